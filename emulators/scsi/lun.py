"""Per-LUN state and the logical unit object.

:class:`LunState` is everything about a LUN that must survive a restart of
the emulator: pending unit attentions, the last sense, mode settings the
guest changed (write cache enable), and room for reservations. Its fields
are bounded (at most :data:`MAX_PENDING_UA` unit attentions, fixed-width
integers) so it maps onto a fixed binary layout: :meth:`LunState.pack` and
:meth:`LunState.unpack` give that layout, which the shared-memory state
store can hold verbatim.

Unit attention rules (SAM-5 5.14, SPC-4 4.5.5): a fresh LUN starts with
POWER ON, RESET, OR BUS DEVICE RESET OCCURRED only on the VM's first power
on (the caller decides: a restarted emulator must not raise it, the guest
would notice). A reset supersedes every pending condition. The same
condition is never queued twice; when the queue is full the oldest is
dropped, so the newest state change always reaches the guest.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from emulators.limits import BLOCK_SIZES

from .backend import BlockBackend
from .sense import UA_CAPACITY_CHANGED, UA_POWER_ON_RESET, Sense, SenseKey

MAX_PENDING_UA = 8
FLAT_SPACE_MAX_LUN = 0x3FFF
"""Flat space addressing (SAM-5 4.7.7) carries 14 bits of LUN; mplaunch
offers fewer (emulators.limits.MAX_LUN)."""

_LAYOUT = struct.Struct("<4sHB8HBBBBIHBBBBQIQ")
_MAGIC = b"LUNS"
_VERSION = 2
# Sense flags: which optional parts of the last sense are there.
_SENSE_PRESENT = 0x01
_SENSE_INFORMATION = 0x02
_SENSE_FIELD = 0x04
_SENSE_BIT = 0x08
_SENSE_IN_CDB = 0x10
_SENSE_FLAGS = 0x1F


def _ua_code(sense: Sense) -> int:
    return (sense.asc << 8) | sense.ascq


@dataclass(slots=True)
class LunState:
    """Mutable, fixed-size state of one LUN (mirrored into the state store).

    Every field matters after a restart: a pending unit attention or the
    sense a REQUEST SENSE is yet to fetch must reach the guest once, not
    twice nor never, and the guest's write cache setting decides whether
    writes are synced. The owner saves the state after every change
    (:meth:`LogicalUnit.changed`); a test drives commands at random and
    holds the saved copy equal to the live one after each.
    """

    pending_ua: tuple[int, ...] = ()
    """Pending unit attentions, oldest first, each ``asc << 8 | ascq``."""
    sense: Sense | None = None
    """The last sense (SPC-4 4.5.1), whole: information and field pointer too."""
    write_cache_enabled: bool = True
    # Reservation placeholders: fixed fields the reservation commands will use.
    reservation_type: int = 0
    reservation_holder: bool = False
    reservation_key: int = 0
    pr_generation: int = 0
    registered_key: int = 0

    @classmethod
    def fresh(cls, initial_unit_attention: bool) -> LunState:
        """State of a LUN the guest has not seen yet.

        ``initial_unit_attention`` is true only on the VM's first power on;
        a restarted emulator reloads the stored state instead.
        """
        state = cls()
        if initial_unit_attention:
            state.pending_ua = (_ua_code(UA_POWER_ON_RESET),)
        return state

    def raise_ua(self, sense: Sense) -> None:
        """Queue a unit attention condition."""
        code = _ua_code(sense)
        pending = self.pending_ua
        if sense.asc == 0x29:
            pending = ()  # a reset supersedes every older condition
        elif code in pending:
            return
        pending = (*pending, code)
        self.pending_ua = pending[-MAX_PENDING_UA:]

    def pop_ua(self) -> Sense | None:
        """Take the oldest pending unit attention, if any."""
        if not self.pending_ua:
            return None
        code = self.pending_ua[0]
        self.pending_ua = self.pending_ua[1:]
        return Sense(SenseKey.UNIT_ATTENTION, code >> 8, code & 0xFF)

    def clear_ua(self, sense: Sense) -> None:
        """Drop one pending condition (REPORT LUNS clears REPORTED LUNS CHANGED)."""
        code = _ua_code(sense)
        self.pending_ua = tuple(c for c in self.pending_ua if c != code)

    def set_sense(self, sense: Sense | None) -> bool:
        """Keep ``sense`` as the last one; returns whether that changed the state
        (the caller then saves it)."""
        if sense is not None and sense.key == 0 and sense.asc == 0 and sense.ascq == 0:
            sense = None  # NO SENSE is no sense to keep
        if sense == self.sense:
            return False
        self.sense = sense
        return True

    def last_sense(self) -> Sense | None:
        return self.sense

    def pack(self) -> bytes:
        """The fixed binary layout (little endian, :data:`STATE_SIZE` bytes)."""
        ua = list(self.pending_ua) + [0] * (MAX_PENDING_UA - len(self.pending_ua))
        s = self.sense
        flags = 0
        if s is not None:
            flags = (
                _SENSE_PRESENT
                | (_SENSE_INFORMATION if s.information is not None else 0)
                | (_SENSE_FIELD if s.field_pointer is not None else 0)
                | (_SENSE_BIT if s.bit is not None else 0)
                | (_SENSE_IN_CDB if s.in_cdb else 0)
            )
        return _LAYOUT.pack(
            _MAGIC, _VERSION, len(self.pending_ua), *ua,
            int(s.key) if s else 0, s.asc if s else 0, s.ascq if s else 0, flags,
            (s.information or 0) if s else 0, (s.field_pointer or 0) if s else 0,
            (s.bit or 0) if s else 0,
            int(self.write_cache_enabled), self.reservation_type,
            int(self.reservation_holder), self.reservation_key,
            self.pr_generation, self.registered_key,
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> LunState:
        """Inverse of :meth:`pack`.

        The bytes come from the state store, which the previous emulator
        (possibly compromised) wrote: anything :meth:`pack` cannot have
        produced is refused with ValueError, so a state that loads is one
        the command set can act on without surprise.
        """
        if len(data) < _LAYOUT.size:
            raise ValueError(f"LUN state needs {_LAYOUT.size} bytes, got {len(data)}")
        fields = _LAYOUT.unpack_from(data)
        magic, version, count = fields[0], fields[1], fields[2]
        if magic != _MAGIC or version != _VERSION:
            raise ValueError(f"unknown LUN state layout {magic!r} v{version}")
        if count > MAX_PENDING_UA:
            raise ValueError(f"LUN state holds {count} unit attentions, at most 8 allowed")
        ua = fields[3:3 + MAX_PENDING_UA]
        if any(ua[count:]):
            raise ValueError("LUN state has unit attentions past its count")
        (key, asc, ascq, flags, info, field, bit, wce, rtype, holder, rkey, gen,
         regkey) = fields[3 + MAX_PENDING_UA:]
        return cls(
            pending_ua=tuple(ua[:count]), sense=_unpack_sense(key, asc, ascq, flags, info,
                                                              field, bit),
            write_cache_enabled=_flag(wce, "write cache"), reservation_type=rtype,
            reservation_holder=_flag(holder, "reservation holder"), reservation_key=rkey,
            pr_generation=gen, registered_key=regkey,
        )


def _flag(value: int, what: str) -> bool:
    if value not in (0, 1):
        raise ValueError(f"bad {what} flag {value} in LUN state")
    return bool(value)


def _unpack_sense(
    key: int, asc: int, ascq: int, flags: int, info: int, field: int, bit: int
) -> Sense | None:
    if flags & ~_SENSE_FLAGS:
        raise ValueError(f"bad sense flags {flags:#x} in LUN state")
    if not flags & _SENSE_PRESENT:
        if key or asc or ascq or flags or info or field or bit:
            raise ValueError("LUN state has sense bytes but no sense")
        return None
    try:
        sense_key = SenseKey(key)
    except ValueError:
        raise ValueError(f"bad sense key {key} in LUN state") from None
    return Sense(  # its own checks refuse a bit pointer out of range
        sense_key, asc, ascq,
        information=info if flags & _SENSE_INFORMATION else None,
        field_pointer=field if flags & _SENSE_FIELD else None,
        bit=bit if flags & _SENSE_BIT else None,
        in_cdb=bool(flags & _SENSE_IN_CDB),
    )


STATE_SIZE = _LAYOUT.size


class LogicalUnit:
    """A disk as the guest sees it: backend, identity, options and state.

    ``unmap`` (default: on for writable disks) enables UNMAP, WRITE SAME
    with UNMAP and the thin-provisioning VPD bits. ``on_change`` is called
    after the state changed (a unit attention queued or consumed, the last
    sense set or cleared, WCE set), so the owner can mirror it into the
    state store before the command that changed it completes.
    """

    def __init__(
        self,
        backend: BlockBackend,
        disk_id: str,
        state: LunState,
        *,
        unmap: bool | None = None,
        product: str = "VDISK",
        on_change: Callable[[LunState], None] | None = None,
    ) -> None:
        if backend.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {BLOCK_SIZES}, not {backend.block_size}")
        self.backend = backend
        self.disk_id = disk_id
        self.state = state
        self.block_size = backend.block_size
        self.readonly = backend.readonly
        self.unmap = (not backend.readonly) if unmap is None else (unmap and not backend.readonly)
        self.product = product
        self.on_change = on_change
        self.num_blocks = backend.size_bytes() // self.block_size

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.state)

    def refresh_capacity(self, always: bool = False) -> bool:
        """Re-read the backend's size; on a change raise CAPACITY DATA HAS CHANGED.

        Returns whether the attention was raised (the caller then sends a
        virtio-scsi PARAM_CHANGE event so the guest rereads it at once).
        `always` raises it for a size this process already served: one that
        started after the image grew, whose guest may still hold the old size.
        """
        blocks = self.backend.size_bytes() // self.block_size
        if blocks == self.num_blocks and not always:
            return False
        self.num_blocks = blocks
        self.state.raise_ua(UA_CAPACITY_CHANGED)
        self.changed()
        return True
