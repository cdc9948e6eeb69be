"""Block commands (SBC-3): READ, WRITE, VERIFY, WRITE SAME, UNMAP, SYNCHRONIZE CACHE,
FORMAT UNIT.

Theory of operation: every handler parses its CDB with one
``struct.unpack_from``, checks fields, then the LBA range against the cached
capacity, then write protection, and only then touches the disk. Data moves
between the disk fd and sub-views of the guest's buffers; nothing is
copied except what must be compared (VERIFY with BYTCHK) or replicated
(WRITE SAME).

Buffer length rules: a data-in buffer shorter than the transfer gets what
fits (the transport reports the residual); a data-out buffer shorter than
the transfer is refused before anything is written (INVALID FIELD IN CDB
on the transfer length, as Linux's own target does), so a write is never
half done because the guest gave too little data.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .iov import gather, iov_len, iov_slice
from .lun import LogicalUnit
from .result import GOOD, CommandResult
from .sense import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAM_LIST,
    LBA_OUT_OF_RANGE,
    MISCOMPARE_DURING_VERIFY,
    PARAM_LIST_LENGTH_ERROR,
    WRITE_PROTECTED,
    CheckCondition,
    Status,
)
from .vpd import (
    MAX_TRANSFER_BYTES,
    MAX_UNMAP_DESCRIPTORS,
    max_transfer_blocks,
    max_unmap_blocks,
    max_write_same_blocks,
)

_CDB10 = struct.Struct(">xBIxH")
_CDB12 = struct.Struct(">xBII")
_CDB16 = struct.Struct(">xBQI")
_UNMAP_DESC = struct.Struct(">QI4x")
_FUA = 0x08
_REPLICATE_CHUNK = 1 << 20


def _check_range(lu: LogicalUnit, lba: int, n: int) -> None:
    if lba + n > lu.num_blocks or (n == 0 and lba >= lu.num_blocks):
        raise CheckCondition(LBA_OUT_OF_RANGE)


def _parse(cdb: bytes) -> tuple[int, int, int, int]:
    """(flags, lba, blocks, byte offset of the transfer length field) of a 10/12/16 CDB."""
    op = cdb[0]
    if op < 0x80:
        flags, lba, n = _CDB10.unpack_from(cdb)
        return flags, lba, n, 7
    if op >= 0xA0:
        flags, lba, n = _CDB12.unpack_from(cdb)
        return flags, lba, n, 6
    flags, lba, n = _CDB16.unpack_from(cdb)
    return flags, lba, n, 10


def _parse6(cdb: bytes) -> tuple[int, int]:
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return lba, cdb[4] or 256  # SBC-3 5.15: zero means 256 blocks


def read(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """READ(10/12/16)."""
    if cdb[0] == 0x28:  # the common case, parsed without a helper call
        flags, lba, n = _CDB10.unpack_from(cdb)
        len_at = 7
    else:
        flags, lba, n, len_at = _parse(cdb)
    if flags & 0xE0:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 7))  # RDPROTECT: no protection info
    return _read(lu, lba, n, len_at, data_in)


def read6(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    lba, n = _parse6(cdb)
    return _read(lu, lba, n, 4, data_in)


def _read(
    lu: LogicalUnit, lba: int, n: int, len_at: int, data_in: Sequence[memoryview]
) -> CommandResult:
    _check_transfer(lu, lba, n, len_at)
    length = n * lu.block_size
    if length == 0:
        return GOOD
    bufs = _first_bytes(data_in, length)
    if iov_len(bufs) == 0:
        return GOOD
    got = lu.backend.readv(lba * lu.block_size, bufs)
    return CommandResult(Status.GOOD, None, got, 0)


def _check_transfer(lu: LogicalUnit, lba: int, n: int, len_at: int) -> None:
    """A transfer of n blocks at lba: within the limit and inside the medium."""
    if n * lu.block_size > MAX_TRANSFER_BYTES:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(len_at))
    if lba + n > lu.num_blocks or (n == 0 and lba >= lu.num_blocks):
        raise CheckCondition(LBA_OUT_OF_RANGE)


def _first_bytes(views: Sequence[memoryview], length: int) -> Sequence[memoryview]:
    """The first `length` bytes of the buffers (fewer if they are shorter);
    one slice, not a list walk, in the common single-buffer case."""
    if len(views) == 1 and views[0].nbytes >= length:
        first = views[0]
        return (first,) if first.nbytes == length else (first[:length],)
    return iov_slice(views, 0, length)


def write(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """WRITE(10/12/16)."""
    if cdb[0] == 0x2A:
        flags, lba, n = _CDB10.unpack_from(cdb)
        len_at = 7
    else:
        flags, lba, n, len_at = _parse(cdb)
    if flags & 0xE0:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 7))  # WRPROTECT
    return _write(lu, lba, n, len_at, bool(flags & _FUA), data_out)


def write6(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    lba, n = _parse6(cdb)
    return _write(lu, lba, n, 4, False, data_out)


def write_and_verify(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """WRITE AND VERIFY(10/16): the write goes to the kernel; nothing can differ after."""
    flags, lba, n, len_at = _parse(cdb)
    if flags & 0xE0:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 7))
    if (flags >> 1) & 0x03 > 1:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 2))
    return _write(lu, lba, n, len_at, False, data_out)


def _write(
    lu: LogicalUnit, lba: int, n: int, len_at: int, fua: bool, data_out: Sequence[memoryview]
) -> CommandResult:
    bs = lu.block_size
    _check_transfer(lu, lba, n, len_at)
    if lu.readonly:
        raise CheckCondition(WRITE_PROTECTED)
    length = n * bs
    if length == 0:
        return GOOD
    bufs = _first_bytes(data_out, length)
    if iov_len(bufs) < length:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(len_at))
    lu.backend.writev(lba * bs, bufs)
    if fua or not lu.state.write_cache_enabled:
        lu.backend.flush()
    return CommandResult(Status.GOOD, None, 0, length)


def verify(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """VERIFY(10/16): BYTCHK 00b checks the range only, 01b compares data-out."""
    flags, lba, n, len_at = _parse(cdb)
    if flags & 0xE0:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 7))
    bytchk = (flags >> 1) & 0x03
    if bytchk > 1:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 2))
    if n > max_transfer_blocks(lu):
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(len_at))
    _check_range(lu, lba, n)
    if bytchk == 0 or n == 0:
        return GOOD
    length = n * lu.block_size
    if iov_len(data_out) < length:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(len_at))
    medium = bytearray(length)
    lu.backend.readv(lba * lu.block_size, [memoryview(medium)])
    given = gather(data_out, 0, length)
    if given != medium:
        raise CheckCondition(MISCOMPARE_DURING_VERIFY.with_information(_first_diff(given, medium)))
    return CommandResult(Status.GOOD, None, 0, length)


def _first_diff(a: bytes, b: bytes | bytearray) -> int:
    """Offset of the first differing byte (the INFORMATION field of MISCOMPARE)."""
    step = 4096
    for base in range(0, len(a), step):
        if a[base:base + step] != b[base:base + step]:
            for i in range(base, min(base + step, len(a))):
                if a[i] != b[i]:
                    return i
    return len(a)


def synchronize_cache(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """SYNCHRONIZE CACHE(10/16): fdatasync (the whole file; a range is no cheaper)."""
    _, lba, n, _ = _parse(cdb)
    _check_range(lu, lba, n)
    if not lu.readonly:
        lu.backend.flush()
    return GOOD


_FMTPINFO = 0xC0
_FMTDATA = 0x10


def format_unit(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """FORMAT UNIT (SBC-3 5.3, mandatory): an image file has nothing to format.

    With FMTDATA 0 there is no parameter list and the device server picks
    its defaults, which here means keeping the medium as it is: a no-op, as
    QEMU's scsi-disk does. A parameter list (FMTDATA 1) would ask for
    defect-list or protection changes this target cannot make, and
    protection information (FMTPINFO) is not supported: both are refused
    with INVALID FIELD IN CDB pointing at the bit, instead of silently
    ignoring what the initiator asked for.
    """
    flags = cdb[1]
    if flags & _FMTPINFO:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 7))
    if flags & _FMTDATA:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 4))
    if lu.readonly:
        raise CheckCondition(WRITE_PROTECTED)
    return GOOD


def write_same(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """WRITE SAME(10/16): one block replicated, or with UNMAP a deallocation.

    A zero block with UNMAP set is punched (reads back zero: LBPRZ). A
    non-zero block is always written, UNMAP or not, since SBC-3 requires
    reads to return the given data afterwards.
    """
    flags, lba, n, len_at = _parse(cdb)
    sixteen = cdb[0] == 0x93
    if flags & 0xE0:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 7))
    if flags & 0x10:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 4))  # ANCHOR: not supported
    if flags & 0x06:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 2))  # PBDATA/LBDATA
    ndob = sixteen and bool(flags & 0x01)
    if not sixteen and flags & 0x01:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 0))
    if n == 0 or n > max_write_same_blocks(lu):
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(len_at))  # WSNZ=1, bounded
    _check_range(lu, lba, n)
    if lu.readonly:
        raise CheckCondition(WRITE_PROTECTED)
    bs = lu.block_size
    if ndob:
        block = bytes(bs)
        used = 0
    else:
        if iov_len(data_out) < bs:
            raise CheckCondition(INVALID_FIELD_IN_CDB.at(len_at))
        block = gather(data_out, 0, bs)
        used = bs
    offset = lba * bs
    length = n * bs
    if block.count(0) == bs:
        if flags & 0x08 and lu.unmap:
            lu.backend.discard(offset, length)
        else:
            lu.backend.write_zeroes(offset, length)
    else:
        per_chunk = max(_REPLICATE_CHUNK // bs, 1)
        chunk = memoryview(block * min(n, per_chunk))
        end = offset + length
        while offset < end:
            take = min(chunk.nbytes, end - offset)
            lu.backend.writev(offset, [chunk[:take]])
            offset += take
    if not lu.state.write_cache_enabled:
        lu.backend.flush()
    return CommandResult(Status.GOOD, None, 0, used)


def unmap(
    lu: LogicalUnit, cdb: bytes, data_out: Sequence[memoryview], data_in: Sequence[memoryview]
) -> CommandResult:
    """UNMAP (SBC-3 5.28): every descriptor is checked before any range is punched."""
    if cdb[1] & 0x01:
        raise CheckCondition(INVALID_FIELD_IN_CDB.at(1, 0))  # ANCHOR
    plen = struct.unpack_from(">H", cdb, 7)[0]
    if lu.readonly:
        raise CheckCondition(WRITE_PROTECTED)
    if plen == 0:
        return GOOD
    if plen < 8 or iov_len(data_out) < plen:
        raise CheckCondition(PARAM_LIST_LENGTH_ERROR)
    params = gather(data_out, 0, plen)
    bddl = struct.unpack_from(">H", params, 2)[0]
    count = min(bddl, plen - 8) // 16
    if count > MAX_UNMAP_DESCRIPTORS:
        raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(2, in_cdb=False))
    limit = max_unmap_blocks(lu)  # for the whole command (SBC-3 6.6.4)
    total = 0
    ranges: list[tuple[int, int]] = []
    for i in range(count):
        at = 8 + 16 * i
        lba, nb = _UNMAP_DESC.unpack_from(params, at)
        total += nb
        if total > limit:
            raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST.at(at + 8, in_cdb=False))
        if lba + nb > lu.num_blocks:
            raise CheckCondition(LBA_OUT_OF_RANGE)
        if nb:
            ranges.append((lba, nb))
    bs = lu.block_size
    for lba, nb in ranges:
        lu.backend.discard(lba * bs, nb * bs)
    return CommandResult(Status.GOOD, None, 0, plen)
