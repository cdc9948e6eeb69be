"""SplitQueue: configuration checks, ring handling, notification math."""

from __future__ import annotations

import pytest

from emulators.virtio import splitqueue
from emulators.virtio.chain import BadChain, DescriptorChain
from emulators.virtio.errors import QueueConfigError, QueueError, QueueFault
from emulators.virtio.memory import GuestMemory, MemoryRegion
from emulators.virtio.splitqueue import SplitQueue, vring_need_event
from emulators.virtio.state import MemoryQueueState
from tests.support.driver import TestDriver, create_memfd_memory, queue_for

RAM = 1 << 20


def memory() -> GuestMemory:
    return GuestMemory.from_buffers([MemoryRegion(0, RAM, 0x7F00_0000_0000, 0)], [bytearray(RAM)])


def setup(size: int = 8, *, event_idx: bool = False) -> tuple[TestDriver, SplitQueue]:
    driver = TestDriver(memory(), size, 0x1000)
    return driver, queue_for(driver, event_idx=event_idx)


def take(queue: SplitQueue) -> DescriptorChain:
    item = queue.pop()
    assert isinstance(item, DescriptorChain), item
    return item


@pytest.mark.parametrize("size", [0, 3, 6, 65536, -8])
def test_size_must_be_power_of_two_in_range(size: int) -> None:
    with pytest.raises(QueueConfigError, match="power of two"):
        SplitQueue(memory(), size, 0, 0x1000, 0x2000, event_idx=False,
                   state=MemoryQueueState(max(size, 1)))


def test_size_limit_parameter_and_state_size() -> None:
    with pytest.raises(QueueConfigError):
        SplitQueue(memory(), 64, 0, 0x1000, 0x2000, event_idx=False,
                   state=MemoryQueueState(64), max_size=32)
    with pytest.raises(QueueConfigError, match="state holds"):
        SplitQueue(memory(), 64, 0, 0x1000, 0x2000, event_idx=False, state=MemoryQueueState(32))


@pytest.mark.parametrize(
    ("desc", "avail", "used", "what"),
    [(8, 0x1000, 0x2000, "descriptor"), (0, 0x1001, 0x2000, "avail"), (0, 0x1000, 0x2002, "used")],
)
def test_ring_alignment(desc: int, avail: int, used: int, what: str) -> None:
    with pytest.raises(QueueConfigError, match=what):
        SplitQueue(memory(), 8, desc, avail, used, event_idx=False, state=MemoryQueueState(8))


@pytest.mark.parametrize("event_idx", [False, True])
def test_rings_must_fit_in_memory(event_idx: bool) -> None:
    size = 8
    mem = memory()
    extra = 2 if event_idx else 0
    # Each ring placed so that it ends exactly at the end of RAM fits ...
    SplitQueue(mem, size, RAM - 16 * size, 0, 0x1000, event_idx=event_idx,
               state=MemoryQueueState(size))
    SplitQueue(mem, size, 0, RAM - (4 + 2 * size + extra), 0x1000, event_idx=event_idx,
               state=MemoryQueueState(size))
    used_fit = (RAM - (4 + 8 * size + extra)) & ~3  # the used ring is 4-aligned
    SplitQueue(mem, size, 0, 0x1000, used_fit, event_idx=event_idx,
               state=MemoryQueueState(size))
    # ... one more byte does not.
    for desc, avail, used in [
        (RAM - 16 * size + 16, 0, 0x1000),
        (0, RAM - (4 + 2 * size + extra) + 2, 0x1000),
        (0, 0x1000, used_fit + 4),
        (2**64 - 16, 0, 0x1000),
    ]:
        with pytest.raises(QueueConfigError, match="not inside guest memory"):
            SplitQueue(mem, size, desc, avail, used, event_idx=event_idx,
                       state=MemoryQueueState(size))


def test_pop_push_roundtrip_and_progress() -> None:
    driver, queue = setup()
    assert queue.pop() is None
    heads = [driver.add_chain([bytes([i])], [4]) for i in range(3)]
    chains = [take(queue) for _ in range(3)]
    assert [c.head for c in chains] == heads
    assert queue.pop() is None
    assert queue.inflight == 3 and queue.get_base() == 3
    queue.push_used(chains[1].head, 4)  # out of order completion
    queue.push_used_many([(chains[2].head, 1), (chains[0].head, 2)])
    assert driver.get_used() == [(heads[1], 4), (heads[2], 1), (heads[0], 2)]
    assert queue.inflight == 0 and queue.used_idx == 3 == queue.guest_used_idx()


def test_push_used_rejects_caller_bugs_without_writing() -> None:
    driver, queue = setup()
    driver.add_chain([b"a"], [])
    head = take(queue).head
    for bad_head, length in [(head + 1, 0), (-1, 0), (99, 0), (head, -1), (head, 2**32)]:
        with pytest.raises(ValueError):
            queue.push_used(bad_head, length)
    with pytest.raises(ValueError, match="twice"):
        queue.push_used_many([(head, 0), (head, 0)])
    with pytest.raises(ValueError, match="not in flight"):
        queue.push_used_many([(head, 0), (head + 1, 0)])
    assert driver.used_idx() == 0 and queue.inflight == 1
    queue.push_used_many([])
    queue.push_used(head, 0)
    with pytest.raises(ValueError):
        queue.push_used(head, 0)


def test_avail_index_wraps_at_65535() -> None:
    driver, queue = setup(size=4)
    queue.set_base(65534)
    driver.avail_idx = 65534
    driver.set_used_idx(65534)
    driver.last_used = 65534
    for i in range(4):
        head = driver.add_chain([bytes([i])], [])
        chain = take(queue)
        assert chain.head == head and chain.readable[0].tobytes() == bytes([i])
        queue.push_used(head, 0)
        driver.collect()
    assert queue.get_base() == 2 and driver.used_idx() == 2


@pytest.mark.parametrize("jump", [9, 100, 65535])
def test_avail_jump_breaks_the_queue(jump: int) -> None:
    driver, queue = setup()
    driver.set_avail_idx(jump)
    with pytest.raises(QueueError) as err:
        queue.pop()
    assert err.value.fault is QueueFault.AVAIL_IDX_JUMP and err.value.value == jump
    assert queue.broken is err.value
    driver.set_avail_idx(0)  # even if the guest undoes it, the queue stays stopped
    with pytest.raises(QueueError):
        queue.pop()
    with pytest.raises(QueueError):
        queue.pop_all()
    queue.set_base(0)  # a reset (SET_VRING_BASE) starts afresh
    assert queue.pop() is None and queue.broken is None


def test_exactly_queue_size_pending_is_fine() -> None:
    driver, queue = setup(size=4)
    for _ in range(4):
        driver.add_chain([b"x"], [])
    assert len(queue.pop_all()) == 4


def test_head_out_of_range() -> None:
    driver, queue = setup()
    driver.offer(8)
    with pytest.raises(QueueError) as err:
        queue.pop()
    assert err.value.fault is QueueFault.HEAD_OUT_OF_RANGE and err.value.value == 8


def test_head_offered_twice_while_in_flight() -> None:
    driver, queue = setup()
    head = driver.add_chain([b"x"], [])
    take(queue)
    driver.offer(head)
    with pytest.raises(QueueError) as err:
        queue.pop()
    assert err.value.fault is QueueFault.HEAD_IN_FLIGHT
    # The head taken before the error is still completable.
    queue.push_used(head, 0)
    assert driver.get_used() == [(head, 0)]


def test_bad_chain_is_in_flight_and_completable() -> None:
    driver, queue = setup()
    driver.write_desc(5, RAM, 16, 0, 0)
    driver.offer(5)
    item = queue.pop()
    assert isinstance(item, BadChain) and item.head == 5
    assert queue.inflight == 1
    queue.push_used(item.head, 0)
    assert driver.get_used() == [(5, 0)]


def test_avail_event_tracks_consumption() -> None:
    driver, queue = setup(event_idx=True)
    assert driver.avail_event() == 0
    driver.add_chain([b"a"], [])
    driver.add_chain([b"b"], [])
    take(queue)
    assert driver.avail_event() == 1
    take(queue)
    assert driver.avail_event() == 2
    for _ in range(3):
        driver.add_chain([b"c"], [])
    assert len(queue.pop_all()) == 3
    assert driver.avail_event() == 5


def test_no_event_idx_leaves_used_ring_tail_alone() -> None:
    driver, queue = setup(event_idx=False)
    driver.add_chain([b"a"], [])
    take(queue)
    assert driver.avail_event() == 0


def test_notification_without_event_idx() -> None:
    driver, queue = setup()
    driver.add_chain([b"a"], [])
    queue.push_used(take(queue).head, 0)
    assert queue.needs_notification()
    driver.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT
    assert not queue.needs_notification()


def test_notification_with_event_idx() -> None:
    driver, queue = setup(event_idx=True)
    heads = []
    for _ in range(4):
        driver.add_chain([b"a"], [])
    chains = queue.pop_all()
    heads = [c.head for c in chains]
    driver.set_used_event(2)  # "interrupt me once used->idx passes 2"
    queue.push_used(heads[0], 0)
    assert queue.needs_notification()  # the first one after start: always
    queue.push_used(heads[1], 0)  # used 1 -> 2: not past 2
    assert not queue.needs_notification()
    queue.push_used(heads[2], 0)  # 2 -> 3: passes used_event 2
    assert queue.needs_notification()
    queue.push_used(heads[3], 0)
    assert not queue.needs_notification()


def test_vring_need_event_math_including_wrap() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(5, 10, 0)
    assert not vring_need_event(10, 10, 0)
    assert not vring_need_event(3, 3, 3)  # nothing moved
    # Across 65535 -> 0.
    assert vring_need_event(65535, 0, 65535)
    assert vring_need_event(65534, 1, 65533)
    assert not vring_need_event(0, 0, 65535)
    assert vring_need_event(0, 1, 65535)
    assert not vring_need_event(1, 1, 65534)
    # Exhaustive cross-check of the modular definition around the wrap.
    for old in (65530, 65535, 0, 3):
        for moved in range(0, 8):
            new = (old + moved) & 0xFFFF
            for back in range(0, 10):
                event = (old + back - 1) & 0xFFFF
                passed = 0 <= back - 1 < moved
                assert vring_need_event(event, new, old) == passed, (event, new, old)


def test_pop_all_rechecks_after_publishing_avail_event(monkeypatch: pytest.MonkeyPatch) -> None:
    driver, queue = setup(event_idx=True)
    driver.add_chain([b"a"], [])
    added: list[int] = []

    def guest_adds_one_during_fence() -> None:
        # The guest saw the old avail_event, so it would not kick for this.
        if not added:
            added.append(driver.add_chain([b"b"], []))

    monkeypatch.setattr(splitqueue, "full_fence", guest_adds_one_during_fence)
    got = queue.pop_all()
    assert [c.head for c in got] == [0, added[0]]
    assert driver.avail_event() == 2


def test_set_base_and_get_base() -> None:
    driver, queue = setup()
    queue.set_base(100)
    assert queue.get_base() == 100 and queue.used_idx == 100 and queue.inflight == 0
    with pytest.raises(QueueConfigError):
        queue.set_base(65536)


def test_chain_for_requires_in_flight_head() -> None:
    driver, queue = setup()
    head = driver.add_chain([b"abc"], [])
    with pytest.raises(ValueError):
        queue.chain_for(head)
    take(queue)
    again = queue.chain_for(head)
    assert isinstance(again, DescriptorChain) and again.readable[0].tobytes() == b"abc"


def test_two_mappings_of_one_memfd() -> None:
    """The driver and the queue on different mappings, as across processes."""
    shared = create_memfd_memory(RAM)
    try:
        device_side = GuestMemory.from_fds([shared.region])
        driver = TestDriver(shared.memory, 16, 0)
        queue = queue_for(driver, memory=device_side, event_idx=True)
        head = driver.add_chain([b"request"], [16], indirect=True)
        chain = take(queue)
        assert chain.readable[0].tobytes() == b"request"
        chain.writable[0][:8] = b"response"
        queue.push_used(head, 8)
        [done] = driver.collect()
        assert done.writable[0][:8] == b"response" and done.used_len == 8
        del chain
        queue.release()
        assert device_side.close() == 0
    finally:
        shared.close()


def test_move_carries_on_over_a_new_memory_map() -> None:
    """SET_MEM_TABLE while the ring runs: same ring, same position, new views."""
    ram = bytearray(RAM)
    region = MemoryRegion(0, RAM, 0x7F00_0000_0000, 0)
    old = GuestMemory.from_buffers([region], [ram])
    driver = TestDriver(GuestMemory.from_buffers([region], [ram]), 8, 0x1000)
    queue = queue_for(driver, memory=old)
    head = driver.add_chain([b"request"], [16])
    chain = take(queue)
    # The same RAM now seen through another map (e.g. a region added by hotplug).
    new = GuestMemory.from_buffers(
        [MemoryRegion(0, RAM, 0x7F00_0000_0000, 0), MemoryRegion(RAM, RAM, 0x7F10_0000_0000, 0)],
        [ram, bytearray(RAM)],
    )
    lay = driver.layout
    queue.move(new, lay.desc_gpa, lay.avail_gpa, lay.used_gpa)
    assert old.close() == 0  # the queue holds no view of the old map any more
    queue.push_used(chain.head, 4)
    second = driver.add_chain([b"next"], [16])
    assert take(queue).head == second
    assert driver.get_used() == [(head, 4)]
    assert queue.get_base() == 2 and queue.inflight == 1


def test_move_refused_leaves_the_queue_as_it_was() -> None:
    driver, queue = setup()
    small = GuestMemory.from_buffers([MemoryRegion(0, 0x1000, 0x7F00_0000_0000, 0)],
                                     [bytearray(0x1000)])
    lay = driver.layout
    with pytest.raises(QueueConfigError):
        queue.move(small, lay.desc_gpa, lay.avail_gpa, lay.used_gpa)
    driver.add_chain([b"x"], [16])
    assert isinstance(queue.pop(), DescriptorChain)


def test_resume_that_contradicts_the_used_ring_breaks_the_queue() -> None:
    from emulators.virtio.errors import RecoveryError

    driver, queue = setup()
    state = MemoryQueueState(8)
    queue = queue_for(driver, state=state)
    driver.add_chain([b"a"], [16])
    queue.push_used(take(queue).head, 0)
    driver.set_used_idx(40)  # the guest scribbles while no emulator runs
    again = queue_for(driver, state=state, fresh=False)
    with pytest.raises(RecoveryError):
        again.resume()
    assert again.broken is not None and again.broken.fault is QueueFault.RESUME_MISMATCH
    with pytest.raises(QueueError):
        again.pop()
    again.set_base(0)  # the driver reset the device: the ring is set up anew
    assert again.broken is None
