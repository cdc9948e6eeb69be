"""A real emulator with a state store, killed at the instants that matter.

Each test plays QEMU (a recording front-end) and the launcher (state store,
restart, the session keeper's replay) around real emulator processes: ring
stops cut by a kill before or after their answer, a guest that scribbles on
its used index while the emulator is down, and a new memory table while the
rings run.
"""

from __future__ import annotations

import os
import select
import struct
from pathlib import Path

import pytest

from emulators.vhost_user.constants import Request
from emulators.vhost_user.messages import MemoryRegion, MemoryTable, VringState
from tests.support.driver import TestDriver
from tests.support.emulator_harness import (
    FIRST_REQUEST_QUEUE,
    ControllerSpec,
    Disk,
    EmulatorHarness,
    request_header,
)
from tests.support.recovery_rig import RecoveryRig, request_or_death
from tests.support.vhost_frontend import UVA_BASE

Q = FIRST_REQUEST_QUEUE
TEST_UNIT_READY = bytes(6)
BLOCK = 512


def write10(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def spec(tmp_path: Path, queues: int = 1) -> ControllerSpec:
    return ControllerSpec("scsi0", (Disk(tmp_path / "disk.img"),), queues=queues)


def do_io(rr: RecoveryRig, queue: int, count: int, first_lba: int = 0) -> None:
    for i in range(count):
        data = bytes([(first_lba + i) & 0xFF]) * BLOCK
        reply = rr.rig.command(write10(first_lba + i), queue=queue, data_out=[data])
        assert reply.status == 0 and reply.response == 0
        back = rr.rig.command(read10(first_lba + i), queue=queue, data_in=[BLOCK])
        assert back.status == 0 and back.data == data


def stop_cut_by_fault(rr: RecoveryRig, ring: int) -> None:
    """QEMU's stop sequence up to GET_VRING_BASE of `ring`, which the fault cuts."""
    fe = rr.frontend
    for index in range(rr.rig.num_rings):
        fe.request(Request.SET_VRING_ENABLE, VringState(index, 0))
    for index in range(ring):
        reply = fe.request(Request.GET_VRING_BASE, VringState(index, 0))
        assert reply is not None
    assert request_or_death(fe, Request.GET_VRING_BASE, VringState(ring, 0)) is None
    assert rr.died_of_fault(), rr.stderr()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def test_kill_before_the_ring_stop_answer_replays_to_the_right_index(workdir: Path) -> None:
    # Rings 0, 1, 2 stop in that order: the third stop's pass is ring 2's.
    rr = RecoveryRig.start(spec(workdir), workdir, fault="ring.stop.before_reply@3")
    try:
        do_io(rr, Q, 5)  # 10 requests: ring 2 consumed up to avail index 10
        stop_cut_by_fault(rr, Q)
        # The successor gets the replay (ring 2 still started, at its start
        # base 0) and then the GET_VRING_BASE again: it must answer 10, not 0.
        reply = rr.restart()
        assert reply is not None and reply.payload == VringState(Q, 10)
        assert rr.alive()
        # QEMU starts the ring again where it was told; requests flow.
        rr.rig.start({Q: 10})
        do_io(rr, Q, 2, first_lba=20)
        assert rr.rig.stop()[Q] == 14
    finally:
        status, text = rr.close()
    assert "Traceback" not in text


def test_kill_after_the_ring_stop_answer_leaves_no_stale_resume(workdir: Path) -> None:
    rr = RecoveryRig.start(spec(workdir), workdir, fault="ring.stop.after_reply@3")
    try:
        do_io(rr, Q, 5)
        fe = rr.frontend
        for index in range(rr.rig.num_rings):
            fe.request(Request.SET_VRING_ENABLE, VringState(index, 0))
        answers = [fe.request(Request.GET_VRING_BASE, VringState(i, 0)) for i in range(3)]
        last = answers[Q]
        assert last is not None and last.payload == VringState(Q, 10)
        assert rr.died_of_fault(), rr.stderr()
        assert rr.restart() is None  # QEMU had its answer: nothing to re-send
        # The guest resets: its driver sets the rings up anew at the same
        # addresses, and QEMU starts them at base 0. The successor must not
        # resume ring 2 from the slot its predecessor had no time to clear.
        for index in range(rr.rig.num_rings):
            old = rr.rig.drivers[index]
            rr.rig.drivers[index] = TestDriver(
                rr.rig.memory, old.size, old.layout.desc_gpa, data_end=old.data_end
            )
        rr.rig.start()
        do_io(rr, Q, 2, first_lba=30)
        assert rr.alive()
    finally:
        status, text = rr.close()
    assert "Traceback" not in text and "stopped until" not in text


def test_scribbled_used_index_stops_that_queue_only(workdir: Path) -> None:
    rr = RecoveryRig.start(spec(workdir, queues=2), workdir)
    try:
        do_io(rr, Q, 3)
        do_io(rr, Q + 1, 3, first_lba=10)
        rr.kill()
        # While no emulator runs, the guest writes nonsense into ring 2's used index.
        rr.rig.drivers[Q].set_used_idx(6 + 77)
        assert rr.restart() is None
        # The process lives and serves the other queues ...
        do_io(rr, Q + 1, 2, first_lba=20)
        assert rr.rig.control(bytes(4 + 4 + 8 + 8), reply_size=1) is not None
        # ... ring 2 is stopped: its request is not taken, the error is said on
        # its err fd (QEMU logs it) and in one line, and it is no hang.
        rr.frontend.wait_call(Q, 0.2)  # the wake-up every new call fd gets
        rr.rig.submit_command(TEST_UNIT_READY, queue=Q)
        assert not rr.frontend.wait_call(Q, 0.5)
        assert rr.rig.drivers[Q].used_idx() == 6 + 77
        err = rr.frontend.err_fds[Q]
        assert select.select([err], [], [], 2)[0] == [err]
        assert os.eventfd_read(err) >= 1
        assert rr.alive()
        progress = rr.progress()
        assert progress[Q][1] == 0 and progress[Q + 1][0] == 4
        assert rr.stderr().count("queue 2 stopped until the driver resets the device") == 1
        # The driver resets the device and sets the ring up anew: it works again.
        bases = rr.rig.stop()
        assert Q in bases
        for index in range(rr.rig.num_rings):
            old = rr.rig.drivers[index]
            rr.rig.drivers[index] = TestDriver(
                rr.rig.memory, old.size, old.layout.desc_gpa, data_end=old.data_end
            )
        rr.rig.start()
        do_io(rr, Q, 1, first_lba=40)
        assert rr.alive()
    finally:
        status, text = rr.close()
    assert "Traceback" not in text


def test_memory_table_while_rings_run_keeps_them_running(tmp_path: Path) -> None:
    with EmulatorHarness.start([spec(tmp_path)]) as h:
        rig = h.rig
        do_io_plain(rig, 3)
        fe = rig.frontend
        hotplug = os.memfd_create("hotplugged-ram", os.MFD_CLOEXEC)
        os.ftruncate(hotplug, 1 << 20)
        try:
            table = MemoryTable((
                MemoryRegion(0, fe.memory_size, UVA_BASE, 0),
                MemoryRegion(1 << 30, 1 << 20, UVA_BASE + (1 << 30), 0),
            ))
            fe.request(Request.SET_MEM_TABLE, table, fds=(fe.memfd, hotplug),
                       need_reply=fe.reply_ack)
        finally:
            os.close(hotplug)
        do_io_plain(rig, 3, first_lba=8)
        assert h.alive()
        assert rig.stop()[Q] == 12
        assert h.alive()
        status, text = h.stop()
    assert "Traceback" not in text and status == 0


def do_io_plain(rig: object, count: int, first_lba: int = 0) -> None:
    from tests.support.emulator_harness import ControllerRig

    assert isinstance(rig, ControllerRig)
    for i in range(count):
        data = bytes([(first_lba + i) & 0xFF]) * BLOCK
        assert rig.command(write10(first_lba + i), data_out=[data]).status == 0
        assert rig.command(read10(first_lba + i), data_in=[BLOCK]).data == data


def test_ring_broken_mid_batch_reports_nothing_in_flight(workdir: Path) -> None:
    """Heads taken before the corrupt entry wait for the driver's reset: the
    heartbeat must not show them as in flight without progress (a hang)."""
    rr = RecoveryRig.start(spec(workdir, queues=2), workdir)
    try:
        driver = rr.rig.drivers[Q]
        for _ in range(2):
            driver.add_chain([request_header(TEST_UNIT_READY)], [108], publish=False)
        driver.set_avail_ring(driver.avail_idx % driver.size, driver.size + 5)  # no such head
        driver.avail_idx += 1
        driver.publish()
        rr.frontend.kick(Q)
        deadline = 50
        while "queue 2 stopped" not in rr.stderr() and deadline:
            select.select([], [], [], 0.05)
            deadline -= 1
        assert rr.alive()
        progress = rr.progress()
        assert progress[Q] == (0, 0)
        do_io(rr, Q + 1, 1)
        assert rr.progress()[Q + 1] == (2, 0)
    finally:
        status, text = rr.close()
    assert text.count("queue 2 stopped until the driver resets the device") == 1


def test_a_kill_while_a_ring_starts_fresh_leaves_no_valid_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot is cleared before the progress words are reset and set valid
    after: never valid over a predecessor's progress for another ring run."""
    import socket

    from emulators import controller as controller_mod
    from emulators.config import ControllerConfig
    from emulators.vhost_user.effects import RingConfig
    from emulators.vhost_user.messages import VringAddr
    from emulators.virtio import splitqueue
    from emulators.virtio.memory import GuestMemory
    from emulators.virtio.memory import MemoryRegion as Region
    from launcher.statestore import layout

    shape = layout.Layout(1, 4, 4)
    fd = layout.create(tmp_path / "state", shape)
    ours, theirs = socket.socketpair()
    store = layout.StateStore(fd)
    try:
        loop = controller_mod.ControllerLoop(
            ControllerConfig("c", theirs.detach(), 1, ()), False, store, 0
        )
        ram = bytearray(1 << 20)
        loop.memory = GuestMemory.from_buffers([Region(0, len(ram), UVA_BASE, 0)], [ram])
        # A predecessor's progress for an earlier run of ring 2: 10 consumed.
        off = shape.queue_offset(0, 2)
        store.view[off + 8 : off + 24] = (10).to_bytes(8, "little") * 2

        class Killed(Exception):
            pass

        def die(*args: object) -> None:
            raise Killed

        monkeypatch.setattr(controller_mod, "reset_state", die, raising=False)
        monkeypatch.setattr(splitqueue, "reset_state", die)
        addr = VringAddr(2, 0, UVA_BASE + 0x1000, UVA_BASE + 0x2000, UVA_BASE + 0x1800, 0)
        ring = RingConfig(2, 128, 0, addr, 0x1000, 0x1800, 0x2000)
        with pytest.raises(Killed):
            loop._start_ring(ring, 0, True)
        assert int.from_bytes(store.view[off : off + 4], "little") == 0
        loop.close()
    finally:
        store.close()
        os.close(fd)
        ours.close()
