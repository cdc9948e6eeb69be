"""The fork-server template: the emulator's code loaded once, each start forked from it.

Theory of operation. A confined emulator used to start as a fresh
interpreter: ``python -I -m launcher.sandbox.jail ... --new-root -- python
-I -m emulators ...``, exec'd by the holder. About 110 of its ~120 ms
(bench/coldstart.py) were the interpreter starting and importing the jail
and the emulator's code; the confinement itself takes 2 to 3 ms. The holder
therefore loads that code once (:func:`load`, at its start, before it
listens) and, for a spawn whose command line is exactly that jail running
the Python emulator (:func:`jailed_emulator`), forks and runs the jail's
``main`` in the forked child (:func:`run_jail`) instead of exec'ing an
interpreter that would load the same code again. Everything after the fork
is what the exec'd interpreter would have done, in the same order: the
same argument parsing, namespaces, program load (already imported: instant),
fd closing, pivot to the empty root, capabilities, uid, no_new_privs,
self-check, stage 1, then the emulator's ``main`` and its own stage 2; the
launcher checks the result through /proc as before
(:func:`launcher.sandbox.check.wait_confined`).

Why in the holder and not in a template process of its own: the holder is
already single-threaded (fork is safe and Python may run in the child), a
subreaper, and the parent of every child, so the forked emulator is its
direct child with no re-parenting, its exit reaches the holder's reaper, its
pidfd and parent-death signal are the holder's as for an exec'd child, and
nothing changes for the launcher or for a launcher that re-attaches. A
separate template would need ``CLONE_PARENT`` or a double fork to give its
children to the holder, one more process, and its own death handling.

What the fork carries over, and what is done about it:

- fds: the holder's child set-up (:func:`launcher.holder.child.setup`)
  closes every fd but the placed ones, as before an exec; the holder's
  socket objects still name their old numbers, so the child never returns
  into the holder's code (every way out of :func:`run_jail` is ``os._exit``:
  no finaliser of the holder's closes an fd that is the emulator's now);
  Python's signal wakeup fd (the holder's pipe, a number the child may
  reuse) is unset;
- memory: the holder's heap. What it holds: names and fd numbers of held
  entries, its children's tags and pids, and the spawn requests it got
  (QEMU's and the emulators' command lines, which name run-folder paths and
  the guest's kernel command line, which every emulator can read in the
  guest RAM it maps anyway; environments empty under the sandbox, but for
  a test's fault arming). No key, no file content, no image data: the
  holder is handed fds, never what is behind them. The holder itself is
  started with an empty environment (:func:`launcher.holder.client.
  start_holder`), so nothing of the launcher's environment is in it. Python's hash seed is
  the holder's, shared by the emulators of one VM;
- signals: a fresh interpreter's dispositions (SIGPIPE and SIGXFSZ
  ignored, SIGINT raising KeyboardInterrupt), the mask emptied;
- state of modules: logging's handlers (the holder's) removed, the
  environment replaced by the spawn's, the fault arming read from it again
  (:mod:`emulators.faults` reads it at import);
- its command line: the holder's, until :func:`_show_argv` points the
  kernel's view of it (``/proc/PID/cmdline``, ``ps``, ``pgrep -f``) at the
  spawn's argv, as an exec would have shown it (PR_SET_MM, while the child
  still has CAP_SYS_RESOURCE);
- code: the template's. If a source file of the project changed since
  :func:`load` (an upgrade installed new code: ``upgrade-emulators`` must
  get it), the template's modules are dropped and imported again from the
  files before the fork (:func:`_current`); if that fails the holder execs,
  as before.

``gc.freeze()`` after loading, and again before each fork, moves every
object to the permanent generation: the collector in a child never walks
(and so never writes to) the template's objects, which keeps their pages
shared between the holder and every emulator.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import NoReturn

LOG = logging.getLogger("mplaunch.holder")

JAIL_MODULE = "launcher.sandbox.jail"
EMULATOR_MODULE = "emulators"
PROJECT_PACKAGES = ("launcher", "emulators")
"""Packages whose loaded source files are watched for an upgrade."""

_sources: dict[str, tuple[int, int]] = {}
_loaded = False
_failed_at = 0.0
RETRY_LOAD_S = 10.0
"""After a failed load, how long spawns exec before the next try."""


def load() -> bool:
    """Import the jail, the seccomp modules and the emulator's import closure;
    freeze the collector's view of them. False (logged) if that failed:
    every spawn then execs."""
    global _loaded, _failed_at
    try:
        from launcher.sandbox import jail, profiles, seccomp  # noqa: F401

        for name in jail.PRELOAD:
            importlib.import_module(name)
    except Exception as e:  # any failure: the exec path still works
        _failed_at = time.monotonic()
        LOG.warning("holder: no emulator template (%s: %s); emulators start by exec",
                    type(e).__name__, e)
        return False
    _sources.clear()
    _sources.update(_project_sources())
    _loaded = True
    gc.collect()
    gc.freeze()
    return True


def _project_sources() -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every loaded module file of the project."""
    found: dict[str, tuple[int, int]] = {}
    for name, module in list(sys.modules.items()):
        if name.split(".", 1)[0] not in PROJECT_PACKAGES:
            continue
        path = getattr(module, "__file__", None)
        if not path:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        found[path] = (st.st_mtime_ns, st.st_size)
    return found


def _changed() -> str | None:
    """The first loaded project file that is no longer what was loaded."""
    for path, seen in _sources.items():
        try:
            st = os.stat(path)
            now = (st.st_mtime_ns, st.st_size)
        except OSError:
            now = (-1, -1)
        if now != seen:
            return path
    return None


def _current() -> bool:
    """Whether the template holds the installed code; if a file changed, the
    template is loaded again from the files (once per change: about as long
    as one exec'd start). False if that failed: exec then."""
    global _loaded
    if not _loaded:  # it failed to load: try again now and then (a file being written)
        if time.monotonic() - _failed_at < RETRY_LOAD_S:
            return False
        return _reload()
    changed = _changed()
    if changed is None:
        return True
    LOG.warning("holder: %s changed since the emulator template was loaded; loading "
                "the template again", changed)
    return _reload()


def _reload() -> bool:
    global _loaded
    _loaded = False
    gc.unfreeze()  # the old modules' objects may go once they are unreferenced
    for name in list(sys.modules):
        if _reloadable(name):
            del sys.modules[name]
    gc.collect()
    return load() and _changed() is None


def _reloadable(name: str) -> bool:
    """A module of the template's: the project's, but for the holder's own
    (which this process runs) and this module."""
    top = name.split(".", 1)[0]
    if top == EMULATOR_MODULE:
        return True
    return top == "launcher" and name not in ("launcher", __name__) and \
        not name.startswith("launcher.holder")


def jailed_emulator(argv: Sequence[str]) -> bool:
    """Whether `argv` is the jail running the Python emulator in process
    (``PYTHON -I -m launcher.sandbox.jail OPTIONS --new-root ... -- PYTHON
    -I -m emulators ...``, this interpreter both times), and the loaded
    template is still the installed code: then a fork of this process runs
    exactly what an exec of `argv` would."""
    if len(argv) < 5 or list(argv[1:4]) != ["-I", "-m", JAIL_MODULE]:
        return False
    if not _same_interpreter(argv[0]):
        return False
    try:
        split = list(argv).index("--")
    except ValueError:
        return False
    options, command = list(argv[4:split]), list(argv[split + 1:])
    if "--new-root" not in options or len(command) < 4:
        return False
    if command[1:4] != ["-I", "-m", EMULATOR_MODULE] or not _same_interpreter(command[0]):
        return False
    return _current()


def _same_interpreter(path: str) -> bool:
    try:
        return os.path.samefile(path, sys.executable)
    except OSError:
        return False


def before_fork() -> None:
    """In the template, just before a fork: nothing buffered that the child
    would write again, every object frozen."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    gc.freeze()


def run_jail(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    """In the forked child (fds already placed): become what an exec of
    `argv` with `env` would have started, run it, and leave with its exit
    status, never returning into the template's code."""
    code = 1
    try:
        _fresh_interpreter_state(env)
        _show_argv(argv)
        from launcher.sandbox import jail

        code = jail.main(list(argv[4:]))
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:  # noqa: BLE001 (as an interpreter would: the traceback, status 1)
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except BaseException:  # noqa: BLE001,S110 (leaving whatever happens)
                pass
        os._exit(code)


def _exit_code(code: object) -> int:
    """SystemExit's code as the interpreter turns it into a status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


PR_SET_MM = 35
PR_SET_MM_MAP = 14
_argv_buffer: object = None  # the shown command line must outlive the call


def _show_argv(argv: Sequence[str]) -> None:
    """Make /proc/self/cmdline show `argv` (what an exec of it would show).

    PR_SET_MM_MAP with every other field as it is (read from
    /proc/self/stat and the program break); unlike the single-field
    PR_SET_MM calls it needs no CAP_SYS_RESOURCE, which a container may
    lack. A failure only leaves the holder's command line shown."""
    import ctypes

    global _argv_buffer
    data = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    buf = ctypes.create_string_buffer(data, len(data))
    with open("/proc/self/stat", "rb") as f:
        fields = [int(x) for x in f.read().rpartition(b")")[2].split()[1:]]

    def field(n: int) -> int:  # proc(5)'s numbering: field 4 is fields[0]
        return fields[n - 4]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    mm = (ctypes.c_uint64 * 13)(  # struct prctl_mm_map: 11 addresses, auxv, two u32
        field(26), field(27), field(45), field(46), field(47), libc.sbrk(0) or 0,
        field(28), ctypes.addressof(buf), ctypes.addressof(buf) + len(data),
        field(50), field(51), 0, 0xFFFFFFFF << 32)  # auxv NULL, auxv_size 0, exe_fd -1
    ulong = ctypes.c_ulong
    if libc.prctl(PR_SET_MM, ulong(PR_SET_MM_MAP), ulong(ctypes.addressof(mm)),
                  ulong(ctypes.sizeof(mm)), ulong(0)) != 0:
        print(f"mplaunch-template: command line not shown: "
              f"{os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return
    _argv_buffer = buf


def _fresh_interpreter_state(env: Mapping[str, str]) -> None:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Whatever the holder inherited from the shell that started mplaunch (a
    # background job ignores SIGQUIT, nohup SIGHUP) or handles itself is not
    # the child's: it starts with these at their defaults.
    for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    os.environ.clear()
    os.environ.update(env)
    from emulators import faults

    faults.arm(faults.parse(os.environ.get(faults.ENV, "")))
    gc.enable()
