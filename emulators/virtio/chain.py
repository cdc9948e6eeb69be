"""Descriptor chains of a split virtqueue (virtio 1.1 section 2.6.5).

Theory of operation
-------------------
A request is a chain of 16-byte descriptors ``(addr u64, len u32, flags u16,
next u16)`` starting at a head index in the descriptor table. Walking it
turns each descriptor into memoryviews of guest RAM (through
:class:`GuestMemory`, so every buffer is range-checked) sorted into
device-readable and device-writable lists. The rules enforced, each from the
spec unless marked as our choice:

* hop budget: a chain has at most queue-size descriptors (2.6.5.3.1, "MUST
  NOT create a descriptor chain longer than the Queue Size"); an indirect
  table has at most as many hops as it has entries. Anything longer is a
  loop.
* ``next`` must index the table it lives in.
* INDIRECT (2.6.5.3): only if VIRTIO_F_INDIRECT_DESC was negotiated; not
  together with NEXT; never inside an indirect table; the table length is a
  non-zero multiple of 16. Our choice: at most ``max_indirect`` entries
  (default 1024, far above what Linux builds from virtio-scsi's seg_max) so a
  guest cannot make one walk arbitrarily long. The WRITE flag on the
  descriptor that points at a table is ignored, as the spec requires.
* device-writable descriptors come after all device-readable ones (2.6.4.2);
  the rule is applied to zero-length descriptors too.
* a buffer may span two adjacent guest memory regions; it then gives two
  views, so the lists may be longer than the chain.
* our choice: zero-length descriptors are accepted and produce no view; their
  address is not checked, since nothing is ever read or written there.
* our choice: the readable plus writable lengths may not exceed 2**32 - 1
  (the used element's length is a u32).
* buffers may point anywhere in guest RAM, including at the rings themselves:
  the spec does not forbid it, and it is harmless to us -- it is still guest
  memory the guest owns, and it can only confuse the guest itself.

A chain that breaks a rule raises :class:`ChainError` with its head; the queue
turns that into a :class:`BadChain` so the caller can complete it with used
length 0 and carry on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from emulators.virtio.errors import ChainError, ChainFault, GuestMemoryError
from emulators.virtio.memory import GuestMemory

__all__ = [
    "DEFAULT_MAX_INDIRECT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "BadChain",
    "DescriptorChain",
    "SplitChain",
    "gather",
    "split_buffers",
    "walk_chain",
    "walk_split",
]

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

DEFAULT_MAX_INDIRECT = 1024
_U32_MAX = 0xFFFF_FFFF

DESC = struct.Struct("<QIHH")

SplitChain = tuple[int, memoryview, list[memoryview], int, memoryview, list[memoryview], int]
"""What :func:`walk_split` gives: ``(head, out header, data out, data-out
length, in header, data in, data-in length)``. A plain tuple: one is built per
request, and a tuple costs the least to build and to take apart."""


class DescriptorChain(NamedTuple):
    """A validated request: guest buffers in chain order.

    The views alias guest RAM: keep them only until the request is completed
    (see :mod:`emulators.virtio.memory` for why). A NamedTuple rather than a
    frozen dataclass because one is built per request on the hot path, and
    a frozen dataclass's ``__init__`` costs about three times as much.
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    readable_len: int
    writable_len: int


@dataclass(frozen=True, slots=True)
class BadChain:
    """A chain that was taken off the ring but refused.

    It is in flight like any other: complete it with ``push_used(head, 0)``.
    """

    head: int
    error: ChainError

    @property
    def fault(self) -> ChainFault:
        return self.error.fault


def _buffers(memory: GuestMemory, head: int, addr: int, length: int) -> list[memoryview]:
    try:
        return memory.views(addr, length)
    except GuestMemoryError as exc:
        raise ChainError(ChainFault.BUFFER_OUT_OF_MEMORY, head, str(exc)) from None


def walk_chain(
    memory: GuestMemory,
    table: memoryview,
    size: int,
    head: int,
    *,
    indirect: bool,
    max_indirect: int = DEFAULT_MAX_INDIRECT,
) -> DescriptorChain:
    """Walk the chain at ``head`` of descriptor ``table`` (``size`` entries).

    ``head`` must already be known to be below ``size``. Raises
    :class:`ChainError` for every rule in the module docstring.
    """
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    rlen = wlen = 0
    index = head
    budget = size
    in_indirect = False
    seen_write = False
    unpack = DESC.unpack_from
    view = memory.view
    while True:
        if budget == 0:
            raise ChainError(ChainFault.LOOP, head, f"more than {size} descriptors")
        budget -= 1
        addr, length, flags, nxt = unpack(table, index << 4)
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not indirect:
                raise ChainError(ChainFault.INDIRECT_NOT_NEGOTIATED, head)
            if in_indirect:
                raise ChainError(ChainFault.INDIRECT_NESTED, head)
            if flags & VIRTQ_DESC_F_NEXT:
                raise ChainError(ChainFault.INDIRECT_WITH_NEXT, head)
            if length == 0 or length & 15:
                raise ChainError(ChainFault.INDIRECT_BAD_LENGTH, head, f"length {length}")
            entries = length >> 4
            if entries > max_indirect:
                raise ChainError(
                    ChainFault.INDIRECT_TOO_LARGE, head, f"{entries} > {max_indirect}"
                )
            try:
                table = view(addr, length)
            except GuestMemoryError as exc:
                raise ChainError(ChainFault.INDIRECT_OUT_OF_MEMORY, head, str(exc)) from None
            size = budget = entries
            index = 0
            in_indirect = True
            continue
        if flags & VIRTQ_DESC_F_WRITE:
            seen_write = True
            if length:
                try:
                    writable.append(view(addr, length))
                except GuestMemoryError:
                    writable.extend(_buffers(memory, head, addr, length))
                wlen += length
        else:
            if seen_write:
                raise ChainError(ChainFault.READABLE_AFTER_WRITABLE, head)
            if length:
                try:
                    readable.append(view(addr, length))
                except GuestMemoryError:
                    readable.extend(_buffers(memory, head, addr, length))
                rlen += length
        if not flags & VIRTQ_DESC_F_NEXT:
            break
        if nxt >= size:
            raise ChainError(ChainFault.NEXT_OUT_OF_RANGE, head, f"next {nxt} >= {size}")
        index = nxt
    if rlen + wlen > _U32_MAX:
        raise ChainError(ChainFault.LENGTH_OVERFLOW, head, f"{rlen + wlen} bytes")
    return DescriptorChain(head, readable, writable, rlen, wlen)


def split_buffers(
    views: list[memoryview], n: int
) -> tuple[list[memoryview], list[memoryview]]:
    """Split a buffer list after ``n`` bytes: (first n bytes, the rest).

    Used to separate a request header from its data (virtio-scsi puts the
    command and the data-out in the readable part, the response and the
    data-in in the writable part). If the views hold fewer than ``n`` bytes,
    the first list holds them all and the second is empty.
    """
    first: list[memoryview] = []
    left = n
    for i, v in enumerate(views):
        if left == 0:
            return first, views[i:]
        if len(v) <= left:
            first.append(v)
            left -= len(v)
        else:
            first.append(v[:left])
            return first, [v[left:], *views[i + 1 :]]
    return first, []


def gather(views: list[memoryview], n: int) -> bytes:
    """Copy the first ``n`` bytes (or fewer, if the views are shorter)."""
    if views and len(views[0]) >= n:
        return views[0][:n].tobytes()
    return b"".join(split_buffers(views, n)[0])


def walk_split(
    memory: GuestMemory,
    main: tuple[int, memoryview],
    table: memoryview,
    size: int,
    head: int,
    out_header: int,
    in_header: int,
    indirect: bool,
    max_indirect: int,
) -> SplitChain | None:
    """The chain at ``head`` in the usual request shape, or None for any other.

    The usual shape (virtio-scsi as Linux builds it, 5.6.6, and most
    request/response devices): a device-readable header of exactly
    ``out_header`` bytes, device-readable data, a device-writable header of
    exactly ``in_header`` bytes, device-writable data; all in one direct
    chain, or all in one indirect table that the head points to. It is
    walked in one pass and comes back already split into headers and data,
    so the device needs neither a second walk nor a split.

    ``main`` is :meth:`GuestMemory.main_view`: a buffer inside that region
    is sliced straight out of it, after the same two bound checks
    :meth:`GuestMemory.view` makes; any other buffer goes through
    :meth:`GuestMemory.view`. Every rule of the module docstring still
    holds, because anything else returns None: the caller then walks the
    chain with :func:`walk_chain`, which applies the rule and raises the
    right :class:`ChainError`, or returns the chain in its general form.
    None is returned for: a next index out of range, more descriptors than
    the budget, INDIRECT anywhere but the head (or with NEXT, a bad length,
    too many entries, not negotiated, out of memory, nested), a header of
    another size, a zero-length descriptor, a readable descriptor after a
    writable one, a chain without a writable header, a buffer not inside one
    region, a total length above u32. So when this returns a chain,
    :func:`walk_chain` returns the same buffers (``readable == [out header,
    *data out]``, ``writable == [in header, *data in]``).
    """
    unpack = DESC.unpack_from
    addr, length, flags, nxt = unpack(table, head << 4)
    if flags & VIRTQ_DESC_F_INDIRECT:
        # 2.6.5.3.1: not with NEXT, a whole number of entries, not nested.
        if not indirect or flags & VIRTQ_DESC_F_NEXT or not length or length & 15:
            return None
        size = length >> 4
        if size > max_indirect:
            return None
        try:
            table = memory.view(addr, length)
        except GuestMemoryError:
            return None
        addr, length, flags, nxt = unpack(table, 0)
    # The budget counts descriptors read from this table (2.6.5.3.1).
    budget = size - 1
    if flags & (VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT) or length != out_header or not length:
        return None
    start, ram = main
    limit = len(ram)
    off = addr - start
    if off >= 0 and off + length <= limit:
        out_view = ram[off : off + length]
    else:
        try:
            out_view = memory.view(addr, length)
        except GuestMemoryError:
            return None
    data_out: list[memoryview] = []
    out_len = 0
    while True:  # device-readable data, then the writable header
        if not flags & VIRTQ_DESC_F_NEXT or nxt >= size or not budget:
            return None
        budget -= 1
        addr, length, flags, nxt = unpack(table, nxt << 4)
        if flags & VIRTQ_DESC_F_INDIRECT or not length:
            return None
        if flags & VIRTQ_DESC_F_WRITE:
            break
        off = addr - start
        if off >= 0 and off + length <= limit:
            data_out.append(ram[off : off + length])
        else:
            try:
                data_out.append(memory.view(addr, length))
            except GuestMemoryError:
                return None
        out_len += length
    if length != in_header:
        return None
    off = addr - start
    if off >= 0 and off + length <= limit:
        in_view = ram[off : off + length]
    else:
        try:
            in_view = memory.view(addr, length)
        except GuestMemoryError:
            return None
    data_in: list[memoryview] = []
    in_len = 0
    while flags & VIRTQ_DESC_F_NEXT:  # device-writable data
        if nxt >= size or not budget:
            return None
        budget -= 1
        addr, length, flags, nxt = unpack(table, nxt << 4)
        if not flags & VIRTQ_DESC_F_WRITE or flags & VIRTQ_DESC_F_INDIRECT or not length:
            return None
        off = addr - start
        if off >= 0 and off + length <= limit:
            data_in.append(ram[off : off + length])
        else:
            try:
                data_in.append(memory.view(addr, length))
            except GuestMemoryError:
                return None
        in_len += length
    if out_header + out_len + in_header + in_len > _U32_MAX:
        return None
    return (head, out_view, data_out, out_len, in_view, data_in, in_len)
