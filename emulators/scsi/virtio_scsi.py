"""virtio-scsi wire formats and request dispatch (virtio 1.1, section 5.6).

Theory of operation: the queue layer pops a descriptor chain and hands over
two lists of memoryviews into guest memory, ``readable`` (the request header,
then data-out) and ``writable`` (the response header, then data-in).
Header/data boundaries need not match buffer boundaries. :class:`VirtioScsiTarget`
decodes the header (copying only the small header, so the guest cannot change
a CDB while it is checked), runs the command on the :class:`ScsiTarget`, and
writes the response header. It returns the used length for the used ring.
Nothing raises out of :meth:`handle_request` / :meth:`handle_control`: hostile
bytes get an answer, and a response buffer too small for the response header
gets nothing (used length 0).

LUN field (5.6.6.1): byte 0 is 1, byte 1 the target, bytes 2-3 a single-level
LUN. Linux sends flat space addressing (40h in byte 2) for every LUN;
peripheral addressing (bus 0) is accepted too. Only target 0 exists: any other
is answered BAD_TARGET so scans stop. Events carry the LUN in the format of
REPORT LUNS, since that is what Linux compares against.

Residuals: ``resid`` is the part of the data buffers that was not used, data-in
when the chain has device-written data buffers, data-out otherwise. A data-in
buffer shorter than the transfer receives what fits, and the residual is then
zero: virtio-scsi has no way to report an overflow.
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
from collections.abc import Mapping, Sequence

from .commands import ScsiTarget, encode_lun
from .fastpath import CHECKED, MIN_CDB_SIZE, serve_rw
from .iov import gather, iov_len, iov_skip, scatter
from .lun import FLAT_SPACE_MAX_LUN, LogicalUnit
from .result import CommandResult
from .sense import (
    INTERNAL_TARGET_FAILURE,
    UA_BUS_DEVICE_RESET,
    UA_I_T_NEXUS_LOSS,
    Status,
)

log = logging.getLogger(__name__)

DEFAULT_CDB_SIZE = 32
DEFAULT_SENSE_SIZE = 96
REQ_FIXED = 19
"""lun[8], id (u64), task_attr, prio, crn: the request header before the CDB."""
RESP_FIXED = 12
"""sense_len, resid (u32 each), status_qualifier (u16), status, response."""
EVENT_SIZE = 16

_RESP = struct.Struct("<IIHBB")
_LUN = struct.Struct("<BBBBI")
_TMF_REQ = struct.Struct("<II8sQ")
_AN_REQ = struct.Struct("<I8sI")
_AN_RESP = struct.Struct("<IB")
_EVENT = struct.Struct("<I8sI")


class Response(enum.IntEnum):
    """The ``response`` byte (5.6.6.1, 5.6.6.2)."""

    OK = 0
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


FUNCTION_COMPLETE = Response.OK
"""VIRTIO_SCSI_S_FUNCTION_COMPLETE shares the value 0 with OK."""


class ControlType(enum.IntEnum):
    TMF = 0
    AN_QUERY = 1
    AN_SUBSCRIBE = 2


class TmfSubtype(enum.IntEnum):
    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class EventType(enum.IntEnum):
    NO_EVENT = 0
    TRANSPORT_RESET = 1
    ASYNC_NOTIFY = 2
    PARAM_CHANGE = 3


EVENTS_MISSED = 0x80000000


class ResetReason(enum.IntEnum):
    """Reasons of a TRANSPORT_RESET event (5.6.6.3.1)."""

    HARD = 0
    RESCAN = 1
    REMOVED = 2


NO_LUN = -1
"""LUN number for an address that cannot name one of ours (never in the map)."""


def decode_lun(field: bytes | memoryview) -> tuple[int, int] | None:
    """(target, LUN) of an 8-byte virtio LUN field; None when byte 0 is not 1.

    A LUN that no addressing method here can express decodes as :data:`NO_LUN`
    (then INQUIRY says "not connected" and commands say LUN NOT SUPPORTED).
    """
    if field[0] != 1:
        return None
    target = field[1]
    b2, b3 = field[2], field[3]
    if field[4] or field[5] or field[6] or field[7]:
        return target, NO_LUN
    method = b2 >> 6
    if method == 1:
        return target, ((b2 & 0x3F) << 8) | b3
    if b2 == 0:
        return target, b3  # peripheral device addressing, bus 0
    return target, NO_LUN


def encode_lun_field(lun: int, target: int = 0) -> bytes:
    """The 8-byte LUN field as Linux's driver builds it (flat addressing)."""
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))


def encode_event(event: int, reason: int, lun: int, target: int = 0) -> bytes:
    """One 16-byte virtio_scsi_event; the LUN in REPORT LUNS format."""
    field = bytes((1, target)) + encode_lun(lun)[:2] + bytes(4)
    return _EVENT.pack(event, field, reason)


EVENT_CAPACITY = 16
_EVENTS_HEADER = struct.Struct("<4sHBB")
_EVENT_ENTRY = struct.Struct("<HHH")
_EVENTS_MAGIC = b"EVTS"
_EVENTS_VERSION = 1
#: The events this target queues: (event, reason).
_QUEUED = frozenset({
    (int(EventType.TRANSPORT_RESET), int(ResetReason.RESCAN)),
    (int(EventType.TRANSPORT_RESET), int(ResetReason.REMOVED)),
    (int(EventType.PARAM_CHANGE), 0x2A | (0x09 << 8)),
})
EVENTS_STATE_SIZE = _EVENTS_HEADER.size + EVENT_CAPACITY * _EVENT_ENTRY.size
"""Bytes of :meth:`EventQueueState.pack` at the default capacity."""


class EventQueueState:
    """Events waiting for the guest to post an event-queue buffer.

    Bounded: when more than ``capacity`` events are waiting the newest is
    dropped and the next event delivered carries EVENTS_MISSED, which makes
    Linux rescan the whole host, so nothing is lost for good.

    The waiting events outlive the emulator (:meth:`pack`, kept in the
    state store): a disk added just before a crash must still make the
    guest rescan. The owner saves after each change; a delivered event is
    saved as gone only after its buffer was published, so a crash in
    between repeats it (a second rescan) rather than loses it.
    """

    def __init__(self, capacity: int = EVENT_CAPACITY) -> None:
        if not 1 <= capacity <= 255:
            raise ValueError("event capacity must be 1 to 255")
        self.capacity = capacity
        self.missed = False
        self._pending: collections.deque[tuple[int, int, int]] = collections.deque()

    def pack(self) -> bytes:
        """A fixed binary layout: header, then ``capacity`` entries (zero when free)."""
        entries = b"".join(_EVENT_ENTRY.pack(event, reason, lun)
                           for event, reason, lun in self._pending)
        head = _EVENTS_HEADER.pack(_EVENTS_MAGIC, _EVENTS_VERSION, len(self._pending),
                                   int(self.missed))
        size = _EVENTS_HEADER.size + self.capacity * _EVENT_ENTRY.size
        return (head + entries).ljust(size, b"\0")

    @classmethod
    def unpack(cls, data: bytes | memoryview, capacity: int = EVENT_CAPACITY) -> EventQueueState:
        """Inverse of :meth:`pack`; the bytes are untrusted (the previous
        emulator's), so anything pack cannot have produced is a ValueError."""
        size = _EVENTS_HEADER.size + capacity * _EVENT_ENTRY.size
        if len(data) < size:
            raise ValueError(f"event state needs {size} bytes, got {len(data)}")
        magic, version, count, missed = _EVENTS_HEADER.unpack_from(data)
        if magic != _EVENTS_MAGIC or version != _EVENTS_VERSION:
            raise ValueError(f"unknown event state layout {magic!r} v{version}")
        if count > capacity or missed not in (0, 1):
            raise ValueError(f"bad event state header ({count} events, missed {missed})")
        state = cls(capacity)
        state.missed = bool(missed)
        for i in range(capacity):
            at = _EVENTS_HEADER.size + i * _EVENT_ENTRY.size
            event, reason, lun = _EVENT_ENTRY.unpack_from(data, at)
            if i >= count:
                if event or reason or lun:
                    raise ValueError("event state has entries past its count")
                continue
            if (event, reason) not in _QUEUED or lun > FLAT_SPACE_MAX_LUN:
                raise ValueError(f"bad event {event}/{reason} for LUN {lun} in event state")
            state._pending.append((event, reason, lun))
        return state

    def push(self, event: EventType, reason: int, lun: int) -> None:
        if len(self._pending) >= self.capacity:
            self.missed = True
            return
        self._pending.append((int(event), reason, lun))

    def lun_added(self, lun: int) -> None:
        self.push(EventType.TRANSPORT_RESET, ResetReason.RESCAN, lun)

    def lun_removed(self, lun: int) -> None:
        self.push(EventType.TRANSPORT_RESET, ResetReason.REMOVED, lun)

    def lun_served(self, lun: int) -> None:
        """`lun` is served (again) and the guest must end up knowing it: a
        REMOVED of it still waiting is withdrawn (the guest never heard it
        was gone, and a REMOVED and a RESCAN delivered together race in
        Linux); else a RESCAN is queued, unless one waits already."""
        for i in range(len(self._pending) - 1, -1, -1):
            event, reason, at = self._pending[i]
            if at != lun:
                continue
            if event == EventType.TRANSPORT_RESET and reason == ResetReason.REMOVED:
                del self._pending[i]
                return
            if event == EventType.TRANSPORT_RESET and reason == ResetReason.RESCAN:
                return
            break
        self.lun_added(lun)

    def capacity_changed(self, lun: int) -> None:
        """PARAM_CHANGE: reason is asc | ascq << 8 (CAPACITY DATA HAS CHANGED)."""
        self.push(EventType.PARAM_CHANGE, 0x2A | (0x09 << 8), lun)

    def pending(self) -> bool:
        return bool(self._pending) or self.missed

    def fill(self, writable: Sequence[memoryview]) -> int:
        """Write the next event into a guest event buffer; returns the used length.

        A buffer shorter than an event is returned empty (used length 0) and
        the event stays queued for the next one.
        """
        if not self.pending() or iov_len(writable) < EVENT_SIZE:
            return 0
        if self._pending:
            event, reason, lun = self._pending.popleft()
        else:
            event, reason, lun = int(EventType.NO_EVENT), 0, 0
        if self.missed:
            event |= EVENTS_MISSED
            self.missed = False
        return scatter(encode_event(event, reason, lun), writable)

    def refill(self, writable: Sequence[memoryview]) -> int:
        """:meth:`fill` for a buffer a dead emulator had taken: the next event,
        or NO_EVENT when none waits. Never left as it is: Linux reads an
        event buffer whatever its used length says, and this one still holds
        the event it carried the last time round."""
        if self.pending() or iov_len(writable) < EVENT_SIZE:
            return self.fill(writable)
        return scatter(encode_event(int(EventType.NO_EVENT), 0, 0), writable)


class VirtioScsiTarget:
    """The device side of one virtio-scsi controller: requests and control."""

    def __init__(
        self,
        luns: Mapping[int, LogicalUnit] | ScsiTarget,
        cdb_size: int = DEFAULT_CDB_SIZE,
        sense_size: int = DEFAULT_SENSE_SIZE,
    ) -> None:
        if not 6 <= cdb_size <= 255:
            raise ValueError(f"cdb_size {cdb_size} outside 6..255")
        if not 0 <= sense_size <= 255:
            raise ValueError(f"sense_size {sense_size} outside 0..255")
        self.scsi = luns if isinstance(luns, ScsiTarget) else ScsiTarget(luns)
        self.cdb_size = cdb_size
        self.sense_size = sense_size
        self.req_size = REQ_FIXED + cdb_size
        self.resp_size = RESP_FIXED + sense_size
        self.events = EventQueueState()
        self._fast = cdb_size >= MIN_CDB_SIZE

    # -- run-time changes (the guest learns through UAs and events) -------

    def add_lun(self, lun: int, lu: LogicalUnit) -> None:
        """Hot-add: REPORTED LUNS DATA HAS CHANGED on the others, and a RESCAN event."""
        self.scsi.add_lun(lun, lu)
        self.events.lun_added(lun)

    def remove_lun(self, lun: int) -> LogicalUnit:
        """Hot-remove: the UA on the remaining LUNs, and a REMOVED event."""
        lu = self.scsi.remove_lun(lun)
        self.events.lun_removed(lun)
        return lu

    def refresh_capacity(self, lun: int, always: bool = False) -> bool:
        """After a resize: CAPACITY DATA HAS CHANGED as a UA and a PARAM_CHANGE
        event (`always`: see :meth:`LogicalUnit.refresh_capacity`)."""
        changed = self.scsi.luns[lun].refresh_capacity(always)
        if changed:
            self.events.capacity_changed(lun)
        return changed

    # -- request queues -------------------------------------------------

    def handle_request(
        self, readable: Sequence[memoryview], writable: Sequence[memoryview]
    ) -> int:
        """Serve one command chain; returns the used length (0: nothing written)."""
        resp_size = self.resp_size
        try:
            first_w = writable[0] if writable else None
            if first_w is not None and first_w.nbytes >= resp_size:
                resp_view: memoryview | None = first_w
                data_in: Sequence[memoryview] = (
                    writable[1:] if first_w.nbytes == resp_size else iov_skip(writable, resp_size)
                )
            elif iov_len(writable) >= resp_size:
                resp_view = None
                data_in = iov_skip(writable, resp_size)
            else:
                return 0  # no room for a response header: nothing can be said
        except Exception:
            log.exception("malformed writable buffers")
            return 0
        try:
            result, resid, response = self._run(readable, data_in)
        except Exception:
            log.exception("internal failure serving a request")
            result = CommandResult(Status.CHECK_CONDITION, INTERNAL_TARGET_FAILURE)
            resid, response = 0, Response.OK
        return self._respond(writable, resp_view, result, resid, response)

    def handle_split(
        self,
        chain: tuple[int, memoryview, list[memoryview], int, memoryview, list[memoryview], int],
    ) -> int:
        """:meth:`handle_request` for a chain already split into the request
        header (``req_size`` bytes), data-out, the response header
        (``resp_size`` bytes) and data-in, as
        :func:`emulators.virtio.chain.walk_split` gives it: the common READ
        and WRITE are served by :func:`~emulators.scsi.fastpath.serve_rw`,
        everything else, and anything unusual about those, by the checked
        path. The outcome is the same either way."""
        _, header, data_out, out_len, resp, data_in, in_len = chain
        if self._fast:
            used = serve_rw(self.scsi.luns, header, data_out, out_len, resp, data_in, in_len)
            if used != CHECKED:
                return used
        return self.handle_request([header, *data_out], [resp, *data_in])

    def _run(
        self, readable: Sequence[memoryview], data_in: Sequence[memoryview]
    ) -> tuple[CommandResult, int, Response]:
        req_size = self.req_size
        first_r = readable[0] if readable else None
        if first_r is not None and first_r.nbytes >= req_size:
            header: bytes | memoryview = first_r
            data_out: Sequence[memoryview] = (
                readable[1:] if first_r.nbytes == req_size else iov_skip(readable, req_size)
            )
        else:
            header = gather(readable, 0, req_size)
            if len(header) < req_size:
                return _NO_RESULT, 0, Response.FAILURE
            data_out = iov_skip(readable, req_size)
        one, target, b2, b3, rest = _LUN.unpack_from(header)
        if one != 1 or target != 0:
            return _NO_RESULT, 0, Response.BAD_TARGET
        if b2 >> 6 == 1 and not rest:
            lun = ((b2 & 0x3F) << 8) | b3  # Linux's flat addressing: the common case
        else:
            addr = decode_lun(bytes(header[0:8]))
            lun = addr[1] if addr is not None else NO_LUN
        cdb = bytes(header[REQ_FIXED:req_size])
        result = self.scsi.execute(lun, cdb, data_out, data_in)
        if data_in:
            resid = iov_len(data_in) - result.data_in
        elif data_out:
            resid = iov_len(data_out) - result.data_out
        else:
            resid = 0
        return result, resid, Response.OK

    def _respond(
        self,
        writable: Sequence[memoryview],
        resp_view: memoryview | None,
        result: CommandResult,
        resid: int,
        response: Response,
    ) -> int:
        sense = b""
        if result.sense is not None and self.sense_size:
            sense = result.sense.fixed()[: self.sense_size]
        if resp_view is not None:
            _RESP.pack_into(resp_view, 0, len(sense), resid, 0, result.status, response)
            if sense:
                resp_view[RESP_FIXED:RESP_FIXED + len(sense)] = sense
        else:
            buf = bytearray(self.resp_size)
            _RESP.pack_into(buf, 0, len(sense), resid, 0, result.status, response)
            buf[RESP_FIXED:RESP_FIXED + len(sense)] = sense
            scatter(buf, writable)
        return self.resp_size + result.data_in

    # -- control queue --------------------------------------------------

    def handle_control(
        self, readable: Sequence[memoryview], writable: Sequence[memoryview]
    ) -> int:
        """Serve one control-queue chain (task management, async notification)."""
        try:
            head = gather(readable, 0, _TMF_REQ.size)
            if len(head) < 4:
                return 0
            ctype = struct.unpack_from("<I", head)[0]
            if ctype == ControlType.TMF:
                if len(head) < _TMF_REQ.size:
                    return scatter(bytes((Response.FAILURE,)), writable)
                _, subtype, lun_field, _tag = _TMF_REQ.unpack(head)
                return scatter(bytes((self._tmf(subtype, lun_field),)), writable)
            if ctype in (ControlType.AN_QUERY, ControlType.AN_SUBSCRIBE):
                if iov_len(writable) < _AN_RESP.size:
                    return 0
                if len(head) < _AN_REQ.size:
                    return scatter(_AN_RESP.pack(0, Response.FAILURE), writable)
                _, lun_field, _requested = _AN_REQ.unpack_from(head)
                addr = decode_lun(lun_field)
                response = Response.OK if addr is not None and addr[0] == 0 else (
                    Response.BAD_TARGET
                )
                # No asynchronous notification is supported: event_actual = 0.
                return scatter(_AN_RESP.pack(0, response), writable)
            log.warning("unknown control request type %d", ctype)
            return 0
        except Exception:
            log.exception("internal failure serving a control request")
            return 0

    def _tmf(self, subtype: int, lun_field: bytes) -> Response:
        """Task management (5.6.6.2.1). Commands complete synchronously, so no
        task is ever in the task set: aborts complete, queries find nothing."""
        addr = decode_lun(lun_field)
        if addr is None or addr[0] != 0:
            return Response.BAD_TARGET
        luns = self.scsi.luns
        if subtype == TmfSubtype.I_T_NEXUS_RESET:
            for lu in luns.values():
                lu.state.raise_ua(UA_I_T_NEXUS_LOSS)
                lu.changed()
            return FUNCTION_COMPLETE
        if subtype > TmfSubtype.QUERY_TASK_SET:
            return Response.FUNCTION_REJECTED
        target_lu = luns.get(addr[1])
        if target_lu is None:
            return Response.INCORRECT_LUN
        if subtype == TmfSubtype.CLEAR_ACA:
            return Response.FUNCTION_REJECTED  # NORMACA=0: there is never an ACA
        if subtype == TmfSubtype.LOGICAL_UNIT_RESET:
            target_lu.state.raise_ua(UA_BUS_DEVICE_RESET)
            target_lu.changed()
        return FUNCTION_COMPLETE


_NO_RESULT = CommandResult(Status.GOOD)
