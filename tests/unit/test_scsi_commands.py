"""SPC/SBC commands through the virtio-scsi request path, on real temp-file disks."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from emulators.scsi import sense as S
from emulators.scsi.vpd import naa_identifier

from .test_scsi_support import Rig, cdb6, cdb10, cdb12, cdb16

MiB = 1 << 20


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path, size=MiB, fill=bytes(range(256)) * 4096)


# -- INQUIRY ------------------------------------------------------------------


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def test_standard_inquiry(rig: Rig) -> None:
    r = rig.cmd(inquiry(), data_in_len=255)
    assert r.status == 0 and r.response == 0
    d = r.data
    assert d[0] == 0x00 and d[2] == 0x06 and d[3] & 0x0F == 2
    assert d[4] == 31 and d[7] & 0x02
    assert d[8:16] == b"MPLAUNCH" and d[16:32].rstrip() == b"VDISK" and d[32:36] == b"0001"
    assert r.resid == 255 - 36
    assert r.used == 108 + 36


def test_inquiry_allocation_length_truncates(rig: Rig) -> None:
    r = rig.cmd(inquiry(alloc=5), data_in_len=255)
    assert r.status == 0 and r.resid == 250 and r.data[5:] == bytes(250)


def test_inquiry_buffer_smaller_than_allocation(rig: Rig) -> None:
    r = rig.cmd(inquiry(alloc=255), data_in_len=10)
    assert r.status == 0 and r.resid == 0 and r.data[8:10] == b"MP"


def test_inquiry_bad_fields(rig: Rig) -> None:
    r = rig.cmd(inquiry(evpd=0, page=0x80), data_in_len=255)
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 2
    r = rig.cmd(inquiry(evpd=2), data_in_len=255)
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 1
    r = rig.cmd(inquiry(evpd=1, page=0xC7), data_in_len=255)
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 2


def test_vpd_pages(rig: Rig) -> None:
    r = rig.cmd(inquiry(1, 0x00), data_in_len=255)
    assert r.data[1] == 0 and list(r.data[4:4 + r.data[3]]) == [0, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    r = rig.cmd(inquiry(1, 0x80), data_in_len=255)
    assert r.data[1] == 0x80 and r.data[4:4 + r.data[3]] == b"disk-0"
    r = rig.cmd(inquiry(1, 0x83), data_in_len=255)
    d = r.data
    assert d[1] == 0x83
    assert d[4] == 0x01 and d[5] == 0x03 and d[7] == 8 and d[8:16] == naa_identifier("disk-0")
    assert d[8] >> 4 == 3
    t10 = d[16:]
    assert t10[0] == 0x02 and t10[1] == 0x01 and t10[4:12] == b"MPLAUNCH"
    # Stable: derived from the id only, different ids differ.
    assert naa_identifier("disk-0") == naa_identifier("disk-0") != naa_identifier("disk-1")


def test_vpd_block_limits_and_provisioning(rig: Rig) -> None:
    d = rig.cmd(inquiry(1, 0xB0), data_in_len=255).data
    assert struct.unpack_from(">H", d, 2)[0] == 0x3C
    max_xfer, opt_xfer = struct.unpack_from(">II", d, 8)
    assert max_xfer == 8 * MiB // 512 and opt_xfer == MiB // 512
    max_unmap, max_desc, gran = struct.unpack_from(">III", d, 20)
    assert max_unmap == (256 * MiB) // 512 and max_desc == 128 and gran == 8
    assert struct.unpack_from(">Q", d, 36)[0] == 32 * MiB // 512
    d = rig.cmd(inquiry(1, 0xB1), data_in_len=255).data
    assert struct.unpack_from(">H", d, 4)[0] == 1
    d = rig.cmd(inquiry(1, 0xB2), data_in_len=255).data
    assert d[5] & 0xE0 == 0xE0 and d[5] & 0x04


def test_vpd_without_unmap(tmp_path: Path) -> None:
    rig = Rig(tmp_path, unmap=False)
    d = rig.cmd(inquiry(1, 0xB2), data_in_len=255).data
    assert d[5] & 0xE0 == 0
    d = rig.cmd(inquiry(1, 0xB0), data_in_len=255).data
    assert struct.unpack_from(">III", d, 20) == (0, 0, 0)
    d = rig.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), data_in_len=32).data
    assert not d[14] & 0x80


# -- simple commands ------------------------------------------------------------


@pytest.mark.parametrize(
    "cdb", [bytes(6), bytes((0x1B, 0, 0, 0, 1, 0)), bytes((0x1E, 0, 0, 0, 1, 0))]
)
def test_no_op_commands(rig: Rig, cdb: bytes) -> None:
    r = rig.cmd(cdb)
    assert r.status == 0 and r.sense_len == 0 and r.used == 108


def test_unknown_opcode(rig: Rig) -> None:
    for op in (0x07, 0x3B, 0xA5, 0x7F, 0xC0, 0xE0):
        assert rig.cmd(bytes((op,)) + bytes(15)).is_sense(S.INVALID_OPCODE), hex(op)


def test_format_unit_without_parameter_list_is_a_no_op(rig: Rig) -> None:
    before = os.pread(rig.fd, 4096, 0)
    r = rig.cmd(bytes((0x04, 0, 0, 0, 0, 0)))
    assert r.status == 0 and r.sense_len == 0 and r.used == 108
    # LONGLIST, CMPLST and the defect list format mean nothing without FMTDATA.
    assert rig.cmd(bytes((0x04, 0x2F, 0, 0, 0, 0))).status == 0
    assert os.pread(rig.fd, 4096, 0) == before


def test_format_unit_refusals_point_at_the_bit(rig: Rig, tmp_path: Path) -> None:
    r = rig.cmd(bytes((0x04, 0x10, 0, 0, 0, 0)), data_out=bytes(4))
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 1
    assert r.sense[15] & 0x0F == 0x08 | 4  # BPV set, bit 4: FMTDATA
    r = rig.cmd(bytes((0x04, 0x40, 0, 0, 0, 0)))
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 1
    assert r.sense[15] & 0x0F == 0x08 | 7  # FMTPINFO
    (tmp_path / "ro").mkdir()
    readonly = Rig(tmp_path / "ro", readonly=True)
    assert readonly.cmd(bytes((0x04, 0, 0, 0, 0, 0))).is_sense(S.WRITE_PROTECTED)


def test_naca_refused(rig: Rig) -> None:
    r = rig.cmd(bytes((0, 0, 0, 0, 0, 0x04)))
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 5


# -- READ CAPACITY --------------------------------------------------------------


def test_read_capacity(rig: Rig) -> None:
    r = rig.cmd(bytes((0x25,)) + bytes(9), data_in_len=8)
    assert struct.unpack(">II", r.data) == (MiB // 512 - 1, 512)
    r = rig.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), data_in_len=32)
    last, bs = struct.unpack_from(">QI", r.data)
    assert (last, bs) == (MiB // 512 - 1, 512)
    assert r.data[14] & 0x80 and r.data[14] & 0x40 and r.data[13] == 0
    r = rig.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 12, 0, 0), data_in_len=32)
    assert r.resid == 20
    r = rig.cmd(struct.pack(">BBQIBB", 0x9E, 0x11, 0, 32, 0, 0), data_in_len=32)
    assert r.is_sense(S.INVALID_FIELD_IN_CDB)
    r = rig.cmd(struct.pack(">BBIBBBB", 0x25, 0, 5, 0, 0, 0, 0), data_in_len=8)
    assert r.is_sense(S.INVALID_FIELD_IN_CDB)


def test_read_capacity_4k(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size=4 * MiB, block_size=4096)
    r = rig.cmd(bytes((0x25,)) + bytes(9), data_in_len=8)
    assert struct.unpack(">II", r.data) == (1023, 4096)
    data = os.urandom(8192)
    assert rig.cmd(cdb10(0x2A, 3, 2), data_out=data).status == 0
    assert os.pread(rig.fd, 8192, 3 * 4096) == data


def test_read_capacity_beyond_32_bits(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size=(1 << 32) * 512 + 512 * 10)  # sparse
    r = rig.cmd(bytes((0x25,)) + bytes(9), data_in_len=8)
    assert struct.unpack(">II", r.data) == (0xFFFFFFFF, 512)
    r = rig.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), data_in_len=32)
    assert struct.unpack_from(">Q", r.data)[0] == (1 << 32) + 9
    payload = os.urandom(512)
    assert rig.cmd(cdb16(0x8A, (1 << 32) + 9, 1), data_out=payload).status == 0
    assert rig.cmd(cdb16(0x88, (1 << 32) + 9, 1), data_in_len=512).data == payload


# -- READ / WRITE ---------------------------------------------------------------


@pytest.mark.parametrize("size", ["6", "10", "12", "16"])
def test_write_read_roundtrip(rig: Rig, size: str) -> None:
    payload = os.urandom(4 * 512)
    build = {"6": cdb6, "10": cdb10, "12": cdb12, "16": cdb16}[size]
    wop = {"6": 0x0A, "10": 0x2A, "12": 0xAA, "16": 0x8A}[size]
    rop = {"6": 0x08, "10": 0x28, "12": 0xA8, "16": 0x88}[size]
    r = rig.cmd(build(wop, 100, 4), data_out=payload)
    assert r.status == 0 and r.resid == 0
    assert os.pread(rig.fd, len(payload), 100 * 512) == payload
    r = rig.cmd(build(rop, 100, 4), data_in_len=4 * 512)
    assert r.status == 0 and r.data == payload and r.resid == 0
    assert r.used == 108 + 2048


def test_read6_zero_means_256(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fill=os.urandom(MiB))
    r = rig.cmd(cdb6(0x08, 0, 0), data_in_len=256 * 512)
    assert r.status == 0 and r.data == os.pread(rig.fd, 256 * 512, 0)


def test_read_out_of_range(rig: Rig) -> None:
    blocks = MiB // 512
    assert rig.cmd(cdb10(0x28, blocks - 1, 2), data_in_len=1024).is_sense(S.LBA_OUT_OF_RANGE)
    assert rig.cmd(cdb16(0x88, 1 << 63, 1), data_in_len=512).is_sense(S.LBA_OUT_OF_RANGE)
    assert rig.cmd(cdb10(0x28, blocks, 0)).is_sense(S.LBA_OUT_OF_RANGE)
    assert rig.cmd(cdb10(0x28, blocks - 1, 0)).status == 0
    assert rig.cmd(cdb10(0x2A, blocks, 1), data_out=bytes(512)).is_sense(S.LBA_OUT_OF_RANGE)


def test_read_too_long_and_protect(rig: Rig) -> None:
    r = rig.cmd(cdb16(0x88, 0, 0x100000), data_in_len=512)
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 10
    r = rig.cmd(cdb10(0x28, 0, 1, flags=0x20), data_in_len=512)
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 1


def test_read_into_short_buffer_transfers_what_fits(rig: Rig) -> None:
    r = rig.cmd(cdb10(0x28, 0, 4), data_in_len=1000)
    assert r.status == 0 and r.data == os.pread(rig.fd, 1000, 0) and r.resid == 0


def test_read_into_long_buffer_reports_residual(rig: Rig) -> None:
    r = rig.cmd(cdb10(0x28, 2, 2), data_in_len=4096)
    assert r.status == 0 and r.resid == 3072 and r.data[:1024] == os.pread(rig.fd, 1024, 1024)


def test_write_data_shortfall_is_refused_and_writes_nothing(rig: Rig) -> None:
    before = os.pread(rig.fd, 2048, 0)
    r = rig.cmd(cdb10(0x2A, 0, 4), data_out=b"\xAA" * 1000)
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 7
    assert os.pread(rig.fd, 2048, 0) == before


def test_write_extra_data_out_is_residual(rig: Rig) -> None:
    r = rig.cmd(cdb10(0x2A, 0, 1), data_out=b"\x11" * 1536)
    assert r.status == 0 and r.resid == 1024
    assert os.pread(rig.fd, 513, 0) == b"\x11" * 512 + bytes((0,))


def test_read_only_disk(tmp_path: Path) -> None:
    rig = Rig(tmp_path, readonly=True)
    assert rig.cmd(cdb10(0x2A, 0, 1), data_out=bytes(512)).is_sense(S.WRITE_PROTECTED)
    assert rig.cmd(cdb6(0x0A, 0, 1), data_out=bytes(512)).is_sense(S.WRITE_PROTECTED)
    ws = rig.cmd(cdb10(0x41, 0, 1), data_out=bytes(512))
    assert ws.is_sense(S.WRITE_PROTECTED)
    assert rig.cmd(cdb10(0x42, 0, 0)).is_sense(S.INVALID_OPCODE)  # UNMAP off when read-only
    assert rig.cmd(cdb10(0x28, 0, 1), data_in_len=512).status == 0
    ms = rig.cmd(bytes((0x1A, 0, 0x3F, 0, 255, 0)), data_in_len=255)
    assert ms.data[2] & 0x80  # WP


def test_fua_and_wce_off_flush(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    assert rig.cmd(cdb10(0x2A, 0, 1), data_out=bytes(512)).status == 0
    assert calls == []
    assert rig.cmd(cdb10(0x2A, 0, 1, flags=0x08), data_out=bytes(512)).status == 0
    assert calls == [rig.fd]
    assert rig.cmd(cdb16(0x8A, 0, 1, flags=0x08), data_out=bytes(512)).status == 0
    assert len(calls) == 2
    assert rig.cmd(cdb10(0x35, 0, 0)).status == 0
    assert rig.cmd(cdb16(0x91, 0, 0)).status == 0
    assert len(calls) == 4
    rig.lu().state.write_cache_enabled = False
    assert rig.cmd(cdb10(0x2A, 0, 1), data_out=bytes(512)).status == 0
    assert len(calls) == 5


def test_synchronize_cache_range(rig: Rig) -> None:
    assert rig.cmd(cdb10(0x35, MiB // 512, 1)).is_sense(S.LBA_OUT_OF_RANGE)


def test_io_errors_map_to_sense(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    os.ftruncate(rig.fd, 4096)  # the file shrank under the LUN: EOF inside the disk
    r = rig.cmd(cdb10(0x28, 100, 1), data_in_len=512)
    assert r.is_sense(S.UNRECOVERED_READ_ERROR)
    assert r.sense[0] & 0x80 and struct.unpack_from(">I", r.sense, 3)[0] == 100
    ro = os.open(tmp_path / "disk0", os.O_RDONLY)
    rig.lu().backend._fd = ro  # type: ignore[attr-defined]
    assert rig.cmd(cdb10(0x2A, 0, 1), data_out=bytes(512)).is_sense(S.WRITE_PROTECTED)
    os.close(ro)


# -- VERIFY / WRITE AND VERIFY ------------------------------------------------------


def test_verify(rig: Rig) -> None:
    good = os.pread(rig.fd, 1024, 512)
    assert rig.cmd(cdb10(0x2F, 1, 2)).status == 0
    assert rig.cmd(cdb16(0x8F, MiB // 512, 1)).is_sense(S.LBA_OUT_OF_RANGE)
    assert rig.cmd(cdb10(0x2F, 1, 2, flags=0x02), data_out=good).status == 0
    bad = bytearray(good)
    bad[700] ^= 1
    r = rig.cmd(cdb10(0x2F, 1, 2, flags=0x02), data_out=bytes(bad))
    assert r.is_sense(S.MISCOMPARE_DURING_VERIFY)
    assert r.sense[0] & 0x80 and struct.unpack_from(">I", r.sense, 3)[0] == 700
    assert rig.cmd(cdb10(0x2F, 1, 2, flags=0x02), data_out=good[:100]).is_sense(
        S.INVALID_FIELD_IN_CDB
    )
    assert rig.cmd(cdb10(0x2F, 1, 2, flags=0x04)).is_sense(S.INVALID_FIELD_IN_CDB)


def test_write_and_verify(rig: Rig) -> None:
    payload = os.urandom(1024)
    assert rig.cmd(cdb10(0x2E, 10, 2), data_out=payload).status == 0
    assert rig.cmd(cdb16(0x8E, 12, 2), data_out=payload).status == 0
    assert os.pread(rig.fd, 2048, 5120) == payload * 2


# -- MODE SENSE / MODE SELECT -------------------------------------------------------


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, 0, alloc, 0))


def mode_sense10(page: int, pc: int = 0, llbaa: bool = False, alloc: int = 512) -> bytes:
    return struct.pack(">BBBBBBBHB", 0x5A, 0x10 if llbaa else 0, (pc << 6) | page, 0, 0, 0, 0,
                       alloc, 0)


def pages_of(data: bytes, start: int) -> dict[int, bytes]:
    out = {}
    pos = start
    while pos < len(data):
        out[data[pos] & 0x3F] = data[pos:pos + 2 + data[pos + 1]]
        pos += 2 + data[pos + 1]
    return out


def test_mode_sense6_all_pages(rig: Rig) -> None:
    r = rig.cmd(mode_sense6(0x3F), data_in_len=255)
    d = r.data[: r.data[0] + 1]
    assert r.status == 0 and d[3] == 8
    blocks, bl = struct.unpack_from(">II", d, 4)
    assert blocks == MiB // 512 and bl == 512
    assert d[2] == 0x10  # DPOFUA, not write protected
    pages = pages_of(d, 12)
    assert sorted(pages) == [0x01, 0x08, 0x0A]
    assert pages[0x08][2] & 0x04  # WCE on by default
    assert len(pages[0x08]) == 20 and len(pages[0x01]) == 12 and len(pages[0x0A]) == 12


def test_mode_sense_dbd_changeable_default_saved(rig: Rig) -> None:
    r = rig.cmd(mode_sense6(0x08, dbd=True), data_in_len=255)
    assert r.data[3] == 0 and r.data[4] == 0x08
    ch = rig.cmd(mode_sense6(0x08, pc=1, dbd=True), data_in_len=255).data
    assert ch[6] == 0x04 and not any(ch[7:24])
    rig.lu().state.write_cache_enabled = False
    cur = rig.cmd(mode_sense6(0x08, dbd=True), data_in_len=255).data
    assert not cur[6] & 0x04
    dflt = rig.cmd(mode_sense6(0x08, pc=2, dbd=True), data_in_len=255).data
    assert dflt[6] & 0x04
    r = rig.cmd(mode_sense6(0x08, pc=3), data_in_len=255)
    assert r.is_sense(S.SAVING_PARAMS_NOT_SUPPORTED)
    assert rig.cmd(mode_sense6(0x19), data_in_len=255).is_sense(S.INVALID_FIELD_IN_CDB)
    r = rig.cmd(bytes((0x1A, 0, 0x08, 0x01, 255, 0)), data_in_len=255)
    assert r.is_sense(S.INVALID_FIELD_IN_CDB) and r.field_pointer == 3


def test_mode_sense10_llbaa_and_truncation(rig: Rig) -> None:
    r = rig.cmd(mode_sense10(0x3F, llbaa=True), data_in_len=512)
    d = r.data
    total = struct.unpack_from(">H", d)[0] + 2
    assert d[4] & 1 and struct.unpack_from(">H", d, 6)[0] == 16
    assert struct.unpack_from(">Q", d, 8)[0] == MiB // 512
    assert struct.unpack_from(">I", d, 20)[0] == 512
    assert r.resid == 512 - total
    r = rig.cmd(mode_sense10(0x3F, alloc=10), data_in_len=512)
    assert r.resid == 502 and struct.unpack_from(">H", r.data, 6)[0] == 8


def select6(params: bytes, pf: bool = True, sp: bool = False) -> bytes:
    return bytes((0x15, (0x10 if pf else 0) | (1 if sp else 0), 0, 0, len(params), 0))


def caching_page(wce: bool) -> bytes:
    body = bytearray(18)
    body[0] = 0x04 if wce else 0
    return bytes((0x08, 18)) + bytes(body)


def test_mode_select_wce_round_trip(rig: Rig) -> None:
    changes: list[bool] = []
    rig.lu().on_change = lambda st: changes.append(st.write_cache_enabled)
    params = bytes(4) + caching_page(False)
    r = rig.cmd(select6(params), data_out=params)
    assert r.status == 0 and rig.lu().state.write_cache_enabled is False and changes == [False]
    cur = rig.cmd(mode_sense6(0x08, dbd=True), data_in_len=255).data
    assert not cur[6] & 0x04
    params10 = bytes(8) + caching_page(True)
    cdb = struct.pack(">BBBBBBBHB", 0x55, 0x10, 0, 0, 0, 0, 0, len(params10), 0)
    assert rig.cmd(cdb, data_out=params10).status == 0
    assert rig.lu().state.write_cache_enabled is True


def test_mode_select_with_block_descriptor(rig: Rig) -> None:
    params = bytes((0, 0, 0, 8)) + struct.pack(">II", 0, 512) + caching_page(False)
    assert rig.cmd(select6(params), data_out=params).status == 0
    bad = bytes((0, 0, 0, 8)) + struct.pack(">II", 0, 4096) + caching_page(True)
    r = rig.cmd(select6(bad), data_out=bad)
    assert r.is_sense(S.INVALID_FIELD_IN_PARAM_LIST)
    assert rig.lu().state.write_cache_enabled is False  # nothing half-applied


def test_mode_select_refusals(rig: Rig) -> None:
    params = bytes(4) + caching_page(False)
    assert rig.cmd(select6(params, pf=False), data_out=params).is_sense(S.INVALID_FIELD_IN_CDB)
    assert rig.cmd(select6(params, sp=True), data_out=params).is_sense(S.INVALID_FIELD_IN_CDB)
    r = rig.cmd(select6(params), data_out=params[:10])
    assert r.is_sense(S.PARAM_LIST_LENGTH_ERROR)
    other = bytearray(params)
    other[4 + 2] |= 0x01  # RCD is not changeable
    r = rig.cmd(select6(bytes(other)), data_out=bytes(other))
    assert r.is_sense(S.INVALID_FIELD_IN_PARAM_LIST) and r.field_pointer == 6
    assert r.sense[15] & 0x40 == 0  # pointer into the parameter list, not the CDB
    ctrl = bytes(4) + bytes((0x0A, 10, 0, 0x20)) + bytes(8)
    assert rig.cmd(select6(ctrl), data_out=ctrl).is_sense(S.INVALID_FIELD_IN_PARAM_LIST)
    unknown = bytes(4) + bytes((0x1C, 2, 0, 0))
    assert rig.cmd(select6(unknown), data_out=unknown).is_sense(S.INVALID_FIELD_IN_PARAM_LIST)
    trunc = bytes(4) + caching_page(False)[:10]
    assert rig.cmd(select6(trunc), data_out=trunc).is_sense(S.PARAM_LIST_LENGTH_ERROR)
    assert rig.lu().state.write_cache_enabled is True
    assert rig.cmd(select6(b"")).status == 0


# -- REPORT LUNS / REQUEST SENSE / RSOC ------------------------------------------------


def report_luns(select: int = 0, alloc: int = 4096) -> bytes:
    return struct.pack(">BBBxxxIBB", 0xA0, 0, select, alloc, 0, 0)


def test_report_luns(tmp_path: Path) -> None:
    rig = Rig(tmp_path, luns=(0, 3, 300))
    r = rig.cmd(report_luns(), data_in_len=4096)
    n = struct.unpack_from(">I", r.data)[0]
    assert n == 24
    entries = [r.data[8 + 8 * i: 16 + 8 * i] for i in range(3)]
    assert entries == [bytes(8), bytes((0, 3)) + bytes(6), bytes((0x41, 0x2C)) + bytes(6)]
    assert rig.cmd(report_luns(1), data_in_len=4096).data[:4] == bytes(4)
    assert rig.cmd(report_luns(2), data_in_len=4096).data[3] == 24
    assert rig.cmd(report_luns(3), data_in_len=4096).is_sense(S.INVALID_FIELD_IN_CDB)
    assert rig.cmd(report_luns(alloc=15), data_in_len=4096).is_sense(S.INVALID_FIELD_IN_CDB)
    r = rig.cmd(report_luns(alloc=16), data_in_len=4096)
    assert r.status == 0 and r.resid == 4096 - 16 and r.data[3] == 24
    # From a LUN that does not exist, too.
    assert rig.cmd(report_luns(), data_in_len=4096, lun=7).data[3] == 24


def test_request_sense(rig: Rig) -> None:
    r = rig.cmd(bytes((0x03, 0, 0, 0, 18, 0)), data_in_len=252)
    assert r.status == 0 and r.data[0] == 0x70 and r.data[2] == 0 and r.resid == 252 - 18
    rig.cmd(cdb10(0x28, 1 << 30, 1), data_in_len=512)
    r = rig.cmd(bytes((0x03, 0, 0, 0, 252, 0)), data_in_len=252)
    assert (r.data[2], r.data[12], r.data[13]) == (5, 0x21, 0)
    r = rig.cmd(bytes((0x03, 0, 0, 0, 252, 0)), data_in_len=252)
    assert r.data[2] == 0  # reported once, then cleared
    rig.cmd(cdb10(0x28, 1 << 30, 1), data_in_len=512)
    r = rig.cmd(bytes((0x03, 1, 0, 0, 252, 0)), data_in_len=252)
    assert r.data[0] == 0x72 and (r.data[1], r.data[2], r.data[3]) == (5, 0x21, 0)
    r = rig.cmd(bytes((0x03, 0, 0, 0, 8, 0)), data_in_len=252)
    assert r.resid == 244


def test_last_sense_cleared_by_next_good_command(rig: Rig) -> None:
    rig.cmd(cdb10(0x28, 1 << 30, 1), data_in_len=512)
    assert rig.cmd(bytes(6)).status == 0
    r = rig.cmd(bytes((0x03, 0, 0, 0, 18, 0)), data_in_len=18)
    assert r.data[2] == 0


def rsoc(options: int, op: int = 0, sa: int = 0, alloc: int = 8192, rctd: bool = False) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, options | (0x80 if rctd else 0), op, sa, alloc,
                       0, 0)


def test_report_supported_opcodes(rig: Rig) -> None:
    r = rig.cmd(rsoc(0), data_in_len=8192)
    n = struct.unpack_from(">I", r.data)[0]
    descs = [r.data[4 + i: 12 + i] for i in range(0, n, 8)]
    ops = {(d[0], struct.unpack_from(">H", d, 2)[0] if d[5] & 1 else None) for d in descs}
    assert (0x28, None) in ops and (0x9E, 0x10) in ops and (0xA3, 0x0C) in ops
    assert (0x04, None) in ops  # FORMAT UNIT, mandatory in SBC-3
    assert all(struct.unpack_from(">H", d, 6)[0] in (6, 10, 12, 16) for d in descs)
    r = rig.cmd(rsoc(0, rctd=True), data_in_len=8192)
    assert struct.unpack_from(">I", r.data)[0] == n // 8 * 20
    r = rig.cmd(rsoc(1, 0x28), data_in_len=64)
    assert r.data[1] & 0x07 == 3 and struct.unpack_from(">H", r.data, 2)[0] == 10
    assert r.data[4] == 0x28 and r.data[13] == 0x04
    r = rig.cmd(rsoc(1, 0x3B), data_in_len=64)
    assert r.data[1] & 0x07 == 1
    assert rig.cmd(rsoc(1, 0x9E), data_in_len=64).is_sense(S.INVALID_FIELD_IN_CDB)
    r = rig.cmd(rsoc(2, 0x9E, 0x10), data_in_len=64)
    assert r.data[1] & 0x07 == 3 and r.data[4] == 0x9E
    assert rig.cmd(rsoc(2, 0x28), data_in_len=64).is_sense(S.INVALID_FIELD_IN_CDB)
    assert rig.cmd(rsoc(5), data_in_len=64).is_sense(S.INVALID_FIELD_IN_CDB)
    bad_sa = struct.pack(">BBBBHIBB", 0xA3, 0x05, 0, 0, 0, 64, 0, 0)
    assert rig.cmd(bad_sa, data_in_len=64).is_sense(S.INVALID_FIELD_IN_CDB)


# -- WRITE SAME / UNMAP -----------------------------------------------------------------


def test_write_same_replicates(rig: Rig) -> None:
    block = os.urandom(512)
    assert rig.cmd(cdb10(0x41, 10, 5), data_out=block).status == 0
    assert os.pread(rig.fd, 5 * 512, 10 * 512) == block * 5
    assert rig.cmd(cdb16(0x93, 20, 3), data_out=block).status == 0
    assert os.pread(rig.fd, 3 * 512, 20 * 512) == block * 3


def test_write_same_refusals(rig: Rig) -> None:
    assert rig.cmd(cdb10(0x41, 0, 0), data_out=bytes(512)).is_sense(S.INVALID_FIELD_IN_CDB)
    assert rig.cmd(cdb10(0x41, 0, 1, flags=0x10), data_out=bytes(512)).is_sense(
        S.INVALID_FIELD_IN_CDB
    )
    assert rig.cmd(cdb10(0x41, 0, 1), data_out=bytes(100)).is_sense(S.INVALID_FIELD_IN_CDB)
    r = rig.cmd(cdb16(0x93, MiB // 512 - 1, 2), data_out=bytes(512))
    assert r.is_sense(S.LBA_OUT_OF_RANGE)
    r = rig.cmd(cdb16(0x93, 0, 1 << 24), data_out=bytes(512))
    assert r.is_sense(S.INVALID_FIELD_IN_CDB)


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks


def test_write_same_unmap_punches(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size=MiB, fill=os.urandom(MiB))
    os.fsync(rig.fd)
    before = allocated(rig.fd)
    r = rig.cmd(cdb16(0x93, 0, 1024, flags=0x08), data_out=bytes(512))
    assert r.status == 0
    assert os.pread(rig.fd, 512 * 1024, 0) == bytes(512 * 1024)
    assert allocated(rig.fd) < before
    r = rig.cmd(cdb16(0x93, 1024, 8, flags=0x01), data_out=b"")  # NDOB
    assert r.status == 0 and os.pread(rig.fd, 4096, 1024 * 512) == bytes(4096)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


def unmap_cdb(plen: int) -> bytes:
    return struct.pack(">BBxxxxBHB", 0x42, 0, 0, plen, 0)


def test_unmap_punches_holes(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size=MiB, fill=os.urandom(MiB))
    os.fsync(rig.fd)
    before = allocated(rig.fd)
    keep = os.pread(rig.fd, 512, 1024 * 512)
    params = unmap_params((0, 512), (1025, 256))
    r = rig.cmd(unmap_cdb(len(params)), data_out=params)
    assert r.status == 0 and r.resid == 0
    assert os.pread(rig.fd, 512 * 512, 0) == bytes(512 * 512)
    assert os.pread(rig.fd, 256 * 512, 1025 * 512) == bytes(256 * 512)
    assert os.pread(rig.fd, 512, 1024 * 512) == keep
    assert allocated(rig.fd) < before
    assert os.fstat(rig.fd).st_size == MiB


def test_unmap_refusals(rig: Rig) -> None:
    before = os.pread(rig.fd, 512, 0)
    params = unmap_params((0, 1), (MiB // 512, 1))
    r = rig.cmd(unmap_cdb(len(params)), data_out=params)
    assert r.is_sense(S.LBA_OUT_OF_RANGE)
    assert os.pread(rig.fd, 512, 0) == before  # checked in full before any punch
    assert rig.cmd(unmap_cdb(4), data_out=bytes(4)).is_sense(S.PARAM_LIST_LENGTH_ERROR)
    params = unmap_params((0, 1))
    assert rig.cmd(unmap_cdb(len(params)), data_out=params[:10]).is_sense(
        S.PARAM_LIST_LENGTH_ERROR
    )
    many = unmap_params(*[(i, 1) for i in range(129)])
    r = rig.cmd(unmap_cdb(len(many)), data_out=many)
    assert r.is_sense(S.INVALID_FIELD_IN_PARAM_LIST)
    huge = unmap_params((0, 1 << 31))
    assert rig.cmd(unmap_cdb(len(huge)), data_out=huge).is_sense(S.INVALID_FIELD_IN_PARAM_LIST)
    anchor = struct.pack(">BBxxxxBHB", 0x42, 1, 0, 24, 0)
    assert rig.cmd(anchor, data_out=unmap_params((0, 1))).is_sense(S.INVALID_FIELD_IN_CDB)
    assert rig.cmd(unmap_cdb(0)).status == 0
    assert os.pread(rig.fd, 512, 0) == before


def test_unmap_disabled(tmp_path: Path) -> None:
    rig = Rig(tmp_path, unmap=False)
    params = unmap_params((0, 1))
    assert rig.cmd(unmap_cdb(len(params)), data_out=params).is_sense(S.INVALID_OPCODE)
    # WRITE SAME with UNMAP still zeroes (it writes instead of punching).
    assert rig.cmd(cdb10(0x41, 0, 2, flags=0x08), data_out=bytes(512)).status == 0
    assert os.pread(rig.fd, 1024, 0) == bytes(1024)


def test_unmap_limit_is_per_command(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size=512 * MiB)  # sparse
    limit = 256 * MiB // 512
    ok = unmap_params((0, limit))
    assert rig.cmd(unmap_cdb(len(ok)), data_out=ok).status == 0
    over = unmap_params((0, limit // 2), (limit, limit // 2 + 1))
    r = rig.cmd(unmap_cdb(len(over)), data_out=over)
    assert r.is_sense(S.INVALID_FIELD_IN_PARAM_LIST) and r.field_pointer == 8 + 16 + 8
