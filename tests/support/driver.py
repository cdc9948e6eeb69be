"""A test-side virtio driver for one split virtqueue.

It plays the guest: lays out the descriptor table, avail ring and used ring
in a :class:`GuestMemory`, allocates data buffers from the rest of the
region, and submits chains the way Linux's virtio_ring does (free
descriptors linked by ``next``, one avail entry per chain, ``avail->idx``
written after the entry). Low-level helpers write raw descriptors and ring
fields for hostile cases: loops, out-of-memory addresses, odd lengths,
nested indirect tables, avail index jumps.

It works over any GuestMemory; :func:`create_memfd_memory` makes one backed
by a memfd, whose fd and region can be handed to an emulator process that
maps the same pages with ``GuestMemory.from_fds``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from emulators.virtio.chain import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from emulators.virtio.memory import GuestMemory, MemoryRegion
from emulators.virtio.splitqueue import SplitQueue
from emulators.virtio.state import MemoryQueueState, QueueState

__all__ = [
    "Completion",
    "MemfdGuestMemory",
    "RingLayout",
    "TestDriver",
    "align_up",
    "create_memfd_memory",
    "queue_for",
]

F_NEXT = VIRTQ_DESC_F_NEXT
F_WRITE = VIRTQ_DESC_F_WRITE
F_INDIRECT = VIRTQ_DESC_F_INDIRECT

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where the rings are: what SET_VRING_NUM / SET_VRING_ADDR would carry."""

    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int


@dataclass(frozen=True, slots=True)
class Completion:
    head: int
    used_len: int
    writable: list[bytes]


@dataclass(slots=True)
class _Chain:
    descs: list[int]
    buffers: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    table: tuple[int, int] | None = None


@dataclass(slots=True)
class _Allocator:
    """First-fit allocator over ``[start, end)`` with coalescing frees."""

    free: list[tuple[int, int]] = field(default_factory=list)

    def alloc(self, n: int, align: int = 16) -> int:
        n = max(align_up(n, align), align)
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = (start + n, length - n)
                return start
        raise MemoryError(f"test driver: no {n} bytes free in the data area")

    def release(self, start: int, n: int, align: int = 16) -> None:
        n = max(align_up(n, align), align)
        self.free.append((start, n))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, length in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self.free = merged


class TestDriver:
    """The guest side of one split queue in ``memory`` starting at ``base_gpa``.

    The data area runs from the end of the used ring to ``data_end`` (by
    default the end of the region holding ``base_gpa``).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        memory: GuestMemory,
        queue_size: int,
        base_gpa: int,
        *,
        data_end: int | None = None,
        used_align: int = 4,
    ) -> None:
        self.memory = memory
        self.size = queue_size
        desc = align_up(base_gpa, 16)
        avail = desc + 16 * queue_size
        used = align_up(avail + 6 + 2 * queue_size, used_align)
        self.layout = RingLayout(queue_size, desc, avail, used)
        self.data_start = align_up(used + 6 + 8 * queue_size, 16)
        if data_end is None:
            region = next(
                r for r in memory.regions if r.guest_phys_addr <= base_gpa < r.gpa_end
            )
            data_end = region.gpa_end
        self.data_end = data_end
        if self.data_end <= self.data_start:
            raise ValueError("no room for data buffers after the rings")
        memory.write(desc, bytes(self.data_start - desc))
        self._alloc = _Allocator([(self.data_start, self.data_end - self.data_start)])
        self._free_descs = list(range(queue_size))
        self._chains: dict[int, _Chain] = {}
        self.avail_idx = 0
        self.last_used = 0

    # ------------------------------------------------------------------
    # normal submission

    def add_chain(
        self,
        readable: list[bytes],
        writable_sizes: list[int],
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> int:
        """Build a chain (device-readable buffers first) and offer it; return its head."""
        count = len(readable) + len(writable_sizes)
        if count == 0:
            raise ValueError("a chain needs at least one buffer")
        buffers: list[tuple[int, int]] = []
        flags: list[int] = []
        for data in readable:
            gpa = self._alloc.alloc(len(data))
            self.memory.write(gpa, data)
            buffers.append((gpa, len(data)))
            flags.append(0)
        for n in writable_sizes:
            buffers.append((self._alloc.alloc(n), n))
            flags.append(F_WRITE)
        writable = buffers[len(readable) :]
        if indirect:
            table = self._alloc.alloc(16 * count)
            for i, ((gpa, n), f) in enumerate(zip(buffers, flags, strict=True)):
                last = i == count - 1
                self.write_desc_at(table + 16 * i, gpa, n, f | (0 if last else F_NEXT), i + 1)
            head = self._take_descs(1)[0]
            self.write_desc(head, table, 16 * count, F_INDIRECT, 0)
            self._chains[head] = _Chain([head], buffers, writable, (table, 16 * count))
        else:
            descs = self._take_descs(count)
            for i, ((gpa, n), f) in enumerate(zip(buffers, flags, strict=True)):
                last = i == count - 1
                nxt = 0 if last else descs[i + 1]
                self.write_desc(descs[i], gpa, n, f | (0 if last else F_NEXT), nxt)
            head = descs[0]
            self._chains[head] = _Chain(descs, buffers, writable)
        self.offer(head, publish=publish)
        return head

    def _take_descs(self, n: int) -> list[int]:
        if n > len(self._free_descs):
            raise MemoryError(f"test driver: {n} descriptors wanted, {len(self._free_descs)} free")
        out, self._free_descs = self._free_descs[:n], self._free_descs[n:]
        return out

    def offer(self, head: int, *, publish: bool = True) -> None:
        """Put ``head`` in the next avail slot; write ``avail->idx`` if ``publish``."""
        self.set_avail_ring(self.avail_idx % self.size, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        """Write the driver's avail index (after the ring entries, as Linux does)."""
        self.set_avail_idx(self.avail_idx)

    # ------------------------------------------------------------------
    # completions

    def get_used(self) -> list[tuple[int, int]]:
        """New used elements since the last call: (head, used length)."""
        idx = self.used_idx()
        out = []
        while self.last_used != idx:
            out.append(self.read_used_elem(self.last_used % self.size))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def read_writable(self, head: int) -> list[bytes]:
        """Contents of the device-writable buffers of a submitted chain."""
        return [self.memory.read(gpa, n) for gpa, n in self._chains[head].writable]

    def free_chain(self, head: int) -> None:
        """Give the chain's descriptors and buffers back (after its completion)."""
        chain = self._chains.pop(head)
        for gpa, n in chain.buffers:
            self._alloc.release(gpa, n)
        if chain.table is not None:
            self._alloc.release(*chain.table)
        # Linux puts freed descriptors at the front: heads get reused soon.
        self._free_descs[:0] = chain.descs

    def collect(self) -> list[Completion]:
        """get_used + read_writable + free_chain for every new completion."""
        out = []
        for head, n in self.get_used():
            out.append(Completion(head, n, self.read_writable(head)))
            self.free_chain(head)
        return out

    @property
    def outstanding(self) -> int:
        return len(self._chains)

    # ------------------------------------------------------------------
    # raw access, for hostile rings

    def alloc(self, n: int) -> int:
        """Reserve ``n`` bytes of the data area (never freed by the driver)."""
        return self._alloc.alloc(n)

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write descriptor ``index`` of the ring's table (values are masked to size)."""
        self.write_desc_at(self.layout.desc_gpa + 16 * index, addr, length, flags, next_)

    def write_desc_at(self, gpa: int, addr: int, length: int, flags: int, next_: int) -> None:
        self.memory.write(
            gpa,
            _DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF, next_ & 0xFFFF),
        )

    def set_avail_ring(self, slot: int, head: int) -> None:
        self.memory.write_u16(self.layout.avail_gpa + 4 + 2 * slot, head & 0xFFFF)

    def set_avail_idx(self, value: int) -> None:
        """Write ``avail->idx`` as is (a jump too, for hostile cases)."""
        self.memory.write_u16(self.layout.avail_gpa + 2, value & 0xFFFF)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.layout.avail_gpa, flags)

    def set_used_event(self, value: int) -> None:
        """EVENT_IDX: interrupt me when ``used->idx`` passes ``value``."""
        self.memory.write_u16(self.layout.avail_gpa + 4 + 2 * self.size, value & 0xFFFF)

    def avail_event(self) -> int:
        """EVENT_IDX: the device wants a kick when avail->idx passes this."""
        return self.memory.read_u16(self.layout.used_gpa + 4 + 8 * self.size)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.layout.used_gpa + 2)

    def set_used_idx(self, value: int) -> None:
        """Scribble on the device's used index (hostile guest)."""
        self.memory.write_u16(self.layout.used_gpa + 2, value & 0xFFFF)

    def read_used_elem(self, slot: int) -> tuple[int, int]:
        head, length = _USED_ELEM.unpack(self.memory.read(self.layout.used_gpa + 4 + 8 * slot, 8))
        return head, length


@dataclass(slots=True)
class MemfdGuestMemory:
    """Guest RAM in one memfd region, as QEMU would share it.

    Give ``fd`` and ``region`` to the emulator (it maps them with
    ``GuestMemory.from_fds([region])``); ``memory`` is this side's mapping.
    """

    memory: GuestMemory
    region: MemoryRegion
    fd: int

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)


def create_memfd_memory(
    size: int,
    *,
    guest_phys_addr: int = 0,
    userspace_addr: int = 0x7F00_0000_0000,
    name: str = "mplaunch-guest-ram",
) -> MemfdGuestMemory:
    """A memfd of ``size`` bytes mapped as one guest RAM region."""
    fd = os.memfd_create(name)
    try:
        os.ftruncate(fd, size)
        region = MemoryRegion(guest_phys_addr, size, userspace_addr, 0, fd)
        memory = GuestMemory.from_fds([region])
    except BaseException:
        os.close(fd)
        raise
    return MemfdGuestMemory(memory, region, fd)


def queue_for(
    driver: TestDriver,
    *,
    event_idx: bool = False,
    indirect: bool = True,
    state: QueueState | None = None,
    memory: GuestMemory | None = None,
    fresh: bool = True,
) -> SplitQueue:
    """The device side of ``driver``'s queue (``memory`` may be another mapping).

    ``fresh`` starts it at base 0 (SET_VRING_BASE); pass False to attach to
    an existing ``state`` and call ``resume()`` yourself.
    """
    layout = driver.layout
    queue = SplitQueue(
        driver.memory if memory is None else memory,
        layout.size,
        layout.desc_gpa,
        layout.avail_gpa,
        layout.used_gpa,
        event_idx=event_idx,
        indirect=indirect,
        state=MemoryQueueState(layout.size) if state is None else state,
    )
    if fresh:
        queue.set_base(0)
    return queue
