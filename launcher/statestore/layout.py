"""The state store: what an emulator must leave behind for its successor.

Theory of operation: the launcher creates one file per emulator in the VM's
run folder (tmpfs), sized by this layout, and passes its fd; the emulator
maps it shared and keeps its resumable state there as it goes. When the
emulator dies, the file outlives it, and the next emulator maps the same file
and carries on from it. Nothing is serialised at crash time: the file is the
live state.

Layout (little endian; every slot 8-byte aligned)::

    header   magic "MPLSTATE", version, header size, slot counts and sizes
    per controller c, per queue q:
        queue slot:  valid u32, num u32, then the queue's progress words
                     (emulators.virtio.state layout, sized for MAX_QUEUE_SIZE)
    per controller c, per LUN slot l:
        lun slot:    valid u32, lun u32, then LunState.pack() bytes

A queue slot is valid while its ring is started: a ring that was running when
the emulator died is resumed (its in-flight heads re-executed); one that was
not is started fresh when the front-end starts it. A LUN slot is valid once
its unit state exists, so a successor inherits pending unit attentions, sense
data and mode settings instead of raising a new power-on attention.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from emulators.scsi.lun import STATE_SIZE as LUN_STATE_SIZE
from emulators.virtio.state import required_size

MAGIC = b"MPLSTATE"
VERSION = 1
MAX_QUEUE_SIZE = 1024
MAX_LUN_SLOTS = 256
_HEADER = struct.Struct("<8sIIIIIIII")
HEADER_SIZE = 64
_SLOT_META = struct.Struct("<II")


class StateStoreError(ValueError):
    """The file is not a state store of this layout: a restart cannot use it."""


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True, slots=True)
class Layout:
    """Slot geometry for a given emulator shape."""

    controllers: int
    queues: int  # per controller, control and event queues included
    lun_slots: int  # per controller

    @property
    def queue_slot_size(self) -> int:
        return _SLOT_META.size + required_size(MAX_QUEUE_SIZE)

    @property
    def lun_slot_size(self) -> int:
        return _align8(_SLOT_META.size + LUN_STATE_SIZE)

    @property
    def size(self) -> int:
        queues = self.controllers * self.queues * self.queue_slot_size
        luns = self.controllers * self.lun_slots * self.lun_slot_size
        return HEADER_SIZE + queues + luns

    def queue_offset(self, controller: int, queue: int) -> int:
        self._check(controller, queue, self.queues)
        return HEADER_SIZE + (controller * self.queues + queue) * self.queue_slot_size

    def lun_offset(self, controller: int, slot: int) -> int:
        self._check(controller, slot, self.lun_slots)
        base = HEADER_SIZE + self.controllers * self.queues * self.queue_slot_size
        return base + (controller * self.lun_slots + slot) * self.lun_slot_size

    def _check(self, controller: int, index: int, limit: int) -> None:
        if not 0 <= controller < self.controllers or not 0 <= index < limit:
            raise IndexError(f"slot ({controller}, {index}) outside the layout {self}")

    def header(self) -> bytes:
        raw = _HEADER.pack(
            MAGIC, VERSION, HEADER_SIZE, self.controllers, self.queues, self.lun_slots,
            self.queue_slot_size, self.lun_slot_size, self.size,
        )
        return raw.ljust(HEADER_SIZE, b"\0")

    @classmethod
    def read_header(cls, data: bytes | memoryview) -> Layout:
        if len(data) < HEADER_SIZE:
            raise StateStoreError("state store shorter than its header")
        magic, version, hsize, ctl, queues, luns, qslot, lslot, size = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise StateStoreError("not a state store (bad magic)")
        if version != VERSION or hsize != HEADER_SIZE:
            raise StateStoreError(f"state store version {version} is not {VERSION}")
        layout = cls(ctl, queues, luns)
        if (qslot, lslot, size) != (layout.queue_slot_size, layout.lun_slot_size, layout.size):
            raise StateStoreError("state store slot sizes do not match this build")
        return layout


def create(path: str | os.PathLike[str], layout: Layout) -> int:
    """Create the zeroed file with its header; returns an O_RDWR fd (close-on-exec)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, layout.size)
        os.pwrite(fd, layout.header(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


class StateStore:
    """A mapped state store: typed slot access for the emulator."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise StateStoreError(f"state store of {size} bytes is too small")
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)
        self.layout = Layout.read_header(self.view)
        if self.layout.size != size:
            self.close()
            raise StateStoreError(
                f"state store is {size} bytes, its header says {self.layout.size}"
            )

    def queue_slot(self, controller: int, queue: int) -> tuple[bool, int, memoryview]:
        """(valid, num, progress buffer) of a queue's slot."""
        off = self.layout.queue_offset(controller, queue)
        valid, num = _SLOT_META.unpack_from(self.view, off)
        body = self.view[off + _SLOT_META.size : off + self.layout.queue_slot_size]
        return bool(valid), num, body

    def set_queue_slot(self, controller: int, queue: int, valid: bool, num: int) -> None:
        off = self.layout.queue_offset(controller, queue)
        if valid:
            _SLOT_META.pack_into(self.view, off, 1, num)
        else:
            _SLOT_META.pack_into(self.view, off, 0, 0)

    def lun_slot(self, controller: int, slot: int) -> tuple[bool, int, memoryview]:
        off = self.layout.lun_offset(controller, slot)
        valid, lun = _SLOT_META.unpack_from(self.view, off)
        body = self.view[off + _SLOT_META.size : off + _SLOT_META.size + LUN_STATE_SIZE]
        return bool(valid), lun, body

    def write_lun_slot(self, controller: int, slot: int, lun: int, state: bytes) -> None:
        """Body first, then the valid mark: a crash between leaves the old state or none."""
        off = self.layout.lun_offset(controller, slot)
        start = off + _SLOT_META.size
        self.view[start : start + len(state)] = state
        _SLOT_META.pack_into(self.view, off, 1, lun)

    def clear_lun_slot(self, controller: int, slot: int) -> None:
        _SLOT_META.pack_into(self.view, self.layout.lun_offset(controller, slot), 0, 0)

    def close(self) -> None:
        self.view.release()
        self._map.close()
