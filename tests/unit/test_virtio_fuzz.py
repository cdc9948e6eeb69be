"""Hostile rings: whatever the guest writes, pop() only returns views inside
guest memory or raises the documented errors."""

from __future__ import annotations

import ctypes
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulators.virtio.chain import BadChain, DescriptorChain
from emulators.virtio.errors import ChainFault, QueueError
from emulators.virtio.memory import GuestMemory, MemoryRegion
from emulators.virtio.splitqueue import SplitQueue
from emulators.virtio.state import MemoryQueueState

REGION = 4096
# Two adjacent regions and one after a hole, so spanning and holes are hit.
LAYOUT = [(0x0, REGION), (REGION, REGION), (4 * REGION, REGION)]
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)


def make_memory() -> tuple[GuestMemory, list[bytearray]]:
    bufs = [bytearray(size) for _, size in LAYOUT]
    regions = [MemoryRegion(gpa, size, 0x10_0000 + gpa, 0) for gpa, size in LAYOUT]
    return GuestMemory.from_buffers(regions, bufs), bufs


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def check_inside(view: memoryview, bufs: list[bytearray]) -> None:
    assert len(view) > 0
    start = address(view)
    for buf in bufs:
        base = address(memoryview(buf))
        if base <= start and start + len(view) <= base + len(buf):
            return
    raise AssertionError(f"view at {start:#x} length {len(view)} is outside guest memory")


def drain(queue: SplitQueue, bufs: list[bytearray], complete: bool) -> None:
    for _ in range(2 * queue.size + 2):
        try:
            item = queue.pop()
        except QueueError:
            assert queue.broken is not None
            return
        if item is None:
            return
        if isinstance(item, DescriptorChain):
            for v in item.readable + item.writable:
                check_inside(v, bufs)
            assert item.readable_len == sum(len(v) for v in item.readable)
            assert item.writable_len == sum(len(v) for v in item.writable)
            assert item.readable_len + item.writable_len < 2**32
        else:
            assert isinstance(item, BadChain) and isinstance(item.fault, ChainFault)
            assert item.error.head == item.head
        assert 0 <= item.head < queue.size
        if complete:
            queue.push_used(item.head, 0)


sizes = st.sampled_from([1, 2, 4, 8, 16])


@SETTINGS
@given(
    blob=st.binary(min_size=0, max_size=2560),
    avail_idx=st.integers(0, 0xFFFF),
    size=sizes,
    event_idx=st.booleans(),
    indirect=st.booleans(),
    complete=st.booleans(),
)
def test_random_bytes_as_rings(
    blob: bytes, avail_idx: int, size: int, event_idx: bool, indirect: bool, complete: bool
) -> None:
    mem, bufs = make_memory()
    bufs[0][: len(blob)] = blob
    if avail_idx <= 2 * size:  # otherwise keep the random one from the blob
        mem.write_u16(16 * size + 2, avail_idx)
    queue = SplitQueue(mem, size, 0, 16 * size, 2048, event_idx=event_idx,
                       indirect=indirect, state=MemoryQueueState(size))
    drain(queue, bufs, complete)


addresses = st.one_of(
    st.integers(0, 6 * REGION),  # inside, near and across the regions and the hole
    st.integers(0, 2**64 - 1),
    st.sampled_from([0x800, 0x810, 2 * REGION - 8, REGION - 1, 2**64 - 16, 5 * REGION - 4]),
)
lengths = st.one_of(
    st.integers(0, 64),
    st.integers(1, 8).map(lambda n: 16 * n),  # plausible indirect tables
    st.sampled_from([0, 16, 32, 48, REGION, 2 * REGION, 0xFFFF_FFFF, 0x8000_0000]),
    st.integers(0, 2**32 - 1),
)
descriptors = st.tuples(addresses, lengths, st.integers(0, 7), st.integers(0, 20))


@SETTINGS
@given(
    size=sizes,
    table=st.lists(descriptors, min_size=16, max_size=16),
    extra=st.lists(descriptors, min_size=8, max_size=8),
    ring=st.lists(st.one_of(st.integers(0, 15), st.integers(0, 20)), min_size=16, max_size=16),
    avail_idx=st.one_of(st.integers(1, 16), st.integers(1, 4), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
    complete=st.booleans(),
)
def test_structured_hostile_descriptors(
    size: int,
    table: list[tuple[int, int, int, int]],
    extra: list[tuple[int, int, int, int]],
    ring: list[int],
    avail_idx: int,
    event_idx: bool,
    complete: bool,
) -> None:
    mem, bufs = make_memory()
    desc_gpa, avail_gpa, used_gpa, spare = 0, 0x400, 0x600, 0x800
    for i, d in enumerate(table[:size]):
        mem.write(desc_gpa + 16 * i, struct.pack("<QIHH", *d))
    # A second table that indirect descriptors may point at (addresses near 0x800).
    for i, d in enumerate(extra):
        mem.write(spare + 16 * i, struct.pack("<QIHH", *d))
    for i, head in enumerate(ring[:size]):
        mem.write_u16(avail_gpa + 4 + 2 * i, head)
    mem.write_u16(avail_gpa + 2, avail_idx)
    queue = SplitQueue(mem, size, desc_gpa, avail_gpa, used_gpa, event_idx=event_idx,
                       state=MemoryQueueState(size))
    drain(queue, bufs, complete)
