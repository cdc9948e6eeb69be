"""The SCSI target: dispatch of one CDB to its handler, and the SPC commands.

Theory of operation: :meth:`ScsiTarget.execute` takes the LUN number, a
private copy of the CDB (so the guest cannot change it while we read it)
and the data-out/data-in views. It checks the CDB's length against its group
code and the NACA bit, finds the logical unit (a missing one still answers
INQUIRY, REPORT LUNS and REQUEST SENSE), reports a pending unit attention
unless the command is one SPC-4 exempts, and runs the handler from a dict
keyed by operation code. Handlers raise :class:`CheckCondition`; backend
failures become MEDIUM ERROR or DATA PROTECT. Anything else is a bug: it is
logged and answered HARDWARE ERROR / INTERNAL TARGET FAILURE, never raised
into the event loop.

The last sense is kept in the LUN state until the next command completes,
for REQUEST SENSE; REQUEST SENSE reports (and clears) a pending unit
attention first, as SPC-4 6.39 says.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence

from . import cdb as cdbmod
from . import mode_pages, sbc, vpd
from .backend import BackendError, BackendFailure
from .cdb import Opcode
from .iov import gather, iov_len
from .lun import FLAT_SPACE_MAX_LUN, LogicalUnit
from .result import GOOD, CommandResult, Handler, reply
from .sense import (
    INTERNAL_TARGET_FAILURE,
    INVALID_FIELD_IN_CDB,
    INVALID_OPCODE,
    LUN_NOT_SUPPORTED,
    NO_SENSE,
    PARAM_LIST_LENGTH_ERROR,
    SPACE_ALLOCATION_FAILED,
    UA_REPORTED_LUNS_CHANGED,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    WRITE_PROTECTED,
    CheckCondition,
    Sense,
    Status,
)

log = logging.getLogger(__name__)

_NO_UA = frozenset((Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE))
"""Commands that neither report nor clear a unit attention (SPC-4 5.14 / SAM-5)."""

_CDB_LEN = tuple(cdbmod.cdb_length(op) for op in range(256))


def encode_lun(lun: int) -> bytes:
    """A LUN in REPORT LUNS format: peripheral addressing below 256, flat above."""
    if lun < 256:
        return bytes((0x00, lun, 0, 0, 0, 0, 0, 0))
    return bytes((0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0))


class ScsiTarget:
    """One SCSI target holding the LUNs of one controller.

    ``luns`` is held by reference: the owner may add or remove LUNs at run
    time through :meth:`add_lun` / :meth:`remove_lun`, which tell the other
    LUNs through REPORTED LUNS DATA HAS CHANGED.
    """

    def __init__(self, luns: Mapping[int, LogicalUnit]) -> None:
        for n in luns:
            if not 0 <= n <= FLAT_SPACE_MAX_LUN:
                raise ValueError(f"LUN {n} outside 0..{FLAT_SPACE_MAX_LUN}")
        self.luns: dict[int, LogicalUnit] = dict(luns)
        self._handlers: dict[int, Handler] = {
            Opcode.TEST_UNIT_READY: _no_op,
            Opcode.REQUEST_SENSE: _request_sense,
            Opcode.FORMAT_UNIT: sbc.format_unit,
            Opcode.READ_6: sbc.read6,
            Opcode.WRITE_6: sbc.write6,
            Opcode.INQUIRY: _inquiry,
            Opcode.MODE_SELECT_6: _mode_select,
            Opcode.MODE_SENSE_6: _mode_sense,
            Opcode.START_STOP_UNIT: _no_op,
            Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: _no_op,
            Opcode.READ_CAPACITY_10: _read_capacity10,
            Opcode.READ_10: sbc.read,
            Opcode.WRITE_10: sbc.write,
            Opcode.WRITE_AND_VERIFY_10: sbc.write_and_verify,
            Opcode.VERIFY_10: sbc.verify,
            Opcode.SYNCHRONIZE_CACHE_10: sbc.synchronize_cache,
            Opcode.WRITE_SAME_10: sbc.write_same,
            Opcode.UNMAP: _unmap,
            Opcode.MODE_SELECT_10: _mode_select,
            Opcode.MODE_SENSE_10: _mode_sense,
            Opcode.READ_16: sbc.read,
            Opcode.WRITE_16: sbc.write,
            Opcode.WRITE_AND_VERIFY_16: sbc.write_and_verify,
            Opcode.VERIFY_16: sbc.verify,
            Opcode.SYNCHRONIZE_CACHE_16: sbc.synchronize_cache,
            Opcode.WRITE_SAME_16: sbc.write_same,
            Opcode.SERVICE_ACTION_IN_16: _service_action_in,
            Opcode.REPORT_LUNS: self._report_luns,
            Opcode.MAINTENANCE_IN: _maintenance_in,
            Opcode.READ_12: sbc.read,
            Opcode.WRITE_12: sbc.write,
        }

    def add_lun(self, lun: int, lu: LogicalUnit) -> None:
        if not 0 <= lun <= FLAT_SPACE_MAX_LUN or lun in self.luns:
            raise ValueError(f"LUN {lun} is taken or out of range")
        self._luns_changed()
        self.luns[lun] = lu

    def remove_lun(self, lun: int) -> LogicalUnit:
        lu = self.luns.pop(lun)
        self._luns_changed()
        return lu

    def _luns_changed(self) -> None:
        for lu in self.luns.values():
            lu.state.raise_ua(UA_REPORTED_LUNS_CHANGED)
            lu.changed()

    def execute(
        self,
        lun: int,
        cdb: bytes,
        data_out: Sequence[memoryview],
        data_in: Sequence[memoryview],
    ) -> CommandResult:
        """Run one command; never raises."""
        op = cdb[0]
        n = _CDB_LEN[op]
        if n == 0 or n > len(cdb):
            return CommandResult(Status.CHECK_CONDITION, INVALID_OPCODE)
        if cdb[n - 1] & 0x04:  # NACA: ACA is not supported (NORMACA=0)
            return CommandResult(Status.CHECK_CONDITION, INVALID_FIELD_IN_CDB.at(n - 1, 2))
        lu = self.luns.get(lun)
        if lu is None:
            return self._no_lun(cdb, data_out, data_in)
        state = lu.state
        if state.pending_ua and op not in _NO_UA:
            ua = state.pop_ua()
            state.set_sense(ua)
            lu.changed()  # the popped attention at least
            return CommandResult(Status.CHECK_CONDITION, ua)
        handler = self._handlers.get(op)
        if handler is None:
            if state.set_sense(INVALID_OPCODE):
                lu.changed()
            return CommandResult(Status.CHECK_CONDITION, INVALID_OPCODE)
        try:
            result = handler(lu, cdb, data_out, data_in)
        except CheckCondition as e:
            sense = e.sense
        except BackendError as e:
            sense = _backend_sense(e, lu.block_size)
            log.warning("LUN %d: %s", lun, e)
        except Exception:
            log.exception("LUN %d: internal failure on CDB %s", lun, cdb[:n].hex())
            sense = INTERNAL_TARGET_FAILURE
        else:
            # The last sense lasts until the next command (SPC-4 4.5.1); saved
            # like every other change, so a successor's REQUEST SENSE agrees.
            if state.sense is not None and op != Opcode.REQUEST_SENSE and state.set_sense(None):
                lu.changed()
            return result
        if state.set_sense(sense):
            lu.changed()
        return CommandResult(Status.CHECK_CONDITION, sense)

    def _no_lun(
        self, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
    ) -> CommandResult:
        """SPC-4 for an unavailable LUN: INQUIRY says PQ 011b, REQUEST SENSE says why."""
        op = cdb[0]
        try:
            if op == Opcode.INQUIRY:
                alloc = _inquiry_checks(cdb)
                if cdb[1] & 0x01:
                    raise CheckCondition(LUN_NOT_SUPPORTED)
                return reply(vpd.standard_inquiry(None), alloc, data_in)
            if op == Opcode.REPORT_LUNS:
                return self._report_luns(None, cdb, data_out, data_in)
            if op == Opcode.REQUEST_SENSE:
                data = LUN_NOT_SUPPORTED.descriptor() if cdb[1] & 1 else LUN_NOT_SUPPORTED.fixed()
                return reply(data, cdb[4], data_in)
        except CheckCondition as e:
            return CommandResult(Status.CHECK_CONDITION, e.sense)
        return CommandResult(Status.CHECK_CONDITION, LUN_NOT_SUPPORTED)

    def _report_luns(
        self,
        lu: LogicalUnit | None,
        cdb: bytes,
        data_out: Sequence[memoryview],
        data_in: Sequence[memoryview],
    ) -> CommandResult:
        """REPORT LUNS (SPC-4 6.33): select report 0 and 2 list every LUN, 1 none."""
        select = cdb[2]
        alloc = struct.unpack_from(">I", cdb, 6)[0]
        if select > 2:
            raise CheckCondition(INVALID_FIELD_IN_CDB.at(2))
        if alloc < 16:
            raise CheckCondition(INVALID_FIELD_IN_CDB.at(6))
        body = b"" if select == 1 else b"".join(encode_lun(n) for n in sorted(self.luns))
        if lu is not None and lu.state.pending_ua:
            before = lu.state.pending_ua
            lu.state.clear_ua(UA_REPORTED_LUNS_CHANGED)
            if lu.state.pending_ua != before:
                lu.changed()
        return reply(struct.pack(">I4x", len(body)) + body, alloc, data_in)


def _backend_sense(e: BackendError, block_size: int) -> Sense:
    if e.kind is BackendFailure.READ:
        return UNRECOVERED_READ_ERROR.with_information(e.offset // block_size)
    if e.kind is BackendFailure.NO_SPACE:
        return SPACE_ALLOCATION_FAILED
    if e.kind is BackendFailure.READ_ONLY:
        return WRITE_PROTECTED
    return WRITE_ERROR.with_information(e.offset // block_size)


def _no_op(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """TEST UNIT READY, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL: always ready."""
    return GOOD


def _inquiry_checks(cdb: bytes) -> int:
    if cdb[1] & 0x02:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 1))  # CMDDT (obsolete)
    if not cdb[1] & 0x01 and cdb[2]:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(2))
    alloc: int = struct.unpack_from(">H", cdb, 3)[0]
    return alloc


def _inquiry(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    alloc = _inquiry_checks(cdb)
    data = vpd.vpd_page(lu, cdb[2]) if cdb[1] & 0x01 else vpd.standard_inquiry(lu)
    return reply(data, alloc, data_in)


def _request_sense(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    state = lu.state
    sense = state.pop_ua() or state.last_sense() or NO_SENSE
    state.set_sense(None)
    lu.changed()
    data = sense.descriptor() if cdb[1] & 0x01 else sense.fixed()
    return reply(data, cdb[4], data_in)


def _read_capacity10(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    lba = struct.unpack_from(">I", cdb, 2)[0]
    if lba and not cdb[8] & 0x01:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(2))  # LBA without PMI (SBC-3 5.16)
    last = max(lu.num_blocks - 1, 0)
    data = struct.pack(">II", min(last, 0xFFFFFFFF), lu.block_size)
    return reply(data, 8, data_in)


def _service_action_in(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    if cdb[1] & 0x1F != cdbmod.SA_READ_CAPACITY_16:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 4))
    lba, alloc = struct.unpack_from(">QI", cdb, 2)
    if lba and not cdb[14] & 0x01:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(2))
    last = max(lu.num_blocks - 1, 0)
    # Byte 14: LBPME (provisioning management) with unmap, LBPRZ always
    # (deallocated blocks read zero); one logical block per physical block.
    prov = (0x80 if lu.unmap else 0) | 0x40
    data = struct.pack(">QIBBBB16x", last, lu.block_size, 0, 0, prov, 0)
    return reply(data, alloc, data_in)


def _maintenance_in(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """REPORT SUPPORTED OPERATION CODES (SPC-4 6.35), the only MAINTENANCE IN served."""
    if cdb[1] & 0x1F != cdbmod.SA_REPORT_SUPPORTED_OPCODES:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 4))
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    op = cdb[3]
    sa = struct.unpack_from(">H", cdb, 4)[0]
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    has_sa = op in cdbmod.SERVICE_ACTION_OPCODES
    if options == 0:
        data = cdbmod.all_commands_descriptors(rctd)
    elif options == 1:
        if has_sa:
            raise CheckCondition(INVALID_FIELD_IN_CDB.at(3))
        data = cdbmod.one_command_descriptor(cdbmod.lookup(op, None), rctd)
    elif options == 2:
        if cdbmod.lookup(op, None) is not None:
            raise CheckCondition(INVALID_FIELD_IN_CDB.at(3))
        data = cdbmod.one_command_descriptor(cdbmod.lookup(op, sa), rctd)
    elif options == 3:
        data = cdbmod.one_command_descriptor(cdbmod.lookup(op, sa if has_sa else None), rctd)
    else:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(2, 2))
    return reply(data, alloc, data_in)


def _mode_sense(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    ten = cdb[0] == Opcode.MODE_SENSE_10
    alloc = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
    return reply(mode_pages.mode_sense(lu, cdb, ten), alloc, data_in)


def _mode_select(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    ten = cdb[0] == Opcode.MODE_SELECT_10
    plen = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
    if iov_len(data_out) < plen:
        raise CheckCondition(PARAM_LIST_LENGTH_ERROR)
    if mode_pages.mode_select(lu, cdb, gather(data_out, 0, plen), ten):
        lu.changed()
    return CommandResult(Status.GOOD, None, 0, plen)


def _unmap(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    if not lu.unmap:
        raise CheckCondition(INVALID_OPCODE)  # LBPU=0: UNMAP is not supported here
    return sbc.unmap(lu, cdb, data_out, data_in)
