"""The common READ and WRITE, served straight from a virtio-scsi request header.

Theory of operation
-------------------
Nearly every request a guest sends is a READ or WRITE (10 or 16) that is
in order: flat LUN addressing of a LUN we have, no unit attention waiting,
no last sense to clear, no protection information, an in-range transfer
within the limit, data buffers at least as long as the transfer. For those,
:func:`serve_rw` does in one function what the checked path
(:meth:`VirtioScsiTarget.handle_request` -> :meth:`ScsiTarget.execute` ->
:mod:`sbc`) does through a dozen calls, and with the same outcome: the
same bytes moved, the same response header, the same used length.

It snapshots the header with one precompiled big-endian ``struct`` per
CDB form (the LUN field and the CDB fields become Python integers at
once, so a guest rewriting the header while we look cannot make us act on
two versions of it: the reason the checked path copies the CDB). Then it
only compares integers. Anything out of the ordinary (another opcode, a
flag the checked path would look at, a LUN that is not there, a pending
unit attention, a range or length problem, FUA or write-through, a read-only
disk, an I/O error) returns :data:`CHECKED`, and the caller runs the checked
path, which gives that case its sense and its side effects. An I/O that
failed is therefore issued again by the checked path before it is
answered; reads and writes of the same buffers at the same offset are
idempotent.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from .iov import iov_slice
from .lun import LogicalUnit
from .vpd import MAX_TRANSFER_BYTES

__all__ = ["CHECKED", "MIN_CDB_SIZE", "serve_rw"]

CHECKED = -1
"""What :func:`serve_rw` returns when the checked path must serve the request."""

MIN_CDB_SIZE = 16
"""The CDB field size (config ``cdb_size``) the fast path needs: it reads up
to 16 CDB bytes out of the header without looking at its length."""

_CDB_AT = 19
"""The CDB's offset in a virtio-scsi request header (5.6.6.1)."""

# LUN field (byte 0, target, two LUN bytes, four zero bytes), id, task
# attribute, priority, CRN (skipped), then the CDB: opcode, flags, LBA,
# [group,] transfer length, [group,] control.
_RW10 = struct.Struct(">BBBBI11xBBIxHB")
_RW16 = struct.Struct(">BBBBI11xBBQIxB")
_READ_10, _WRITE_10, _READ_16, _WRITE_16 = 0x28, 0x2A, 0x88, 0x8A
_PROTECT = 0xE0  # RDPROTECT / WRPROTECT
_FUA = 0x08
_NACA = 0x04
_RESP = struct.Struct("<IIHBB")  # sense_len, resid, status_qualifier, status, response


def serve_rw(
    luns: Mapping[int, LogicalUnit],
    header: memoryview,
    data_out: list[memoryview],
    out_len: int,
    resp: memoryview,
    data_in: list[memoryview],
    in_len: int,
) -> int:
    """Serve one request of the usual shape, or return :data:`CHECKED`.

    ``header`` and ``resp`` are the exact-size request and response headers
    (:func:`emulators.virtio.chain.walk_split`); ``out_len``/``in_len`` the
    data lengths; the header's CDB field must hold :data:`MIN_CDB_SIZE`
    bytes at least. Returns the used length. Nothing is written to the guest unless it serves.
    """
    op = header[_CDB_AT]
    if op in (_READ_10, _WRITE_10):
        one, target, b2, b3, rest, op2, flags, lba, blocks, control = _RW10.unpack_from(header)
    elif op in (_READ_16, _WRITE_16):
        one, target, b2, b3, rest, op2, flags, lba, blocks, control = _RW16.unpack_from(header)
    else:
        return CHECKED
    if (
        op2 != op
        or one != 1
        or target
        or b2 >> 6 != 1  # flat space addressing, as Linux sends it
        or rest
        or flags & _PROTECT
        or control & _NACA
        or not blocks
    ):
        return CHECKED
    lu = luns.get(((b2 & 0x3F) << 8) | b3)
    if lu is None:
        return CHECKED
    state = lu.state
    if state.pending_ua or state.sense is not None:
        return CHECKED
    bs = lu.block_size
    length = blocks * bs
    if length > MAX_TRANSFER_BYTES or lba + blocks > lu.num_blocks:
        return CHECKED
    try:
        if op in (_READ_10, _READ_16):
            if in_len < length:
                return CHECKED
            bufs = data_in if in_len == length else iov_slice(data_in, 0, length)
            moved = lu.backend.readv(lba * bs, bufs)
            resid = in_len - moved
        else:
            if flags & _FUA or lu.readonly or not state.write_cache_enabled or out_len < length:
                return CHECKED
            bufs = data_out if out_len == length else iov_slice(data_out, 0, length)
            lu.backend.writev(lba * bs, bufs)
            moved = 0
            resid = in_len if data_in else out_len - length
    except Exception:  # the checked path does it again and answers the failure
        return CHECKED
    _RESP.pack_into(resp, 0, 0, resid, 0, 0, 0)  # no sense, GOOD, VIRTIO_SCSI_S_OK
    return resp.nbytes + moved
