"""The jail: an exec'd helper that confines itself, then runs the emulator (or execs QEMU).

Theory of operation: the launcher is a threaded asyncio program, where
running Python between fork and exec (a ``preexec_fn``) is unsafe. So it
spawns ``python -I -m launcher.sandbox.jail ARGS -- COMMAND``, a fresh
single-threaded interpreter that runs the steps below in order, as root,
and ends with one execve of COMMAND. Every step either succeeds or the jail
exits with :data:`EXIT_JAIL` and one line on stderr: it fails closed, and
the launcher's check (:mod:`launcher.sandbox.check`) reports it.

1. New mount, network, IPC, UTS and cgroup namespaces; mounts private.
2. For a Python emulator (``--new-root``): its program is loaded now, as
   root, while the host's files are still in view: the emulator's whole
   import closure (:data:`PRELOAD`, and a script's own imports) and the
   compiled code of COMMAND. Then an empty read-only tmpfs becomes the
   root (pivot_root, the old root detached with MNT_DETACH): from here on
   no path resolves to a host file, whatever the syscall (a stat with
   AT_EMPTY_PATH and a path, say) and whatever the uid could read.
   For a program exec'd with ``--view`` (QEMU, which opens its libraries,
   modules and firmware by path): the root becomes a read-only tmpfs
   holding only the named host paths (read-only, nosuid binds), a /proc
   of its own and a private /dev with only the ``--dev`` nodes (``kvm``
   made for this uid); pivot_root, old root detached as above.
   Otherwise (the host's view): folders on the interpreter's path that
   the uid could not traverse are covered by a bare tmpfs holding just
   the needed entry; ``--dev`` gives a private /dev; an empty read-only
   tmpfs becomes the working folder.
3. Every fd closed but 0, 1, 2 and those passed on purpose.
4. rlimits: fds, address space, no core dumps, no locked memory.
5. Securebits locked so that uid 0 never means capabilities again; the
   bounding and ambient sets emptied.
6. No supplementary groups; gid and uid of this process alone (this
   empties the permitted and effective sets); then no new processes
   (RLIMIT_NPROC, counted per uid; QEMU gets threads), parent-death
   signal (the uid change cleared the one the spawner set), and a check
   that the parent is still the one the jail started under: one that died
   before the signal was set again would leave the jail running; umask 077.
7. no_new_privs; a check that every capability set is empty.
8. Seccomp stage 1 (:data:`launcher.sandbox.profiles.STAGE1_DENY`; with
   ``--no-spawn`` also no new process, :data:`~launcher.sandbox.profiles.NO_SPAWN`).
9. The environment emptied (but for a test's ``MPLAUNCH_FAULT``, see
   :mod:`emulators.faults`); then COMMAND: with ``--new-root`` its code,
   already compiled, runs in this very interpreter (execve is refused
   outright, there is nothing left to exec); otherwise one execve.

Why the Python emulator is not exec'd: a new interpreter would have to
read its modules from files after the pivot, so the root would have to
hold the Python prefix and the project, host files all. Loading first and
pivoting after, in one process, is minijail's order (everything needed is
open or loaded before the view goes away) without a single host path left.
The cost: the emulator's interpreter is the jail's (started ``-I``, by
mplaunch, with an empty environment), and the jail's small module set
stays in its memory.

A PID namespace is not used: unsharing one moves only the children of the
caller, so the jail would have to fork and stay between the launcher and
the emulator, and the launcher would lose the direct parent-child link it
relies on (exit seen at once, the pid it checks and kills being the
emulator itself). What a PID namespace would hide is covered otherwise: a
distinct uid per emulator stops signals and ptrace, and stage 2 allows
neither kill nor ptrace nor any open of /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.machinery
import importlib.util
import os
import resource
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType
from typing import TYPE_CHECKING

from emulators.faults import ENV as FAULT_ENV

if TYPE_CHECKING:
    from pathlib import Path

# The emulator runs in this interpreter (``--new-root``): every module imported
# here stays loaded in it, so the jail keeps to small ones (no argparse,
# pathlib or ctypes.util, which would bring subprocess, tempfile and shutil);
# the QEMU-only steps import pathlib when they run.

EXIT_JAIL = 121
"""The jail's exit status when a step failed: the emulator never ran."""

EXIT_ORPHANED = 127
"""The jail's exit status when its parent (the launcher or the holder) died
while the jail changed uid: nobody would supervise what it ran."""

EMPTY_DIR = "/run/mplaunch/.empty"
"""The emulator's working folder; in its mount namespace an empty read-only tmpfs."""

NEW_ROOT = "/run/mplaunch/.root"
"""Where the empty root is mounted before pivot_root (in the jail's namespace only)."""

PRELOAD = ("emulators.process",)
"""Imported before the pivot: the Python emulator's import closure (the
modules it imports later, at lockdown, are already in it)."""

DEVICES = ("null", "zero", "urandom", "random", "kvm")
"""The nodes a private /dev (``--dev``) may hold."""

UNLIMITED = -1
"""``address_space`` for a process that needs no bound (QEMU maps as it needs)."""

NOFILE = 1024
SPARE_NPROC = 2
"""A warm spare's RLIMIT_NPROC (per uid, threads counted, its uid its own):
itself and the one thread it waits in as a hot standby
(launcher.statestore.liveness); its seccomp filter allows that thread's
clone and no other (profiles.STANDBY_THREAD). Every other emulator: 0."""
ADDRESS_SPACE_HEADROOM = 1 << 30
"""Address space for the interpreter itself, added to the guest RAM it maps."""

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REMOUNT = 0x20
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64; glibc has no wrapper
PR_SET_PDEATHSIG = 1
PR_SET_SECUREBITS = 28
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# SECBIT_NOROOT, SECBIT_NO_SETUID_FIXUP (left off: the fixup empties the sets
# at setuid), SECBIT_KEEP_CAPS (off), SECBIT_NO_CAP_AMBIENT_RAISE: each with its lock.
SECUREBITS = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7)
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

_libc = ctypes.CDLL("libc.so.6", use_errno=True)

TRACE: Callable[[str], None] | None = None
"""Called with each step's name as :func:`run` finishes it (bench/coldstart.py
times the steps with it); None in production."""


def _mark(step: str) -> None:
    if TRACE is not None:
        TRACE(step)


class JailError(Exception):
    """A confinement step failed; the emulator must not be started."""


@dataclass(frozen=True, slots=True)
class JailSpec:
    """What the launcher asks of the jail for one emulator."""

    uid: int
    gid: int
    keep_fds: tuple[int, ...]
    address_space: int
    nofile: int = NOFILE
    cwd: str = EMPTY_DIR
    #: Run COMMAND (this interpreter, ``-I -m MODULE`` or ``-I SCRIPT``) in
    #: process, under an empty root (the Python emulator).
    new_root: bool = False
    #: Threads and processes this uid may have (QEMU runs threads).
    nproc: int = 0
    #: A private /dev holding only these nodes (empty: the host's /dev view).
    dev: tuple[str, ...] = ()
    #: Exec COMMAND under a root holding only these host paths, read-only
    #: (with /proc and the private /dev); empty: the host's view.
    view: tuple[str, ...] = ()
    #: Stage 1 also refuses new processes (threads only): fork, vfork, clone
    #: without CLONE_THREAD, clone3 (``profiles.NO_SPAWN``). For an exec'd
    #: COMMAND; the in-process emulator's stage 2 forbids all of them already.
    no_spawn: bool = False

    def argv(self, command: list[str]) -> list[str]:
        """The launcher's command line: the jail, its settings, then COMMAND."""
        return [
            sys.executable, "-I", "-m", "launcher.sandbox.jail",
            "--uid", str(self.uid), "--gid", str(self.gid),
            "--keep-fds", ",".join(str(fd) for fd in self.keep_fds),
            "--address-space", str(self.address_space), "--nofile", str(self.nofile),
            "--cwd", self.cwd, "--nproc", str(self.nproc), "--dev", ",".join(self.dev),
            "--view", ",".join(self.view),
            *(["--new-root"] if self.new_root else []),
            *(["--no-spawn"] if self.no_spawn else []), "--", *command,
        ]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]),
           f"mount {target}")


def _prctl(option: int, arg: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), what)


def enter_namespaces() -> None:
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    _check(_libc.unshare(flags), "unshare (mount, net, ipc, uts, cgroup namespaces)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def _blocking_parent(path: Path, uid: int, gid: int) -> tuple[Path, str] | None:
    """The first folder on `path` that `uid` may not traverse, and the entry under it."""
    from pathlib import Path

    current = Path("/")
    for part in path.parts[1:]:
        st = os.stat(current)
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return current, part
        current = current / part
    return None


def interpreter_paths() -> list[Path]:
    """What the emulator's interpreter must reach: its prefixes and the packages."""
    from pathlib import Path

    here = Path(__file__).resolve()
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(),
             Path(sys.executable).resolve().parent, here.parents[2]}
    return sorted(paths)


def expose(paths: list[Path], uid: int, gid: int) -> None:
    """Make `paths` traversable by `uid` in this mount namespace only.

    A folder in the way is covered by a tmpfs holding only the entries
    needed, each bind-mounted from the original; the rest of the folder
    (a home directory, say) stays hidden from the emulator.
    """
    for _ in range(8):
        blocked: dict[Path, set[str]] = {}
        for p in paths:
            found = _blocking_parent(p, uid, gid)
            if found is not None:
                blocked.setdefault(found[0], set()).add(found[1])
        if not blocked:
            return
        folder = min(blocked, key=lambda f: len(f.parts))
        handles = {name: os.open(folder / name, os.O_PATH) for name in blocked[folder]}
        _mount("tmpfs", str(folder), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for name, fd in handles.items():
            target = folder / name
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                target.mkdir()
            else:
                target.touch()
            _mount(f"/proc/self/fd/{fd}", str(target), None, MS_BIND | MS_REC)
            os.close(fd)
    raise JailError(f"cannot make {paths} reachable for uid {uid}")


def empty_cwd(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
           "mode=0111,size=4k")


def private_dev(names: tuple[str, ...], uid: int, gid: int, at: str = "/dev") -> None:
    """A /dev (at `at`) of this mount namespace holding only `names`: QEMU
    reaches no other device node, and ``kvm`` (root's only, on most hosts)
    is a node of this uid alone."""
    rdevs = {}
    for name in names:
        if name not in DEVICES:
            raise JailError(f"no device {name!r} may be given (allowed: {', '.join(DEVICES)})")
        st = os.stat(f"/dev/{name}")
        if not stat.S_ISCHR(st.st_mode):
            raise JailError(f"/dev/{name} is not a character device")
        rdevs[name] = st.st_rdev
    _mount("tmpfs", at, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, rdev in rdevs.items():
        path = f"{at}/{name}"
        os.mknod(path, stat.S_IFCHR | 0o600, rdev)
        if name == "kvm":
            os.chown(path, uid, gid)
        else:
            os.chmod(path, 0o666)
    # No MS_NODEV, here or on the tmpfs: its nodes must open.
    _mount(None, at, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


@dataclass(frozen=True, slots=True)
class Program:
    """COMMAND loaded for a run in process: its code and its ``sys.argv``."""

    code: CodeType
    argv: list[str]
    spec: importlib.machinery.ModuleSpec | None


def _preload(source: str, path: str) -> None:
    """Import every absolute import a script names, anywhere in it."""
    import ast

    for node in ast.walk(ast.parse(source, path)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            # A name imported from a module, not a module; or absent anyway.
            with contextlib.suppress(ImportError):
                importlib.import_module(name)


def load_program(command: list[str]) -> Program:
    """Everything COMMAND will import, imported; its code compiled. Only this
    interpreter in isolated mode is accepted: the command runs in it."""
    if len(command) < 3 or command[1] != "-I" or (
            os.path.realpath(command[0]) != os.path.realpath(sys.executable)):
        raise JailError(f"--new-root runs only '{sys.executable} -I ...', not {command[:3]}")
    for name in PRELOAD:
        importlib.import_module(name)
    if command[2] == "-m" and len(command) >= 4:
        spec = importlib.util.find_spec(command[3])
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(command[3] + ".__main__")
        if spec is None or spec.loader is None or spec.origin is None:
            raise JailError(f"no module {command[3]!r}")
        code = spec.loader.get_code(spec.name)  # type: ignore[attr-defined]
        return Program(code, [spec.origin, *command[4:]], spec)
    path = command[2]
    with open(path, encoding="utf-8") as f:
        source = f.read()
    _preload(source, path)
    return Program(compile(source, path, "exec"), [path, *command[3:]], None)


def _pivot_into(path: str) -> None:
    """`path` (a mount point) becomes "/", the old root is detached."""
    os.chdir(path)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def pivot_to_empty_root() -> None:
    """An empty read-only tmpfs becomes "/", the old root is detached: no
    path of this process resolves to a host file any more."""
    os.makedirs(NEW_ROOT, mode=0o755, exist_ok=True)
    _mount("tmpfs", NEW_ROOT, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
           "mode=0111,size=4k")
    _pivot_into(NEW_ROOT)


def pivot_to_view(view: tuple[str, ...], dev: tuple[str, ...], uid: int, gid: int) -> None:
    """A root holding only `view` (read-only binds; a symlink is copied as a
    symlink, a missing path skipped), a /proc of its own and a private /dev:
    for a program that opens its libraries and data files by path (QEMU)."""
    os.makedirs(NEW_ROOT, mode=0o755, exist_ok=True)
    _mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    for path in view:
        if not os.path.isabs(path) or not os.path.lexists(path):
            continue
        target = NEW_ROOT + path
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if os.path.islink(path):
            os.symlink(os.readlink(path), target)
            continue
        if os.path.isdir(path):
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o444))
        _mount(path, target, None, MS_BIND | MS_REC)
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.mkdir(NEW_ROOT + "/proc", 0o555)
    _mount("proc", NEW_ROOT + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(NEW_ROOT + "/dev", 0o755)
    private_dev(dev, uid, gid, at=NEW_ROOT + "/dev")
    _mount(None, NEW_ROOT, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _pivot_into(NEW_ROOT)


def close_fds(keep: tuple[int, ...]) -> None:
    wanted = sorted({0, 1, 2, *keep})
    start = 0
    for fd in wanted:
        if start < fd:  # closerange(n, n) would close everything from n on
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, max(start + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    for fd in keep:
        os.set_inheritable(fd, True)


def set_limits(spec: JailSpec) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec.nofile, spec.nofile))
    space = resource.RLIM_INFINITY if spec.address_space == UNLIMITED else spec.address_space
    resource.setrlimit(resource.RLIMIT_AS, (space, space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


def drop_capabilities(last: int) -> None:
    """Lock securebits and empty the bounding and ambient sets, while still root."""
    _prctl(PR_SET_SECUREBITS, SECUREBITS, "lock securebits")
    for cap in range(last + 1):
        _prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient set")


def become(uid: int, gid: int, nproc: int = 0, parent: int | None = None) -> None:
    """Drop to `uid`/`gid`, then die with `parent` again (the uid change
    cleared the parent-death signal); if `parent` (the pid the jail started
    under) died before the signal was set, it never comes: exit 127 now."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
    if parent is not None and os.getppid() != parent:
        os._exit(EXIT_ORPHANED)
    os.umask(0o077)


def verify_self(uid: int, status: str) -> None:
    """`status`: this process's /proc status, read now (through an fd opened
    before the pivot, when /proc is gone from the view)."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    for name in CAP_FIELDS:
        if int(fields[name].strip(), 16) != 0:
            raise JailError(f"{name} is {fields[name].strip()}, not 0")
    if fields["NoNewPrivs"].strip() != "1":
        raise JailError("no_new_privs did not hold")
    if {int(x) for x in fields["Uid"].split()} != {uid}:
        raise JailError(f"uids are {fields['Uid'].split()}, not {uid}")
    if fields["Groups"].strip():
        raise JailError(f"supplementary groups remain: {fields['Groups'].strip()}")


def _kept_environment() -> list[tuple[str, str]]:
    """Empty, but for a test's fault-point arming (launcher/faultplan.py)."""
    return [(FAULT_ENV, v) for v in [os.environ.get(FAULT_ENV)] if v]


def exec_confined(command: list[str], no_spawn: bool = False) -> None:
    """Load stage 1 (with :data:`~launcher.sandbox.profiles.NO_SPAWN` when
    `no_spawn`) and exec; returns only if the exec failed."""
    from launcher.sandbox import profiles, seccomp  # imported by run()

    path = ctypes.create_string_buffer(os.fsencode(command[0]))
    argv = (ctypes.c_char_p * (len(command) + 1))(*[os.fsencode(a) for a in command], None)
    env = [os.fsencode(f"{k}={v}") for k, v in _kept_environment()]
    envp = (ctypes.c_char_p * (len(env) + 1))(*env, None)
    stage1 = profiles.stage1_no_spawn if no_spawn else profiles.stage1_deny
    seccomp.load(seccomp.build_deny_list(stage1(ctypes.addressof(path))))
    sys.stdout.flush()
    sys.stderr.flush()
    _libc.execve(path, argv, envp)
    raise JailError(f"execve {command[0]}: {os.strerror(ctypes.get_errno())}")


def confine_in_place(program: Program) -> None:
    """Load stage 1 (no execve at all) and leave only the kept environment;
    the caller then runs `program`."""
    from launcher.sandbox import profiles, seccomp

    no_exec = profiles.Rule("execve", "nothing to exec: the program runs in this interpreter")
    stage1 = seccomp.build_deny_list((*profiles.STAGE1_DENY, no_exec))
    _mark("stage 1 built")
    seccomp.load(stage1)
    kept = _kept_environment()
    os.environ.clear()
    os.environ.update(kept)
    sys.argv = list(program.argv)


def run(spec: JailSpec, command: list[str]) -> Program | None:
    """Confine this process. With ``new_root`` return the program to run in
    it; otherwise exec COMMAND (returns only by raising)."""
    if os.geteuid() != 0:
        raise JailError("needs root (uid change, namespaces, mounts)")
    parent = os.getppid()  # the spawner, whose death must end this process
    # Imported now: finding libseccomp may run a helper program, which is
    # impossible once the uid may have no processes.
    # Both are needed after the view may have changed (the root pivoted).
    import launcher.sandbox.profiles  # noqa: F401
    import launcher.sandbox.seccomp  # noqa: F401

    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    _mark("jail set-up")
    enter_namespaces()
    _mark("namespaces")
    program = load_program(command) if spec.new_root else None
    _mark("program loaded")
    if program is None and spec.view:
        pivot_to_view(spec.view, spec.dev, spec.uid, spec.gid)
    elif program is None:
        expose(interpreter_paths(), spec.uid, spec.gid)
        if spec.dev:
            private_dev(spec.dev, spec.uid, spec.gid)
        empty_cwd(spec.cwd)
    close_fds(spec.keep_fds)
    _mark("fds closed")
    status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        set_limits(spec)
        if program is not None:
            pivot_to_empty_root()
        _mark("limits, root pivoted")
        drop_capabilities(last_cap)
        become(spec.uid, spec.gid, spec.nproc, parent)
        os.chdir("/" if program is not None or spec.view else spec.cwd)
        _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
        _mark("capabilities, uid")
        verify_self(spec.uid, os.pread(status_fd, 1 << 16, 0).decode())
        _mark("self-check")
    finally:
        os.close(status_fd)
    if program is None:
        exec_confined(command, spec.no_spawn)
        raise JailError("exec returned")
    confine_in_place(program)
    _mark("stage 1 loaded")
    return program


def run_program(program: Program) -> None:
    """COMMAND's code as ``__main__`` (its SystemExit ends the process)."""
    main = type(sys)("__main__")
    main.__dict__.update({
        "__file__": program.argv[0], "__spec__": program.spec,
        "__package__": program.spec.parent if program.spec else None,
        "__loader__": program.spec.loader if program.spec else None,
    })
    sys.modules["__main__"] = main
    exec(program.code, main.__dict__)


_INT_OPTIONS = ("--uid", "--gid", "--address-space", "--nofile", "--nproc")
_STR_OPTIONS = ("--keep-fds", "--cwd", "--dev", "--view")


def parse(argv: list[str]) -> tuple[JailSpec, list[str]]:
    """``--name value`` options (and the flags ``--new-root``, ``--no-spawn``),
    ``--``, COMMAND."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    i = 0
    while i < len(argv) and argv[i] != "--":
        name = argv[i]
        if name in ("--new-root", "--no-spawn"):
            flags.add(name)
            i += 1
            continue
        if name not in _INT_OPTIONS + _STR_OPTIONS or i + 1 >= len(argv):
            raise JailError(f"bad option {name!r}")
        values[name] = argv[i + 1]
        i += 2
    command = argv[i + 1:]
    missing = [n for n in ("--uid", "--gid", "--address-space") if n not in values]
    if missing or not command:
        raise JailError(f"missing {', '.join(missing) or 'COMMAND'}")
    ints = {n: int(values[n]) for n in _INT_OPTIONS if n in values}
    if ints["--uid"] <= 0 or ints["--gid"] <= 0:
        raise JailError("refusing to run an emulator as root")
    fds = tuple(int(x) for x in values.get("--keep-fds", "").split(",") if x)
    dev = tuple(x for x in values.get("--dev", "").split(",") if x)
    view = tuple(x for x in values.get("--view", "").split(",") if x)
    spec = JailSpec(ints["--uid"], ints["--gid"], fds, ints["--address-space"],
                    ints.get("--nofile", NOFILE), values.get("--cwd", EMPTY_DIR),
                    "--new-root" in flags, ints.get("--nproc", 0), dev, view,
                    "--no-spawn" in flags)
    return spec, command


def main(argv: list[str]) -> int:
    try:
        spec, command = parse(argv)
        program = run(spec, command)
    except (JailError, OSError, ValueError) as e:
        print(f"mplaunch-jail: cannot apply the sandbox: {e}", file=sys.stderr)
    except Exception as e:  # fail closed whatever went wrong
        print(f"mplaunch-jail: cannot apply the sandbox: {type(e).__name__}: {e}",
              file=sys.stderr)
    else:
        if program is not None:
            run_program(program)  # confined: from here on it is the emulator's
            return 0
    return EXIT_JAIL


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
