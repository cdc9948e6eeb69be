"""INQUIRY data: the standard page and the vital product data pages.

Pages served (SPC-4 7.8, SBC-3 6.6): 00h supported pages, 80h unit serial
number, 83h device identification, B0h block limits, B1h block device
characteristics, B2h logical block provisioning. The serial number and the
NAA identifier derive from the disk id alone, so they stay the same across
emulator restarts and VM reboots and the guest's /dev/disk/by-id links hold.

Limits in B0h matter to Linux: the optimal transfer length becomes the
guest's max_sectors_kb; the unmap limits bound the work one UNMAP can ask.
"""

from __future__ import annotations

import hashlib
import struct

from .lun import LogicalUnit
from .sense import INVALID_FIELD_IN_CDB, CheckCondition

VENDOR = b"MPLAUNCH"
REVISION = b"0001"

MAX_TRANSFER_BYTES = 8 << 20
OPTIMAL_TRANSFER_BYTES = 1 << 20
MAX_UNMAP_BYTES = 256 << 20
"""Per UNMAP command (all descriptors together). Punching holes is cheap, but
where it is impossible discard writes zeroes, and one command must stay short
enough not to stall the event loop past the hang timeout."""
MAX_WRITE_SAME_BYTES = 32 << 20
"""Per WRITE SAME: a replicated block is really written, chunk by chunk."""
MAX_UNMAP_DESCRIPTORS = 128
UNMAP_GRANULARITY_BYTES = 4096
"""Hole punching works in filesystem blocks; smaller ranges only zero-fill."""

SUPPORTED_VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)

PQ_NOT_CONNECTED = 0x7F
"""Peripheral qualifier 011b, device type 1Fh: no logical unit at this LUN."""


def max_transfer_blocks(lu: LogicalUnit) -> int:
    return MAX_TRANSFER_BYTES // lu.block_size


def max_unmap_blocks(lu: LogicalUnit) -> int:
    return MAX_UNMAP_BYTES // lu.block_size


def max_write_same_blocks(lu: LogicalUnit) -> int:
    return MAX_WRITE_SAME_BYTES // lu.block_size


def _pad(text: str | bytes, n: int) -> bytes:
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    raw = bytes(c if 0x20 <= c < 0x7F else 0x5F for c in raw)
    return raw[:n].ljust(n, b" ")


def standard_inquiry(lu: LogicalUnit | None) -> bytes:
    """Standard INQUIRY data, 36 bytes (SPC-4 6.4.2).

    Version 06h (SPC-4), response data format 2 with HISUP (LUNs are
    reported in the hierarchical format), CMDQUE (tagged queueing: virtio
    requests are independent tasks).
    """
    byte0 = 0x00 if lu is not None else PQ_NOT_CONNECTED
    product = lu.product if lu is not None else "VDISK"
    head = bytes((byte0, 0x00, 0x06, 0x12, 36 - 5, 0x00, 0x00, 0x02))
    return head + _pad(VENDOR, 8) + _pad(product, 16) + _pad(REVISION, 4)


def serial_number(disk_id: str) -> bytes:
    """The unit serial number: the disk id, printable ASCII, at most 32 bytes.

    An id longer than that would lose its tail, so it is replaced by a hash.
    """
    raw = _pad(disk_id, len(disk_id.encode("ascii", "replace"))).strip()
    if not raw or len(raw) > 32:
        raw = hashlib.sha256(disk_id.encode()).hexdigest()[:32].encode()
    return raw


def naa_identifier(disk_id: str) -> bytes:
    """An 8-byte NAA 3h (locally assigned) identifier hashed from the disk id."""
    digest = hashlib.sha256(b"mplaunch-naa\0" + disk_id.encode()).digest()
    value = int.from_bytes(digest[:8], "big") & ((1 << 60) - 1)
    return struct.pack(">Q", (0x3 << 60) | value)


def vpd_page(lu: LogicalUnit, page: int) -> bytes:
    """One VPD page; an unknown page is INVALID FIELD IN CDB on the page code."""
    if page == 0x00:
        body = bytes(SUPPORTED_VPD_PAGES)
    elif page == 0x80:
        body = serial_number(lu.disk_id)
    elif page == 0x83:
        body = _device_identification(lu)
    elif page == 0xB0:
        body = _block_limits(lu)
    elif page == 0xB1:
        body = _block_characteristics()
    elif page == 0xB2:
        body = _provisioning(lu)
    else:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(2))
    return struct.pack(">BBH", 0x00, page, len(body)) + body


def _device_identification(lu: LogicalUnit) -> bytes:
    naa = naa_identifier(lu.disk_id)
    # NAA designator: code set binary (1), association LU (0), type NAA (3).
    out = struct.pack(">BBBB", 0x01, 0x03, 0, len(naa)) + naa
    # T10 vendor ID designator: code set ASCII (2), type 1: vendor + serial.
    t10 = _pad(VENDOR, 8) + serial_number(lu.disk_id)
    out += struct.pack(">BBBB", 0x02, 0x01, 0, len(t10)) + t10
    return out


def _block_limits(lu: LogicalUnit) -> bytes:
    bs = lu.block_size
    unmap_blocks = max_unmap_blocks(lu) if lu.unmap else 0
    descriptors = MAX_UNMAP_DESCRIPTORS if lu.unmap else 0
    granularity = max(UNMAP_GRANULARITY_BYTES // bs, 1) if lu.unmap else 0
    return struct.pack(
        ">BBHIIIIIIIQ20x",
        0x01,  # WSNZ: WRITE SAME with zero blocks is refused
        0,  # no COMPARE AND WRITE
        1,  # optimal transfer length granularity: one block
        max_transfer_blocks(lu),
        OPTIMAL_TRANSFER_BYTES // bs,
        0,
        unmap_blocks,
        descriptors,
        granularity,
        0,
        max_write_same_blocks(lu),
    )


def _block_characteristics() -> bytes:
    # Medium rotation rate 0001h: non-rotating (solid state); form factor unknown.
    return struct.pack(">HBB", 0x0001, 0, 0) + bytes(56)


def _provisioning(lu: LogicalUnit) -> bytes:
    if lu.unmap:
        # LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2 (thin).
        return bytes((0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0))
    return bytes((0, 0x04, 0x00, 0))
