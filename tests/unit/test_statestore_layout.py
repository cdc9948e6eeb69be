"""State store slots: what a successor may trust after a kill at any store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emulators.scsi.lun import STATE_SIZE, LunState
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
    off = store.layout.queue_offset(0, 1)
    writes: list[int] = []
    struct_pack = layout._U32
    id_struct = layout._RING_ID
    layout._U32 = _Recording(struct_pack, writes, off)  # type: ignore[assignment]
    layout._RING_ID = _Recording(id_struct, writes, off)  # type: ignore[assignment]
    try:
        store.set_queue_slot(0, 1, RingIdentity(8, 0, 1, 2, 3))
    finally:
        layout._U32 = struct_pack
        layout._RING_ID = id_struct
    assert writes[-1] == 0 and writes.count(0) == 1


class _Recording:
    def __init__(self, inner: object, writes: list[int], base: int) -> None:
        self._inner = inner
        self._writes = writes
        self._base = base

    @property
    def size(self) -> int:
        return int(self._inner.size)  # type: ignore[attr-defined]

    def pack_into(self, buffer: memoryview, offset: int, *values: int) -> None:
        self._writes.append(offset - self._base)
        self._inner.pack_into(buffer, offset, *values)  # type: ignore[attr-defined]

    def unpack_from(self, buffer: memoryview, offset: int = 0) -> tuple[int, ...]:
        return tuple(self._inner.unpack_from(buffer, offset))  # type: ignore[attr-defined]


def test_lun_state_is_never_rewritten_in_place(store: StateStore) -> None:
    off = store.layout.lun_offset(0, 3) + 8
    step = (STATE_SIZE + 7) & ~7

    def copies() -> tuple[bytes, bytes]:
        return (bytes(store.view[off : off + STATE_SIZE]),
                bytes(store.view[off + step : off + step + STATE_SIZE]))

    states = [
        LunState.fresh(initial_unit_attention=True),
        LunState(write_cache_enabled=False),
        LunState(sense_key=5, sense_asc=0x24),
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
