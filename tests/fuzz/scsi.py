"""Fuzz harnesses for what a guest sends a SCSI target: virtio-scsi requests and
control (TMF, AN) requests, and the CDB decoders behind them.

Both run a `Rig` from tests/unit/test_scsi_support.py (LUNs 0 and 2 on temp
files, unlinked once open) and hand it buffers carved out of a `CanaryArena`,
as the queue layer hands it views of guest RAM. `check_reply` from
tests/unit/test_scsi_fuzz.py checks each virtio-scsi response; the target
never raises (it answers an internal failure with CHECK CONDITION and an
ERROR log line, which `ErrorLog` turns into a failure).

virtio_scsi input: kind u8 (bit 0: control queue, bit 1: unit attention
pending), up to 4 cut points u16 splitting the request, the writable length
u16 and up to 4 cut points splitting it, then the request bytes.

scsi_cdb input: LUN selector u8, the 32-byte CDB, the data-in length u16,
then the data-out bytes (MODE SELECT parameter lists, UNMAP descriptors,
WRITE data...). After each command every LUN's state must survive the
state store's pack/unpack unchanged: a successor emulator reads it back.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

from emulators.scsi.lun import LunState
from emulators.scsi.sense import Status
from emulators.scsi.virtio_scsi import encode_lun_field
from tests.unit.test_scsi_commands import (
    caching_page,
    inquiry,
    mode_sense6,
    mode_sense10,
    report_luns,
    rsoc,
    select6,
    unmap_cdb,
    unmap_params,
)
from tests.unit.test_scsi_fuzz import check_reply
from tests.unit.test_scsi_support import RESP_SIZE, Rig, cdb6, cdb10, cdb16

from .harness import CanaryArena, ErrorLog, Harness, Input, OneInput

LUNS = (0, 2)
DISK = 64 * 1024


def _rig() -> Rig:
    folder = Path(tempfile.mkdtemp(prefix="mplaunch-fuzz-"))
    try:
        return Rig(folder, size=DISK, luns=LUNS, initial_ua=True)
    finally:
        shutil.rmtree(folder)  # the rig keeps its fds


def _reset(rig: Rig, unit_attention: bool) -> None:
    for lu in rig.lus.values():
        lu.state = LunState.fresh(unit_attention)


def _cuts(inp: Input, total: int) -> list[int]:
    n = inp.u8() % 5
    return sorted({inp.u16() % (total + 1) for _ in range(n)})


def _split(total: int, cuts: list[int]) -> list[int]:
    sizes, prev = [], 0
    for cut in [*cuts, total]:
        sizes.append(cut - prev)
        prev = cut
    return sizes


# --- virtio-scsi requests and control requests --------------------------------------


def _request(cdb: bytes, lun: int = 0) -> bytes:
    return encode_lun_field(lun) + struct.pack("<QBBB", 1, 0, 0, 0) + cdb.ljust(32, b"\0")


def _virtio_seeds() -> list[bytes]:
    def request(kind: int, raw: bytes, wlen: int, rcuts: tuple[int, ...] = (),
                wcuts: tuple[int, ...] = ()) -> bytes:
        head = bytes((kind, len(rcuts))) + b"".join(struct.pack("<H", c) for c in rcuts)
        head += struct.pack("<HB", wlen, len(wcuts)) + b"".join(struct.pack("<H", c) for c in wcuts)
        return head + raw

    tmf = struct.pack("<II", 0, 5) + encode_lun_field(0) + struct.pack("<Q", 9)  # LU reset
    an = struct.pack("<I", 1) + encode_lun_field(2) + struct.pack("<I", 0)
    write = _request(cdb10(0x2A, 3, 1)) + bytes(range(256)) * 2
    return [
        request(0, _request(inquiry()), RESP_SIZE + 96),
        request(2, _request(bytes(6), lun=2), RESP_SIZE),  # TEST UNIT READY, a UA pending
        request(0, write, RESP_SIZE, rcuts=(51, 60)),
        request(0, _request(cdb10(0x28, 0, 2)), RESP_SIZE + 1024, wcuts=(RESP_SIZE, 500)),
        request(0, _request(report_luns(), lun=7), RESP_SIZE + 64),
        request(1, tmf, 1),
        request(1, an, 8),
    ]


def _make_virtio() -> OneInput:
    rig = _rig()
    errors = ErrorLog("emulators")
    target = rig.target

    def one_input(data: bytes) -> None:
        inp = Input(data)
        kind = inp.u8()
        _reset(rig, bool(kind & 2))
        rcuts = [inp.u16() for _ in range(inp.u8() % 5)]
        wlen = inp.u16() % (RESP_SIZE + 8192)
        wcuts = _cuts(inp, wlen)
        raw = inp.rest()
        readable = _split(len(raw), sorted({c % (len(raw) + 1) for c in rcuts}))
        writable = _split(wlen, wcuts)
        arena = CanaryArena(readable + writable)
        rviews = arena.buffers[: len(readable)]
        wviews = arena.buffers[len(readable) :]
        at = 0
        for view in rviews:
            view[:] = raw[at : at + len(view)]
            at += len(view)
        if kind & 1:
            used = target.handle_control(rviews, wviews)
            assert 0 <= used <= wlen and used in (0, 1, 5), used
        else:
            used = target.handle_request(rviews, wviews)
            if wlen < RESP_SIZE:
                assert used == 0
            else:
                response = b"".join(bytes(v) for v in wviews)[:RESP_SIZE]
                check_reply(used, response, wlen - RESP_SIZE)
        errors.check()
        arena.check()

    return one_input


VIRTIO_SCSI = Harness(
    "virtio_scsi",
    "virtio-scsi request, TMF and AN parsing (emulators.scsi.virtio_scsi)",
    _make_virtio,
    _virtio_seeds,
)


# --- CDBs and their parameter lists ----------------------------------------------------

_LUN_CHOICES = (0, 2, 1, 300)


def _cdb_seeds() -> list[bytes]:
    def command(cdb: bytes, data_out: bytes = b"", data_in: int = 0, lun: int = 0) -> bytes:
        return bytes((_LUN_CHOICES.index(lun),)) + cdb.ljust(32, b"\0") + struct.pack(
            "<H", data_in) + data_out

    mode6 = bytes(4) + caching_page(False)
    mode10 = bytes(8) + caching_page(True)
    mode_bd = bytes((0, 0, 0, 8)) + struct.pack(">II", 0, 512) + caching_page(False)
    unmap = unmap_params((0, 8), (64, 16))
    select10 = struct.pack(">BBBBBBBHB", 0x55, 0x10, 0, 0, 0, 0, 0, len(mode10), 0)
    return [
        command(inquiry(), data_in=255),
        command(inquiry(evpd=1, page=0x83), data_in=255),
        command(mode_sense6(0x3F), data_in=255),
        command(mode_sense10(0x08, llbaa=True), data_in=512),
        command(select6(mode6), mode6),
        command(select10, mode10),
        command(select6(mode_bd), mode_bd),
        command(unmap_cdb(len(unmap)), unmap),
        command(cdb10(0x28, 1, 2), data_in=1024),
        command(cdb6(0x0A, 5, 1), bytes(range(256)) * 2),
        command(cdb16(0x93, 16, 8), bytes(512)),  # WRITE SAME (16)
        command(cdb10(0x2F, 0, 4)),  # VERIFY (10)
        command(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), data_in=32),
        command(report_luns(), data_in=64, lun=300),
        command(rsoc(1, op=0x28), data_in=64),
        command(bytes((0x03, 0, 0, 0, 18, 0)), data_in=18),  # REQUEST SENSE
    ]


def _make_cdb() -> OneInput:
    rig = _rig()
    errors = ErrorLog("emulators")
    scsi = rig.target.scsi

    def one_input(data: bytes) -> None:
        inp = Input(data)
        lun = _LUN_CHOICES[inp.u8() % len(_LUN_CHOICES)]
        _reset(rig, False)
        cdb = inp.take(32).ljust(32, b"\0")
        data_in = inp.u16() % 8193
        data_out = inp.rest()
        arena = CanaryArena([len(data_out), data_in])
        out_view, in_view = arena.buffers
        out_view[:] = data_out
        result = scsi.execute(lun, cdb, [out_view] if data_out else [],
                              [in_view] if data_in else [])
        assert isinstance(result.status, Status), result
        assert 0 <= result.data_in <= data_in, result
        if result.status is Status.CHECK_CONDITION:
            assert result.sense is not None and len(result.sense.fixed()) == 18
        for lu in rig.lus.values():
            assert LunState.unpack(lu.state.pack()) == lu.state, lu.state
        errors.check()
        arena.check()

    return one_input


CDB = Harness(
    "scsi_cdb",
    "SCSI CDB decoders with their parameter lists: MODE SELECT, UNMAP, WRITE... "
    "(emulators.scsi)",
    _make_cdb,
    _cdb_seeds,
)
