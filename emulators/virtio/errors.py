"""Errors raised by the virtio layer.

Every error here is "the peer broke it": either the frontend (QEMU, through
vhost-user messages that configure memory and rings) or the guest driver
(through the contents of the rings and descriptors) gave us something the
virtio spec forbids. None of them means a bug in the emulator.

::

    VirtioError                       base of everything below
     +-- GuestMemoryError (ValueError) an address range is not inside guest
     |                                 RAM, or the region table is invalid
     +-- QueueConfigError (ValueError) ring size / alignment / placement given
     |                                 by the frontend is invalid; the queue
     |                                 cannot be started
     +-- QueueError                    the guest corrupted the ring itself
     |                                 (avail index jump, head out of range,
     |                                 a head reused while in flight, or a
     |                                 used index that disagrees with the
     |                                 saved progress on resume): the queue
     |                                 is stopped until the driver resets
     |                                 the device and sets the ring up anew
     +-- ChainError                    one descriptor chain is malformed; it
     |                                 carries its head so the caller can
     |                                 complete it with used_len 0 and go on
     +-- RecoveryError                 persisted queue state does not agree
                                       with the guest's rings; resuming would
                                       lose or duplicate requests

Which errors a restart can help with: none of them. They are all caused by
data the guest or frontend wrote; a new emulator would read the same data.
"""

from __future__ import annotations

import enum

__all__ = [
    "ChainError",
    "ChainFault",
    "GuestMemoryError",
    "QueueConfigError",
    "QueueError",
    "QueueFault",
    "RecoveryError",
    "VirtioError",
]


class VirtioError(Exception):
    """Base class: the frontend or the guest violated the virtio contract."""


class GuestMemoryError(VirtioError, ValueError):
    """An access outside guest RAM, or an invalid memory region table.

    ``address`` and ``length`` say which access failed (both ``None`` for a
    region-table problem that is not about one access).
    """

    def __init__(self, reason: str, address: int | None = None, length: int | None = None):
        self.reason = reason
        self.address = address
        self.length = length
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.address is None:
            return self.reason
        return f"{self.reason}: address {self.address:#x} length {self.length:#x}"


class QueueConfigError(VirtioError, ValueError):
    """The ring configuration (size, addresses, alignment) is invalid."""


class QueueFault(enum.Enum):
    """Why a queue had to be stopped (virtio 1.1 section 2.6)."""

    AVAIL_IDX_JUMP = "avail index moved by more than the queue size"
    HEAD_OUT_OF_RANGE = "avail ring entry is not a valid descriptor index"
    HEAD_IN_FLIGHT = "avail ring offered a head that is still in flight"
    USED_HEAD_INVALID = "completion for a head that is not in flight"
    RESUME_MISMATCH = "saved progress does not match the used ring"


class QueueError(VirtioError):
    """The guest corrupted a ring; the queue is stopped (permanently).

    ``queue_index`` is filled in by whoever knows it (the device layer);
    ``value`` is the offending number (index or head).
    """

    def __init__(self, fault: QueueFault, value: int, queue_index: int | None = None):
        self.fault = fault
        self.value = value
        self.queue_index = queue_index
        super().__init__(str(self))

    def __str__(self) -> str:
        where = "" if self.queue_index is None else f"queue {self.queue_index}: "
        return f"{where}{self.fault.value} ({self.value})"


class ChainFault(enum.Enum):
    """Why one descriptor chain was refused (virtio 1.1 section 2.6.5)."""

    LOOP = "chain longer than the queue size (a loop)"
    NEXT_OUT_OF_RANGE = "next index outside the descriptor table"
    INDIRECT_NOT_NEGOTIATED = "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
    INDIRECT_WITH_NEXT = "indirect descriptor with NEXT set"
    INDIRECT_NESTED = "indirect descriptor inside an indirect table"
    INDIRECT_BAD_LENGTH = "indirect table length not a non-zero multiple of 16"
    INDIRECT_TOO_LARGE = "indirect table has too many entries"
    INDIRECT_OUT_OF_MEMORY = "indirect table outside guest memory"
    READABLE_AFTER_WRITABLE = "device-readable descriptor after a device-writable one"
    LENGTH_OVERFLOW = "total chain length exceeds 2**32 - 1"
    BUFFER_OUT_OF_MEMORY = "buffer outside guest memory"


class ChainError(VirtioError):
    """A malformed descriptor chain. ``head`` is the chain's head index."""

    def __init__(self, fault: ChainFault, head: int, detail: str = ""):
        self.fault = fault
        self.head = head
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"chain at head {self.head}: {self.fault.value}{extra}"


class RecoveryError(VirtioError):
    """Persisted queue state is inconsistent with the guest's used ring."""
