"""Queue progress state and crash recovery (resume) at every crash point."""

from __future__ import annotations

from collections import Counter

import pytest

from emulators.virtio.chain import BadChain, DescriptorChain
from emulators.virtio.errors import RecoveryError
from emulators.virtio.memory import GuestMemory, MemoryRegion
from emulators.virtio.splitqueue import SplitQueue
from emulators.virtio.state import (
    BufferQueueState,
    MemoryQueueState,
    ResumePlan,
    inflight_heads_oldest_first,
    required_size,
    resume,
)
from tests.support.driver import TestDriver, queue_for

RAM = 1 << 18
SIZE = 16
REQUESTS = 7


class Crash(Exception):
    """The emulator process dies here."""


class Ticker:
    """Counts persistent writes; raises Crash at write number ``at``."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.count = 0

    def tick(self) -> None:
        if self.at is not None and self.count == self.at:
            raise Crash(self.count)
        self.count += 1


class CountingWords:
    """The state's u64 words, with every store counted as a crash point."""

    def __init__(self, words: memoryview, ticker: Ticker) -> None:
        self._words = words
        self._ticker = ticker

    def __getitem__(self, i: int) -> int:
        return int(self._words[i])

    def __setitem__(self, i: int, value: int) -> None:
        self._ticker.tick()
        self._words[i] = value


class CrashState(BufferQueueState):
    __slots__ = ("ticker",)

    def __init__(self, buffer: bytearray, size: int, ticker: Ticker) -> None:
        super().__init__(buffer, size)
        self.ticker = ticker

    @property
    def words(self) -> memoryview:
        return CountingWords(super().words, self.ticker)  # type: ignore[return-value]


class CrashQueue(SplitQueue):
    """Also counts the store of the guest's used->idx (the publication point)."""

    __slots__ = ("ticker",)
    ticker: Ticker

    def _publish_used_idx(self, value: int) -> None:
        self.ticker.tick()
        super()._publish_used_idx(value)


def execute(queue: SplitQueue, item: DescriptorChain | BadChain) -> tuple[int, int]:
    """Run one request: echo the readable byte four times into the writable buffer."""
    assert isinstance(item, DescriptorChain), item
    item.writable[0][:] = item.readable[0].tobytes() * 4
    return item.head, 4


def serve(driver: TestDriver, buffer: bytearray, ticker: Ticker) -> ResumePlan:
    """One emulator life: resume, re-run, then take and complete everything.

    Completions are deliberately out of order and mixed single/batched.
    """
    state = CrashState(buffer, SIZE, ticker)
    layout = driver.layout
    queue = CrashQueue(driver.memory, SIZE, layout.desc_gpa, layout.avail_gpa, layout.used_gpa,
                       event_idx=True, state=state)
    queue.ticker = ticker
    plan = queue.resume()
    for head in plan.rerun:
        queue.push_used(*execute(queue, queue.chain_for(head)))
    while True:
        chains = []
        for _ in range(3):
            item = queue.pop()
            if item is None:
                break
            chains.append(item)
        if not chains:
            return plan
        done = [execute(queue, c) for c in chains]
        if len(done) > 1:
            queue.push_used(*done.pop(1))
        queue.push_used_many(done[::-1])


def fresh() -> tuple[TestDriver, bytearray, list[int]]:
    mem = GuestMemory.from_buffers([MemoryRegion(0, RAM, 0, 0)], [bytearray(RAM)])
    driver = TestDriver(mem, SIZE, 0)
    buffer = bytearray(required_size(SIZE))
    queue_for(driver, state=BufferQueueState(buffer, SIZE), event_idx=True)  # set_base(0)
    heads = [driver.add_chain([bytes([65 + i])], [4]) for i in range(REQUESTS)]
    return driver, buffer, heads


def check_exactly_once(driver: TestDriver, heads: list[int]) -> None:
    done = driver.collect()
    assert Counter(c.head for c in done) == Counter(heads), done
    for c in done:
        assert c.used_len == 4
        assert c.writable[0] == bytes([65 + heads.index(c.head)]) * 4


def total_steps() -> int:
    driver, buffer, heads = fresh()
    ticker = Ticker(None)
    serve(driver, buffer, ticker)
    check_exactly_once(driver, heads)
    return ticker.count


def test_no_crash_baseline() -> None:
    assert total_steps() > 30


def test_crash_at_every_step_then_resume() -> None:
    steps = total_steps()
    plans = []
    for at in range(steps):
        driver, buffer, heads = fresh()
        with pytest.raises(Crash):
            serve(driver, buffer, Ticker(at))
        stored_last_avail = BufferQueueState(buffer, SIZE).last_avail_idx
        plan = serve(driver, buffer, Ticker(None))
        plans.append((plan, stored_last_avail))
        check_exactly_once(driver, heads)
    # The crash points covered every recovery case.
    assert any(p.retired and p.rerun for p, _ in plans)
    assert any(p.rerun and not p.retired for p, _ in plans)
    assert any(p.last_avail_idx == last + 1 for p, last in plans)  # died mid-pop
    assert any(len(p.retired) > 1 for p, _ in plans)  # a batch settled


def test_second_crash_during_recovery() -> None:
    steps = total_steps()
    for first in range(0, steps, 3):
        for second in range(0, 12):
            driver, buffer, heads = fresh()
            with pytest.raises(Crash):
                serve(driver, buffer, Ticker(first))
            try:
                serve(driver, buffer, Ticker(second))
            except Crash:
                serve(driver, buffer, Ticker(None))
            check_exactly_once(driver, heads)


def test_published_batch_is_retired_not_rerun() -> None:
    """Crash right after the guest saw used->idx: the batch must not run again."""
    driver, buffer, heads = fresh()
    queue = queue_for(driver, state=BufferQueueState(buffer, SIZE), fresh=False)
    a, b, c = (queue.pop() for _ in range(3))
    assert a is not None and b is not None and c is not None
    state = BufferQueueState(buffer, SIZE)
    # Do P1..P3 of a two-element batch by hand, then "crash".
    state.set_batch_head(0, b.head)
    state.set_batch_head(1, a.head)
    state.batch_len = 2
    driver.memory.write(driver.layout.used_gpa + 4, bytes([b.head, 0, 0, 0, 4, 0, 0, 0]))
    driver.memory.write(driver.layout.used_gpa + 12, bytes([a.head, 0, 0, 0, 4, 0, 0, 0]))
    driver.set_used_idx(2)
    plan = resume(state, 2)
    assert plan.retired == (b.head, a.head)
    assert plan.rerun == (c.head,)
    assert (plan.last_avail_idx, plan.used_idx) == (3, 2)
    assert resume(state, 2) == ResumePlan(3, 2, (c.head,), ())  # idempotent
    assert inflight_heads_oldest_first(state) == [c.head]


def test_rerun_order_is_submission_order() -> None:
    state = MemoryQueueState(8)
    for number, head in enumerate([5, 1, 7, 0], start=1):
        state.set_counter(head, number)
    state.last_counter = 5
    state.last_avail_idx = 4
    assert resume(state, 0).rerun == (5, 1, 7, 0)


def test_recovery_errors() -> None:
    state = MemoryQueueState(8)
    with pytest.raises(RecoveryError, match="past the stored"):
        resume(state, 3)  # guest claims completions that never happened
    state.last_avail_idx = 5  # consumed 5, but nothing in flight or used
    with pytest.raises(RecoveryError, match="imply avail index"):
        resume(state, 0)
    state = MemoryQueueState(8)
    state.batch_len = 9
    with pytest.raises(RecoveryError, match="exceeds queue size"):
        resume(state, 0)
    state = MemoryQueueState(8)
    state.batch_len = 1
    state.set_batch_head(0, 8)
    with pytest.raises(RecoveryError, match="names head"):
        resume(state, 1)
    state = MemoryQueueState(8)
    state.used_idx = 70000
    with pytest.raises(RecoveryError, match="out of range"):
        resume(state, 0)


def test_resume_across_index_wrap() -> None:
    state = MemoryQueueState(4)
    state.used_idx = 65535
    state.last_avail_idx = 1
    state.set_counter(2, 10)
    state.set_counter(3, 11)
    state.last_counter = 12
    state.batch_len = 1
    state.set_batch_head(0, 3)
    plan = resume(state, 0)  # the batch (head 3) was published: 65535 -> 0
    assert plan.retired == (3,) and plan.rerun == (2,)
    assert (plan.used_idx, plan.last_avail_idx) == (0, 1)


def test_buffer_state_validation_and_layout() -> None:
    assert required_size(8) == 8 * (4 + 16)
    with pytest.raises(ValueError):
        required_size(0)
    with pytest.raises(ValueError, match="need"):
        BufferQueueState(bytearray(10), 8)
    with pytest.raises(ValueError, match="read-only"):
        BufferQueueState(memoryview(bytes(required_size(8))), 8)
    buf = bytearray(required_size(8))
    state = BufferQueueState(buf, 8)
    state.last_avail_idx = 0x0102
    state.set_counter(7, 9)
    state.set_batch_head(7, 3)
    words = memoryview(buf).cast("Q")
    assert words[0] == 0x0102 and words[4 + 7] == 9 and words[4 + 8 + 7] == 3
    assert state.counter(7) == 9 and state.batch_head(7) == 3
    state.release()
