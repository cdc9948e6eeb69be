"""MODE SENSE and MODE SELECT (SPC-4 6.11-6.14, 7.5; SBC-3 6.5).

Pages: 01h read-write error recovery, 08h caching, 0Ah control, and 3Fh for
all of them. The only thing a guest may change is WCE in the caching page
(Linux's cache_type sysfs knob does exactly that); the change lives in the
LUN state, so it survives an emulator restart. Nothing is saveable: page
control 11b (saved) and SP=1 are refused.

MODE SELECT is validated in full before anything is applied: a parameter
list with one bad page changes nothing.
"""

from __future__ import annotations

import struct

from .lun import LogicalUnit
from .sense import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAM_LIST,
    PARAM_LIST_LENGTH_ERROR,
    SAVING_PARAMS_NOT_SUPPORTED,
    CheckCondition,
)

PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3
PAGE_ERROR_RECOVERY = 0x01
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_ALL = 0x3F
_PAGES = (PAGE_ERROR_RECOVERY, PAGE_CACHING, PAGE_CONTROL)
_WCE = 0x04


def _page(lu: LogicalUnit, code: int, pc: int) -> bytes:
    """One mode page as the given page control sees it."""
    if code == PAGE_ERROR_RECOVERY:
        body = bytearray(10)
        if pc != PC_CHANGEABLE:
            body[0] = 0x80  # AWRE: writes never need reallocation here
    elif code == PAGE_CACHING:
        body = bytearray(18)
        # Changeable: WCE is; default: WCE on; current: the LUN's setting.
        if pc in (PC_CHANGEABLE, PC_DEFAULT) or lu.state.write_cache_enabled:
            body[0] = _WCE
    else:
        body = bytearray(10)
        if pc != PC_CHANGEABLE:
            body[1] = 0x10  # queue algorithm modifier 1: unrestricted reordering
    return bytes((code, len(body))) + bytes(body)


def mode_sense(lu: LogicalUnit, cdb: bytes, ten: bool) -> bytes:
    """The full MODE SENSE(6)/(10) parameter data (before allocation-length cut)."""
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = cdb[2] >> 6
    code = cdb[2] & 0x3F
    subpage = cdb[3]
    if pc == PC_SAVED:
        raise CheckCondition(SAVING_PARAMS_NOT_SUPPORTED.at(2, 7))
    if code == PAGE_ALL:
        if subpage not in (0x00, 0xFF):
            raise CheckCondition(INVALID_FIELD_IN_CDB.at(3))
        pages = b"".join(_page(lu, c, pc) for c in _PAGES)
    elif code in _PAGES:
        if subpage != 0:
            raise CheckCondition(INVALID_FIELD_IN_CDB.at(3))
        pages = _page(lu, code, pc)
    else:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(2, 5))

    # Device-specific parameter (SBC-3 6.5.1): WP, and DPOFUA (FUA honoured).
    dsp = (0x80 if lu.readonly else 0) | 0x10
    if dbd:
        desc = b""
    elif llbaa:
        desc = struct.pack(">QII", lu.num_blocks, 0, lu.block_size)
    else:
        desc = struct.pack(">II", min(lu.num_blocks, 0xFFFFFFFF), lu.block_size & 0xFFFFFF)
    if ten:
        total = 8 + len(desc) + len(pages)
        head = struct.pack(">HBBBBH", total - 2, 0, dsp, 0x01 if llbaa else 0, 0, len(desc))
    else:
        total = 4 + len(desc) + len(pages)
        head = struct.pack(">BBBB", total - 1, 0, dsp, len(desc))
    return head + desc + pages


def mode_select(lu: LogicalUnit, cdb: bytes, params: bytes, ten: bool) -> bool:
    """Validate and apply a MODE SELECT parameter list; returns whether WCE changed.

    ``params`` is exactly the parameter list (the caller checked that the
    data-out buffer holds PARAMETER LIST LENGTH bytes).
    """
    if not cdb[1] & 0x10:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 4))  # PF=0: vendor format
    if cdb[1] & 0x01:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 0))  # SP=1: nothing saveable
    if not params:
        return False
    hlen = 8 if ten else 4
    if len(params) < hlen:
        raise CheckCondition(PARAM_LIST_LENGTH_ERROR)
    if ten:
        longlba = bool(params[4] & 0x01)
        bdlen = struct.unpack_from(">H", params, 6)[0]
    else:
        longlba = False
        bdlen = params[3]
    medium_type_at = 2 if ten else 1
    if params[medium_type_at] != 0:
        raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(medium_type_at, in_cdb=False))
    want_bd = 16 if longlba else 8
    if bdlen not in (0, want_bd):
        raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(hlen - 1, in_cdb=False))
    if hlen + bdlen > len(params):
        raise CheckCondition(PARAM_LIST_LENGTH_ERROR)
    if bdlen:
        _check_block_descriptor(lu, params, hlen, longlba)

    pos = hlen + bdlen
    new_wce = lu.state.write_cache_enabled
    while pos < len(params):
        if pos + 2 > len(params):
            raise CheckCondition(PARAM_LIST_LENGTH_ERROR)
        code = params[pos] & 0x3F
        if params[pos] & 0x40:  # SPF: sub-page format, none supported
            raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(pos, 6, in_cdb=False))
        plen = params[pos + 1]
        if pos + 2 + plen > len(params):
            raise CheckCondition(PARAM_LIST_LENGTH_ERROR)
        if code not in _PAGES:
            raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(pos, in_cdb=False))
        current = _page(lu, code, PC_CURRENT)
        changeable = _page(lu, code, PC_CHANGEABLE)
        if plen != current[1]:
            raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(pos + 1, in_cdb=False))
        got = params[pos:pos + 2 + plen]
        for i in range(2, len(current)):
            diff = (got[i] ^ current[i]) & ~changeable[i] & 0xFF
            if diff:
                bit = diff.bit_length() - 1
                raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(pos + i, bit, in_cdb=False))
        if code == PAGE_CACHING:
            new_wce = bool(got[2] & _WCE)
        pos += 2 + plen

    if new_wce == lu.state.write_cache_enabled:
        return False
    lu.state.write_cache_enabled = new_wce
    return True


def _check_block_descriptor(lu: LogicalUnit, params: bytes, at: int, longlba: bool) -> None:
    """Only the current geometry (or zero: "unchanged") is accepted."""
    if longlba:
        blocks, _, length = struct.unpack_from(">QII", params, at)
        length_at = at + 12
    else:
        blocks, length = struct.unpack_from(">II", params, at)
        length &= 0xFFFFFF
        length_at = at + 5
    if blocks not in (0, lu.num_blocks, min(lu.num_blocks, 0xFFFFFFFF)):
        raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(at, in_cdb=False))
    if length != lu.block_size:
        raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(length_at, in_cdb=False))
