"""The remote LSI process: QEMU's ``x-remote`` machine emulating one LSI53C895A.

Theory of operation. The VM's QEMU forwards the controller's PCI config and
BAR accesses over an "mpqemu" link (an x-pci-proxy-dev); this module
starts the process at the other end. It is QEMU itself
(``qemu-system-x86_64 -machine x-remote``), started as mplaunch starts the
VM's QEMU: through the jail (:mod:`launcher.sandbox.jail`), under a uid of
its own, with no capabilities, no_new_privs, its own namespaces, a root
holding only QEMU's files (:data:`launcher.vmm.QEMU_VIEW`), stage 1 with
new processes refused (``JailSpec.no_spawn``), and QEMU's own ``-sandbox``
on top. It opens nothing by path of the spec's:

- each disk image comes as fds mplaunch opened (an O_RDWR and an O_RDONLY
  one, or only O_RDONLY for a read-only disk) in an fd set per SCSI target
  (``-add-fd``); QEMU's file driver opens ``/dev/fdset/S`` and gets a dup
  of the fd whose access mode it asks for;
- the mpqemu link and the QMP monitor are socketpairs made here; mplaunch
  keeps one end of each. The link's end (:attr:`RemoteProcess.link`) is for
  the relay, the monitor's for the heartbeat (:meth:`RemoteProcess.ping`).

The argv and the jail are pure functions; :class:`RemoteProcess` is the
thin I/O layer (spawn, check, QMP, stop). A process counts as started only
once :func:`launcher.sandbox.check.wait_confined` has seen both filters in
place and its QMP monitor has greeted.

Errors::

    RemoteError              the remote process could not be used
     +-- RemoteStartError    it cannot start as asked (no binary, bad disks); no restart helps
     +-- RemoteFailed        it exited or stayed silent during start; a restart may help
     +-- HeartbeatLost       its monitor did not answer a ping (``hung``) or broke

A sandbox that does not hold is :class:`launcher.sandbox.check.SandboxError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from qemu.qmp import QMPClient

from launcher import children
from launcher.emulators import output_pipe, reaped, relay_output
from launcher.qemu import QUIT_TIMEOUT, TERM_TIMEOUT
from launcher.sandbox import check
from launcher.sandbox.jail import JailSpec
from launcher.spec import SandboxMode
from launcher.status import LOG
from launcher.vmm import QEMU_BINARY, QEMU_DEVICES, QEMU_VIEW, SANDBOX

MAX_TARGET = 6
"""SCSI targets 0-6: the LSI53C895A's own id is 7."""
REMOTE_NPROC = 128
"""Threads the remote's uid may run (main loop, RCU, up to 64 block I/O
workers): RLIMIT_NPROC, which counts threads. No process: stage 1 refuses it."""
TB_SIZE_MIB = 16
"""TCG's translation buffer: the remote runs no guest code, and the default
(1 GiB) would only take address space under RLIMIT_AS."""
RAM_MAPPINGS = 64
"""Guest RAM counted this many times in the remote's address space limit.
The remote maps the RAM anew on each SYNC_SYSMEM and unmaps the old
mapping only after an RCU grace period, and firmware and the guest kernel
change the memory map in bursts: a 256 MiB guest's remote peaked at 7.9 GB
of address space (VmPeak) while the guest booted, some 30 mappings at once.
The limit is address space, not memory: the mappings share the same pages."""
REMOTE_HEADROOM = 3 << 30
"""Address space beyond the guest RAM the remote maps (SYNC_SYSMEM): QEMU
itself (about 360 MiB at start), thread stacks (8 MiB each) and malloc
arenas (64 MiB each, reserved); a thread QEMU cannot create aborts it."""
START_TIMEOUT = 15.0
"""How long the monitor's greeting may take once the process is confined."""
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,30}")


class RemoteError(Exception):
    """The remote process could not be used."""


class RemoteStartError(RemoteError):
    """It cannot be started as asked; restarting cannot help."""


class RemoteFailed(RemoteError):
    """It exited, or its monitor stayed silent, during start; a restart may help."""


class HeartbeatLost(RemoteError):
    """Its monitor did not answer ``query-status`` in time (`hung`), or broke."""

    def __init__(self, controller_id: str, pid: int, hung: bool, detail: str) -> None:
        super().__init__(controller_id, pid, hung, detail)
        self.controller_id = controller_id
        self.pid = pid
        self.hung = hung
        self.detail = detail

    def __str__(self) -> str:
        what = "is hung" if self.hung else "lost its monitor"
        return f"LSI remote {self.controller_id} (pid {self.pid}) {what}: {self.detail}"


@dataclass(frozen=True, slots=True)
class RemoteDisk:
    """One disk on the controller: its SCSI target and the fds of its image
    that mplaunch opened (``rw_fd`` None: a read-only disk)."""

    target: int
    ro_fd: int
    rw_fd: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.target <= MAX_TARGET:
            raise ValueError(f"SCSI target {self.target} is not in 0-{MAX_TARGET}")

    @property
    def readonly(self) -> bool:
        return self.rw_fd is None

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.ro_fd,) if self.rw_fd is None else (self.rw_fd, self.ro_fd)

    @classmethod
    def open(cls, path: str, target: int, readonly: bool) -> RemoteDisk:
        """Open the image (close-on-exec; the start passes the fds on purpose)."""
        flags = os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            ro = os.open(path, os.O_RDONLY | flags)
        except OSError as e:
            raise RemoteStartError(f"{path}: cannot open read-only: {e.strerror}") from None
        if readonly:
            return cls(target, ro)
        try:
            return cls(target, ro, os.open(path, os.O_RDWR | flags))
        except OSError as e:
            os.close(ro)
            raise RemoteStartError(f"{path}: cannot open read-write: {e.strerror}") from None

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def fdset_id(target: int) -> int:
    """The fd set of a target's image: stable, so a new remote gets the same."""
    return target + 1


def node_name(target: int) -> str:
    """The raw block node a target's scsi-hd sits on (its file node adds ``-file``)."""
    return f"t{target}"


def device_id(target: int) -> str:
    return f"scsi-t{target}"


def disk_args(controller_id: str, disk: RemoteDisk) -> list[str]:
    """The fd set, the two block nodes and the scsi-hd of one disk. No file
    locking: the image's users are fixed by mplaunch, and the locks (OFD
    locks, held by the open file description mplaunch shares with the
    remote) would outlive a killed remote and refuse its successor."""
    fdset, node = fdset_id(disk.target), node_name(disk.target)
    ro = ",read-only=on" if disk.readonly else ""
    argv: list[str] = []
    for fd in disk.fds:
        argv += ["-add-fd", f"fd={fd},set={fdset}"]
    return argv + [
        "-blockdev", f"driver=file,node-name={node}-file,filename=/dev/fdset/{fdset},"
                     f"locking=off{ro}",
        "-blockdev", f"driver=raw,node-name={node},file={node}-file{ro}",
        "-device", f"scsi-hd,id={device_id(disk.target)},bus={controller_id}.0,"
                   f"scsi-id={disk.target},lun=0,drive={node}",
    ]


def remote_argv(controller_id: str, disks: Sequence[RemoteDisk], link_fd: int,
                monitor_fd: int, binary: str = QEMU_BINARY) -> list[str]:
    """The remote's complete command line. `link_fd` is its end of the
    mpqemu link, `monitor_fd` its end of the QMP socketpair."""
    if not _QEMU_ID.fullmatch(controller_id):
        raise ValueError(f"controller id {controller_id!r} is not a QEMU id "
                         "(a letter, then letters, digits, '.', '_', '-'; at most 31)")
    targets = [d.target for d in disks]
    if len(set(targets)) != len(targets):
        raise ValueError(f"two disks on one SCSI target: {sorted(targets)}")
    argv = [
        binary,
        "-name", f"lsi-{controller_id},debug-threads=on",
        "-machine", "x-remote,vfio-user=off",
        "-accel", f"tcg,tb-size={TB_SIZE_MIB}",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-sandbox", SANDBOX,
    ]
    argv += ["-device", f"lsi53c895a,id={controller_id}"]
    for disk in sorted(disks, key=lambda d: d.target):
        argv += disk_args(controller_id, disk)
    return argv + [
        "-object", f"x-remote-object,id=robj,devid={controller_id},fd={link_fd}",
        "-chardev", f"socket,id=mon,fd={monitor_fd}",
        "-mon", "chardev=mon,mode=control",
    ]


def remote_jail(uid: int, gid: int, keep_fds: Sequence[int], guest_memory: int) -> JailSpec:
    """The remote's confinement: the VM's QEMU's view and private /dev, its
    threads, an address space for the guest RAM it maps and itself, and no
    new process (stage 1 with ``no_spawn``)."""
    return JailSpec(uid=uid, gid=gid, keep_fds=tuple(keep_fds),
                    address_space=guest_memory * RAM_MAPPINGS + REMOTE_HEADROOM,
                    nproc=REMOTE_NPROC, dev=QEMU_DEVICES, view=QEMU_VIEW, no_spawn=True)


class RemoteProcess:
    """One running remote LSI process and mplaunch's ends of its sockets.

    :attr:`link` is mplaunch's end of the mpqemu link (the relay's);
    :attr:`exited` completes with the wait status once it is reaped. The
    link and the monitor belong to this object: :meth:`stop` closes them.
    """

    def __init__(self, controller_id: str, child: children.Child,
                 link: socket.socket, monitor: socket.socket, uid: int,
                 relay: asyncio.Task[None]) -> None:
        self.controller_id = controller_id
        self.child = child
        self.link = link
        self.monitor = monitor
        self.uid = uid
        self.relay = relay
        self.exited: asyncio.Task[int] = asyncio.create_task(reaped(child, relay))
        self.qmp = QMPClient(f"lsi-{controller_id}")

    @property
    def pid(self) -> int:
        return self.child.pid

    @classmethod
    async def start(
        cls, controller_id: str, disks: Sequence[RemoteDisk], uid: int, gid: int,
        guest_memory: int, sandbox: SandboxMode = SandboxMode.ON,
        binary: str = QEMU_BINARY, timeout: float = START_TIMEOUT,
    ) -> RemoteProcess:
        """Start the remote for `controller_id` with `disks` (their fds stay
        the caller's), under `uid`/`gid` (leased by the caller), and return
        once it is confined and its monitor has greeted. It is spawned through
        :func:`launcher.children.host`, tagged ``remote:CONTROLLER``. Raises
        :class:`RemoteError` or :class:`launcher.sandbox.check.SandboxError`,
        with nothing left running."""
        path = shutil.which(binary)
        if path is None:
            raise RemoteStartError(f"{binary}: not found")
        link, link_remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        monitor, monitor_remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            keep = [link_remote.fileno(), monitor_remote.fileno()]
            keep += [fd for d in disks for fd in d.fds]
            try:
                argv = remote_argv(controller_id, disks, keep[0], keep[1], path)
            except ValueError as e:
                raise RemoteStartError(str(e)) from None
            jail = None
            if sandbox is not SandboxMode.OFF:
                jail = remote_jail(uid, gid, keep, guest_memory)
                argv = jail.argv(argv)
            LOG.debug("starting %s", " ".join(argv))
            output, output_w = output_pipe()
            try:
                child = await children.host().spawn(
                    f"remote:{controller_id}", argv, pass_fds=tuple(keep),
                    stdin=children.DEVNULL, stdout=output_w, stderr=output_w, env={})
            except OSError as e:  # a disk fd that is not open, a binary that will not run
                os.close(output)
                raise RemoteStartError(f"cannot spawn the LSI remote {controller_id}: "
                                       f"{e.strerror}") from None
            except BaseException:
                os.close(output)
                raise
            finally:
                os.close(output_w)
        except BaseException:
            link.close()
            monitor.close()
            raise
        finally:
            link_remote.close()
            monitor_remote.close()
        relay = asyncio.create_task(relay_output(f"lsi {controller_id} {child.pid}", output))
        remote = cls(controller_id, child, link, monitor, uid if jail else os.getuid(), relay)
        try:
            await remote._ready(jail, timeout)
        except BaseException:
            remote.kill()
            await asyncio.shield(remote._close())
            raise
        if jail is None:
            LOG.warning("LSI remote %s started UNCONFINED (pid %d): sandbox = \"off\"",
                        controller_id, child.pid)
        else:
            LOG.info("LSI remote %s started (pid %d, uid %d)", controller_id, child.pid, uid)
        return remote

    async def _ready(self, jail: JailSpec | None, timeout: float) -> None:
        what = f"LSI remote {self.controller_id}"
        if jail is not None:
            await check.wait_confined(self.controller_id, self.pid,
                                      check.Expected(jail.uid, jail.gid, check.QEMU_STAGES),
                                      self.exited, what=what)
        connecting = asyncio.create_task(self.qmp.connect(self.monitor))
        done, _ = await asyncio.wait({connecting, self.exited}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if connecting in done:
            try:
                connecting.result()
            except Exception as e:  # qemu.qmp's ConnectError and the like
                raise RemoteFailed(f"{what}: its monitor failed during start-up: {e}") from None
            return
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        if self.exited in done:
            raise RemoteFailed(f"{what} exited with status {self.exited.result()} "
                               "during start-up; see its messages above")
        raise RemoteFailed(f"{what}: its monitor did not greet within {timeout:g} s")

    async def ping(self, timeout: float) -> float:
        """One ``query-status`` round trip over the monitor, in milliseconds.
        Raises :class:`HeartbeatLost` (``hung`` when no answer came in time)."""
        start = time.monotonic()
        try:
            await asyncio.wait_for(self.qmp.execute("query-status"), timeout)
        except TimeoutError:
            raise HeartbeatLost(self.controller_id, self.pid, True,
                                f"no answer to query-status within {timeout * 1000:.0f} ms"
                                ) from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise HeartbeatLost(self.controller_id, self.pid, False,
                                f"{type(e).__name__}: {e}") from None
        return (time.monotonic() - start) * 1000

    def kill(self) -> None:
        """SIGKILL now (a hung remote, or a test); :attr:`exited` tells when it is reaped."""
        if not self.exited.done():
            self.child.kill()

    async def stop(self) -> int:
        """``quit`` over the monitor, then SIGTERM, then SIGKILL; always
        reaps, closes the link and the monitor, and returns the wait status."""
        quit_sent = False
        if not self.exited.done() and self.qmp.runstate.name == "RUNNING":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), QUIT_TIMEOUT)
                quit_sent = True
        steps = (((None, QUIT_TIMEOUT),) if quit_sent else ()) + (
            (signal.SIGTERM, TERM_TIMEOUT), (signal.SIGKILL, None))
        for sig, wait in steps:
            if self.exited.done():
                break
            if sig is not None:
                self.child.send_signal(sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), wait)
        return await self._close()

    async def _close(self) -> int:
        """Wait for the reaping, then drop the QMP session and the sockets."""
        status = await self.exited
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        self.monitor.close()
        self.link.close()
        return status
