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

_LAYOUT = struct.Struct("<4sHB8H3BBBBQIQ")
_MAGIC = b"LUNS"
_VERSION = 1


def _ua_code(sense: Sense) -> int:
    return (sense.asc << 8) | sense.ascq


@dataclass(slots=True)
class LunState:
    """Mutable, fixed-size state of one LUN (mirrored into the state store)."""

    pending_ua: tuple[int, ...] = ()
    """Pending unit attentions, oldest first, each ``asc << 8 | ascq``."""
    sense_key: int = 0
    sense_asc: int = 0
    sense_ascq: int = 0
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

    def set_sense(self, sense: Sense | None) -> None:
        if sense is None:
            self.sense_key = self.sense_asc = self.sense_ascq = 0
        else:
            self.sense_key, self.sense_asc, self.sense_ascq = sense.key, sense.asc, sense.ascq

    def last_sense(self) -> Sense | None:
        if self.sense_key == 0 and self.sense_asc == 0 and self.sense_ascq == 0:
            return None
        return Sense(SenseKey(self.sense_key), self.sense_asc, self.sense_ascq)

    def pack(self) -> bytes:
        """The fixed binary layout (little endian, :data:`STATE_SIZE` bytes)."""
        ua = list(self.pending_ua) + [0] * (MAX_PENDING_UA - len(self.pending_ua))
        return _LAYOUT.pack(
            _MAGIC, _VERSION, len(self.pending_ua), *ua,
            self.sense_key, self.sense_asc, self.sense_ascq,
            int(self.write_cache_enabled), self.reservation_type,
            int(self.reservation_holder), self.reservation_key,
            self.pr_generation, self.registered_key,
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> LunState:
        """Inverse of :meth:`pack`; refuses a layout it does not know."""
        if len(data) < _LAYOUT.size:
            raise ValueError(f"LUN state needs {_LAYOUT.size} bytes, got {len(data)}")
        fields = _LAYOUT.unpack_from(data)
        magic, version, count = fields[0], fields[1], fields[2]
        if magic != _MAGIC or version != _VERSION:
            raise ValueError(f"unknown LUN state layout {magic!r} v{version}")
        if count > MAX_PENDING_UA:
            raise ValueError(f"LUN state holds {count} unit attentions, at most 8 allowed")
        ua = fields[3:3 + MAX_PENDING_UA]
        (key, asc, ascq, wce, rtype, holder, rkey, gen, regkey) = fields[3 + MAX_PENDING_UA:]
        if key > 0xF:
            raise ValueError(f"bad sense key {key} in LUN state")
        return cls(
            pending_ua=tuple(ua[:count]), sense_key=key, sense_asc=asc, sense_ascq=ascq,
            write_cache_enabled=bool(wce), reservation_type=rtype,
            reservation_holder=bool(holder), reservation_key=rkey,
            pr_generation=gen, registered_key=regkey,
        )


STATE_SIZE = _LAYOUT.size


class LogicalUnit:
    """A disk as the guest sees it: backend, identity, options and state.

    ``unmap`` (default: on for writable disks) enables UNMAP, WRITE SAME
    with UNMAP and the thin-provisioning VPD bits. ``on_change`` is called
    after the state changed (a unit attention queued or consumed, WCE set),
    so the owner can mirror it into the state store.
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

    def refresh_capacity(self) -> bool:
        """Re-read the backend's size; on a change raise CAPACITY DATA HAS CHANGED.

        Returns whether the capacity changed (the caller then sends a
        virtio-scsi PARAM_CHANGE event so the guest rereads it at once).
        """
        blocks = self.backend.size_bytes() // self.block_size
        if blocks == self.num_blocks:
            return False
        self.num_blocks = blocks
        self.state.raise_ua(UA_CAPACITY_CHANGED)
        self.changed()
        return True
