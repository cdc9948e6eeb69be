"""The jail: an exec'd helper that confines itself, then execs the emulator.

Theory of operation: the launcher is a threaded asyncio program, where
running Python between fork and exec (a ``preexec_fn``) is unsafe. So it
spawns ``python -I -m launcher.sandbox.jail ARGS -- COMMAND``, a fresh
single-threaded interpreter that runs the steps below in order, as root,
and ends with one execve of COMMAND. Every step either succeeds or the jail
exits with :data:`EXIT_JAIL` and one line on stderr: it fails closed, and
the launcher's check (:mod:`launcher.sandbox.check`) reports it.

1. New mount, network, IPC, UTS and cgroup namespaces; mounts private.
2. Folders on the interpreter's path that the emulator's uid could not
   traverse are replaced, in this mount namespace only, by a bare tmpfs
   that holds just the needed entry (a Python under /root, say).
3. An empty read-only tmpfs becomes the working folder.
4. Every fd closed but 0, 1, 2 and those passed on purpose.
5. rlimits: fds, address space, no core dumps, no locked memory.
6. Securebits locked so that uid 0 never means capabilities again; the
   bounding and ambient sets emptied.
7. No supplementary groups; gid and uid of this emulator alone (this
   empties the permitted and effective sets); then no new processes
   (RLIMIT_NPROC, counted per uid), parent-death signal, umask 077.
8. no_new_privs; a check that every capability set is empty.
9. Seccomp stage 1 (:data:`launcher.sandbox.profiles.STAGE1_DENY`).
10. execve of COMMAND with an empty environment (but for a test's
    ``MPLAUNCH_FAULT``, see :mod:`emulators.faults`).

A PID namespace is not used: unsharing one moves only the children of the
caller, so the jail would have to fork and stay between the launcher and
the emulator, and the launcher would lose the direct parent-child link it
relies on (exit seen at once, the pid it checks and kills being the
emulator itself). What a PID namespace would hide is covered otherwise: a
distinct uid per emulator stops signals and ptrace, and stage 2 allows
neither kill nor ptrace nor any open of /proc.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import resource
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from emulators.faults import ENV as FAULT_ENV

EXIT_JAIL = 121
"""The jail's exit status when a step failed: the emulator never ran."""

EMPTY_DIR = "/run/mplaunch/.empty"
"""The emulator's working folder; in its mount namespace an empty read-only tmpfs."""

NOFILE = 1024
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
MS_REC = 0x4000
MS_PRIVATE = 0x40000
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

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


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

    def argv(self, command: list[str]) -> list[str]:
        """The launcher's command line: the jail, its settings, then COMMAND."""
        return [
            sys.executable, "-I", "-m", "launcher.sandbox.jail",
            "--uid", str(self.uid), "--gid", str(self.gid),
            "--keep-fds", ",".join(str(fd) for fd in self.keep_fds),
            "--address-space", str(self.address_space), "--nofile", str(self.nofile),
            "--cwd", self.cwd, "--", *command,
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
    resource.setrlimit(resource.RLIMIT_AS, (spec.address_space, spec.address_space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


def drop_capabilities() -> None:
    """Lock securebits and empty the bounding and ambient sets, while still root."""
    _prctl(PR_SET_SECUREBITS, SECUREBITS, "lock securebits")
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient set")


def become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
    os.umask(0o077)


def verify_self(uid: int) -> None:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    for name in CAP_FIELDS:
        if int(fields[name].strip(), 16) != 0:
            raise JailError(f"{name} is {fields[name].strip()}, not 0")
    if fields["NoNewPrivs"].strip() != "1":
        raise JailError("no_new_privs did not hold")
    if {int(x) for x in fields["Uid"].split()} != {uid}:
        raise JailError(f"uids are {fields['Uid'].split()}, not {uid}")
    if fields["Groups"].strip():
        raise JailError(f"supplementary groups remain: {fields['Groups'].strip()}")


def exec_confined(command: list[str]) -> None:
    """Load stage 1 and exec; returns only if the exec failed."""
    from launcher.sandbox import seccomp  # imported (and libseccomp found) by run()

    path = ctypes.create_string_buffer(os.fsencode(command[0]))
    argv = (ctypes.c_char_p * (len(command) + 1))(*[os.fsencode(a) for a in command], None)
    # Empty, but for a test's fault-point arming (launcher/faultplan.py).
    env = [os.fsencode(f"{FAULT_ENV}={v}") for v in [os.environ.get(FAULT_ENV)] if v]
    envp = (ctypes.c_char_p * (len(env) + 1))(*env, None)
    seccomp.load(seccomp.build_stage1(ctypes.addressof(path)))
    sys.stdout.flush()
    sys.stderr.flush()
    _libc.execve(path, argv, envp)
    raise JailError(f"execve {command[0]}: {os.strerror(ctypes.get_errno())}")


def run(spec: JailSpec, command: list[str]) -> None:
    if os.geteuid() != 0:
        raise JailError("needs root (uid change, namespaces, mounts)")
    # Imported now: finding libseccomp may run a helper program, which is
    # impossible once the uid may have no processes.
    import launcher.sandbox.seccomp  # noqa: F401

    enter_namespaces()
    expose(interpreter_paths(), spec.uid, spec.gid)
    empty_cwd(spec.cwd)
    close_fds(spec.keep_fds)
    set_limits(spec)
    drop_capabilities()
    become(spec.uid, spec.gid)
    os.chdir(spec.cwd)
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    verify_self(spec.uid)
    exec_confined(command)


def parse(argv: list[str]) -> tuple[JailSpec, list[str]]:
    p = argparse.ArgumentParser(prog="launcher.sandbox.jail")
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--keep-fds", default="")
    p.add_argument("--address-space", type=int, required=True)
    p.add_argument("--nofile", type=int, default=NOFILE)
    p.add_argument("--cwd", default=EMPTY_DIR)
    p.add_argument("command", nargs="+")
    a = p.parse_args(argv)
    fds = tuple(int(x) for x in a.keep_fds.split(",") if x)
    if a.uid <= 0 or a.gid <= 0:
        raise JailError("refusing to run an emulator as root")
    return JailSpec(a.uid, a.gid, fds, a.address_space, a.nofile, a.cwd), a.command


def main(argv: list[str]) -> int:
    try:
        spec, command = parse(argv)
        run(spec, command)
    except (JailError, OSError, ValueError) as e:
        print(f"mplaunch-jail: cannot apply the sandbox: {e}", file=sys.stderr)
    except Exception as e:  # fail closed whatever went wrong
        print(f"mplaunch-jail: cannot apply the sandbox: {type(e).__name__}: {e}",
              file=sys.stderr)
    return EXIT_JAIL


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
