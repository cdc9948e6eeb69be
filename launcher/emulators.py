"""Emulator processes as the launcher sees them: their fds, start and stop.

For every controller the launcher makes a socketpair: QEMU gets one end as
its vhost-user chardev, the emulator the other. Disk images are opened here,
read-only or read-write as the spec says, and only the descriptors cross
into the emulator.

Each emulator is started through the jail (:mod:`launcher.sandbox.jail`)
with a uid and gid of its own (leased host-wide by its slot or the spare
pool, :mod:`launcher.uidpool`), under an empty root, and counts as started
only once :func:`launcher.sandbox.check.wait_confined` has seen it locked
down: QEMU, and with it every byte from the guest, comes later. Its fds 1
and 2 are a pipe whose lines mplaunch relays to its own log, prefixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from launcher import children, faultplan
from launcher.sandbox import check
from launcher.sandbox.jail import ADDRESS_SPACE_HEADROOM, JailSpec
from launcher.spec import EmulatorSpec, SandboxMode, Spec
from launcher.status import LOG

STOP_TIMEOUT = 3.0
PF_EXITING = 0x4  # /proc/PID/stat flags: the process is exiting
MAX_LINE = 2000
"""Bytes of one output line of an emulator that reach mplaunch's log."""
RELAY_DRAIN = 1.0
"""How long an emulator's exit waits for the end of its output."""


class DiskOpenError(Exception):
    """A disk image named by the spec cannot be opened; no restart can help."""


@dataclass
class EmulatorResources:
    """Everything one emulator is handed, and what QEMU gets in return."""

    spec: EmulatorSpec
    config: EmulatorConfig
    qemu_ends: dict[str, socket.socket] = field(default_factory=dict)
    emulator_ends: list[socket.socket] = field(default_factory=list)
    disk_fds: list[int] = field(default_factory=list)
    sandbox: SandboxMode = SandboxMode.ON
    uid: int = 0
    address_space: int = 0
    #: RLIMIT_NPROC: 0 (no thread, no process) but for a warm spare's.
    nproc: int = 0

    @classmethod
    def for_vm(
        cls, spec: Spec, emulator: EmulatorSpec, config: EmulatorConfig, uid: int,
        controllers: int | None = None,
    ) -> EmulatorResources:
        """With the VM's sandbox settings: its mode, this uid, and an address
        space that fits one mapping of guest RAM per controller (`controllers`
        when the config has none yet: a spare's)."""
        res = cls(emulator, config)
        res.sandbox = spec.vm.sandbox
        res.uid = uid
        count = len(config.controllers) if controllers is None else controllers
        res.address_space = address_space(spec, count)
        return res

    def close_emulator_side(self) -> None:
        for sock in self.emulator_ends:
            sock.close()
        for fd in self.disk_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.emulator_ends.clear()
        self.disk_fds.clear()

    def close(self) -> None:
        self.close_emulator_side()
        for sock in self.qemu_ends.values():
            sock.close()
        self.qemu_ends.clear()


def address_space(spec: Spec, controllers: int) -> int:
    """The emulator's RLIMIT_AS: each controller maps the guest's RAM once."""
    return spec.vm.memory * max(1, controllers) + ADDRESS_SPACE_HEADROOM


def open_disk(path: str, readonly: bool) -> int:
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except OSError as e:
        raise DiskOpenError(f"{path}: cannot open {'read-only' if readonly else 'read-write'}: "
                            f"{e.strerror}") from None


def prepare(spec: Spec, emulator: EmulatorSpec, first_start: bool = True) -> EmulatorResources:
    """Open the disks and make the sockets of one emulator."""
    uid = spec.vm.uid_range[0] + spec.emulators.index(emulator)
    res = EmulatorResources.for_vm(spec, emulator, EmulatorConfig(emulator.id, ()), uid)
    try:
        controllers = []
        for controller in spec.controllers_of(emulator.id):
            qemu_end, emu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            res.qemu_ends[controller.id] = qemu_end
            res.emulator_ends.append(emu_end)
            luns = []
            for disk in spec.disks_of(controller.id):
                fd = open_disk(str(disk.image), disk.readonly)
                res.disk_fds.append(fd)
                luns.append(LunConfig(disk.lun, disk.id, fd, disk.readonly, disk.block_size))
            controllers.append(
                ControllerConfig(controller.id, emu_end.fileno(), controller.queues, tuple(luns))
            )
        res.config = EmulatorConfig(emulator.id, tuple(controllers), first_start=first_start)
        res.address_space = address_space(spec, len(controllers))
        return res
    except BaseException:
        res.close()
        raise


@dataclass
class EmulatorProcess:
    """One running emulator; `exited` completes with its status (asyncio's
    convention: an exit code, or -N for signal N) once its output is read."""

    id: str
    child: children.Child
    #: The read end of its output pipe (owned: relayed, and closed at its
    #: end), -1 once closed or if there is none: what the caller gives the
    #: holder to keep.
    output_fd: int = -1
    #: The launcher signalled it (kill or stop): its death is no fault point's.
    signalled: bool = False
    #: Copies its output (fds 1 and 2, a pipe) to mplaunch's stderr; ends at its EOF.
    relay: asyncio.Task[None] | None = field(init=False, default=None)
    exited: asyncio.Task[int] = field(init=False)

    def __post_init__(self) -> None:
        if self.output_fd >= 0:
            def closing() -> None:
                self.output_fd = -1
            self.relay = asyncio.create_task(
                relay_output(f"{self.id} {self.child.pid}", self.output_fd, closing))
        self.exited = asyncio.create_task(reaped(self.child, self.relay))

    @classmethod
    def adopt(cls, id: str, child: children.Child, output_fd: int) -> EmulatorProcess:
        """An emulator a previous launcher started (re-attach): its output is
        relayed again from the read end the holder kept (`output_fd`, owned
        from now on; -1: none was kept)."""
        return cls(id, child, output_fd)

    @property
    def pid(self) -> int:
        return self.child.pid

    def kill(self) -> None:
        self._note_signal()
        self.child.kill()

    def _note_signal(self) -> None:
        """Remember that we signalled it, unless it was dying already (exiting,
        or a zombie not yet reaped): then its death was its own. Its sockets
        close while it exits, so the launcher may act on that before the
        process is a zombie."""
        if self.child.exited.done():
            return
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            state, flags = fields[0], int(fields[6])
        except (OSError, IndexError, ValueError):
            return
        if state not in (b"Z", b"X") and not flags & PF_EXITING:
            self.signalled = True

    def report_exit(self, exited: asyncio.Task[int]) -> None:
        if not exited.cancelled() and exited.exception() is None:
            faultplan.PLAN.exited(self.pid, exited.result(), self.signalled)

    async def stop(self) -> int:
        for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, None)):
            if self.exited.done():
                break
            self._note_signal()
            self.child.send_signal(sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        status = await self.exited
        if self.relay is not None:  # its last lines: the pipe ends with the process
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.relay), STOP_TIMEOUT)
        return status


def emulator_argv(config: EmulatorConfig, sandbox: SandboxMode = SandboxMode.ON) -> list[str]:
    return [sys.executable, "-I", "-m", "emulators", config.to_json(), sandbox.value]


async def reaped(child: children.Child, relay: asyncio.Task[None] | None) -> int:
    """The exit status, once the process is reaped and its output pipe read to
    the end (at once: only the emulator, which cannot fork, holds its write
    end; the same for QEMU's remote, which cannot fork either), so that the
    pipe is closed by the time anyone sees the exit."""
    status = await asyncio.shield(child.exited)
    if relay is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(relay), RELAY_DRAIN)
    return status


def jail_spec(res: EmulatorResources) -> JailSpec:
    """The emulator runs in the jail's interpreter under an empty root."""
    return JailSpec(uid=res.uid, gid=res.uid, keep_fds=tuple(res.config.all_fds()),
                    address_space=res.address_space, nproc=res.nproc, new_root=True)


def output_pipe() -> tuple[int, int]:
    """(read end, write end) for a child's output; both close-on-exec (the
    child gets the write end as its fds 1 and 2 by dup2, which clears it)."""
    return os.pipe2(os.O_CLOEXEC)


async def relay_output(name: str, fd: int, closing: Callable[[], None] | None = None) -> None:
    """Copy a child's output (its fds 1 and 2: one pipe) to mplaunch's stderr,
    each line prefixed with `name` and cut at :data:`MAX_LINE`, until the
    pipe's end; owns `fd` and closes it however it ends (cancelled too),
    calling `closing` just before (so nobody uses the number after). The
    child never holds a file mplaunch writes: a pipe cannot be seeked,
    overwritten or hole-punched (pwrite64 and fallocate fail on it)."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    try:
        os.set_blocking(fd, False)
        loop.add_reader(fd, readable.set)
        try:
            pending = b""
            while True:
                await readable.wait()
                readable.clear()
                try:
                    chunk = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                pending += chunk
                lines = pending.split(b"\n")
                pending = lines.pop() if chunk else b""
                if len(pending) > MAX_LINE:
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    if line:
                        text = line[:MAX_LINE].decode("utf-8", "replace")
                        print(f"[{name}] {text}", file=sys.stderr, flush=True)
                if not chunk:
                    return
        finally:
            loop.remove_reader(fd)
    finally:
        if closing is not None:
            closing()
        os.close(fd)


async def start(
    res: EmulatorResources, command: list[str] | None = None, quiet: bool = False,
    tag: str | None = None,
) -> EmulatorProcess:
    """Start the emulator (through :func:`launcher.children.host`, tagged
    `tag`, by default ``emulator:ID``) and return once it is confined (unless
    the spec says ``sandbox = "off"``). A sandbox that does not hold raises
    :class:`launcher.sandbox.check.SandboxError`, with the process reaped.
    `command` replaces the emulator's own command line (a warm spare's, or a
    test's); `quiet` logs the start as a detail, not a lifecycle event. The
    read end of its output pipe is :attr:`EmulatorProcess.output_fd`."""
    argv = command or emulator_argv(res.config, res.sandbox)
    if res.sandbox is not SandboxMode.OFF:
        argv = jail_spec(res).argv(argv)
    # Empty but for a test's fault-point arming (launcher.faultplan).
    env = faultplan.PLAN.offer()
    output, output_w = output_pipe()
    began = time.monotonic()
    try:
        child = await children.host().spawn(
            tag or f"emulator:{res.spec.id}", argv, pass_fds=res.config.all_fds(),
            stdin=children.DEVNULL, stdout=output_w, stderr=output_w, env=env)
    except BaseException:
        os.close(output)
        faultplan.PLAN.given(env, None)
        raise
    finally:
        os.close(output_w)
    faultplan.PLAN.given(env, child.pid)
    spawned = time.monotonic()
    proc = EmulatorProcess(res.spec.id, child, output)
    proc.exited.add_done_callback(proc.report_exit)
    if res.sandbox is SandboxMode.OFF:
        LOG.warning("emulator %s started UNCONFINED (pid %d): sandbox = \"off\"",
                    res.spec.id, child.pid)
        return proc
    try:
        await check.wait_confined(res.spec.id, child.pid, check.Expected(res.uid, res.uid),
                                  proc.exited)
    except BaseException:
        child.kill()
        await asyncio.shield(proc.exited)
        raise
    (LOG.debug if quiet else LOG.info)(
        "emulator %s started (pid %d, uid %d, sandbox %s)", res.spec.id, child.pid,
        res.uid, res.sandbox.value,
    )
    LOG.debug("emulator %s (pid %d): spawned in %.1f ms, confined %.1f ms later",
              res.spec.id, child.pid, (spawned - began) * 1e3, (time.monotonic() - spawned) * 1e3)
    return proc
