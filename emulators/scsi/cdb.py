"""Operation codes, CDB lengths and the table of supported commands.

The table below is the single list of what the target implements. It feeds
the dispatcher (which handler runs), REPORT SUPPORTED OPERATION CODES (the
CDB usage data: which bits of each CDB byte the device server looks at) and
the CDB length check.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class Opcode(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA


SA_READ_CAPACITY_16 = 0x10
SA_REPORT_SUPPORTED_OPCODES = 0x0C

_GROUP_LEN = (6, 10, 10, 0, 16, 12, 0, 0)


def cdb_length(opcode: int) -> int:
    """CDB length from the group code (SPC-4 4.2.5.1); 0 when unknown/variable."""
    return _GROUP_LEN[opcode >> 5]


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """One supported command: identity and CDB usage data (SPC-4 6.35.3)."""

    opcode: int
    service_action: int | None
    usage: bytes

    @property
    def cdb_len(self) -> int:
        return len(self.usage)


_C = 0x04  # control byte: NACA is checked (and refused), nothing else


def _u(*b: int) -> bytes:
    return bytes(b)


_FF4 = (0xFF,) * 4
_FF8 = (0xFF,) * 8

COMMANDS: tuple[CommandInfo, ...] = (
    CommandInfo(0x00, None, _u(0x00, 0, 0, 0, 0, _C)),
    CommandInfo(0x03, None, _u(0x03, 0x01, 0, 0, 0xFF, _C)),
    # FORMAT UNIT: FMTPINFO and FMTDATA are looked at (both must be 0).
    CommandInfo(0x04, None, _u(0x04, 0xD0, 0, 0, 0, _C)),
    CommandInfo(0x08, None, _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, _C)),
    CommandInfo(0x0A, None, _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, _C)),
    CommandInfo(0x12, None, _u(0x12, 0x03, 0xFF, 0xFF, 0xFF, _C)),
    CommandInfo(0x15, None, _u(0x15, 0x11, 0, 0, 0xFF, _C)),
    CommandInfo(0x1A, None, _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, _C)),
    CommandInfo(0x1B, None, _u(0x1B, 0, 0, 0, 0, _C)),
    CommandInfo(0x1E, None, _u(0x1E, 0, 0, 0, 0, _C)),
    CommandInfo(0x25, None, _u(0x25, 0, *_FF4, 0, 0, 0x01, _C)),
    CommandInfo(0x28, None, _u(0x28, 0xF8, *_FF4, 0, 0xFF, 0xFF, _C)),
    CommandInfo(0x2A, None, _u(0x2A, 0xF8, *_FF4, 0, 0xFF, 0xFF, _C)),
    CommandInfo(0x2E, None, _u(0x2E, 0xF6, *_FF4, 0, 0xFF, 0xFF, _C)),
    CommandInfo(0x2F, None, _u(0x2F, 0xF6, *_FF4, 0, 0xFF, 0xFF, _C)),
    CommandInfo(0x35, None, _u(0x35, 0x02, *_FF4, 0, 0xFF, 0xFF, _C)),
    CommandInfo(0x41, None, _u(0x41, 0xF8, *_FF4, 0, 0xFF, 0xFF, _C)),
    CommandInfo(0x42, None, _u(0x42, 0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C)),
    CommandInfo(0x55, None, _u(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C)),
    CommandInfo(0x5A, None, _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, _C)),
    CommandInfo(0x88, None, _u(0x88, 0xF8, *_FF8, *_FF4, 0, _C)),
    CommandInfo(0x8A, None, _u(0x8A, 0xF8, *_FF8, *_FF4, 0, _C)),
    CommandInfo(0x8E, None, _u(0x8E, 0xF6, *_FF8, *_FF4, 0, _C)),
    CommandInfo(0x8F, None, _u(0x8F, 0xF6, *_FF8, *_FF4, 0, _C)),
    CommandInfo(0x91, None, _u(0x91, 0x02, *_FF8, *_FF4, 0, _C)),
    CommandInfo(0x93, None, _u(0x93, 0xF9, *_FF8, *_FF4, 0, _C)),
    CommandInfo(0x9E, SA_READ_CAPACITY_16, _u(0x9E, 0x1F, *_FF8, *_FF4, 0x01, _C)),
    CommandInfo(0xA0, None, _u(0xA0, 0, 0xFF, 0, 0, 0, *_FF4, 0, _C)),
    CommandInfo(
        0xA3, SA_REPORT_SUPPORTED_OPCODES, _u(0xA3, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, *_FF4, 0, _C)
    ),
    CommandInfo(0xA8, None, _u(0xA8, 0xF8, *_FF4, *_FF4, 0, _C)),
    CommandInfo(0xAA, None, _u(0xAA, 0xF8, *_FF4, *_FF4, 0, _C)),
)

_BY_KEY: dict[tuple[int, int | None], CommandInfo] = {
    (c.opcode, c.service_action): c for c in COMMANDS
}
SERVICE_ACTION_OPCODES = frozenset(c.opcode for c in COMMANDS if c.service_action is not None)


def lookup(opcode: int, service_action: int | None) -> CommandInfo | None:
    return _BY_KEY.get((opcode, service_action))


def all_commands_descriptors(with_timeouts: bool) -> bytes:
    """REPORT SUPPORTED OPERATION CODES, reporting options 000b (SPC-4 6.35.2)."""
    out = bytearray()
    for c in COMMANDS:
        flags = (0x02 if with_timeouts else 0) | (0x01 if c.service_action is not None else 0)
        out += struct.pack(">BBHBBH", c.opcode, 0, c.service_action or 0, 0, flags, c.cdb_len)
        if with_timeouts:
            out += _timeouts_descriptor()
    return struct.pack(">I", len(out)) + bytes(out)


def one_command_descriptor(info: CommandInfo | None, with_timeouts: bool) -> bytes:
    """Reporting options 001b/010b: support level and CDB usage data (SPC-4 6.35.3)."""
    if info is None:
        return bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
    ctdp = 0x80 if with_timeouts else 0
    body = struct.pack(">BBH", 0, ctdp | 0x03, info.cdb_len) + info.usage
    if with_timeouts:
        body += _timeouts_descriptor()
    return body


def _timeouts_descriptor() -> bytes:
    # Length 0Ah, no command-specific data, timeouts unknown (zero).
    return struct.pack(">HBBII", 0x0A, 0, 0, 0, 0)
