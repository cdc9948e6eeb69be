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
                     (emulators.virtio.state layout, sized for MAX_QUEUE_SIZE),
                     then the ring it belongs to: base u32, pad u32, and the
                     front-end's desc, avail and used addresses (u64 each)
    per controller c, per LUN slot l:
        lun slot:    active u32 (0: none, 1: copy A, 2: copy B), lun u32,
                     then two copies of LUN_STATE_SIZE bytes, each one
                     LunState.pack() (emulators.scsi.lun) zero padded
    per controller c:
        events slot: active u32, 0 u32, then two copies of
                     EVENTS_STATE_SIZE bytes: the virtio-scsi events not yet
                     delivered (EventQueueState.pack(), zero padded)

This module is a leaf: both the launcher and the emulators load it, so it
imports the standard library only (tests/unit/test_import_boundary.py),
and states the sizes of what the slots hold instead of importing them.
The bytes a slot holds are the previous emulator's, and it may have been
compromised: an emulator parses them only once locked down (its
controllers are built after its lockdown, emulators/process.py).

A queue slot is valid while its ring is started: a ring that was running when
the emulator died is resumed (its in-flight heads re-executed); one that was
not is started fresh when the front-end starts it. The slot names the ring
it was saved for (size, start base and addresses, as the front-end gave
them): a successor resumes it only for the same ring, so a slot left valid
by a process killed while stopping its ring cannot be taken for a ring the
driver set up anew. A LUN slot is valid once its unit state exists, so a
successor inherits pending unit attentions, sense data and mode settings
instead of raising a new power-on attention.

Crash safety: every store is ordered so that a SIGKILL between any two of
them leaves either the old or the new content, never a mix a successor
would trust. A queue slot's valid flag is written last when it is set
(after the progress words and the ring identity it vouches for) and first
when it is cleared. A LUN state is never rewritten in place: the new state
goes into the copy not in use, and a single-byte change of the active
selector switches to it. Every store goes through one method
(``StateStore._put``); tests/unit/test_statestore_layout.py records the
stores of random updates and plays a kill after every byte of each (in
either byte order), and the reader must find the old state or the new.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

MAGIC = b"MPLSTATE"
VERSION = 3
MAX_QUEUE_SIZE = 1024
MAX_LUN_SLOTS = 256
QUEUE_PROGRESS_SIZE = 8 * (4 + 2 * MAX_QUEUE_SIZE)
"""Bytes of a queue slot's progress words: the layout of emulators.virtio.state
for a ring of MAX_QUEUE_SIZE (4 header words, then a counter and a batch
entry per head). Stated here, not imported: this module is a leaf that both
sides load, and a unit test holds the two equal."""
LUN_STATE_SIZE = 128
"""Bytes of one copy of a LUN's state: room for emulators.scsi.lun's packed
LunState (a unit test holds it no larger) and for what reservations add."""
EVENTS_STATE_SIZE = 128
"""Bytes of one copy of a controller's waiting virtio-scsi events (the
packed EventQueueState of emulators.scsi.virtio_scsi; a test holds it no larger)."""
_HEADER = struct.Struct("<8sIIIIIIII")
HEADER_SIZE = 64
_SLOT_META = struct.Struct("<II")
_U32 = struct.Struct("<I")
_RING_ID = struct.Struct("<IIQQQ")


@dataclass(frozen=True, slots=True)
class RingIdentity:
    """Which ring a queue slot's progress belongs to: the size and start base
    the front-end set, and its desc, avail and used addresses (the front-end's
    own, which a new memory table does not change)."""

    num: int
    base: int
    desc: int
    avail: int
    used: int


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
        return _SLOT_META.size + QUEUE_PROGRESS_SIZE + _RING_ID.size

    @property
    def lun_slot_size(self) -> int:
        return _SLOT_META.size + 2 * _align8(LUN_STATE_SIZE)

    @property
    def events_slot_size(self) -> int:
        return _SLOT_META.size + 2 * _align8(EVENTS_STATE_SIZE)

    @property
    def size(self) -> int:
        queues = self.controllers * self.queues * self.queue_slot_size
        luns = self.controllers * self.lun_slots * self.lun_slot_size
        return HEADER_SIZE + queues + luns + self.controllers * self.events_slot_size

    def queue_offset(self, controller: int, queue: int) -> int:
        self._check(controller, queue, self.queues)
        return HEADER_SIZE + (controller * self.queues + queue) * self.queue_slot_size

    def lun_offset(self, controller: int, slot: int) -> int:
        self._check(controller, slot, self.lun_slots)
        base = HEADER_SIZE + self.controllers * self.queues * self.queue_slot_size
        return base + (controller * self.lun_slots + slot) * self.lun_slot_size

    def events_offset(self, controller: int) -> int:
        self._check(controller, 0, 1)
        base = self.lun_offset(0, 0) + self.controllers * self.lun_slots * self.lun_slot_size
        return base + controller * self.events_slot_size

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
        reset(fd, layout)
    except BaseException:
        os.close(fd)
        raise
    return fd


def reset(fd: int, layout: Layout) -> None:
    """Make the store behind ``fd`` what `create` makes: every slot invalid, so
    the next emulator starts as a device just powered on (no ring to resume,
    a power-on unit attention). Only while no process maps it: a truncation
    under a live emulator would fault its next store access."""
    os.ftruncate(fd, 0)
    os.ftruncate(fd, layout.size)
    os.pwrite(fd, layout.header(), 0)


class StateStore:
    """A mapped state store: typed slot access for the emulator.

    Every store goes through :meth:`_put`, in the order the crash-safety
    rules of the module docstring give; a test records that sequence and
    replays every prefix of it, byte by byte, to play a kill at each one.
    """

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise StateStoreError(f"state store of {size} bytes is too small")
        self._map: mmap.mmap | None = mmap.mmap(
            fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._attach(memoryview(self._map))

    @classmethod
    def over(cls, buffer: bytearray) -> StateStore:
        """A store over a plain buffer (tests, and a launcher-side check)."""
        store = cls.__new__(cls)
        store._map = None
        store._attach(memoryview(buffer))
        return store

    def _attach(self, view: memoryview) -> None:
        self.view = view
        try:
            self.layout = Layout.read_header(view)
            if self.layout.size != len(view):
                raise StateStoreError(
                    f"state store is {len(view)} bytes, its header says {self.layout.size}"
                )
        except StateStoreError:
            self.close()
            raise

    def _put(self, offset: int, data: bytes) -> None:
        """The one door every store goes through."""
        self.view[offset : offset + len(data)] = data

    def queue_slot(self, controller: int, queue: int) -> tuple[RingIdentity | None, memoryview]:
        """The ring a queue's slot holds progress for (None: no valid progress),
        and the progress buffer (written in place by the queue, one aligned
        u64 word per store: see emulators.virtio.state)."""
        off = self.layout.queue_offset(controller, queue)
        valid, num = _SLOT_META.unpack_from(self.view, off)
        body_end = off + self.layout.queue_slot_size - _RING_ID.size
        body = self.view[off + _SLOT_META.size : body_end]
        if valid != 1:
            return None, body
        base, _, desc, avail, used = _RING_ID.unpack_from(self.view, body_end)
        return RingIdentity(num, base, desc, avail, used), body

    def set_queue_slot(self, controller: int, queue: int, ring: RingIdentity | None) -> None:
        """Vouch for the progress words of `ring` (None: for none).

        Setting: the flag cleared if it was set, identity, then the flag
        last. Clearing: the flag alone. Call it only once the progress words
        are what they should be.
        """
        off = self.layout.queue_offset(controller, queue)
        if ring is None:
            self._put(off, _U32.pack(0))
            return
        if _U32.unpack_from(self.view, off)[0] != 0:
            self._put(off, _U32.pack(0))  # never an identity rewritten under a set flag
        id_at = off + self.layout.queue_slot_size - _RING_ID.size
        self._put(id_at, _RING_ID.pack(ring.base, 0, ring.desc, ring.avail, ring.used))
        self._put(off + 4, _U32.pack(ring.num))
        self._put(off, _U32.pack(1))

    def lun_slot(self, controller: int, slot: int) -> tuple[bool, int, memoryview]:
        """(valid, lun, the state bytes in use) of a LUN's slot.

        Only the selector and the LUN number are looked at here: the bytes
        are whatever the previous emulator left, for the caller to parse
        as untrusted input (and, in an emulator, only once it is locked down).
        """
        return self._read_double(self.layout.lun_offset(controller, slot), LUN_STATE_SIZE)

    def write_lun_slot(self, controller: int, slot: int, lun: int, state: bytes) -> None:
        """Write `state` into the copy not in use, then switch to it.

        The switch is one changed byte (1 <-> 2), so a crash at any instant
        leaves the old state or the new one, never a torn mix of both. The
        copy is written whole (zero padded), so no byte of an older state
        survives behind a shorter one.
        """
        self._write_double(self.layout.lun_offset(controller, slot), LUN_STATE_SIZE, lun, state)

    def events_slot(self, controller: int) -> tuple[bool, memoryview]:
        """(valid, the event bytes in use) of a controller: untrusted, as a LUN's."""
        valid, _, body = self._read_double(self.layout.events_offset(controller),
                                           EVENTS_STATE_SIZE)
        return valid, body

    def write_events_slot(self, controller: int, state: bytes) -> None:
        """As :meth:`write_lun_slot`, for the controller's waiting events."""
        self._write_double(self.layout.events_offset(controller), EVENTS_STATE_SIZE, 0, state)

    def _read_double(self, off: int, size: int) -> tuple[bool, int, memoryview]:
        active, tag = _SLOT_META.unpack_from(self.view, off)
        start = off + _SLOT_META.size + (1 if active == 2 else 0) * _align8(size)
        return active in (1, 2), tag, self.view[start : start + size]

    def _write_double(self, off: int, size: int, tag: int, state: bytes) -> None:
        if len(state) > size:
            raise ValueError(f"a state of {len(state)} bytes, the slot holds {size}")
        active, stored_tag = _SLOT_META.unpack_from(self.view, off)
        if active not in (0, 1, 2) or (active and stored_tag != tag):
            self._put(off, _U32.pack(0))  # another LUN's state (or garbage): drop it first
            active = 0
        target = 1 if active == 2 else 2
        start = off + _SLOT_META.size + (target - 1) * _align8(size)
        self._put(start, state.ljust(size, b"\0"))
        if not active:
            self._put(off + 4, _U32.pack(tag))
        self._put(off, _U32.pack(target))

    def clear_lun_slot(self, controller: int, slot: int) -> None:
        self._put(self.layout.lun_offset(controller, slot), _U32.pack(0))

    def close(self) -> None:
        self.view.release()
        if self._map is not None:
            self._map.close()
