"""An emulator with a state store that a test can kill, restart and replay to.

`RecoveryRig` plays the launcher's part around a real emulator process the
way `EmulatorHarness` plays QEMU's: it creates the state store file (the
launcher's layout), passes its fd with the config, can arm fault points
(``MPLAUNCH_FAULT``) and can start a successor on the same store and disks.
Its front-end is a `RecordingFrontend`: it plays QEMU 7.2 and, like the
launcher's session keeper, records every exchange once it is complete in a
`BackendSession`. After a restart it sends the successor the keeper's replay
(`replay_messages` of that record) and then the message whose exchange the
death interrupted, so the test sees what QEMU would see: one late reply.

The control channel is here too, so a test can ask for a heartbeat's
per-queue progress as the launcher's hang detector would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from emulators.faults import ENV as FAULT_ENV
from emulators.vhost_user.codec import Decoder, Message, Role, encode_request
from emulators.vhost_user.constants import Request
from emulators.vhost_user.messages import Payload
from emulators.vhost_user.replay import replay_messages
from emulators.vhost_user.session import BackendSession
from emulators.virtio.memory import GuestMemory, MemoryRegion
from launcher.heartbeat import protocol as proto
from launcher.statestore import layout
from tests.support.driver import TestDriver
from tests.support.emulator_harness import (
    FIRST_REQUEST_QUEUE,
    REPO,
    ControllerRig,
    ControllerSpec,
    _open_disk,
)
from tests.support.vhost_frontend import UVA_BASE, FrontendError, VhostFrontend

QUEUE_SLOTS = 2 + 16
LUN_SLOTS = 256


class _NoQueues:
    """The record's ring owner: its GET_VRING_BASE answer is never sent."""

    def vring_base(self, index: int) -> int:
        return 0


def _keep(fd: int) -> None:
    """The record's fds are the front-end's own; it closes them itself."""


class RecordingFrontend(VhostFrontend):
    """A `VhostFrontend` that records each completed exchange, as the keeper does."""

    def __init__(self, sock: socket.socket, *, memory_size: int, num_queues: int) -> None:
        super().__init__(sock, memory_size=memory_size, num_queues=num_queues)
        self.record = BackendSession(
            num_queues=num_queues, ring_owner=_NoQueues(), close_fd=_keep,
            max_queue_size=layout.MAX_QUEUE_SIZE,
        )
        self.pending: tuple[Request, Payload, tuple[int, ...], bool] | None = None

    def request(
        self,
        request: Request,
        payload: Payload = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> Message | None:
        self.pending = (request, payload, tuple(fds), need_reply)
        reply = super().request(request, payload, fds=fds, need_reply=need_reply)
        self.pending = None
        data = encode_request(request, payload, need_reply=need_reply, fds=fds)
        decoder = Decoder(Role.BACKEND, close_fd=_keep)
        decoder.receive_data(data, list(fds))
        message = decoder.next_message()
        assert isinstance(message, Message)
        self.record.handle(message)
        return reply

    def reattach(self, sock: socket.socket) -> Message | None:
        """Talk to a successor: replay the record, then re-send the interrupted
        message; returns that message's reply (None if it had none)."""
        self.sock.close()
        self.sock = sock
        self.sock.settimeout(self.timeout)
        self._decoder = Decoder(Role.FRONTEND, close_fd=os.close)
        for data, fds in replay_messages(self.record.snapshot(), {}):
            self.send_raw(data, fds)
        if self.pending is None:
            return None
        request, payload, fds, need_reply = self.pending
        return self.request(request, payload, fds=fds, need_reply=need_reply)


@dataclass
class RecoveryRig:
    """One emulator process (replaceable), its state store, and one controller."""

    spec: ControllerSpec
    workdir: Path
    state_fd: int
    disk_fds: list[int]
    rig: ControllerRig
    proc: subprocess.Popen[bytes] | None = None
    control: socket.socket | None = None
    stderr_paths: list[Path] = field(default_factory=list)
    #: A liveness page (launcher.statestore.liveness) each emulator started
    #: here is given, as the launcher gives a slot's; -1: none.
    liveness_fd: int = -1
    _seq: int = 0

    @classmethod
    def start(cls, spec: ControllerSpec, workdir: Path, *, fault: str = "",
              liveness_fd: int = -1) -> RecoveryRig:
        shape = layout.Layout(1, QUEUE_SLOTS, LUN_SLOTS)
        state_fd = layout.create(workdir / "state", shape)
        disk_fds = [_open_disk(d) for d in spec.disks]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        rings = FIRST_REQUEST_QUEUE + spec.queues
        frontend = RecordingFrontend(ours, memory_size=spec.memory_size, num_queues=rings)
        memory = GuestMemory.from_fds(
            [MemoryRegion(0, spec.memory_size, UVA_BASE, 0, frontend.memfd)]
        )
        slice_ = (spec.memory_size // rings) & ~0xFFF
        drivers = {
            i: TestDriver(memory, spec.queue_size, i * slice_, data_end=(i + 1) * slice_)
            for i in range(rings)
        }
        rig = ControllerRig(spec, frontend, memory, drivers)
        self = cls(spec, workdir, state_fd, disk_fds, rig, liveness_fd=liveness_fd)
        try:
            self._spawn(theirs, first_start=False, fault=fault)
            frontend.init()
            self.rig.start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def frontend(self) -> RecordingFrontend:
        assert isinstance(self.rig.frontend, RecordingFrontend)
        return self.rig.frontend

    def _spawn(self, theirs: socket.socket, *, first_start: bool, fault: str) -> None:
        control_ours, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        luns = tuple(
            LunConfig(d.lun, d.disk_id or f"{self.spec.id}-lun{d.lun}", fd, d.readonly,
                      d.block_size)
            for d, fd in zip(self.spec.disks, self.disk_fds, strict=True)
        )
        config = EmulatorConfig(
            "emu",
            (ControllerConfig(self.spec.id, theirs.fileno(), self.spec.queues, luns),),
            control_fd=control_theirs.fileno(),
            state_fd=self.state_fd,
            first_start=first_start,
            liveness_fd=self.liveness_fd,
        )
        fd, name = tempfile.mkstemp(prefix="emulator-stderr-", dir=self.workdir)
        self.stderr_paths.append(Path(name))
        env = {FAULT_ENV: fault} if fault else {}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "emulators", config.to_json()],
                pass_fds=config.all_fds(), env=env, cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
            )
        finally:
            os.close(fd)
            theirs.close()
            control_theirs.close()
        if self.control is not None:
            self.control.close()
        self.control = control_ours
        self.control.settimeout(5.0)

    def restart(self, *, fault: str = "") -> Message | None:
        """Kill the emulator if it lives, start a successor on the same store,
        replay the session to it; returns the re-sent message's reply."""
        self.kill()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._spawn(theirs, first_start=False, fault=fault)
        return self.frontend.reattach(ours)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def died_of_fault(self, timeout: float = 5.0) -> bool:
        """Whether the current process killed itself at an armed fault point."""
        assert self.proc is not None
        self.proc.wait(timeout)
        return self.proc.returncode == -signal.SIGKILL and "mplaunch-fault:" in self.stderr()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_paths[-1].read_text(errors="replace") if self.stderr_paths else ""

    def progress(self) -> dict[int, tuple[int, int]]:
        """One heartbeat: ring -> (completed, in flight), as the detector sees them."""
        assert self.control is not None
        self._seq += 1
        data, _ = proto.encode(proto.Ping(self._seq, 0))
        self.control.send(data)
        while True:
            raw = self.control.recv(proto.MAX_DATAGRAM + 1)
            message = proto.decode(raw, [], sender=proto.Sender.EMULATOR)
            if isinstance(message, proto.Pong) and message.seq == self._seq:
                return {p.queue: (p.completed, p.in_flight) for p in message.progress}

    def expect_dead_frontend(self) -> None:
        """Assert the last request was cut off by the process's death."""
        assert self.frontend.pending is not None

    def close(self) -> tuple[int | None, str]:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        status = self.proc.returncode if self.proc is not None else None
        text = self.stderr()
        self.rig.close()
        if self.control is not None:
            self.control.close()
        for fd in (*self.disk_fds, self.state_fd):
            os.close(fd)
        self.disk_fds = []
        return status, text


def request_or_death(frontend: VhostFrontend, request: Request, payload: Payload) -> Message | None:
    """Send one request; None when the back-end died before answering."""
    try:
        return frontend.request(request, payload)
    except FrontendError:
        return None
