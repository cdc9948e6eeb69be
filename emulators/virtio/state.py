"""Per-queue progress state that survives an emulator crash.

Theory of operation
-------------------
A split virtqueue's progress is three numbers and a table: the avail index
consumed so far (``last_avail_idx``), the used index published so far
(``used_idx``), and, per descriptor head, whether the head is in flight and
in which order it was taken. This is the split-ring scheme of the vhost-user
spec's inflight I/O tracking, reduced to integer fields so that it can live
in any writable buffer: a bytearray here, the mmap'd state-store file in
production. Every field is a u64 word; the layout is::

    word 0              last_avail_idx   (0..65535)
    word 1              used_idx         (0..65535, as last settled)
    word 2              last_counter     (last submission number handed out)
    word 3              batch_len        (entries in the batch being published)
    words 4 .. 4+N      counter[head]    (0 = free, else submission number)
    words 4+N .. 4+2N   batch[i]         (heads of the batch being published)

An all-zero buffer is a valid state: index 0, nothing in flight.

The queue updates it in this order (crash-safe at every step):

taking a head (``pop``)
    1. ``number = last_counter + 1; last_counter = number`` (a number is
       used up even if we die now)
    2. ``counter[head] = number``   -- the head is in flight
    3. ``last_avail_idx += 1``

publishing a batch of n completions (``push_used_many``)
    P1. ``batch[0..n) = heads``, then ``batch_len = n``
    P2. write the n used elements into the guest's used ring
    P3. guest ``used->idx = used_idx + n``   -- the publication point
    P4. ``counter[head] = 0`` for each head of the batch
    P5. ``used_idx += n``

Recovery (:func:`resume`), given the guest-visible ``used->idx``:

* ``used->idx == used_idx``: nothing was published since the last settled
  batch; every head still marked is to be executed again.
* ``used->idx == used_idx + batch_len``: the last batch was published (P3)
  but not settled (P4/P5 incomplete): its heads are retired -- not run
  again, which would give the guest a second completion -- and
  ``used_idx`` catches up.
* anything else: the state or the guest's ring was tampered with:
  :class:`RecoveryError`.

Then the consumed avail index is ``used_idx + number of heads in flight``
(each consumed avail entry is either published or in flight; this holds for
out-of-order completion too). It may be one more than the stored
``last_avail_idx`` (a crash between steps 2 and 3) but never anything else.
The heads still in flight are returned oldest first (by counter), to be
executed again in the order the guest submitted them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from emulators.virtio.errors import RecoveryError

__all__ = [
    "BufferQueueState",
    "MemoryQueueState",
    "QueueState",
    "ResumePlan",
    "inflight_heads_oldest_first",
    "required_size",
    "reset_state",
    "resume",
]

#: Word offsets of the layout (module docstring).
W_LAST_AVAIL = 0
W_USED = 1
W_LAST_COUNTER = 2
W_BATCH_LEN = 3
W_COUNTERS = 4
_HEADER_WORDS = 4


COUNTER_LIMIT = 1 << 63
"""No submission number reaches this (2**63 requests): a stored one that does
was not written by a queue, and leaves no room to count on in a u64 word."""


def required_size(queue_size: int) -> int:
    """Bytes of buffer a :class:`BufferQueueState` needs for this queue size."""
    if queue_size <= 0:
        raise ValueError(f"queue size {queue_size} must be positive")
    return 8 * (_HEADER_WORDS + 2 * queue_size)


class QueueState(Protocol):
    """Integer fields a split queue keeps its progress in (see module docs).

    ``words`` is the whole layout as a u64 array; the queue's hot path reads
    and writes it directly (a method call per field would double the cost
    of a request). The named accessors are for everything else.
    """

    @property
    def size(self) -> int:
        """Queue size: number of heads the tables hold."""
        ...

    @property
    def words(self) -> memoryview:
        """The layout of the module docstring, cast to unsigned 64-bit words."""
        ...

    last_avail_idx: int
    used_idx: int
    last_counter: int
    batch_len: int

    def counter(self, head: int) -> int:
        """0 if ``head`` is free, else its submission number."""
        ...

    def set_counter(self, head: int, value: int) -> None: ...

    def batch_head(self, i: int) -> int: ...

    def set_batch_head(self, i: int, head: int) -> None: ...


class BufferQueueState:
    """:class:`QueueState` over any writable buffer of :func:`required_size` bytes.

    The buffer may be shared memory (the state store); the values are kept
    in native byte order, as the file is never read on another host.
    """

    __slots__ = ("_size", "_words", "_batch_base")

    def __init__(self, buffer: bytearray | memoryview, size: int) -> None:
        need = required_size(size)
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise ValueError("queue state buffer is read-only")
        if len(view) != need:
            raise ValueError(f"queue state buffer is {len(view)} bytes, need {need}")
        self._size = size
        self._words = view.cast("Q")
        self._batch_base = _HEADER_WORDS + size

    @property
    def size(self) -> int:
        return self._size

    @property
    def words(self) -> memoryview:
        return self._words

    @property
    def last_avail_idx(self) -> int:
        return self._words[0]

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        self._words[0] = value

    @property
    def used_idx(self) -> int:
        return self._words[1]

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self._words[1] = value

    @property
    def last_counter(self) -> int:
        return self._words[2]

    @last_counter.setter
    def last_counter(self, value: int) -> None:
        self._words[2] = value

    @property
    def batch_len(self) -> int:
        return self._words[3]

    @batch_len.setter
    def batch_len(self, value: int) -> None:
        self._words[3] = value

    def counter(self, head: int) -> int:
        return self._words[_HEADER_WORDS + head]

    def set_counter(self, head: int, value: int) -> None:
        self._words[_HEADER_WORDS + head] = value

    def batch_head(self, i: int) -> int:
        return self._words[self._batch_base + i]

    def set_batch_head(self, i: int, head: int) -> None:
        self._words[self._batch_base + i] = head

    def release(self) -> None:
        """Drop the view of the buffer (needed before unmapping a shared one)."""
        self._words.release()


class MemoryQueueState(BufferQueueState):
    """A :class:`BufferQueueState` in a private bytearray (tests, no state store)."""

    __slots__ = ()

    def __init__(self, size: int) -> None:
        super().__init__(bytearray(required_size(size)), size)


def reset_state(state: QueueState, last_avail_idx: int, used_idx: int) -> None:
    """Start afresh: nothing in flight, indexes as given (SET_VRING_BASE)."""
    for head in range(state.size):
        if state.counter(head):
            state.set_counter(head, 0)
    state.batch_len = 0
    state.last_counter = 0
    state.used_idx = used_idx & 0xFFFF
    state.last_avail_idx = last_avail_idx & 0xFFFF


def inflight_heads_oldest_first(state: QueueState) -> list[int]:
    """Heads marked in flight, in the order they were taken from the ring."""
    marked = [(state.counter(h), h) for h in range(state.size)]
    return [h for c, h in sorted(marked) if c]


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """What a resumed queue must do before taking new requests.

    ``rerun`` are heads to execute again (oldest first) and complete as
    usual; ``last_avail_idx`` is where popping continues; ``retired`` are
    heads whose completion the guest had already seen (reported for logs
    and tests, nothing to do).
    """

    last_avail_idx: int
    used_idx: int
    rerun: tuple[int, ...]
    retired: tuple[int, ...]


def resume(state: QueueState, guest_used_idx: int) -> ResumePlan:
    """Settle the last batch and compute the re-execution plan (module docs).

    Updates ``state`` (idempotent: calling it twice gives the same plan) and
    raises :class:`RecoveryError` when state and ring disagree.
    """
    size = state.size
    used = state.used_idx
    last_avail = state.last_avail_idx
    batch_len = state.batch_len
    if used > 0xFFFF or last_avail > 0xFFFF or not 0 <= guest_used_idx <= 0xFFFF:
        raise RecoveryError(
            f"index out of range: used {used}, last_avail {last_avail}, "
            f"guest used {guest_used_idx}"
        )
    if batch_len > size:
        raise RecoveryError(f"batch length {batch_len} exceeds queue size {size}")
    # Submission numbers grow by one per request from 0: one at or past
    # COUNTER_LIMIT was never handed out, and the next pop would overflow its word.
    if state.last_counter >= COUNTER_LIMIT or any(
        state.counter(h) >= COUNTER_LIMIT for h in range(size)
    ):
        raise RecoveryError(f"a submission number is past {COUNTER_LIMIT:#x}")
    delta = (guest_used_idx - used) & 0xFFFF
    retired: list[int] = []
    if delta:
        if delta != batch_len:
            raise RecoveryError(
                f"guest used index {guest_used_idx} is {delta} past the stored {used}, "
                f"but the last batch held {batch_len}"
            )
        for i in range(batch_len):
            head = state.batch_head(i)
            if head >= size:
                raise RecoveryError(f"batch entry {i} names head {head} >= size {size}")
            retired.append(head)
            state.set_counter(head, 0)
        used = guest_used_idx
        state.used_idx = used
    rerun = inflight_heads_oldest_first(state)
    consumed = (used + len(rerun)) & 0xFFFF
    if (consumed - last_avail) & 0xFFFF not in (0, 1):
        raise RecoveryError(
            f"{len(rerun)} heads in flight and used index {used} imply avail index "
            f"{consumed}, but {last_avail} was stored"
        )
    state.last_avail_idx = consumed
    top = max((state.counter(h) for h in rerun), default=0)
    if state.last_counter < top:
        state.last_counter = top
    return ResumePlan(consumed, used, tuple(rerun), tuple(retired))
