"""SCSI over the wire: a real emulator process, real fds, real eventfds.

Every command travels as a guest would send it: a descriptor chain in the
front-end's memfd RAM, a kick on an eventfd, the reply read back after the
call eventfd fires. What the emulator writes to disk is read back with
os.pread from the image file itself.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.emulator_harness import (
    ControllerRig,
    ControllerSpec,
    Disk,
    EmulatorHarness,
    ScsiReply,
    tmf_request,
)

pytestmark = pytest.mark.timeout(60)

GOOD = 0
CHECK_CONDITION = 2
ILLEGAL_REQUEST = 5
UNIT_ATTENTION = 6
DATA_PROTECT = 7
BAD_TARGET = 3
MIB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def emu(images: Path) -> Iterator[EmulatorHarness]:
    disks = (
        Disk(images / "d512.img", lun=0, size=4 * MIB, block_size=512),
        Disk(images / "d4k.img", lun=1, size=8 * MIB, block_size=4096),
        Disk(images / "ro.img", lun=3, size=MIB, readonly=True),
    )
    harness = EmulatorHarness.start([ControllerSpec("c0", disks)])
    yield harness
    assert harness.alive(), harness.stderr()
    status, err = harness.stop()
    assert status == 0, err
    assert "Traceback" not in err


@pytest.fixture()
def rig(emu: EmulatorHarness) -> ControllerRig:
    return emu.rig


def cdb10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def cdb16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(n))


def assert_sense(r: ScsiReply, key: int, asc: int, ascq: int = 0) -> None:
    assert r.response == 0 and r.status == CHECK_CONDITION, r
    assert (r.sense_key, r.asc) == (key, (asc, ascq)), r.sense.hex()


# -- INQUIRY ------------------------------------------------------------------


def test_standard_inquiry(rig: ControllerRig) -> None:
    r = rig.command(bytes([0x12, 0, 0, 0, 96, 0]), data_in=[96])
    assert (r.response, r.status) == (0, GOOD)
    assert r.data[0] == 0x00  # connected, direct access block device
    assert r.data[2] >= 5  # SPC-3 or later
    assert r.data[3] & 0x0F == 2
    assert r.data[8:16] == b"MPLAUNCH"
    assert r.used_len == 108 + r.data[4] + 5
    assert r.resid == 96 - (r.data[4] + 5)


def test_vpd_pages(rig: ControllerRig) -> None:
    r = rig.command(bytes([0x12, 1, 0x00, 0, 255, 0]), data_in=[255])
    assert r.status == GOOD
    pages = list(r.data[4 : 4 + r.data[3]])
    assert pages == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    for page in pages[1:]:
        v = rig.command(bytes([0x12, 1, page, 0, 255, 0]), data_in=[255])
        assert v.status == GOOD and v.data[1] == page, (page, v)
        length = struct.unpack_from(">H", v.data, 2)[0]
        assert 0 < length <= 251
    serial = rig.command(bytes([0x12, 1, 0x80, 0, 255, 0]), data_in=[255])
    other = rig.command(bytes([0x12, 1, 0x80, 0, 255, 0]), data_in=[255], lun=1)
    assert serial.data[4 : 4 + serial.data[3]] != other.data[4 : 4 + other.data[3]]
    limits = rig.command(bytes([0x12, 1, 0xB0, 0, 255, 0]), data_in=[255])
    assert struct.unpack_from(">I", limits.data, 12)[0] > 0  # optimal transfer length
    bad = rig.command(bytes([0x12, 1, 0x99, 0, 255, 0]), data_in=[255])
    assert_sense(bad, ILLEGAL_REQUEST, 0x24)


# -- capacity -----------------------------------------------------------------


@pytest.mark.parametrize(("lun", "blocks", "block_size"), [(0, 8192, 512), (1, 2048, 4096)])
def test_read_capacity(rig: ControllerRig, lun: int, blocks: int, block_size: int) -> None:
    r10 = rig.command(bytes(10).replace(b"\0", b"\x25", 1), data_in=[8], lun=lun)
    assert r10.status == GOOD
    assert struct.unpack(">II", r10.data) == (blocks - 1, block_size)
    cdb = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    r16 = rig.command(cdb, data_in=[32], lun=lun)
    assert r16.status == GOOD
    last, size = struct.unpack_from(">QI", r16.data)
    assert (last + 1, size) == (blocks, block_size)
    assert r16.data[14] & 0x80  # LBPME: thin provisioned, UNMAP works


# -- data path ----------------------------------------------------------------


def test_write10_read10_multi_buffer(rig: ControllerRig, images: Path) -> None:
    data = pattern(24 * 512, 1)
    chunks = [data[:1000], data[1000:5000], data[5000:]]
    w = rig.command(cdb10(0x2A, 100, 24), data_out=chunks)
    assert (w.status, w.resid, w.used_len) == (GOOD, 0, 108)
    r = rig.command(cdb10(0x28, 100, 24), data_in=[512, 3000, 24 * 512 - 3512])
    assert (r.status, r.resid) == (GOOD, 0)
    assert r.data == data
    assert r.used_len == 108 + len(data)
    fd = os.open(images / "d512.img", os.O_RDONLY)
    try:
        assert os.pread(fd, len(data), 100 * 512) == data
    finally:
        os.close(fd)


def test_write16_read16_on_4k_disk_indirect(rig: ControllerRig, images: Path) -> None:
    data = pattern(5 * 4096, 2)
    w = rig.command(
        cdb16(0x8A, 2040, 5), lun=1, data_out=[data[:4096], data[4096:]], indirect=True
    )
    assert w.status == GOOD
    r = rig.command(cdb16(0x88, 2040, 5), lun=1, data_in=[4096] * 5, indirect=True)
    assert r.status == GOOD and r.data == data
    fd = os.open(images / "d4k.img", os.O_RDONLY)
    try:
        assert os.pread(fd, len(data), 2040 * 4096) == data
    finally:
        os.close(fd)


def test_fua_write_and_synchronize_cache(rig: ControllerRig, images: Path) -> None:
    data = pattern(4096, 3)
    w = rig.command(cdb10(0x2A, 300, 8, flags=0x08), data_out=[data])
    assert w.status == GOOD
    fd = os.open(images / "d512.img", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 300 * 512) == data
    finally:
        os.close(fd)
    assert rig.command(bytes([0x35]) + bytes(9)).status == GOOD
    assert rig.command(bytes([0x91]) + bytes(15)).status == GOOD
    assert rig.command(bytes([0x35]) + bytes(9), lun=1).status == GOOD


def test_read_only_disk_refuses_write(rig: ControllerRig, images: Path) -> None:
    before = (images / "ro.img").read_bytes()
    w = rig.command(cdb10(0x2A, 0, 1), lun=3, data_out=[b"\xee" * 512])
    assert_sense(w, DATA_PROTECT, 0x27)
    assert rig.command(cdb10(0x28, 0, 1), lun=3, data_in=[512]).status == GOOD
    assert (images / "ro.img").read_bytes() == before


def test_out_of_range_lba(rig: ControllerRig) -> None:
    r = rig.command(cdb10(0x28, 8190, 4), data_in=[2048])
    assert_sense(r, ILLEGAL_REQUEST, 0x21)
    r = rig.command(cdb16(0x8A, 1 << 40, 1), data_out=[bytes(512)])
    assert_sense(r, ILLEGAL_REQUEST, 0x21)


def test_unknown_opcode(rig: ControllerRig) -> None:
    r = rig.command(bytes([0x3B]) + bytes(9))  # WRITE BUFFER: not offered
    assert_sense(r, ILLEGAL_REQUEST, 0x20)
    r = rig.command(bytes([0xC7]) + bytes(15))  # vendor specific
    assert_sense(r, ILLEGAL_REQUEST, 0x20)


def test_missing_lun(rig: ControllerRig) -> None:
    r = rig.command(bytes([0x12, 0, 0, 0, 96, 0]), data_in=[96], lun=7)
    assert r.status == GOOD
    assert r.data[0] == 0x7F  # peripheral qualifier 3, type 1Fh
    assert_sense(rig.command(bytes(6), lun=7), ILLEGAL_REQUEST, 0x25)
    assert_sense(rig.command(cdb10(0x28, 0, 1), data_in=[512], lun=7), ILLEGAL_REQUEST, 0x25)


def test_bad_target(rig: ControllerRig) -> None:
    r = rig.command(bytes(6), target=1)
    assert r.response == BAD_TARGET
    r = rig.command(bytes([0xA0]) + bytes(11), data_in=[64], target=5)
    assert r.response == BAD_TARGET


def test_report_luns(rig: ControllerRig) -> None:
    cdb = bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2)
    r = rig.command(cdb, data_in=[64], lun=5)  # answered for a missing LUN too
    assert r.status == GOOD
    length = struct.unpack_from(">I", r.data)[0]
    assert length == 24
    assert [r.data[8 + 8 * i + 1] for i in range(3)] == [0, 1, 3]


def test_every_task_management_function(rig: ControllerRig) -> None:
    complete, rejected, incorrect_lun = 0, 11, 12
    expect = {0: complete, 1: complete, 2: rejected, 3: complete, 5: complete, 6: complete,
              7: complete}
    for subtype, response in expect.items():
        assert rig.control(tmf_request(subtype, lun=0)) == bytes([response]), subtype
    assert rig.control(tmf_request(0, lun=9)) == bytes([incorrect_lun])
    assert rig.control(tmf_request(0, target=2)) == bytes([BAD_TARGET])
    assert rig.control(tmf_request(42)) == bytes([rejected])
    # The logical unit reset of subtype 5 is seen by the next command on LUN 0.
    assert_sense(rig.command(bytes(6)), UNIT_ATTENTION, 0x29, 0x03)
    assert rig.command(bytes(6)).status == GOOD
    # I_T nexus reset: every LUN gets I_T NEXUS LOSS OCCURRED.
    assert rig.control(tmf_request(4)) == bytes([complete])
    for lun in (0, 1, 3):
        assert_sense(rig.command(bytes(6), lun=lun), UNIT_ATTENTION, 0x29, 0x07)
        assert rig.command(bytes(6), lun=lun).status == GOOD
    # Asynchronous notification query: nothing supported, answered OK.
    an = rig.control(struct.pack("<I8sI", 1, bytes([1, 0, 0x40, 0]) + bytes(4), 0), 5)
    assert an == struct.pack("<IB", 0, 0)


def test_unmap_punches_holes(rig: ControllerRig, images: Path) -> None:
    lba, blocks = 4096, 2048  # 1 MiB at 2 MiB
    data = b"\x5a" * (blocks * 512)
    assert rig.command(cdb10(0x2A, lba, blocks, flags=0x08), data_out=[data]).status == GOOD
    path = images / "d512.img"
    allocated = os.stat(path).st_blocks
    params = struct.pack(">HH4x", 6 + 16, 16) + struct.pack(">QI4x", lba, blocks)
    cdb = bytes([0x42, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", len(params)) + bytes(1)
    r = rig.command(cdb, data_out=[params])
    assert r.status == GOOD, r
    assert os.stat(path).st_blocks <= allocated - blocks  # st_blocks counts 512 bytes
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, len(data), lba * 512) == bytes(len(data))
    finally:
        os.close(fd)
    back = rig.command(cdb10(0x28, lba, 8), data_in=[4096])
    assert back.data == bytes(4096)


def test_power_on_unit_attention_on_first_start(tmp_path: Path) -> None:
    spec = ControllerSpec("c0", (Disk(tmp_path / "a.img"),), memory_size=2 * MIB)
    with EmulatorHarness.start([spec], first_start=True) as emu:
        rig = emu.rig
        # INQUIRY and REPORT LUNS do not consume a unit attention (SAM-5).
        assert rig.command(bytes([0x12, 0, 0, 0, 36, 0]), data_in=[36]).status == GOOD
        assert_sense(rig.command(bytes(6)), UNIT_ATTENTION, 0x29, 0x00)
        assert rig.command(bytes(6)).status == GOOD
        status, err = emu.stop()
    assert status == 0 and "Traceback" not in err
