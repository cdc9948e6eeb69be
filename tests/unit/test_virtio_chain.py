"""Descriptor chain walking: normal, indirect and hostile chains."""

from __future__ import annotations

import pytest

from emulators.virtio.chain import (
    BadChain,
    DescriptorChain,
    gather,
    split_buffers,
)
from emulators.virtio.errors import ChainFault
from emulators.virtio.memory import GuestMemory, MemoryRegion
from emulators.virtio.splitqueue import SplitQueue
from tests.support.driver import F_INDIRECT, F_NEXT, F_WRITE, TestDriver, queue_for

RAM = 1 << 20
SIZE = 16


def setup(size: int = SIZE, *, indirect: bool = True) -> tuple[TestDriver, SplitQueue]:
    mem = GuestMemory.from_buffers([MemoryRegion(0, RAM, 0x7F00_0000_0000, 0)], [bytearray(RAM)])
    driver = TestDriver(mem, size, 0x1000)
    return driver, queue_for(driver, indirect=indirect)


def good(item: DescriptorChain | BadChain | None) -> DescriptorChain:
    assert isinstance(item, DescriptorChain), item
    return item


def bad(item: DescriptorChain | BadChain | None, fault: ChainFault) -> BadChain:
    assert isinstance(item, BadChain), item
    assert item.fault is fault, item.error
    assert str(item.head) in str(item.error)
    return item


def raw_chain(driver: TestDriver, descs: list[tuple[int, int, int, int]], head: int = 0) -> None:
    """Write descriptors 0.. as given and offer ``head``."""
    for i, (addr, length, flags, nxt) in enumerate(descs):
        driver.write_desc(i, addr, length, flags, nxt)
    driver.offer(head)


@pytest.mark.parametrize("indirect", [False, True])
def test_chain_buffers_in_order(indirect: bool) -> None:
    driver, queue = setup()
    head = driver.add_chain([b"cmd-header", b"data-out"], [8, 100], indirect=indirect)
    chain = good(queue.pop())
    assert chain.head == head
    assert [v.tobytes() for v in chain.readable] == [b"cmd-header", b"data-out"]
    assert [len(v) for v in chain.writable] == [8, 100]
    assert (chain.readable_len, chain.writable_len) == (18, 108)
    chain.writable[0][:] = b"response"
    chain.writable[1][:3] = b"abc"
    queue.push_used(head, 11)
    [done] = driver.collect()
    assert (done.head, done.used_len) == (head, 11)
    assert done.writable[0] == b"response" and done.writable[1][:3] == b"abc"


def test_loop_is_refused_by_hop_budget() -> None:
    driver, queue = setup()
    buf = driver.alloc(64)
    raw_chain(driver, [(buf, 8, F_NEXT, 1), (buf, 8, F_NEXT, 0)])
    bad(queue.pop(), ChainFault.LOOP)
    # The queue carries on: complete the bad one, take the next.
    queue.push_used(0, 0)
    head = driver.add_chain([b"ok"], [])
    assert good(queue.pop()).head == head


def test_chain_of_exactly_queue_size_is_fine() -> None:
    driver, queue = setup(size=4)
    buf = driver.alloc(64)
    raw_chain(driver, [(buf, 1, F_NEXT, i + 1) for i in range(3)] + [(buf, 1, 0, 0)])
    assert good(queue.pop()).readable_len == 4


def test_next_out_of_range() -> None:
    driver, queue = setup()
    buf = driver.alloc(64)
    raw_chain(driver, [(buf, 8, F_NEXT, SIZE)])
    bad(queue.pop(), ChainFault.NEXT_OUT_OF_RANGE)


@pytest.mark.parametrize(
    ("addr", "length"),
    [(RAM - 4, 8), (RAM, 1), (2**64 - 8, 16), (0, 0xFFFF_FFFF)],
)
def test_buffer_outside_memory(addr: int, length: int) -> None:
    driver, queue = setup()
    raw_chain(driver, [(addr, length, F_WRITE, 0)])
    bad(queue.pop(), ChainFault.BUFFER_OUT_OF_MEMORY)


def test_zero_length_descriptors_are_skipped_unchecked() -> None:
    driver, queue = setup()
    buf = driver.alloc(64)
    raw_chain(driver, [(2**64 - 1, 0, F_NEXT, 1), (buf, 4, F_NEXT, 2), (RAM * 8, 0, F_WRITE, 0)])
    chain = good(queue.pop())
    assert [len(v) for v in chain.readable] == [4] and chain.writable == []


def test_readable_after_writable() -> None:
    driver, queue = setup()
    buf = driver.alloc(64)
    raw_chain(driver, [(buf, 8, F_WRITE | F_NEXT, 1), (buf, 8, 0, 0)])
    bad(queue.pop(), ChainFault.READABLE_AFTER_WRITABLE)
    # Also when the writable one is empty.
    driver.write_desc(2, buf, 0, F_WRITE | F_NEXT, 3)
    driver.write_desc(3, buf, 8, 0, 0)
    driver.offer(2)
    bad(queue.pop(), ChainFault.READABLE_AFTER_WRITABLE)


def test_length_overflow() -> None:
    # 1024 descriptors of 4 MiB, all over the same bytes, add up to 2**32.
    mem = GuestMemory.from_buffers([MemoryRegion(0, 8 << 20, 0, 0)], [bytearray(8 << 20)])
    driver = TestDriver(mem, 4, 0, data_end=1 << 20)
    queue = queue_for(driver)
    table = driver.alloc(16 * 1024)
    for i in range(1024):
        more = F_NEXT if i < 1023 else 0
        driver.write_desc_at(table + 16 * i, 4 << 20, 4 << 20, F_WRITE | more, i + 1)
    driver.write_desc(0, table, 16 * 1024, F_INDIRECT, 0)
    driver.offer(0)
    bad(queue.pop(), ChainFault.LENGTH_OVERFLOW)
    # One byte less in total is accepted.
    driver.write_desc_at(table, 4 << 20, (4 << 20) - 1, F_WRITE | F_NEXT, 1)
    queue.push_used(0, 0)
    driver.offer(0)
    assert good(queue.pop()).writable_len == 2**32 - 1


def test_indirect_rules() -> None:
    driver, queue = setup()
    buf = driver.alloc(64)
    table = driver.alloc(16 * 4)
    driver.write_desc_at(table, buf, 8, 0, 0)

    def offer_indirect(addr: int, length: int, flags: int = F_INDIRECT) -> None:
        driver.write_desc(0, addr, length, flags, 1)
        driver.offer(0)

    offer_indirect(table, 16, F_INDIRECT | F_NEXT)
    bad(queue.pop(), ChainFault.INDIRECT_WITH_NEXT)
    queue.push_used(0, 0)
    for length in (0, 8, 24):
        offer_indirect(table, length)
        bad(queue.pop(), ChainFault.INDIRECT_BAD_LENGTH)
        queue.push_used(0, 0)
    offer_indirect(RAM - 8, 16)
    bad(queue.pop(), ChainFault.INDIRECT_OUT_OF_MEMORY)
    queue.push_used(0, 0)
    offer_indirect(table, 16 * 1025)
    bad(queue.pop(), ChainFault.INDIRECT_TOO_LARGE)
    queue.push_used(0, 0)
    # Nested table.
    driver.write_desc_at(table, table, 16, F_INDIRECT, 0)
    offer_indirect(table, 16)
    bad(queue.pop(), ChainFault.INDIRECT_NESTED)
    queue.push_used(0, 0)
    # A loop inside the table: budget is the table's entry count.
    driver.write_desc_at(table, buf, 8, F_NEXT, 1)
    driver.write_desc_at(table + 16, buf, 8, F_NEXT, 0)
    offer_indirect(table, 32)
    bad(queue.pop(), ChainFault.LOOP)
    queue.push_used(0, 0)
    # next beyond the table's end (but within the ring's size).
    driver.write_desc_at(table + 16, buf, 8, F_NEXT, 2)
    offer_indirect(table, 32)
    bad(queue.pop(), ChainFault.NEXT_OUT_OF_RANGE)
    queue.push_used(0, 0)
    # WRITE on the pointing descriptor is ignored; a valid table works.
    driver.write_desc_at(table + 16, buf, 8, F_WRITE, 0)
    offer_indirect(table, 32, F_INDIRECT | F_WRITE)
    chain = good(queue.pop())
    assert (chain.readable_len, chain.writable_len) == (8, 8)


def test_indirect_not_negotiated() -> None:
    driver, queue = setup(indirect=False)
    driver.add_chain([b"x"], [4], indirect=True)
    bad(queue.pop(), ChainFault.INDIRECT_NOT_NEGOTIATED)


def test_indirect_after_direct_descriptors() -> None:
    driver, queue = setup()
    buf = driver.alloc(64)
    table = driver.alloc(32)
    driver.write_desc_at(table, buf, 4, F_WRITE, 0)
    raw_chain(driver, [(buf, 2, F_NEXT, 1), (table, 16, F_INDIRECT, 0)])
    chain = good(queue.pop())
    assert (chain.readable_len, chain.writable_len) == (2, 4)


def test_buffers_may_point_into_the_rings() -> None:
    driver, queue = setup()
    layout = driver.layout
    raw_chain(driver, [(layout.desc_gpa, 16, F_NEXT, 1), (layout.used_gpa, 8, F_WRITE, 0)])
    chain = good(queue.pop())
    assert chain.readable[0].tobytes()[:8] == layout.desc_gpa.to_bytes(8, "little")


def test_buffer_spanning_adjacent_regions() -> None:
    regions = [MemoryRegion(0, 65536, 0, 0), MemoryRegion(65536, 65536, 65536, 0)]
    mem = GuestMemory.from_buffers(regions, [bytearray(65536), bytearray(65536)])
    driver = TestDriver(mem, 8, 0)
    queue = queue_for(driver)
    mem.write(65536 - 3, b"abcdef")
    driver.write_desc(0, 65536 - 3, 6, 0, 0)
    driver.offer(0)
    chain = good(queue.pop())
    assert [v.tobytes() for v in chain.readable] == [b"abc", b"def"]
    assert chain.readable_len == 6


def test_split_buffers_and_gather() -> None:
    views = [memoryview(bytearray(b"abc")), memoryview(bytearray(b"defg"))]
    first, rest = split_buffers(views, 5)
    assert [v.tobytes() for v in first] == [b"abc", b"de"]
    assert [v.tobytes() for v in rest] == [b"fg"]
    first, rest = split_buffers(views, 3)
    assert [v.tobytes() for v in first] == [b"abc"] and [v.tobytes() for v in rest] == [b"defg"]
    first, rest = split_buffers(views, 99)
    assert len(first) == 2 and rest == []
    first, rest = split_buffers(views, 0)
    assert first == [] and len(rest) == 2
    assert gather(views, 2) == b"ab"
    assert gather(views, 6) == b"abcdef"
    assert gather(views, 50) == b"abcdefg"
    assert gather([], 4) == b""
