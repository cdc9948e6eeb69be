"""Fuzz harness for the state-store reader: what a (possibly compromised)
predecessor left in the file, read back by its successor.

The reader is the whole path an emulator takes: `StateStore` checks the
header, `queue_slot`, `lun_slot` and `events_slot` give the slots,
`LunState.unpack` parses a LUN's state (which the SCSI command set then acts
on: REQUEST SENSE, TEST UNIT READY, MODE SENSE), `EventQueueState.unpack` a
controller's waiting events (delivered until none is left), and a queue
slot's progress words resume a split
queue over guest memory (`SplitQueue.resume`, re-walking every head it says
was in flight, then popping on).

Input: flags u8 (bits 0-2: ring size), the guest's used index u16, the file
size u32 (at most `MAX_FILE`), the 64-byte header, then patches (records
whose bytes are a u32 offset and the bytes to write there) over a zeroed
file. The guest memory holds a ring of that size built by the test driver
with a few chains offered, in a `CanaryArena`.
"""

from __future__ import annotations

import struct

from emulators.scsi.lun import LunState
from emulators.scsi.virtio_scsi import EventQueueState
from emulators.virtio.chain import DescriptorChain
from emulators.virtio.errors import RecoveryError
from emulators.virtio.splitqueue import SplitQueue
from emulators.virtio.state import BufferQueueState, required_size
from launcher.statestore.layout import (
    HEADER_SIZE,
    Layout,
    RingIdentity,
    StateStore,
    StateStoreError,
)
from tests.support.driver import TestDriver
from tests.unit.test_virtio_fuzz import check_inside, drain

from .harness import ErrorLog, Harness, Input, OneInput, record
from .scsi import _rig
from .virtio import _SPAN, SIZES, canary_memory

MAX_FILE = 256 * 1024
SEED_LAYOUT = Layout(controllers=1, queues=3, lun_slots=2)
_PROBES = (bytes((0x03, 0, 0, 0, 252, 0)), bytes(6), bytes((0x1A, 0, 0x3F, 0, 255, 0)))
"""REQUEST SENSE, TEST UNIT READY, MODE SENSE (6) of every page."""


def _guest(size: int, chains: int = 3) -> tuple[object, object, TestDriver]:
    memory, arena = canary_memory()
    driver = TestDriver(memory, size, 0, data_end=_SPAN)
    for i in range(min(chains, size)):
        driver.add_chain([bytes((i,)) * 51], [])
    return memory, arena, driver


def _seeds() -> list[bytes]:
    out = []
    for size, taken, lun_states in [
        (4, 2, [LunState.fresh(True)]),
        (8, 3, [LunState.fresh(False), LunState.fresh(True)]),
        (1, 0, []),
    ]:
        raw = bytearray(SEED_LAYOUT.size)
        raw[:HEADER_SIZE] = SEED_LAYOUT.header()
        store = StateStore.over(raw)
        memory, _arena, driver = _guest(size)
        layout = driver.layout
        _, body = store.queue_slot(0, 0)
        state = BufferQueueState(body[: required_size(size)], size)
        queue = SplitQueue(memory, size, layout.desc_gpa, layout.avail_gpa,  # type: ignore[arg-type]
                           layout.used_gpa, event_idx=False, state=state)
        queue.set_base(0)
        for _ in range(taken):
            queue.pop()
        queue.release()
        state.release()
        body.release()
        store.set_queue_slot(0, 0, RingIdentity(size, 0, layout.desc_gpa, layout.avail_gpa,
                                                layout.used_gpa))
        for slot, lun_state in enumerate(lun_states):
            store.write_lun_slot(0, slot, slot, lun_state.pack())
        events = EventQueueState()
        for lun in range(len(lun_states)):
            events.lun_added(lun)
            events.capacity_changed(lun)
        store.write_events_slot(0, events.pack())
        store.close()
        patches = b""
        for at in range(HEADER_SIZE, len(raw), 512):
            chunk = bytes(raw[at : at + 512])
            if any(chunk):
                patches += record(0, struct.pack("<I", at) + chunk.rstrip(b"\0"))
        head = struct.pack("<BHI", SIZES.index(size), 0, len(raw)) + bytes(raw[:HEADER_SIZE])
        out.append(head + patches)
    return out


def _make() -> OneInput:
    rig = _rig()
    errors = ErrorLog("emulators")
    scsi = rig.target.scsi

    def use_lun_state(state: LunState) -> None:
        lu = rig.lus[0]
        lu.state = state
        for cdb in _PROBES:
            scsi.execute(0, cdb, [], [memoryview(bytearray(255))])
        errors.check()

    def use_events(events: EventQueueState) -> None:
        assert EventQueueState.unpack(events.pack()).pack() == events.pack()
        buffer = memoryview(bytearray(16))
        for _ in range(events.capacity + 2):
            if not events.pending():
                return
            assert events.fill([buffer]) == len(buffer)
        raise AssertionError("events still pending after capacity + 1 deliveries")

    def resume(body: memoryview, size: int, guest_used: int) -> None:
        memory, arena, driver = _guest(size)
        driver.set_used_idx(guest_used)
        layout = driver.layout
        state = BufferQueueState(body[: required_size(size)], size)
        queue = SplitQueue(memory, size, layout.desc_gpa, layout.avail_gpa,  # type: ignore[arg-type]
                           layout.used_gpa, event_idx=False, state=state)
        try:
            plan = queue.resume()
        except RecoveryError:
            assert queue.broken is not None
        else:
            done = []
            for head in plan.rerun:
                chain = queue.chain_for(head)
                if isinstance(chain, DescriptorChain):
                    for view in chain.readable + chain.writable:
                        check_inside(view, arena.buffers)  # type: ignore[attr-defined]
                done.append((head, 0))
            queue.push_used_many(done)
            drain(queue, arena.buffers, True)  # type: ignore[attr-defined]
        queue.release()
        state.release()
        arena.check()  # type: ignore[attr-defined]

    def one_input(data: bytes) -> None:
        inp = Input(data)
        size = SIZES[(inp.u8() & 7) % len(SIZES)]
        guest_used = inp.u16()
        raw = bytearray(min(inp.u32(), MAX_FILE))
        head = inp.take(HEADER_SIZE)
        raw[: len(head)] = head[: len(raw)]
        for _tag, patch in inp.records():
            if len(patch) >= 4 and raw:
                at = struct.unpack_from("<I", patch)[0] % len(raw)
                data_ = patch[4:][: len(raw) - at]
                raw[at : at + len(data_)] = data_
        try:
            store = StateStore.over(raw)
        except StateStoreError:
            return
        layout = store.layout
        for controller in range(min(layout.controllers, 2)):
            for queue in range(min(layout.queues, 4)):
                identity, body = store.queue_slot(controller, queue)
                if identity is not None and identity.num == size:
                    resume(body, size, guest_used)
                body.release()
            for slot in range(min(layout.lun_slots, 4)):
                valid, _lun, state_bytes = store.lun_slot(controller, slot)
                if valid:
                    try:
                        state = LunState.unpack(state_bytes)
                    except ValueError:
                        pass
                    else:
                        use_lun_state(state)
                state_bytes.release()
            valid, events_bytes = store.events_slot(controller)
            if valid:
                try:
                    events = EventQueueState.unpack(events_bytes)
                except ValueError:
                    pass
                else:
                    use_events(events)
            events_bytes.release()
        store.close()

    return one_input


STATESTORE = Harness(
    "statestore",
    "the state-store reader and what resumes from it: LUN state, queue progress "
    "(launcher.statestore.layout, emulators.scsi.lun, emulators.virtio.state)",
    _make,
    _seeds,
    max_len=8192,
)
