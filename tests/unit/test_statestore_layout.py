"""State store slots: what a successor may trust after a kill at any store."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulators.scsi import sense as S
from emulators.scsi.lun import MAX_PENDING_UA, STATE_SIZE, LunState
from emulators.scsi.virtio_scsi import EVENTS_STATE_SIZE, EventQueueState
from emulators.virtio.state import required_size
from launcher.statestore import layout
from launcher.statestore.layout import RingIdentity, StateStore


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    fd = layout.create(tmp_path / "state", layout.Layout(2, 4, 8))
    s = StateStore(fd)
    os.close(fd)
    return s


def test_queue_slot_names_its_ring(store: StateStore) -> None:
    ring = RingIdentity(128, 7, 0x7F00_0000_1000, 0x7F00_0000_1800, 0x7F00_0000_2000)
    saved, body = store.queue_slot(1, 2)
    assert saved is None
    body.release()
    store.set_queue_slot(1, 2, ring)
    saved, body = store.queue_slot(1, 2)
    assert saved == ring
    body.release()
    # Other slots untouched.
    for c, q in ((0, 2), (1, 1), (1, 3)):
        other, view = store.queue_slot(c, q)
        view.release()
        assert other is None
    store.set_queue_slot(1, 2, None)
    saved, body = store.queue_slot(1, 2)
    body.release()
    assert saved is None


def test_queue_slot_valid_flag_is_the_last_store(store: StateStore) -> None:
    """Set: identity, num, then the flag; a crash before the flag shows nothing."""
    rec = Recorder(store)
    with rec:
        store.set_queue_slot(0, 1, RingIdentity(8, 0, 1, 2, 3))
    off = store.layout.queue_offset(0, 1)
    assert [w[0] for w in rec.writes][-1] == off
    assert [w[0] for w in rec.writes].count(off) == 1


class Recorder:
    """Records every store a StateStore makes through its one door."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.writes: list[tuple[int, bytes]] = []

    def __enter__(self) -> Recorder:
        inner = self.store._put

        def put(offset: int, data: bytes) -> None:
            self.writes.append((offset, bytes(data)))
            inner(offset, data)

        self.store._put = put  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.store._put


def kill_images(before: bytes, writes: list[tuple[int, bytes]]) -> Iterator[bytes]:
    """Every content a SIGKILL can leave behind: after each byte of each store.

    A store of several bytes (a memcpy) may land in any byte order, so each
    is played forwards and backwards; only the bytes it changes make new
    images.
    """
    image = bytearray(before)
    yield bytes(image)
    for offset, data in writes:
        changed = [i for i, b in enumerate(data) if image[offset + i] != b]
        for order in (changed, changed[::-1]):
            partial = bytearray(image)
            for i in order:
                partial[offset + i] = data[i]
                yield bytes(partial)
        image[offset : offset + len(data)] = data


def _over(shape: layout.Layout) -> StateStore:
    buffer = bytearray(shape.size)
    buffer[: layout.HEADER_SIZE] = shape.header()
    return StateStore.over(buffer)


def _reading(image: bytes, read: Callable[[StateStore], object]) -> object:
    view = StateStore.over(bytearray(image))
    try:
        return read(view)
    finally:
        view.close()


def _lun_reading(controller: int, slot: int) -> Callable[[StateStore], object]:
    def read(s: StateStore) -> object:
        valid, lun, body = s.lun_slot(controller, slot)
        try:
            return (lun, LunState.unpack(body)) if valid else None
        finally:
            body.release()
    return read


_UA_CODES = [(u.asc << 8) | u.ascq for u in (
    S.UA_POWER_ON_RESET, S.UA_BUS_DEVICE_RESET, S.UA_I_T_NEXUS_LOSS,
    S.UA_MODE_PARAMETERS_CHANGED, S.UA_CAPACITY_CHANGED, S.UA_REPORTED_LUNS_CHANGED)]
_SENSES = st.one_of(
    st.none(),
    st.sampled_from([S.INVALID_OPCODE, S.LBA_OUT_OF_RANGE, S.WRITE_PROTECTED,
                     S.UA_CAPACITY_CHANGED, S.INTERNAL_TARGET_FAILURE]),
    st.builds(lambda b, bit, cdb: S.INVALID_FIELD_IN_CDB.at(b, bit, in_cdb=cdb),
              st.integers(0, 0xFFFF), st.one_of(st.none(), st.integers(0, 7)), st.booleans()),
    st.builds(lambda info: S.UNRECOVERED_READ_ERROR.with_information(info),
              st.integers(0, 0xFFFFFFFF)),
)
LUN_STATES = st.builds(
    LunState,
    pending_ua=st.lists(st.sampled_from(_UA_CODES), max_size=MAX_PENDING_UA).map(tuple),
    sense=_SENSES,
    write_cache_enabled=st.booleans(),
    reservation_type=st.integers(0, 255),
    reservation_holder=st.booleans(),
    reservation_key=st.integers(0, 2**64 - 1),
    pr_generation=st.integers(0, 2**32 - 1),
    registered_key=st.integers(0, 2**64 - 1),
)
LUN_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from([3, 3, 3, 7]), LUN_STATES),
        st.tuples(st.just("clear"), st.just(0), st.just(LunState())),
    ),
    min_size=1, max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(ops=LUN_OPS)
def test_a_lun_slot_killed_at_any_byte_holds_the_old_or_the_new_state(
    ops: list[tuple[str, int, LunState]],
) -> None:
    """Kill the writer after every byte of every store of each update: the
    successor reads exactly the state before the update or after it, and
    never a state it cannot use."""
    store = _over(layout.Layout(1, 3, 4))
    read = _lun_reading(0, 2)
    for op, lun, state in ops:
        before = bytes(store.view)
        old = read(store)
        with Recorder(store) as rec:
            if op == "write":
                store.write_lun_slot(0, 2, lun, state.pack())
            else:
                store.clear_lun_slot(0, 2)
        new = read(store)
        assert new == ((lun, state) if op == "write" else None)
        for image in kill_images(before, rec.writes):
            got = _reading(image, read)  # never raises: a torn state would
            if op == "write" and isinstance(old, tuple) and old[0] != lun:
                assert got in (old, None, new)  # another LUN's slot is dropped first
            else:
                assert got in (old, new)


RINGS = st.builds(RingIdentity, st.sampled_from([8, 256, 1024]), st.integers(0, 0xFFFF),
                  st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                  st.integers(0, 2**64 - 1))


@settings(max_examples=60, deadline=None)
@given(rings=st.lists(st.one_of(st.none(), RINGS), min_size=1, max_size=6))
def test_a_queue_slot_killed_at_any_byte_names_a_whole_ring_or_none(
    rings: list[RingIdentity | None],
) -> None:
    """A queue slot changes through "no valid slot": a kill mid-update leaves
    the old ring, none (the ring then starts fresh at the front-end's base),
    or the new one, never an identity mixed from two rings."""
    store = _over(layout.Layout(1, 3, 1))

    def read(s: StateStore) -> object:
        ring, body = s.queue_slot(0, 1)
        body.release()
        return ring

    for ring in rings:
        before = bytes(store.view)
        old = read(store)
        with Recorder(store) as rec:
            store.set_queue_slot(0, 1, ring)
        assert read(store) == ring
        for image in kill_images(before, rec.writes):
            assert _reading(image, read) in (old, None, ring)


def _events(spec: list[tuple[int, int]]) -> EventQueueState:
    events = EventQueueState()
    for kind, lun in spec:
        (events.lun_added, events.lun_removed, events.capacity_changed)[kind](lun)
    return events


@settings(max_examples=40, deadline=None)
@given(updates=st.lists(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 255)),
                                 max_size=20), min_size=1, max_size=5))
def test_the_events_slot_killed_at_any_byte_holds_the_old_or_the_new_events(
    updates: list[list[tuple[int, int]]],
) -> None:
    store = _over(layout.Layout(2, 3, 1))

    def read(s: StateStore) -> object:
        valid, body = s.events_slot(1)
        try:
            return EventQueueState.unpack(body).pack() if valid else None
        finally:
            body.release()

    for spec in updates:
        blob = _events(spec).pack()
        before = bytes(store.view)
        old = read(store)
        with Recorder(store) as rec:
            store.write_events_slot(1, blob)
        assert read(store) == blob
        for image in kill_images(before, rec.writes):
            assert _reading(image, read) in (old, blob)


def test_the_leaf_layout_agrees_with_the_emulator() -> None:
    """layout.py states the sizes it holds instead of importing them."""
    assert required_size(layout.MAX_QUEUE_SIZE) == layout.QUEUE_PROGRESS_SIZE
    assert STATE_SIZE <= layout.LUN_STATE_SIZE
    assert EVENTS_STATE_SIZE <= layout.EVENTS_STATE_SIZE


def test_lun_state_is_never_rewritten_in_place(store: StateStore) -> None:
    off = store.layout.lun_offset(0, 3) + 8
    step = (layout.LUN_STATE_SIZE + 7) & ~7

    def copies() -> tuple[bytes, bytes]:
        return (bytes(store.view[off : off + STATE_SIZE]),
                bytes(store.view[off + step : off + step + STATE_SIZE]))

    states = [
        LunState.fresh(initial_unit_attention=True),
        LunState(write_cache_enabled=False),
        LunState(sense=S.INVALID_FIELD_IN_CDB.at(4, 1)),
    ]
    previous: bytes | None = None
    for state in states:
        before = copies()
        store.write_lun_slot(0, 3, 3, state.pack())
        after = copies()
        valid, lun, body = store.lun_slot(0, 3)
        assert valid and lun == 3 and LunState.unpack(body) == state
        body.release()
        # Only the copy not in use was written: a kill in the middle of the
        # write leaves the selector on the old copy, still whole.
        changed = [i for i in (0, 1) if before[i] != after[i]]
        assert len(changed) == 1
        if previous is not None:
            kept = 1 - changed[0]
            assert before[kept] == after[kept] == previous
        previous = state.pack()
    store.clear_lun_slot(0, 3)
    valid, _, body = store.lun_slot(0, 3)
    body.release()
    assert not valid


def test_lun_slot_taken_by_another_lun_number(store: StateStore) -> None:
    store.write_lun_slot(1, 0, 0, LunState().pack())
    store.write_lun_slot(1, 0, 9, LunState(write_cache_enabled=False).pack())
    valid, lun, body = store.lun_slot(1, 0)
    assert valid and lun == 9 and not LunState.unpack(body).write_cache_enabled
    body.release()


def test_layout_version_refuses_an_old_file(tmp_path: Path) -> None:
    fd = layout.create(tmp_path / "s", layout.Layout(1, 3, 2))
    try:
        header = bytearray(os.pread(fd, layout.HEADER_SIZE, 0))
        header[8:12] = (1).to_bytes(4, "little")
        os.pwrite(fd, bytes(header), 0)
        with pytest.raises(layout.StateStoreError, match="version"):
            StateStore(fd)
    finally:
        os.close(fd)
