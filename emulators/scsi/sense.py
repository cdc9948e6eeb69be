"""SCSI status codes, sense keys and sense data (SAM-5, SPC-4 4.5).

Every error the target reports to the guest is a :class:`Sense`: a sense key
plus an additional sense code and qualifier (ASC/ASCQ), optionally with an
INFORMATION field or a sense-key-specific field pointer. Command handlers
raise :class:`CheckCondition` carrying one; the dispatcher turns it into a
CHECK CONDITION status with the sense bytes in fixed (70h) or descriptor
(72h) format. The named constants below are the only senses the target
produces, so tests can compare against them exactly.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class Status(enum.IntEnum):
    """SCSI status byte values (SAM-5 5.3.1)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28


class SenseKey(enum.IntEnum):
    """Sense keys (SPC-4 table 45)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


FIXED_SENSE_LEN = 18
"""Fixed-format sense data as built here: 8 header bytes + 10 additional."""

_FIXED = struct.Struct(">BBBIBIBBBBH")


@dataclass(frozen=True, slots=True)
class Sense:
    """One sense condition.

    ``information`` (when not None) fills the INFORMATION field and sets the
    VALID bit, e.g. the offset of the first miscompared byte. ``field_pointer``
    (when not None) fills the sense-key-specific bytes of an ILLEGAL REQUEST:
    the byte of the CDB (``in_cdb``) or of the parameter list that is wrong,
    and ``bit`` the bit within it, so a guest's log can say which field.
    """

    key: SenseKey
    asc: int
    ascq: int
    information: int | None = None
    field_pointer: int | None = None
    bit: int | None = None
    in_cdb: bool = True

    def __post_init__(self) -> None:
        if not (0 <= self.asc <= 0xFF and 0 <= self.ascq <= 0xFF):
            raise ValueError(f"asc/ascq out of range: {self.asc:#x}/{self.ascq:#x}")
        if self.field_pointer is not None and not 0 <= self.field_pointer <= 0xFFFF:
            raise ValueError(f"field pointer out of range: {self.field_pointer}")
        if self.bit is not None and not 0 <= self.bit <= 7:
            raise ValueError(f"bit pointer out of range: {self.bit}")

    def at(self, byte: int, bit: int | None = None, *, in_cdb: bool = True) -> Sense:
        """The same condition pointing at ``byte`` (and ``bit``) of the CDB or list."""
        return Sense(self.key, self.asc, self.ascq, self.information, byte, bit, in_cdb)

    def with_information(self, information: int) -> Sense:
        """The same condition with the INFORMATION field set (VALID bit on)."""
        return Sense(
            self.key, self.asc, self.ascq, information & 0xFFFFFFFF,
            self.field_pointer, self.bit, self.in_cdb,
        )

    def fixed(self) -> bytes:
        """Fixed-format sense data, current error (SPC-4 4.5.3)."""
        response = 0x70 | (0x80 if self.information is not None else 0)
        sks = 0
        sks_hi = 0
        if self.field_pointer is not None:
            sks_hi = 0x80 | (0x40 if self.in_cdb else 0)
            if self.bit is not None:
                sks_hi |= 0x08 | self.bit
            sks = self.field_pointer
        return _FIXED.pack(
            response, 0, int(self.key), self.information or 0, FIXED_SENSE_LEN - 8,
            0, self.asc, self.ascq, 0, sks_hi, sks,
        )

    def descriptor(self) -> bytes:
        """Descriptor-format sense data (SPC-4 4.5.2), with the same contents."""
        descs = b""
        if self.information is not None:
            descs += struct.pack(">BBBBQ", 0x00, 0x0A, 0x80, 0, self.information)
        if self.field_pointer is not None:
            sks_hi = 0x80 | (0x40 if self.in_cdb else 0)
            if self.bit is not None:
                sks_hi |= 0x08 | self.bit
            descs += struct.pack(">BBBBBHB", 0x02, 0x06, 0, 0, sks_hi, self.field_pointer, 0)
        header = bytes((0x72, int(self.key), self.asc, self.ascq, 0, 0, 0, len(descs)))
        return header + descs

    def __str__(self) -> str:
        return f"{self.key.name} {self.asc:02X}h/{self.ascq:02X}h"


class CheckCondition(Exception):  # noqa: N818 - named after the SCSI status it produces
    """Raised by a command handler: end the command with CHECK CONDITION."""

    def __init__(self, sense: Sense) -> None:
        super().__init__(str(sense))
        self.sense = sense


_IR = SenseKey.ILLEGAL_REQUEST
_UA = SenseKey.UNIT_ATTENTION

NO_SENSE = Sense(SenseKey.NO_SENSE, 0x00, 0x00)
INVALID_OPCODE = Sense(_IR, 0x20, 0x00)
LBA_OUT_OF_RANGE = Sense(_IR, 0x21, 0x00)
INVALID_FIELD_IN_CDB = Sense(_IR, 0x24, 0x00)
LUN_NOT_SUPPORTED = Sense(_IR, 0x25, 0x00)
INVALID_FIELD_IN_PARAM_LIST = Sense(_IR, 0x26, 0x00)
PARAM_LIST_LENGTH_ERROR = Sense(_IR, 0x1A, 0x00)
SAVING_PARAMS_NOT_SUPPORTED = Sense(_IR, 0x39, 0x00)
WRITE_PROTECTED = Sense(SenseKey.DATA_PROTECT, 0x27, 0x00)
SPACE_ALLOCATION_FAILED = Sense(SenseKey.DATA_PROTECT, 0x27, 0x07)
UNRECOVERED_READ_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
MISCOMPARE_DURING_VERIFY = Sense(SenseKey.MISCOMPARE, 0x1D, 0x00)
INTERNAL_TARGET_FAILURE = Sense(SenseKey.HARDWARE_ERROR, 0x44, 0x00)

# Unit attention conditions (SPC-4 annex F ASC/ASCQ list).
UA_POWER_ON_RESET = Sense(_UA, 0x29, 0x00)
UA_BUS_DEVICE_RESET = Sense(_UA, 0x29, 0x03)
UA_I_T_NEXUS_LOSS = Sense(_UA, 0x29, 0x07)
UA_MODE_PARAMETERS_CHANGED = Sense(_UA, 0x2A, 0x01)
UA_CAPACITY_CHANGED = Sense(_UA, 0x2A, 0x09)
UA_REPORTED_LUNS_CHANGED = Sense(_UA, 0x3F, 0x0E)
