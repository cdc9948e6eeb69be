"""A hot standby beside a real emulator: it follows, it keeps its hands off
the rings while its predecessor lives (even frozen), and it takes over on
its own the moment the predecessor dies.

The predecessor is a real emulator process driven by a recording front-end
(tests.support.recovery_rig, playing QEMU and the launcher's keeper); the
standby is a real spare process (`python -m emulators --spare`) given the
same config with a pidfd of the predecessor, as the launcher's slot gives
it, and fed the keeper's record on a socketpair of its own.

Each test runs three ways (the `rr` fixture): with no liveness page (the
pidfd alone tells the death), with one shared by the predecessor and the
standby as the launcher's slot shares it (its robust lock tells it first),
and with one the predecessor does not hold (the standby's waiting thread
learns nothing; the pidfd tells).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from emulators.vhost_user.codec import Decoder, Role
from emulators.vhost_user.constants import Request
from emulators.vhost_user.replay import replay_messages
from launcher.heartbeat import protocol as proto
from launcher.statestore import layout, liveness
from tests.support.emulator_harness import FIRST_REQUEST_QUEUE, REPO, ControllerSpec, Disk
from tests.support.recovery_rig import RecoveryRig

Q = FIRST_REQUEST_QUEUE
BLOCK = 512
FROZEN_S = 1.0
PAGES = ("no liveness page", "liveness lock", "lock not held")


def write10(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


class StandbyProcess:
    """A spare emulator process and its control socket, as the pool keeps one."""

    def __init__(self, workdir: Path) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control.settimeout(5.0)
        self.stderr_path = workdir / "standby-stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "emulators", "--spare", str(theirs.fileno()), "on"],
                pass_fds=[theirs.fileno()], env={}, cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            )
        theirs.close()
        self._seq = 0
        ready = self.receive()
        assert isinstance(ready, proto.Ready) and ready.locked_down, self.stderr()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, message: proto.Message) -> None:
        data, fds = proto.encode(message)
        if fds:
            socket.send_fds(self.control, [data], fds)
        else:
            self.control.send(data)

    def receive(self) -> proto.Message:
        data = self.control.recv(proto.MAX_DATAGRAM + 1)
        assert data, f"the standby closed its control channel: {self.stderr()}"
        return proto.decode(data, [], sender=proto.Sender.EMULATOR)

    def progress(self) -> dict[int, tuple[int, int]]:
        """A heartbeat: it answers from its loop, so the loop runs."""
        self._seq += 1
        self.send(proto.Ping(self._seq, 0))
        while True:
            message = self.receive()
            if isinstance(message, proto.Pong) and message.seq == self._seq:
                return {p.queue: (p.completed, p.in_flight) for p in message.progress}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self.control.close()


def used_idx(rr: RecoveryRig, queue: int) -> int:
    lay = rr.rig.drivers[queue].layout
    return int(struct.unpack_from("<H", rr.frontend.memory, lay.used_gpa + 2)[0])


def store_bytes(rr: RecoveryRig) -> bytes:
    return os.pread(rr.state_fd, os.fstat(rr.state_fd).st_size, 0)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def assign_standby(rr: RecoveryRig, standby: StandbyProcess,
                   predecessor: int | None = None) -> socket.socket:
    """Give the standby the predecessor's config with a pidfd of it (the
    rig's emulator unless `predecessor` names another pid) and the rig's
    liveness page, then the keeper's record on its own socket; returns the
    keeper's end of it."""
    assert rr.proc is not None
    keeper_end, emu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pidfd = os.pidfd_open(rr.proc.pid if predecessor is None else predecessor)
    luns = tuple(
        LunConfig(d.lun, d.disk_id or f"{rr.spec.id}-lun{d.lun}", fd, d.readonly, d.block_size)
        for d, fd in zip(rr.spec.disks, rr.disk_fds, strict=True)
    )
    config = EmulatorConfig(
        "emu", (ControllerConfig(rr.spec.id, emu_end.fileno(), rr.spec.queues, luns),),
        state_fd=rr.state_fd, first_start=False, predecessor_fd=pidfd,
        liveness_fd=getattr(rr, "standby_liveness_fd", -1),
    )
    standby.send(proto.Assign(config.to_json(), tuple(config.assigned_fds())))
    emu_end.close()
    os.close(pidfd)
    answer = standby.receive()
    assert isinstance(answer, proto.Assigned) and answer.ok, (answer, standby.stderr())
    for data, fds in replay_messages(rr.frontend.record.snapshot(), {}):
        if fds:
            socket.send_fds(keeper_end, [data], list(fds))
        else:
            keeper_end.sendall(data)
    return keeper_end


@pytest.fixture(params=PAGES)
def rr(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RecoveryRig]:
    spec = ControllerSpec("scsi0", (Disk(tmp_path / "disk.img"),))
    page = -1 if request.param == PAGES[0] else liveness.create()
    rig = RecoveryRig.start(spec, tmp_path, liveness_fd=page if request.param == PAGES[1] else -1)
    rig.standby_liveness_fd = page  # type: ignore[attr-defined]
    yield rig
    if rig.proc is not None and rig.proc.poll() is None:
        os.kill(rig.proc.pid, signal.SIGCONT)
    rig.close()
    if page >= 0:
        os.close(page)


def took_over_by(standby: StandbyProcess) -> str:
    """Which signal the standby served on, from its log line."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in standby.stderr().splitlines():
            if "predecessor gone; serving" in line:
                return line.rpartition("by its ")[2].rstrip(")")
        time.sleep(0.01)
    raise AssertionError(f"no takeover logged: {standby.stderr()}")


def expected_signals(rr: RecoveryRig) -> set[str]:
    return {"liveness lock", "pidfd"} if rr.liveness_fd >= 0 else {"pidfd"}


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process that lives through the test: a pidfd of it never says
    "dead", so a standby given it learns of a death by the lock alone."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_standby_keeps_off_the_rings_of_a_frozen_predecessor(rr: RecoveryRig,
                                                            tmp_path: Path) -> None:
    # Some I/O through the predecessor first: the rings have progress to resume.
    for lba in range(4):
        data = bytes([lba + 1]) * BLOCK
        assert rr.rig.command(write10(lba), queue=Q, data_out=[data]).status == 0
    standby = StandbyProcess(tmp_path)
    try:
        keeper_end = assign_standby(rr, standby)
        assert standby.progress() == {}  # following: no ring of its own yet
        assert rr.proc is not None
        os.kill(rr.proc.pid, signal.SIGSTOP)
        # Requests the frozen predecessor cannot serve: avail ring, kick fd set.
        heads = [rr.rig.submit_command(read10(lba), queue=Q, data_in=[BLOCK])
                 for lba in range(4)]
        kick_fd = rr.frontend.kick_fds[Q]
        call_fd = rr.frontend.call_fds[Q]
        while readable(call_fd):  # completions before the freeze
            os.eventfd_read(call_fd)
        used_before, store_before = used_idx(rr, Q), store_bytes(rr)
        deadline = time.monotonic() + FROZEN_S
        while time.monotonic() < deadline:
            assert standby.progress() == {}  # alive, answering, serving nothing
            time.sleep(0.05)
        assert used_idx(rr, Q) == used_before, "the standby published completions"
        assert store_bytes(rr) == store_before, "the standby wrote the state store"
        assert not readable(call_fd), "the standby signalled a call fd"
        assert readable(kick_fd), "the standby took the predecessor's kick"
        assert rr.proc.poll() is None  # frozen, not dead

        killed = time.monotonic()
        os.kill(rr.proc.pid, signal.SIGKILL)
        rr.proc.wait(5)
        for lba, head in enumerate(heads):
            used_len, writable = rr.rig.wait(Q, head, timeout=5.0)
            assert writable[1][:BLOCK] == bytes([lba + 1]) * BLOCK
        took_over_ms = (time.monotonic() - killed) * 1000
        assert used_idx(rr, Q) == used_before + len(heads)
        progress = standby.progress()
        assert progress[Q][0] == len(heads) and progress[Q][1] == 0
        assert store_bytes(rr) != store_before  # its progress, stored
        # Served without any word from the launcher: no PROMOTE was sent yet.
        assert took_over_ms < 5000
        # Whichever told it first (with a small guest RAM, the pidfd can).
        assert took_over_by(standby) in expected_signals(rr)

        # Promoted, it answers the keeper on the socket it followed on.
        standby.send(proto.Promote(7))
        result = standby.receive()
        assert isinstance(result, proto.Result) and result.ok and result.seq == 7
        from emulators.vhost_user.codec import encode_request
        keeper_end.sendall(encode_request(Request.GET_FEATURES, None))
        keeper_end.settimeout(5.0)
        decoder = Decoder(Role.FRONTEND, close_fd=os.close)
        decoder.receive_data(keeper_end.recv(4096), [])
        reply = decoder.next_message()
        assert getattr(reply, "request", None) is Request.GET_FEATURES
        assert rr.rig.command(write10(9), queue=Q, data_out=[b"\x09" * BLOCK]).status == 0
        keeper_end.close()
    finally:
        standby.close()


def test_a_standby_is_not_promoted_while_its_predecessor_lives(rr: RecoveryRig,
                                                               tmp_path: Path) -> None:
    standby = StandbyProcess(tmp_path)
    try:
        keeper_end = assign_standby(rr, standby)
        store_before = store_bytes(rr)
        standby.send(proto.Promote(3))
        result = standby.receive()
        assert isinstance(result, proto.Result) and not result.ok
        assert "predecessor" in result.error
        assert store_bytes(rr) == store_before
        # The predecessor still serves alone.
        assert rr.rig.command(write10(1), queue=Q, data_out=[b"\x01" * BLOCK]).status == 0
        keeper_end.close()
    finally:
        standby.close()


def test_store_layout_is_what_the_rig_made(rr: RecoveryRig) -> None:
    """The store the checks above compare byte for byte is the real layout."""
    assert os.fstat(rr.state_fd).st_size == layout.Layout(1, 2 + 16, 256).size


@pytest.mark.parametrize("rr", [PAGES[1]], indirect=True)
def test_the_lock_alone_tells_the_death_and_a_frozen_holder_keeps_it(
        rr: RecoveryRig, tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    """The standby's pidfd here is of a process that lives on: only the
    liveness lock can tell it of the death. A SIGSTOP does not let it go."""
    assert rr.proc is not None
    standby = StandbyProcess(tmp_path)
    try:
        keeper_end = assign_standby(rr, standby, predecessor=bystander.pid)
        os.kill(rr.proc.pid, signal.SIGSTOP)
        head = rr.rig.submit_command(read10(0), queue=Q, data_in=[BLOCK])
        time.sleep(FROZEN_S / 2)
        assert standby.progress() == {}, "a frozen holder let the lock go"
        rr.kill()
        rr.rig.wait(Q, head, timeout=5.0)  # served by the standby
        assert took_over_by(standby) == "liveness lock"
        assert bystander.poll() is None
        keeper_end.close()
    finally:
        standby.close()


@pytest.mark.parametrize("rr", [PAGES[1], PAGES[2]], indirect=True)
def test_the_promoted_standby_holds_the_lock_its_own_standby_waits_on(
        rr: RecoveryRig, tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    """Two takeovers in a row: the lock passes to each process that takes
    over, so that the next standby learns of its death through it (its
    pidfd is of a bystander: the lock alone can tell it), whether the
    first holder held it or not."""
    assert rr.rig.command(write10(0), queue=Q, data_out=[b"\x01" * BLOCK]).status == 0
    first = StandbyProcess(tmp_path)
    (tmp_path / "second").mkdir()
    second = StandbyProcess(tmp_path / "second")
    try:
        keeper_first = assign_standby(rr, first)
        rr.kill()
        assert rr.rig.command(write10(1), queue=Q, data_out=[b"\x02" * BLOCK]).status == 0
        first.send(proto.Promote(1))
        result = first.receive()
        assert isinstance(result, proto.Result) and result.ok
        assert took_over_by(first) in expected_signals(rr)

        keeper_second = assign_standby(rr, second, predecessor=bystander.pid)
        assert second.progress() == {}  # following, serving nothing
        head = rr.rig.submit_command(read10(1), queue=Q, data_in=[BLOCK])
        used, writable = rr.rig.wait(Q, head, timeout=5.0)  # the first one serves it
        assert writable[1][:BLOCK] == b"\x02" * BLOCK
        assert "predecessor gone" not in second.stderr()
        first.proc.kill()
        first.proc.wait(5)
        assert rr.rig.command(write10(2), queue=Q, data_out=[b"\x03" * BLOCK]).status == 0
        assert took_over_by(second) == "liveness lock", second.stderr()
        keeper_first.close()
        keeper_second.close()
    finally:
        first.close()
        second.close()
