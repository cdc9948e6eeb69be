"""The device side of a split virtqueue (virtio 1.1 section 2.6).

Theory of operation
-------------------
Three areas in guest RAM make a split queue: the descriptor table (16 bytes
per entry), the avail ring written by the driver (flags, idx, ring[size],
and ``used_event`` with VIRTIO_F_EVENT_IDX) and the used ring written by us
(flags, idx, ring[size] of (id u32, len u32), and ``avail_event`` with
EVENT_IDX). Indexes are free-running u16 counters; a ring slot is the index
modulo the (power of two) size.

The queue keeps memoryviews of the three areas, taken once through
:class:`GuestMemory` when the queue is built (after range checks), and reads
fields with precompiled ``struct`` objects: no per-byte work on the hot
path. Progress (last avail index, used index, heads in flight) is written
through to a :class:`QueueState` so that a new emulator can resume after a
crash; the order of those writes is what makes resuming exact, see
:mod:`emulators.virtio.state`.

Memory ordering
---------------
The guest runs on other CPUs while we read and write its rings. On x86,
loads are not reordered with loads and stores not with stores, so reading
``avail->idx`` before the ring entries, and writing used elements before
``used->idx``, is enough -- provided each access is one machine access in
program order, which ``struct`` pack/unpack on a memoryview are. The one
reordering x86 does allow is a later load passing an earlier store: the
read of ``used_event`` / avail flags after publishing ``used->idx``, and the
re-read of ``avail->idx`` after writing ``avail_event``. Python has no fence
primitive; we take and release a lock there, which is a locked instruction
and so a full fence on x86. This module targets x86-64 hosts; the choice is
kept in one function (:func:`full_fence`).
"""

from __future__ import annotations

import struct
import threading
from array import array
from collections.abc import Sequence
from typing import NoReturn

from emulators import faults
from emulators.limits import VIRTIO_MAX_QUEUE_SIZE
from emulators.virtio.chain import (
    DEFAULT_MAX_INDIRECT,
    BadChain,
    DescriptorChain,
    SplitChain,
    walk_chain,
    walk_split,
)
from emulators.virtio.errors import (
    ChainError,
    GuestMemoryError,
    QueueConfigError,
    QueueError,
    QueueFault,
    RecoveryError,
)
from emulators.virtio.memory import GuestMemory
from emulators.virtio.state import (
    W_BATCH_LEN,
    W_COUNTERS,
    W_LAST_AVAIL,
    W_LAST_COUNTER,
    W_USED,
    QueueState,
    ResumePlan,
    reset_state,
    resume,
)

__all__ = [
    "VIRTIO_MAX_QUEUE_SIZE",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "SplitQueue",
    "full_fence",
    "vring_need_event",
]

VRING_AVAIL_F_NO_INTERRUPT = 1

_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_U32_MAX = 0xFFFF_FFFF
#: ``<II`` repeated k times, built the first time a batch of k is published.
_USED_RUNS: dict[int, struct.Struct] = {}


def _used_run(k: int) -> struct.Struct:
    """The pack of k used elements in a row, precompiled once per k."""
    run = _USED_RUNS.get(k)
    if run is None:
        run = _USED_RUNS[k] = struct.Struct("<" + "II" * k)
    return run

_fence_lock = threading.Lock()


def full_fence() -> None:
    """Order earlier stores before later loads (see module docstring)."""
    _fence_lock.acquire()
    _fence_lock.release()


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving an index from ``old_idx`` to ``new_idx`` passed ``event_idx``.

    Virtio 1.1 section 2.6.7.2 / 2.6.10: all arithmetic is modulo 2**16, so
    it works across the wrap at 65535.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def _ring_view(memory: GuestMemory, gpa: int, length: int, what: str) -> memoryview:
    try:
        return memory.view(gpa, length)
    except GuestMemoryError as exc:
        raise QueueConfigError(f"{what} not inside guest memory: {exc}") from exc


class SplitQueue:
    """One split virtqueue, device side. Not thread-safe: one owner loop."""

    __slots__ = (
        "_memory",
        "_main",
        "_size",
        "_mask",
        "_event_idx",
        "_indirect",
        "_max_indirect",
        "_state",
        "_words",
        "_batch_base",
        "_desc",
        "_avail",
        "_used",
        "_used_event_off",
        "_avail_event_off",
        "_last_avail",
        "_used_idx",
        "_inflight",
        "_signalled_used",
        "_signalled_valid",
        "_broken",
    )

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool,
        state: QueueState,
        indirect: bool = True,
        max_size: int = VIRTIO_MAX_QUEUE_SIZE,
        max_indirect: int = DEFAULT_MAX_INDIRECT,
    ) -> None:
        """Check the ring layout (2.6) and attach to it; ``state`` is not changed.

        ``indirect`` says whether VIRTIO_F_INDIRECT_DESC was negotiated and
        ``event_idx`` whether VIRTIO_F_EVENT_IDX was. For a fresh start call
        :meth:`set_base`; after an emulator restart call :meth:`resume`.
        """
        if not 0 < size <= max_size or size & (size - 1):
            raise QueueConfigError(
                f"queue size {size} is not a power of two between 1 and {max_size}"
            )
        if state.size != size:
            raise QueueConfigError(f"state holds {state.size} heads, queue size is {size}")
        # 2.6: descriptor table 16-byte aligned, avail ring 2, used ring 4.
        for what, gpa, align in (
            ("descriptor table", desc_gpa, 16),
            ("avail ring", avail_gpa, 2),
            ("used ring", used_gpa, 4),
        ):
            if gpa % align:
                raise QueueConfigError(f"{what} at {gpa:#x} is not {align}-byte aligned")
        extra = 2 if event_idx else 0
        self._desc = _ring_view(memory, desc_gpa, 16 * size, "descriptor table")
        self._avail = _ring_view(memory, avail_gpa, 4 + 2 * size + extra, "avail ring")
        self._used = _ring_view(memory, used_gpa, 4 + 8 * size + extra, "used ring")
        self._memory = memory
        self._main = memory.main_view()
        self._size = size
        self._mask = size - 1
        self._event_idx = event_idx
        self._indirect = indirect
        self._max_indirect = max_indirect
        self._state = state
        self._words = state.words
        self._batch_base = W_COUNTERS + size
        self._used_event_off = 4 + 2 * size
        self._avail_event_off = 4 + 8 * size
        self._last_avail = state.last_avail_idx & 0xFFFF
        self._used_idx = state.used_idx & 0xFFFF
        self._inflight = sum(1 for h in range(size) if state.counter(h))
        self._signalled_used = 0
        self._signalled_valid = False
        self._broken: QueueError | None = None

    # ------------------------------------------------------------------
    # properties

    @property
    def size(self) -> int:
        return self._size

    @property
    def inflight(self) -> int:
        """Heads taken and not yet completed (progress counters, heartbeat)."""
        return self._inflight

    @property
    def broken(self) -> QueueError | None:
        """The error that stopped the queue, or None while it works."""
        return self._broken

    @property
    def used_idx(self) -> int:
        return self._used_idx

    def avail_idx(self) -> int:
        """The driver's current ``avail->idx``."""
        return int(_U16.unpack_from(self._avail, 2)[0])

    def has_pending(self) -> bool:
        """Whether the driver offered chains not taken yet (a look, no state
        change; a broken queue has none to offer)."""
        if self._broken is not None:
            return False
        return bool(_U16.unpack_from(self._avail, 2)[0] != self._last_avail)

    def guest_used_idx(self) -> int:
        """``used->idx`` as the guest sees it (equal to ours except mid-publish)."""
        return int(_U16.unpack_from(self._used, 2)[0])

    # ------------------------------------------------------------------
    # base (SET_VRING_BASE / GET_VRING_BASE)

    def set_base(self, last_avail_idx: int) -> None:
        """Fresh start at ``last_avail_idx`` with nothing in flight.

        The used index starts equal to it: a frontend sends the base it got
        from GET_VRING_BASE, answered only once every request was completed,
        so the guest's ``used->idx`` is the same number (0 after a reset).
        It also clears a :class:`QueueError`: the ring was set up anew.
        """
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise QueueConfigError(f"vring base {last_avail_idx} is not a u16")
        reset_state(self._state, last_avail_idx, last_avail_idx)
        self._last_avail = self._used_idx = last_avail_idx
        self._inflight = 0
        self._signalled_valid = False
        self._broken = None
        self._write_avail_event()

    def get_base(self) -> int:
        """The next avail index to consume (GET_VRING_BASE's answer)."""
        return self._last_avail

    def resume(self) -> ResumePlan:
        """Resume from persisted state after a restart (see :func:`state.resume`).

        Run the plan's ``rerun`` heads (via :meth:`chain_for`) and complete
        them as usual. The next :meth:`needs_notification` answers True, so
        an interrupt lost in the crash is delivered.

        Raises :class:`RecoveryError` when the saved progress and the guest's
        used index disagree; the queue is then broken (:attr:`broken`) like
        one whose ring the guest corrupted: re-executing or skipping requests
        on a guess would be worse than stopping.
        """
        try:
            plan = resume(self._state, self.guest_used_idx())
        except RecoveryError as exc:
            self._broken = QueueError(QueueFault.RESUME_MISMATCH, self.guest_used_idx())
            self._broken.__cause__ = exc
            raise
        self._last_avail = plan.last_avail_idx
        self._used_idx = plan.used_idx
        self._inflight = len(plan.rerun)
        self._signalled_valid = False
        self._write_avail_event()
        return plan

    # ------------------------------------------------------------------
    # taking requests

    def pop(self) -> DescriptorChain | BadChain | None:
        """Take the next available chain, or None if the ring is empty.

        Raises :class:`QueueError` if the guest corrupted the ring; the queue
        then stays broken. A malformed chain is returned as :class:`BadChain`
        (in flight; complete it with length 0).
        """
        if self._broken is not None:
            raise self._broken
        avail_idx = _U16.unpack_from(self._avail, 2)[0]
        pending = (avail_idx - self._last_avail) & 0xFFFF
        if not pending:
            return None
        if pending > self._size:
            self._fail(QueueFault.AVAIL_IDX_JUMP, avail_idx)
        chain = self._take()
        self._write_avail_event()
        return chain

    def pop_all(self) -> list[DescriptorChain | BadChain]:
        """Take every available chain; the batch form of :meth:`pop`.

        With EVENT_IDX it then publishes ``avail_event``, fences and looks
        again, so a chain added meanwhile is either returned or will be
        kicked: a caller that drains with pop_all on each kick never misses
        one. A QueueError raised midway loses nothing already taken: those
        chains stay in flight and are still in the state.
        """
        return self._take_all(0, 0)  # type: ignore[return-value]

    def pop_split(
        self, out_header: int, in_header: int
    ) -> list[SplitChain | DescriptorChain | BadChain]:
        """:meth:`pop_all` for a request queue: a chain of the usual shape
        (:func:`~emulators.virtio.chain.walk_split`, headers of exactly these
        positive sizes) comes back split, as a plain tuple; any other is
        walked by the checked walker and comes back as from :meth:`pop_all`.
        """
        if out_header <= 0 or in_header <= 0:
            raise ValueError("header sizes must be positive")
        return self._take_all(out_header, in_header)

    def _take_all(
        self, out_header: int, in_header: int
    ) -> list[SplitChain | DescriptorChain | BadChain]:
        """The loop of :meth:`_take` over every available head, inlined
        (same checks, same state order): it runs once per request."""
        if self._broken is not None:
            raise self._broken
        out: list[SplitChain | DescriptorChain | BadChain] = []
        append = out.append
        avail = self._avail
        words = self._words
        size = self._size
        mask = self._mask
        unpack = _U16.unpack_from
        # Fault points are armed (tests only) before the process serves.
        point = faults.point if faults.armed() else None
        split = out_header > 0
        memory, main, desc = self._memory, self._main, self._desc
        indirect, max_indirect = self._indirect, self._max_indirect
        last = self._last_avail
        taken = 0
        try:
            while True:
                avail_idx = unpack(avail, 2)[0]
                pending = (avail_idx - last) & 0xFFFF
                if pending > size:
                    self._fail(QueueFault.AVAIL_IDX_JUMP, avail_idx)
                for _ in range(pending):
                    head: int = unpack(avail, 4 + 2 * (last & mask))[0]
                    if head >= size:
                        self._fail(QueueFault.HEAD_OUT_OF_RANGE, head)
                    if words[W_COUNTERS + head]:
                        # 2.6.13: a head is reused only after the device returned it.
                        self._fail(QueueFault.HEAD_IN_FLIGHT, head)
                    chain: SplitChain | DescriptorChain | BadChain | None = None
                    if split:
                        chain = walk_split(
                            memory, main, desc, size, head, out_header, in_header,
                            indirect, max_indirect,
                        )
                    if chain is None:
                        chain = self._walk(head)
                    # State order matters for resume(): see emulators.virtio.state.
                    number = words[W_LAST_COUNTER] + 1
                    words[W_LAST_COUNTER] = number
                    words[W_COUNTERS + head] = number
                    if point is not None:
                        point("queue.mark_inflight")
                    last = (last + 1) & 0xFFFF
                    words[W_LAST_AVAIL] = last
                    if point is not None:
                        point("queue.consumed")
                    taken += 1
                    append(chain)
                if not self._event_idx:
                    return out
                _U16.pack_into(self._used, self._avail_event_off, last)
                full_fence()
                if unpack(avail, 2)[0] == last:
                    return out
        finally:  # also when the ring turns out broken midway
            self._last_avail = last
            self._inflight += taken

    def chain_for(self, head: int) -> DescriptorChain | BadChain:
        """Walk an in-flight head again (to re-execute it after :meth:`resume`)."""
        if not 0 <= head < self._size or not self._words[W_COUNTERS + head]:
            raise ValueError(f"head {head} is not in flight")
        return self._walk(head)

    def _take(self) -> DescriptorChain | BadChain:
        last = self._last_avail
        head: int = _U16.unpack_from(self._avail, 4 + 2 * (last & self._mask))[0]
        if head >= self._size:
            self._fail(QueueFault.HEAD_OUT_OF_RANGE, head)
        words = self._words
        if words[W_COUNTERS + head]:
            # 2.6.13: a head is reused only after the device returned it.
            self._fail(QueueFault.HEAD_IN_FLIGHT, head)
        chain = self._walk(head)
        # State order matters for resume(): see emulators.virtio.state.
        number = words[W_LAST_COUNTER] + 1
        words[W_LAST_COUNTER] = number
        words[W_COUNTERS + head] = number
        faults.point("queue.mark_inflight")
        last = (last + 1) & 0xFFFF
        words[W_LAST_AVAIL] = last
        faults.point("queue.consumed")
        self._last_avail = last
        self._inflight += 1
        return chain

    def _walk(self, head: int) -> DescriptorChain | BadChain:
        try:
            return walk_chain(
                self._memory,
                self._desc,
                self._size,
                head,
                indirect=self._indirect,
                max_indirect=self._max_indirect,
            )
        except ChainError as exc:
            return BadChain(head, exc)

    def _fail(self, fault: QueueFault, value: int) -> NoReturn:
        self._broken = QueueError(fault, value)
        raise self._broken

    def _write_avail_event(self) -> None:
        if self._event_idx:
            _U16.pack_into(self._used, self._avail_event_off, self._last_avail)

    # ------------------------------------------------------------------
    # completing requests

    def push_used(self, head: int, used_len: int) -> None:
        """Complete one in-flight head; ``used_len`` is bytes written to the guest.

        The one-element case of :meth:`push_used_many`, kept separate because
        it is the common one.
        """
        words = self._words
        if not 0 <= head < self._size or not words[W_COUNTERS + head]:
            raise ValueError(f"head {head} is not in flight")
        if not 0 <= used_len <= _U32_MAX:
            raise ValueError(f"used length {used_len} is not a u32")
        words[self._batch_base] = head  # P1
        words[W_BATCH_LEN] = 1
        faults.point("queue.batch_recorded")
        used = self._used_idx
        _USED_ELEM.pack_into(self._used, 4 + 8 * (used & self._mask), head, used_len)  # P2
        faults.point("queue.used_written")
        new = (used + 1) & 0xFFFF
        self._publish_used_idx(new)  # P3
        faults.point("queue.publish_used")
        words[W_COUNTERS + head] = 0  # P4
        faults.point("queue.clear_inflight")
        words[W_USED] = new  # P5
        faults.point("queue.batch_settle")
        self._used_idx = new
        self._inflight -= 1

    def push_used_many(self, completions: Sequence[tuple[int, int]]) -> None:
        """Complete several heads and publish ``used->idx`` once.

        Completing a head that is not in flight, twice in one batch, or with
        a length outside u32, is a bug in the caller: ValueError, and nothing
        is written. The steps P1..P5 are those of :mod:`emulators.virtio.state`.
        """
        self.push_used_batch([h for h, _ in completions], [n for _, n in completions])

    def push_used_batch(self, heads: list[int], lengths: list[int]) -> None:
        """:meth:`push_used_many` given as two lists (``heads[i]`` wrote
        ``lengths[i]`` bytes): the request path builds no pair per request,
        and the used elements are written with one precompiled pack."""
        n = len(heads)
        if len(lengths) != n:
            raise ValueError(f"{n} heads but {len(lengths)} lengths")
        if not n:
            return
        words = self._words
        size = self._size
        for head in heads:
            if not 0 <= head < size or not words[W_COUNTERS + head]:
                raise ValueError(f"head {head} is not in flight")
        for length in (min(lengths), max(lengths)):
            if not 0 <= length <= _U32_MAX:
                raise ValueError(f"used length {length} is not a u32")
        if n > 1 and len(set(heads)) != n:
            raise ValueError("a head is completed twice in one batch")
        # P1: remember the batch, so a crash after P3 can be settled.
        base = self._batch_base
        words[base : base + n] = array("Q", heads)
        words[W_BATCH_LEN] = n
        faults.point("queue.batch_recorded")
        # P2: used elements, before the index that makes them visible; a run
        # that passes the end of the ring is two packs.
        used = self._used_idx
        slot = used & self._mask
        elems = [0] * (2 * n)
        elems[0::2] = heads
        elems[1::2] = lengths
        first = min(n, size - slot)
        ring = self._used
        _used_run(first).pack_into(ring, 4 + 8 * slot, *elems[: 2 * first])
        if first < n:
            _used_run(n - first).pack_into(ring, 4, *elems[2 * first :])
        faults.point("queue.used_written")
        # P3: publish.
        new = (used + n) & 0xFFFF
        self._publish_used_idx(new)
        faults.point("queue.publish_used")
        # P4, P5: settle.
        for head in heads:
            words[W_COUNTERS + head] = 0
        faults.point("queue.clear_inflight")
        words[W_USED] = new
        faults.point("queue.batch_settle")
        self._used_idx = new
        self._inflight -= n

    def _publish_used_idx(self, value: int) -> None:
        _U16.pack_into(self._used, 2, value)

    # ------------------------------------------------------------------
    # notification

    def needs_notification(self) -> bool:
        """Whether the guest wants an interrupt for what was published so far.

        Without EVENT_IDX: unless the avail ring says NO_INTERRUPT (2.6.7).
        With EVENT_IDX: if ``used->idx`` passed ``used_event`` since the last
        call (2.6.7.2); the first call after a start or resume is always True.
        Call it after publishing; it fences first (module docstring).
        """
        full_fence()
        if not self._event_idx:
            flags = _U16.unpack_from(self._avail, 0)[0]
            return not flags & VRING_AVAIL_F_NO_INTERRUPT
        new = self._used_idx
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if not valid:
            return True
        used_event = _U16.unpack_from(self._avail, self._used_event_off)[0]
        return vring_need_event(used_event, new, old)

    # ------------------------------------------------------------------

    def move(self, memory: GuestMemory, desc_gpa: int, avail_gpa: int, used_gpa: int) -> None:
        """Carry on over a new guest memory map (vhost-user SET_MEM_TABLE while
        the ring runs, e.g. memory hotplug), at the same position.

        Only the views change: indexes, heads in flight and the saved
        progress are the ring's, not the map's. The new views are taken (and
        checked) before the old ones are dropped, so a refused move leaves
        the queue as it was.
        """
        extra = 2 if self._event_idx else 0
        size = self._size
        for what, gpa, align in (
            ("descriptor table", desc_gpa, 16),
            ("avail ring", avail_gpa, 2),
            ("used ring", used_gpa, 4),
        ):
            if gpa % align:
                raise QueueConfigError(f"{what} at {gpa:#x} is not {align}-byte aligned")
        desc = _ring_view(memory, desc_gpa, 16 * size, "descriptor table")
        avail = _ring_view(memory, avail_gpa, 4 + 2 * size + extra, "avail ring")
        used = _ring_view(memory, used_gpa, 4 + 8 * size + extra, "used ring")
        self.release()
        self._desc, self._avail, self._used = desc, avail, used
        self._memory = memory
        self._main = memory.main_view()

    def release(self) -> None:
        """Drop the ring views (before the memory is closed or replaced)."""
        for view in (self._desc, self._avail, self._used):
            view.release()
