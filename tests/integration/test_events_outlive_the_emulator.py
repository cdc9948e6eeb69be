"""virtio-scsi events not yet delivered survive a restart of the emulator.

A disk added (or removed, or resized) while the guest had no event buffer
posted waits in the controller's event queue. If the emulator dies then,
its successor must still deliver it, or the guest never rescans and never
sees the disk. The events live in the state store's events slot; an event
is saved as delivered only after its buffer was published.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulators.config import ControllerConfig, LunConfig
from emulators.controller import EVENT_QUEUE, ControllerLoop
from emulators.scsi.virtio_scsi import (
    EVENTS_STATE_SIZE,
    EventQueueState,
    EventType,
    ResetReason,
    encode_event,
)
from emulators.vhost_user.effects import RingConfig
from emulators.vhost_user.messages import VringAddr
from emulators.virtio.memory import GuestMemory, MemoryRegion
from launcher.statestore import layout
from tests.support.driver import TestDriver

RAM = 1 << 20
UVA = 0x7F00_0000_0000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[layout.StateStore]:
    fd = layout.create(tmp_path / "state", layout.Layout(1, 3, 8))
    s = layout.StateStore(fd)
    os.close(fd)
    yield s
    s.close()


def _disk(tmp_path: Path, name: str) -> int:
    fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 20)
    return fd


def _controller(tmp_path: Path, store: layout.StateStore, luns: tuple[int, ...],
                first_start: bool) -> tuple[ControllerLoop, socket.socket]:
    ours, theirs = socket.socketpair()
    config = ControllerConfig("c0", theirs.detach(), 1, tuple(
        LunConfig(n, f"d{n}", _disk(tmp_path, f"d{n}"), False, 512) for n in luns))
    return ControllerLoop(config, first_start, store, 0), ours


def _close(c: ControllerLoop, peer: socket.socket) -> None:
    for unit in c.target.scsi.luns.values():
        os.close(unit.backend.fd)  # type: ignore[attr-defined]
    c.close()
    peer.close()


def test_a_hot_added_disk_is_announced_by_the_successor(
    tmp_path: Path, store: layout.StateStore
) -> None:
    first, peer = _controller(tmp_path, store, (0,), first_start=True)
    first.add_lun(LunConfig(3, "d3", _disk(tmp_path, "d3"), False, 512))
    assert first.target.events.pending()
    _close(first, peer)  # killed before the guest posted an event buffer

    second, peer = _controller(tmp_path, store, (0, 3), first_start=False)
    assert EVENT_QUEUE in second.pending_kicks
    buffer = bytearray(16)
    assert second.target.events.fill([memoryview(buffer)]) == 16
    event, _, reason = struct.unpack("<I8sI", buffer)
    assert (event, reason) == (EventType.TRANSPORT_RESET, ResetReason.RESCAN)
    assert buffer[4:8] == bytes((1, 0, 0, 3))  # target 0, LUN 3 (peripheral addressing)
    second._save_events()  # as _serve_events does once the buffer is published
    _close(second, peer)

    third, peer = _controller(tmp_path, store, (0, 3), first_start=False)
    assert not third.target.events.pending()  # delivered once, not again
    _close(third, peer)


def _pending(c: ControllerLoop) -> list[tuple[int, int, int]]:
    """(event, reason, LUN) of each event `c` has yet to deliver."""
    found = []
    while c.target.events.pending():
        buffer = bytearray(16)
        c.target.events.fill([memoryview(buffer)])
        event, field, reason = struct.unpack("<I8sI", buffer)
        found.append((event, reason, field[3]))
    return found


def test_a_disk_whose_add_the_dead_emulator_never_saved_is_announced(
    tmp_path: Path, store: layout.StateStore
) -> None:
    """Killed in the middle of adding a LUN, before the guest's event was
    saved: the launcher, in doubt, keeps the disk and the successor's config
    holds it. The successor finds no state for it and tells the guest, or
    the guest would never see a disk management says is attached."""
    first, peer = _controller(tmp_path, store, (0,), first_start=True)
    assert not first.target.events.pending()  # a first start announces nothing
    _close(first, peer)  # LUN 0's state is saved; LUN 3's add never was

    second, peer = _controller(tmp_path, store, (0, 3), first_start=False)
    assert EVENT_QUEUE in second.pending_kicks
    assert _pending(second) == [(EventType.TRANSPORT_RESET, ResetReason.RESCAN, 3)]
    second._save_events()
    _close(second, peer)

    third, peer = _controller(tmp_path, store, (0, 3), first_start=False)
    assert not third.target.events.pending()  # LUN 3's state is saved now
    assert EVENT_QUEUE not in third.pending_kicks
    _close(third, peer)


def test_a_disk_whose_remove_went_unanswered_is_kept_for_the_guest(
    tmp_path: Path, store: layout.StateStore
) -> None:
    """Killed after removing a LUN and before answering: the launcher keeps
    the disk, so the successor serves it. A REMOVED still waiting is
    withdrawn (the guest keeps the disk it never heard go); one delivered
    already is followed by a RESCAN (the guest finds it again)."""
    first, peer = _controller(tmp_path, store, (0, 3), first_start=True)
    first.remove_lun(3)  # the REMOVED waits: no event buffer was posted
    _close(first, peer)
    second, peer = _controller(tmp_path, store, (0, 3), first_start=False)
    assert _pending(second) == []
    second._save_events()
    _close(second, peer)

    third, peer = _controller(tmp_path, store, (0, 3), first_start=False)
    third.remove_lun(3)
    assert _pending(third) == [(EventType.TRANSPORT_RESET, ResetReason.REMOVED, 3)]
    third._save_events()  # delivered
    _close(third, peer)
    fourth, peer = _controller(tmp_path, store, (0, 3), first_start=False)
    assert _pending(fourth) == [(EventType.TRANSPORT_RESET, ResetReason.RESCAN, 3)]
    _close(fourth, peer)


def test_lun_served_withdraws_or_rescans() -> None:
    events = EventQueueState()
    events.lun_added(2)
    events.lun_served(2)  # a RESCAN waits already
    events.capacity_changed(4)
    events.lun_served(4)  # a PARAM_CHANGE tells nothing of presence
    events.lun_removed(5)
    events.lun_added(5)
    events.lun_removed(5)
    events.lun_served(5)  # the last REMOVED withdrawn: add, remove, add in effect
    got = []
    while events.pending():
        buffer = bytearray(16)
        events.fill([memoryview(buffer)])
        event, field, reason = struct.unpack("<I8sI", buffer)
        got.append((event, reason, field[3]))
    rescan, removed = ResetReason.RESCAN, ResetReason.REMOVED
    reset, param = EventType.TRANSPORT_RESET, EventType.PARAM_CHANGE
    assert got == [(reset, rescan, 2), (param, 0x2A | 0x09 << 8, 4), (reset, rescan, 4),
                   (reset, removed, 5), (reset, rescan, 5)]


def _event_ring(driver: TestDriver) -> RingConfig:
    r = driver.layout
    return RingConfig(EVENT_QUEUE, r.size, 0,
                      VringAddr(EVENT_QUEUE, 0, UVA + r.desc_gpa, UVA + r.used_gpa,
                                UVA + r.avail_gpa, 0),
                      r.desc_gpa, r.avail_gpa, r.used_gpa)


@pytest.mark.parametrize("waiting", [True, False])
def test_an_event_buffer_taken_by_the_dead_emulator_is_filled_again(
    tmp_path: Path, store: layout.StateStore, waiting: bool
) -> None:
    """Killed between taking an event buffer and publishing it: the successor
    re-runs that buffer as an event buffer, with the event that waited (or
    NO_EVENT), never as a request nor as it was. Linux reads an event
    buffer whatever its used length says, and this one still holds the
    event it carried before: left as it was, a REMOVED of a LUN number
    since reused would drop a live disk."""
    ram = bytearray(RAM)
    region = MemoryRegion(0, RAM, UVA, 0)
    driver = TestDriver(GuestMemory.from_buffers([region], [ram]), 8, 0x1000)
    ring = _event_ring(driver)

    first, peer = _controller(tmp_path, store, (0, 3), first_start=True)
    first.memory = GuestMemory.from_buffers([region], [ram])
    first._start_ring(ring, 0, True)
    head = driver.add_chain([], [16])
    stale = encode_event(EventType.TRANSPORT_RESET, ResetReason.REMOVED, 3)
    driver.memory.write(driver._chains[head].writable[0][0], stale)  # its last event
    if waiting:
        first.remove_lun(3)  # the event queued, and saved
        first.add_lun(LunConfig(3, "d3", _disk(tmp_path, "d3b"), False, 512))
        first.target.events._pending.popleft()  # REMOVED was delivered before
        first._save_events()
    taken = first.rings[EVENT_QUEUE].queue.pop()  # killed here, before push_used
    assert taken is not None
    _close(first, peer)

    second, peer = _controller(tmp_path, store, (0, 3), first_start=False)
    second.memory = GuestMemory.from_buffers([region], [ram])
    second._start_ring(ring, 0, True)
    [(done, used)] = driver.get_used()
    assert done == head and used == 16
    event, field, reason = struct.unpack("<I8sI", driver.read_writable(head)[0])
    if waiting:
        assert (event, reason, field[3]) == (EventType.TRANSPORT_RESET, ResetReason.RESCAN, 3)
    else:
        assert event == EventType.NO_EVENT
    assert not second.target.events.pending()
    _close(second, peer)
    third, peer = _controller(tmp_path, store, (0, 3), first_start=False)
    assert not third.target.events.pending()  # saved as delivered
    _close(third, peer)


def test_stored_events_are_untrusted_input() -> None:
    events = EventQueueState()
    events.lun_added(3)
    events.capacity_changed(0)
    events.missed = True
    blob = events.pack()
    assert len(blob) == EVENTS_STATE_SIZE <= layout.EVENTS_STATE_SIZE
    again = EventQueueState.unpack(blob)
    assert again.pack() == blob
    for bad in (
        b"XXXX" + blob[4:],  # magic
        blob[:6] + bytes((17,)) + blob[7:],  # more events than room
        blob[:7] + bytes((2,)) + blob[8:],  # missed flag not 0 or 1
        blob[:8] + struct.pack("<HHH", 2, 0, 0) + blob[14:],  # ASYNC_NOTIFY: never queued
        blob[:8] + struct.pack("<HHH", 1, 1, 0x4000) + blob[14:],  # LUN out of range
        blob[:20] + struct.pack("<HHH", 1, 1, 1) + blob[26:],  # an entry past the count
        blob[:10],
    ):
        with pytest.raises(ValueError):
            EventQueueState.unpack(bad)
