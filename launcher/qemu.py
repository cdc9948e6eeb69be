"""QEMU as a child: start it unprivileged, talk QMP to it, stop it, always reap it.

mplaunch binds QEMU's QMP socket itself and hands QEMU the listening fd, so
it can connect at once without waiting for a path to appear, and speaks QMP
through QEMU's own client library (qemu.qmp).

QEMU runs through the emulators' jail (:mod:`launcher.sandbox.jail`) under a
uid of its own, leased host-wide (:mod:`launcher.uidpool`) for as long as
it lives: no capabilities, no_new_privs, its own mount, IPC, UTS, network
and cgroup namespaces, a private /dev, only the fds mplaunch opened for it,
and ``-sandbox on`` on top. The launcher checks all of that in
/proc/PID/status before it talks to QEMU, as it does for an emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import children, holdnames
from launcher.emulators import output_pipe, reaped, relay_output
from launcher.sandbox import check
from launcher.sandbox.jail import JailSpec
from launcher.spec import Accel, SandboxMode, Spec
from launcher.status import LOG
from launcher.uidpool import HostUids, Lease
from launcher.vmm import QemuFds, qemu_argv, qemu_jail

if TYPE_CHECKING:  # loaded when a QEMU is started: --backends-only needs no QMP client
    from qemu.qmp import QMPClient

QUIT_TIMEOUT = 5.0
TERM_TIMEOUT = 5.0


def bind_qmp_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(4)
    sock.set_inheritable(True)
    return sock


class QemuStartError(Exception):
    """QEMU cannot be started as the spec asks (no uid left, a file that
    cannot be read); no restart can help."""


F_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def sealed_copy(path: Path) -> int:
    """A sealed memfd holding the file's bytes: QEMU (another uid) can open it
    by /proc/self/fd/N whatever the file's own mode, and cannot change it."""
    fd = os.memfd_create(f"mplaunch-{path.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(path, "rb") as src:
            while chunk := src.read(1 << 20):
                os.write(fd, chunk)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEALS)
        return fd
    except OSError as e:
        os.close(fd)
        raise QemuStartError(f"{path}: cannot read: {e.strerror}") from None


@dataclass
class QemuFiles:
    """The spec's files, opened by mplaunch for QEMU (-1: not used)."""

    kernel: int = -1
    initrd: int = -1
    console: int = -1

    @classmethod
    def open(cls, spec: Spec) -> QemuFiles:
        vm, files = spec.vm, cls()
        try:
            if vm.kernel is not None:
                files.kernel = sealed_copy(vm.kernel)
            if vm.initrd is not None:
                files.initrd = sealed_copy(vm.initrd)
            if vm.console not in ("stdio", "none"):
                # As QEMU's file chardev would, but never through a symlink (root opens it).
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    files.console = os.open(vm.console, flags, 0o640)
                except OSError as e:
                    raise QemuStartError(f"{vm.console}: cannot open the console file: "
                                         f"{e.strerror}") from None
            return files
        except BaseException:
            files.close()
            raise

    def fds(self, qmp_listener: int, controller_fds: Mapping[str, int]) -> QemuFds:
        """`controller_fds`: per controller id, QEMU's end of its link (a
        vhost-user socket, or for an ``lsi`` controller the proxy's socket)."""
        def opt(fd: int) -> int | None:
            return None if fd < 0 else fd
        return QemuFds(qmp_listener, controller_fds, opt(self.kernel), opt(self.initrd),
                       opt(self.console))

    def close(self) -> None:
        for name in ("kernel", "initrd", "console"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


@dataclass(frozen=True, slots=True)
class QemuIdentity:
    """The uid and gid QEMU runs under, and the lease that holds them (None
    for the spec's fixed ``qemu_user``)."""

    uid: int
    gid: int
    lease: Lease | None

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


def qemu_identity(spec: Spec, purpose: str) -> QemuIdentity:
    """QEMU's uid: the spec's ``qemu_user``, or a host-wide lease from its
    uid_range, never one of any emulator's, of this VM or another."""
    user = spec.vm.qemu_user
    if user is not None:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise QemuStartError(f"qemu_user {user!r}: no such user on this host") from None
        return QemuIdentity(pw.pw_uid, pw.pw_gid, None)
    first, last = spec.vm.uid_range
    lease = HostUids(first, last).take(f"{spec.vm.name}/{purpose}")
    if lease is None:
        raise QemuStartError(f"uid_range {first}-{last} has no uid left for QEMU")
    return QemuIdentity(lease.uid, lease.uid, lease)


class Qemu:
    """One QEMU process and our QMP connection to it.

    `exited` completes with its status (asyncio's convention); `relay`
    copies its stderr (a pipe, whose read end `output_fd` is owned here, and
    kept by the holder as :data:`launcher.holdnames.QEMU_OUTPUT` while QEMU lives) to mplaunch's."""

    def __init__(self, name: str, child: children.Child, qmp_path: Path,
                 output_fd: int = -1) -> None:
        self.name = name
        self.child = child
        self.qmp_path = qmp_path
        from qemu.qmp import QMPClient

        self.qmp: QMPClient = QMPClient(name)
        self.exited: asyncio.Task[int] = asyncio.create_task(reaped(child, None))
        self.exited.add_done_callback(lambda _: children.host().unhold(holdnames.QEMU_OUTPUT))
        self.relay: asyncio.Task[None] | None = None
        #: The uid it runs under when mplaunch leased one for it (None: the spec's
        #: fixed qemu_user, or no sandbox).
        self.uid: int | None = None
        if output_fd >= 0:
            self.relay = asyncio.create_task(relay_output(f"qemu {child.pid}", output_fd))

    @classmethod
    def adopt(cls, name: str, child: children.Child, qmp_path: Path, output_fd: int) -> Qemu:
        """QEMU as a previous launcher started it (re-attach): its stderr is
        relayed again from the read end the holder kept (`output_fd`, owned
        from now on; -1: none was kept). QMP is not connected: call
        :meth:`connect` (QEMU takes a new client once the old one is gone)."""
        return cls(name, child, qmp_path, output_fd)

    @classmethod
    async def launch(cls, spec: Spec, accel: Accel, qmp_listener: int,
                     controller_fds: Mapping[str, int], qmp_path: Path,
                     incoming: bool = False) -> Qemu:
        """QEMU for the spec, confined (unless ``sandbox = "off"``) and checked;
        `incoming`: paused, waiting for a migration (launcher.vmm.qemu_argv).
        Raises :class:`QemuStartError` or :class:`launcher.sandbox.check.
        SandboxError`, with nothing left running."""
        files = QemuFiles.open(spec)
        who: QemuIdentity | None = None
        try:
            fds = files.fds(qmp_listener, controller_fds)
            argv = qemu_argv(spec, accel, fds, incoming=incoming)
            jail = None
            if spec.vm.sandbox is not SandboxMode.OFF:
                who = qemu_identity(spec, "qemu")
                jail = qemu_jail(who.uid, who.gid, fds.all(), accel is Accel.KVM)
            qemu = await cls.start(spec.vm.name, argv, fds.all(), qmp_path,
                                   spec.vm.console == "stdio", jail)
        except BaseException:
            if who is not None:
                who.release()
            raise
        finally:
            files.close()
        if who is not None:
            held = who
            qemu.uid = who.uid if who.lease is not None else None
            qemu.exited.add_done_callback(lambda _: held.release())  # reaped: uid free
        return qemu

    @classmethod
    async def start(
        cls, name: str, argv: Sequence[str], pass_fds: Sequence[int], qmp_path: Path,
        stdio: bool, jail: JailSpec | None = None,
    ) -> Qemu:
        """Start QEMU (through :func:`launcher.children.host`, tagged
        ``qemu``; through the jail when `jail` is given, and then only return
        once its confinement is checked). The read end of its stderr pipe is
        given to the holder to keep as :data:`launcher.holdnames.QEMU_OUTPUT`
        until QEMU is reaped."""
        LOG.debug("starting %s", " ".join(argv))
        if jail is not None:  # the jail execs a path, it does not search PATH
            binary = shutil.which(argv[0])
            if binary is None:
                raise QemuStartError(f"{argv[0]}: not found")
            argv = jail.argv([binary, *argv[1:]])
        output, output_w = output_pipe()
        try:
            child = await children.host().spawn(
                "qemu", argv,
                pass_fds=tuple(pass_fds),
                stdin=None if stdio else children.DEVNULL,
                stdout=None if stdio else children.DEVNULL,
                # A pipe mplaunch reads, never mplaunch's own stderr (a log file
                # it could seek in and overwrite).
                stderr=output_w,
                env={} if jail is not None else None,
                # Under mplaunch, QEMU stays in its process group when it owns the
                # terminal (a background group would be stopped by SIGTTIN);
                # otherwise it gets a session of its own, so a terminal's Ctrl-C
                # reaches only mplaunch, which stops it in order.
                session=not (stdio and sys.stdin.isatty()),
            )
        except BaseException:
            os.close(output)
            raise
        finally:
            os.close(output_w)
        children.host().hold(holdnames.QEMU_OUTPUT, "pipe", [output])
        qemu = cls(name, child, qmp_path, output)
        if jail is None:
            LOG.warning("QEMU started as mplaunch's own user (pid %d): sandbox = \"off\"",
                        child.pid)
            return qemu
        try:
            await check.wait_confined("QEMU", child.pid,
                                      check.Expected(jail.uid, jail.gid, check.QEMU_STAGES),
                                      qemu.exited, what="QEMU")
        except BaseException:
            child.kill()
            await asyncio.shield(qemu.exited)
            raise
        LOG.debug("QEMU confined (pid %d, uid %d)", child.pid, jail.uid)
        return qemu

    @property
    def pid(self) -> int:
        return self.child.pid

    async def connect(self, timeout: float = 30.0) -> None:
        """Connect QMP; fails early if QEMU exits first."""
        connecting = asyncio.create_task(self.qmp.connect(str(self.qmp_path)))
        try:
            done, _ = await asyncio.wait(
                {connecting, self.exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not connecting.done():  # given up on, or we were cancelled: not left behind
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
            elif not connecting.cancelled():
                connecting.exception()  # seen, whatever it was: never "never retrieved"
        if connecting in done:
            connecting.result()
            return
        if self.exited in done:
            raise RuntimeError(f"QEMU exited with status {self.exited.result()} during start-up")
        raise TimeoutError(f"QEMU's QMP did not answer within {timeout:.0f} s")

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        async for event in self.qmp.events:
            name = str(event["event"])
            data = event.get("data", {})
            yield name, data if isinstance(data, dict) else {}

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, arguments)

    async def stop(self) -> int:
        """quit through QMP, then SIGTERM, then SIGKILL; always reaps."""
        quit_sent = False
        if not self.exited.done() and self.qmp.runstate.name == "RUNNING":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), QUIT_TIMEOUT)
                quit_sent = True
        # Without a quit on its way (QMP not up yet), waiting would only let the guest run on.
        steps = (
            ((None, QUIT_TIMEOUT),) if quit_sent else ()
        ) + ((signal.SIGTERM, TERM_TIMEOUT), (signal.SIGKILL, None))
        for sig, timeout in steps:
            if self.exited.done():
                break
            if sig is not None:
                LOG.debug("sending %s to QEMU (pid %d)", sig.name, self.pid)
                self.child.send_signal(sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        await self.disconnect()
        status = await self.exited
        if self.relay is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.relay), TERM_TIMEOUT)
        return status

    async def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
