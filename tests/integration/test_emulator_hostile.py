"""Hostile descriptor chains against a real emulator process.

Each case writes raw descriptors and ring fields with the driver's low-level
writers, kicks, and then checks three things:

- the emulator is still alive, and nothing it logged is a traceback;
- it wrote nothing in guest RAM but the ring's used ring and the buffers the
  chain offered as device-writable (the data areas are filled with canary
  bytes first, and the whole RAM is compared before and after);
- it still serves the other queue of the same controller and the other
  controller (and the same queue too, unless the case broke the ring itself:
  an avail index jump or a head out of range stops that queue for good).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.driver import F_INDIRECT, F_NEXT, F_WRITE, TestDriver
from tests.support.emulator_harness import (
    REQ_SIZE,
    RESP_SIZE,
    ControllerRig,
    ControllerSpec,
    Disk,
    EmulatorHarness,
    changed_ranges,
    outside,
    request_header,
    used_ring_range,
)

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
Q = 2  # the request queue that gets the hostile chains
OTHER_Q = 3
CANARY = 0xA5
D = 100  # raw descriptors live at 100.., away from the driver's own
TUR = request_header(bytes(6))

Range = tuple[int, int]


@pytest.fixture()
def emu(tmp_path: Path) -> Iterator[EmulatorHarness]:
    specs = [
        ControllerSpec("c0", (Disk(tmp_path / "a.img"),), queues=2, memory_size=4 * MIB),
        ControllerSpec("c1", (Disk(tmp_path / "b.img"),), queues=1, memory_size=2 * MIB),
    ]
    harness = EmulatorHarness.start(specs)
    for rig in harness.rigs:
        for driver in rig.drivers.values():
            n = driver.data_end - driver.data_start
            driver.memory.write(driver.data_start, bytes([CANARY]) * n)
    yield harness
    if harness.rigs:
        harness.stop()


def wait_used(rig: ControllerRig, queue: int, count: int, timeout: float = 3.0) -> bool:
    """Wait until ``count`` new used elements are there (not consumed)."""
    driver = rig.drivers[queue]
    deadline = time.monotonic() + timeout
    while (driver.used_idx() - driver.last_used) & 0xFFFF < count:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        rig.frontend.wait_call(queue, min(left, 0.2))
    return True


def roundtrip(rig: ControllerRig, queue: int, lba: int, seed: int) -> None:
    data = bytes((seed + i) & 0xFF for i in range(4096))
    w = rig.command(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 8, 0), queue=queue, data_out=[data])
    assert (w.response, w.status) == (0, 0), w
    r = rig.command(struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0), queue=queue, data_in=[4096])
    assert (r.response, r.status, r.data) == (0, 0, data)


def check_survives(emu: EmulatorHarness, *, queue_broken: bool = False) -> None:
    assert emu.alive(), emu.stderr()
    c0, c1 = emu.rigs
    roundtrip(c0, OTHER_Q, 10, 1)
    roundtrip(c1, 2, 20, 2)
    if not queue_broken:
        roundtrip(c0, Q, 30, 3)
    assert emu.alive()
    status, err = emu.stop()
    assert status == 0, err
    assert "Traceback" not in err, err


def attack(
    emu: EmulatorHarness,
    build: Callable[[TestDriver], tuple[list[int], list[Range]]],
    *,
    expect_used: bool | None = True,
) -> list[tuple[int, int]]:
    """Build hostile chains (heads, writable ranges) on c0's queue Q, offer, kick, audit.

    Returns the used elements; fails if anything outside the used ring and
    the allowed ranges changed. ``expect_used`` None: either outcome is fine.
    """
    rig = emu.rig
    driver = rig.drivers[Q]
    heads, allowed = build(driver)
    for head in heads:
        driver.offer(head, publish=False)
    driver.publish()
    before = bytes(rig.frontend.memory)
    rig.frontend.kick(Q)
    got = wait_used(rig, Q, max(1, len(heads)), 3.0 if expect_used else 0.5)
    if expect_used is not None:
        assert got == expect_used
    time.sleep(0.05)  # anything stray would have landed by now
    after = bytes(rig.frontend.memory)
    allowed = [*allowed, used_ring_range(driver)]
    assert outside(changed_ranges(before, after), allowed) == []
    return driver.get_used() if expect_used else []


def header_at(driver: TestDriver, header: bytes = TUR) -> int:
    gpa = driver.alloc(len(header))
    driver.memory.write(gpa, header)
    return gpa


def test_descriptor_loop(emu: EmulatorHarness) -> None:
    def build(d: TestDriver) -> tuple[list[int], list[Range]]:
        resp = d.alloc(RESP_SIZE)
        d.write_desc(D, header_at(d), REQ_SIZE, F_NEXT, D + 1)
        d.write_desc(D + 1, resp, RESP_SIZE, F_WRITE | F_NEXT, D)
        d.write_desc(D + 2, header_at(d), REQ_SIZE, F_NEXT, D + 2)  # a loop onto itself
        return [D, D + 2], [(resp, resp + RESP_SIZE)]

    used = attack(emu, build)
    assert sorted(used) == [(D, 0), (D + 2, 0)]
    check_survives(emu)


def test_addresses_outside_guest_ram(emu: EmulatorHarness) -> None:
    size = emu.rig.spec.memory_size

    def build(d: TestDriver) -> tuple[list[int], list[Range]]:
        resp = d.alloc(RESP_SIZE)
        d.write_desc(D, 1 << 40, REQ_SIZE, F_NEXT, D + 1)
        d.write_desc(D + 1, resp, RESP_SIZE, F_WRITE, 0)
        d.write_desc(D + 2, header_at(d), REQ_SIZE, F_NEXT, D + 3)
        d.write_desc(D + 3, size - 40, RESP_SIZE, F_WRITE, 0)  # straddles the end
        d.write_desc(D + 4, header_at(d), REQ_SIZE, F_NEXT, D + 5)
        d.write_desc(D + 5, 2**64 - 16, RESP_SIZE, F_WRITE, 0)  # wraps around
        return [D, D + 2, D + 4], [(resp, resp + RESP_SIZE)]

    used = attack(emu, build)
    assert sorted(used) == [(D, 0), (D + 2, 0), (D + 4, 0)]
    check_survives(emu)


def test_zero_and_huge_lengths(emu: EmulatorHarness) -> None:
    allowed: list[Range] = []

    def build(d: TestDriver) -> tuple[list[int], list[Range]]:
        r1, r2, r3 = d.alloc(RESP_SIZE), d.alloc(RESP_SIZE), d.alloc(RESP_SIZE)
        d.write_desc(D, header_at(d), 0, F_NEXT, D + 1)  # empty header
        d.write_desc(D + 1, r1, RESP_SIZE, F_WRITE, 0)
        d.write_desc(D + 2, header_at(d), REQ_SIZE, F_NEXT, D + 3)
        d.write_desc(D + 3, r2, 0xFFFF_FFFF, F_WRITE, 0)  # 4 GiB response buffer
        d.write_desc(D + 4, header_at(d), 0xFFFF_FFFF, F_NEXT, D + 5)  # 4 GiB header
        d.write_desc(D + 5, r3, RESP_SIZE, F_WRITE, 0)
        d.write_desc(D + 6, header_at(d), REQ_SIZE, F_NEXT, D + 7)
        d.write_desc(D + 7, r1, 0, F_WRITE, 0)  # zero-length response
        allowed.extend([(r1, r1 + RESP_SIZE)])
        return [D, D + 2, D + 4, D + 6], list(allowed)

    used = dict(attack(emu, build))
    assert used[D + 2] == 0 and used[D + 4] == 0 and used[D + 6] == 0
    assert used[D] in (0, RESP_SIZE)  # refused, or answered "bad request"
    check_survives(emu)


def test_nested_and_malformed_indirect(emu: EmulatorHarness) -> None:
    def build(d: TestDriver) -> tuple[list[int], list[Range]]:
        resp = d.alloc(RESP_SIZE)
        inner = d.alloc(32)
        d.write_desc_at(inner, header_at(d), REQ_SIZE, F_NEXT, 1)
        d.write_desc_at(inner + 16, resp, RESP_SIZE, F_WRITE, 0)
        outer = d.alloc(32)
        d.write_desc_at(outer, header_at(d), REQ_SIZE, F_NEXT, 1)
        d.write_desc_at(outer + 16, inner, 32, F_INDIRECT, 0)  # indirect inside indirect
        d.write_desc(D, outer, 32, F_INDIRECT, 0)
        d.write_desc(D + 1, inner, 24, F_INDIRECT, 0)  # not a multiple of 16
        d.write_desc(D + 2, inner, 0, F_INDIRECT, 0)  # empty table
        looped = d.alloc(32)
        d.write_desc_at(looped, header_at(d), REQ_SIZE, F_NEXT, 1)
        d.write_desc_at(looped + 16, resp, RESP_SIZE, F_WRITE | F_NEXT, 0)  # loop in table
        d.write_desc(D + 3, looped, 32, F_INDIRECT, 0)
        d.write_desc(D + 4, inner, 32, F_INDIRECT | F_NEXT, D + 5)  # INDIRECT with NEXT
        d.write_desc(D + 5, resp, RESP_SIZE, F_WRITE, 0)
        return [D, D + 1, D + 2, D + 3, D + 4], [(resp, resp + RESP_SIZE)]

    used = dict(attack(emu, build))
    assert set(used) == {D, D + 1, D + 2, D + 3, D + 4}
    assert all(used[h] == 0 for h in (D, D + 1, D + 2, D + 3))
    check_survives(emu)


def test_avail_index_jump_breaks_only_that_queue(emu: EmulatorHarness) -> None:
    def build(d: TestDriver) -> tuple[list[int], list[Range]]:
        d.avail_idx = (d.avail_idx + d.size + 7) & 0xFFFF
        return [], []

    attack(emu, build, expect_used=False)
    check_survives(emu, queue_broken=True)


def test_head_out_of_range(emu: EmulatorHarness) -> None:
    def build(d: TestDriver) -> tuple[list[int], list[Range]]:
        return [d.size + 3], []

    attack(emu, build, expect_used=False)
    check_survives(emu, queue_broken=True)


def test_descriptors_pointing_into_the_rings(emu: EmulatorHarness) -> None:
    driver = emu.rig.drivers[Q]
    lay = driver.layout
    ring_area = (lay.desc_gpa, used_ring_range(driver)[1])

    def build(d: TestDriver) -> tuple[list[int], list[Range]]:
        # Header read from the descriptor table, response written over the used ring,
        # data-in over the avail ring.
        d.write_desc(D, lay.desc_gpa, REQ_SIZE, F_NEXT, D + 1)
        d.write_desc(D + 1, lay.used_gpa, RESP_SIZE, F_WRITE | F_NEXT, D + 2)
        d.write_desc(D + 2, lay.avail_gpa, 64, F_WRITE, 0)
        return [D], [ring_area]

    attack(emu, build, expect_used=None)
    # The guest wrecked its own ring: the other queues and controllers must go on.
    check_survives(emu, queue_broken=True)


def test_short_header_gets_a_failure_response(emu: EmulatorHarness) -> None:
    rig = emu.rig
    head = rig.submit(Q, [TUR[:20]], [RESP_SIZE], kick=False)
    buffer = rig.drivers[Q]._chains[head].writable[0]
    before = bytes(rig.frontend.memory)
    rig.frontend.kick(Q)
    used_len, writable = rig.wait(Q, head)
    assert used_len == RESP_SIZE
    assert writable[0][11] == 9  # VIRTIO_SCSI_S_FAILURE
    after = bytes(rig.frontend.memory)
    allowed = [(buffer[0], buffer[0] + buffer[1]), used_ring_range(rig.drivers[Q])]
    assert outside(changed_ranges(before, after), allowed) == []
    check_survives(emu)


def test_response_buffer_too_small(emu: EmulatorHarness) -> None:
    rig = emu.rig
    driver = rig.drivers[Q]
    inquiry = bytes([0x12, 0, 0, 0, 96, 0])
    # 50 + 40 bytes in all: short of the 108-byte response header.
    head = rig.submit_command(inquiry, queue=Q, data_in=[40], resp_size=50, kick=False)
    before = bytes(rig.frontend.memory)
    rig.frontend.kick(Q)
    used_len, writable = rig.wait(Q, head)
    assert used_len == 0
    # Nothing was written: the response and data buffers still hold canaries.
    assert [len(b) for b in writable] == [50, 40]
    assert all(b == bytes([CANARY]) * len(b) for b in writable)
    changes = changed_ranges(before, bytes(rig.frontend.memory))
    assert outside(changes, [used_ring_range(driver)]) == []
    check_survives(emu)
