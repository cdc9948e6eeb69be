"""GuestMemory: region table validation, checked translation, mmap lifetime."""

from __future__ import annotations

import os

import pytest

from emulators.virtio.errors import GuestMemoryError
from emulators.virtio.memory import GuestMemory, MemoryRegion
from tests.support.driver import create_memfd_memory

KIB = 1024


def two_regions() -> tuple[GuestMemory, bytearray, bytearray]:
    a, b = bytearray(64 * KIB), bytearray(64 * KIB)
    regions = [
        MemoryRegion(0x10000, 64 * KIB, 0x7000_0000, 0),
        MemoryRegion(0x0, 64 * KIB, 0x7100_0000, 0),  # unsorted on purpose
    ]
    return GuestMemory.from_buffers(regions, [a, b]), a, b


def test_region_rejects_zero_size_and_wrap() -> None:
    with pytest.raises(GuestMemoryError, match="size 0"):
        MemoryRegion(0, 0, 0, 0)
    with pytest.raises(GuestMemoryError, match="wraps the guest physical"):
        MemoryRegion(2**64 - 4096, 8192, 0, 0)
    with pytest.raises(GuestMemoryError, match="wraps the frontend"):
        MemoryRegion(0, 8192, 2**64 - 4096, 0)
    with pytest.raises(GuestMemoryError, match="file range wraps"):
        MemoryRegion(0, 8192, 0, 2**64 - 4096)
    with pytest.raises(GuestMemoryError, match="not a u64"):
        MemoryRegion(-1, 8192, 0, 0)
    # Ending exactly at 2**64 is fine.
    assert MemoryRegion(2**64 - 4096, 4096, 0, 0).gpa_end == 2**64


def test_table_rejects_overlaps_count_and_short_buffers() -> None:
    r1 = MemoryRegion(0, 8192, 0x1000_0000, 0)
    with pytest.raises(GuestMemoryError, match="overlap in guest physical"):
        GuestMemory.from_buffers(
            [r1, MemoryRegion(4096, 8192, 0x2000_0000, 0)], [bytearray(8192)] * 2
        )
    with pytest.raises(GuestMemoryError, match="overlap in frontend"):
        GuestMemory.from_buffers(
            [r1, MemoryRegion(8192, 8192, 0x1000_1000, 0)], [bytearray(8192)] * 2
        )
    with pytest.raises(GuestMemoryError, match="holds only"):
        GuestMemory.from_buffers([r1], [bytearray(4096)])
    with pytest.raises(GuestMemoryError, match="read-only"):
        GuestMemory.from_buffers([r1], [memoryview(bytes(8192))])
    many = [MemoryRegion(i * 4096, 4096, i * 4096, 0) for i in range(9)]
    with pytest.raises(GuestMemoryError, match="allowed 1 to 8"):
        GuestMemory.from_buffers(many, [bytearray(4096) for _ in many])
    assert len(GuestMemory.from_buffers(many, [bytearray(4096) for _ in many], max_regions=9)
               .regions) == 9
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_buffers([], [])


def test_view_is_checked_and_aliases_the_buffer() -> None:
    mem, a, b = two_regions()
    v = mem.view(0x10010, 4)
    v[:] = b"abcd"
    assert a[0x10:0x14] == b"abcd"
    assert mem.read(0x10010, 4) == b"abcd"
    mem.write(0x20, b"xyz")
    assert b[0x20:0x23] == b"xyz"
    assert len(mem.view(0x20000, 0)) == 0  # empty at the very end
    for gpa, n in [
        (0x1FFFF, 2),  # crosses the end of guest RAM
        (0x20000, 1),
        (-1, 1),
        (0, -1),
        (2**64 - 1, 2),
        (0x10000, 2**64),
    ]:
        with pytest.raises(GuestMemoryError) as err:
            mem.view(gpa, n)
        assert f"{gpa:#x}" in str(err.value) and err.value.address == gpa
    # A single view never spans two regions, even adjacent ones.
    with pytest.raises(GuestMemoryError, match="one guest memory region"):
        mem.view(0xFFFE, 4)


def test_views_span_adjacent_regions_but_not_holes() -> None:
    mem, a, b = two_regions()
    b[-2:] = b"12"
    a[:2] = b"34"
    parts = mem.views(0xFFFE, 4)
    assert [len(p) for p in parts] == [2, 2]
    assert mem.read(0xFFFE, 4) == b"1234"
    mem.write(0xFFFF, b"ZZ")
    assert b[-1:] == b"Z" and a[:1] == b"Z"
    assert mem.views(0x100, 0) == []
    holey = GuestMemory.from_buffers(
        [MemoryRegion(0, 4096, 0, 0), MemoryRegion(8192, 4096, 8192, 0)],
        [bytearray(4096), bytearray(4096)],
    )
    with pytest.raises(GuestMemoryError, match="hole"):
        holey.views(4000, 200)
    with pytest.raises(GuestMemoryError):
        holey.views(4096, 1)


def test_integers_little_endian() -> None:
    mem, a, _ = two_regions()
    mem.write_u16(0x10000, 0x1234)
    mem.write_u32(0x10002, 0xDEADBEEF)
    mem.write_u64(0x10006, 0x0102030405060708)
    assert a[:14] == bytes.fromhex("3412efbeadde0807060504030201")
    assert mem.read_u16(0x10000) == 0x1234
    assert mem.read_u32(0x10002) == 0xDEADBEEF
    assert mem.read_u64(0x10006) == 0x0102030405060708
    with pytest.raises(GuestMemoryError):
        mem.read_u64(0x1FFF9)


def test_uva_to_gpa() -> None:
    mem, _, _ = two_regions()
    assert mem.uva_to_gpa(0x7000_0010, 16) == 0x10010
    assert mem.uva_to_gpa(0x7100_0000, 64 * KIB) == 0
    with pytest.raises(GuestMemoryError, match="frontend address"):
        mem.uva_to_gpa(0x7000_FFF0, 32)
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x6FFF_FFFF, 1)


def test_closed_memory_refuses_access() -> None:
    mem, _, _ = two_regions()
    assert mem.close() == 0
    assert mem.closed
    with pytest.raises(GuestMemoryError, match="closed"):
        mem.view(0, 1)
    with pytest.raises(GuestMemoryError, match="closed"):
        mem.uva_to_gpa(0x7000_0000, 1)


def test_memfd_mapping_shares_pages_and_honours_offset() -> None:
    shared = create_memfd_memory(256 * KIB)
    try:
        # A second mapping of the same fd, as the emulator would make.
        other = GuestMemory.from_fds([shared.region])
        other.write(0x100, b"from emulator")
        assert shared.memory.read(0x100, 13) == b"from emulator"
        assert other.close() == 0
        # A region at a file offset that is not page aligned.
        region = MemoryRegion(0x4000_0000, 8192, 0x1000, 4096 + 16, shared.fd)
        off = GuestMemory.from_fds([region])
        off.write(0x4000_0000, b"at offset")
        assert shared.memory.read(4096 + 16, 9) == b"at offset"
        off.close()
    finally:
        shared.close()


def test_close_with_live_view_defers_unmap() -> None:
    shared = create_memfd_memory(64 * KIB)
    try:
        mem = GuestMemory.from_fds([shared.region])
        kept = mem.view(0, 16)
        assert mem.close() == 1  # the mapping outlives close while viewed
        kept[:4] = b"live"  # still valid memory, not a crash
        assert shared.memory.read(0, 4) == b"live"
        kept.release()
        mem2 = GuestMemory.from_fds([shared.region])
        with mem2:
            mem2.view(0, 16).release()
        assert mem2.closed
    finally:
        shared.close()


def test_from_fds_errors() -> None:
    with pytest.raises(GuestMemoryError, match="no fd"):
        GuestMemory.from_fds([MemoryRegion(0, 4096, 0, 0)])
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError, match="cannot map"):
            GuestMemory.from_fds([MemoryRegion(0, 4096, 0, 0, r)])
    finally:
        os.close(r)
        os.close(w)
