"""A running libvirtd for the tests that hand mplaunch's VM to libvirt.

The tests talk to the system instance (``qemu:///system``) as an operator
would, through virsh. Where an init system runs, libvirtd and virtlogd are
usually up already; in a container (CI) nothing starts them. So
:class:`Daemons` starts whichever of the two does not answer on its socket,
in the foreground as its own child, waits until libvirtd accepts
connections, and at the end stops only what it started: a daemon someone
else runs is left alone.

virtlogd comes first: libvirtd asks it to open each QEMU's log file when a
domain starts (Debian's default ``stdio_handler = "logd"``), and a domain
start fails without it.

/dev/kvm must be open to the user libvirt runs QEMU as (on Debian udev makes
it root:kvm 0660, and libvirt-qemu is in group kvm). Where nothing set it
up, a container's /dev/kvm is often root's alone; then libvirtd, whose probe
of QEMU's capabilities keeps CAP_DAC_OVERRIDE and so finds KVM, judges its
cached capabilities stale on every call (KVM unusable for libvirt-qemu),
probes QEMU again each time, and a ``virsh define`` takes minutes.
:func:`need_libvirt` names that state instead of letting every call crawl.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

URI = "qemu:///system"
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
DAEMON_START_S = 30.0
DAEMON_STOP_S = 30.0
VIRSH_S = 60.0
KVM_DEVICE = Path("/dev/kvm")
QEMU_USER = "libvirt-qemu"  # the user Debian's libvirt runs QEMU as


@dataclass(frozen=True)
class Daemon:
    """One daemon: its program, the Debian package that installs it, and the
    socket on which it answers once it is ready."""

    program: str
    package: str
    socket: Path


VIRTLOGD = Daemon("virtlogd", "libvirt-daemon-system", VIRTLOGD_SOCKET)
LIBVIRTD = Daemon("libvirtd", "libvirt-daemon-system", LIBVIRT_SOCKET)


def need_libvirt() -> str | None:
    """Why the libvirt tests cannot run here, or None."""
    for program, package in (("libvirtd", "libvirt-daemon-system"),
                             ("virtlogd", "libvirt-daemon-system"),
                             ("virsh", "libvirt-clients")):
        if shutil.which(program) is None:
            return f"{program} is not installed (scripts/setup installs {package})"
    if os.geteuid() != 0:
        return "libvirtd's system instance (qemu:///system) needs root"
    return kvm_closed_to(QEMU_USER)


def kvm_closed_to(user: str) -> str | None:
    """Why ``user`` cannot read and write /dev/kvm while it exists, or None
    (no such device or user, or it can)."""
    try:
        st = KVM_DEVICE.stat()
        account = pwd.getpwnam(user)
    except (OSError, KeyError):
        return None
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if st.st_uid == account.pw_uid:
        rw = stat.S_IRUSR | stat.S_IWUSR
    elif st.st_gid in groups:
        rw = stat.S_IRGRP | stat.S_IWGRP
    else:
        rw = stat.S_IROTH | stat.S_IWOTH
    if st.st_mode & rw == rw:
        return None
    owner = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
    return (f"{KVM_DEVICE} ({owner} {stat.S_IMODE(st.st_mode):04o}) is closed to {user}, so "
            "libvirtd probes QEMU again on every call (scripts/setup makes it root:kvm 0660, "
            "as udev does on Debian)")


def answers(path: Path) -> bool:
    """Whether a daemon accepts connections on the Unix socket ``path``.

    A socket file alone proves nothing: a daemon that died leaves it behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class Daemons:
    """virtlogd and libvirtd, each started here only if it was not running."""

    def __init__(self) -> None:
        self.started: list[tuple[Daemon, subprocess.Popen[bytes], Path]] = []
        self._logs: Path | None = None  # made when a daemon is started

    def ensure(self) -> None:
        """Start what does not answer; raise with its log if it cannot start."""
        for daemon in (VIRTLOGD, LIBVIRTD):
            if not answers(daemon.socket):
                self._start(daemon)

    def _start(self, daemon: Daemon) -> None:
        if self._logs is None:
            self._logs = Path(tempfile.mkdtemp(prefix="mplaunch-libvirtd-"))
        log = self._logs / f"{daemon.program}.log"
        program = shutil.which(daemon.program)
        assert program is not None, need_libvirt()
        with open(log, "wb") as out:
            # Its own session: the test run's signals (^C) are not its own.
            proc = subprocess.Popen([program], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd="/", start_new_session=True)
        self.started.append((daemon, proc, log))
        deadline = time.monotonic() + DAEMON_START_S
        while not answers(daemon.socket):
            if proc.poll() is not None:
                raise RuntimeError(f"{daemon.program} exited with {proc.returncode} before it "
                                   f"answered on {daemon.socket}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{daemon.program} did not answer on {daemon.socket} in "
                                   f"{DAEMON_START_S:.0f} s:\n{_tail(log)}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop what this object started (libvirtd before virtlogd), then drop the logs."""
        for _daemon, proc, _log in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(DAEMON_STOP_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.started.clear()
        if self._logs is not None:
            shutil.rmtree(self._logs, ignore_errors=True)
            self._logs = None


@contextlib.contextmanager
def running_daemons() -> Iterator[Daemons]:
    """virtlogd and libvirtd answering for the duration of the block."""
    daemons = Daemons()
    try:
        daemons.ensure()
        yield daemons
    finally:
        daemons.stop()


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One virsh command against the system instance; raises with virsh's
    words when it fails and ``check`` is set."""
    done = subprocess.run(["virsh", "-c", URI, *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=VIRSH_S)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed ({done.returncode}): "
                             f"{done.stderr.strip()}")
    return done


def domains() -> list[str]:
    """The names of every domain libvirt knows, running or not."""
    return virsh("list", "--all", "--name").stdout.split()


def domain_state(name: str) -> str:
    """``running``, ``shut off``, ... as virsh says it."""
    return virsh("domstate", name).stdout.strip()


def wait_shut_off(name: str, timeout: float) -> float:
    """Seconds until the domain is shut off; raises after ``timeout``."""
    start = time.monotonic()
    while (state := domain_state(name)) != "shut off":
        if time.monotonic() - start > timeout:
            raise AssertionError(f"domain {name} still {state} after {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - start


@contextlib.contextmanager
def defined_domain(name: str, xml: Path) -> Iterator[None]:
    """``virsh define`` the file; afterwards the domain is gone, whatever
    happened (destroyed if it still runs, then undefined)."""
    try:
        virsh("define", str(xml))
        yield
    finally:
        # Also after a define that timed out: libvirtd may have finished it.
        if name in domains():
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
