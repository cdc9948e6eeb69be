"""FdBackend on real files: scatter-gather, IOV_MAX chunking, EOF, ENOSPC, discard."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from emulators.scsi import sense as S
from emulators.scsi.backend import BackendError, BackendFailure, FdBackend
from emulators.scsi.iov import gather, iov_len, iov_skip, iov_slice, scatter
from emulators.scsi.lun import LogicalUnit, LunState
from emulators.scsi.virtio_scsi import VirtioScsiTarget

from .test_scsi_support import Rig, cdb10, make_disk

MiB = 1 << 20


def test_many_small_buffers_beyond_iov_max(tmp_path: Path) -> None:
    data = os.urandom(3000 * 16)
    fd = make_disk(tmp_path, MiB, fill=data)
    b = FdBackend(fd)
    store = bytearray(len(data))
    views = [memoryview(store)[i:i + 16] for i in range(0, len(data), 16)]
    assert b.readv(0, views) == len(data) and store == data
    new = os.urandom(len(data))
    src = [memoryview(new)[i:i + 16] for i in range(0, len(new), 16)]
    assert b.writev(4096, src) == len(new)
    assert os.pread(fd, len(new), 4096) == new


def test_eof_inside_disk_is_a_read_error(tmp_path: Path) -> None:
    fd = make_disk(tmp_path, 1000)
    b = FdBackend(fd)
    with pytest.raises(BackendError) as e:
        b.readv(512, [memoryview(bytearray(1024))])
    assert e.value.kind is BackendFailure.READ and e.value.offset == 1000


def test_enospc_is_space_allocation_failure() -> None:
    fd = os.open("/dev/full", os.O_RDWR)
    try:
        b = FdBackend(fd)
        with pytest.raises(BackendError) as e:
            b.writev(0, [memoryview(bytes(512))])
        assert e.value.kind is BackendFailure.NO_SPACE
        lu = LogicalUnit(b, "full", LunState())
        lu.num_blocks = 100  # /dev/full has no size; pretend it is a disk
        t = VirtioScsiTarget({0: lu})
        r = t.scsi.execute(0, cdb10(0x2A, 0, 1).ljust(32, b"\0"), [memoryview(bytes(512))], [])
        assert r.status == 2 and r.sense == S.SPACE_ALLOCATION_FAILED
    finally:
        os.close(fd)


def test_readonly_backend_refuses(tmp_path: Path) -> None:
    fd = make_disk(tmp_path, MiB)
    b = FdBackend(fd, readonly=True)
    with pytest.raises(BackendError) as e:
        b.writev(0, [memoryview(bytes(1))])
    assert e.value.kind is BackendFailure.READ_ONLY
    with pytest.raises(BackendError):
        b.discard(0, 4096)


def test_discard_punches_and_keeps_size(tmp_path: Path) -> None:
    fd = make_disk(tmp_path, MiB, fill=os.urandom(MiB))
    os.fsync(fd)
    b = FdBackend(fd)
    before = os.fstat(fd).st_blocks
    b.discard(0, MiB // 2)
    assert os.fstat(fd).st_blocks < before and os.fstat(fd).st_size == MiB
    assert os.pread(fd, MiB // 2, 0) == bytes(MiB // 2)


def test_discard_falls_back_to_zeroes(tmp_path: Path) -> None:
    fd = make_disk(tmp_path, MiB, fill=b"\xff" * MiB)
    b = FdBackend(fd)

    def unsupported(fd: int, mode: int, off: int, length: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    b._fallocate = unsupported
    b.discard(100, 5000)
    assert os.pread(fd, 5200, 0) == b"\xff" * 100 + bytes(5000) + b"\xff" * 100
    assert b._fallocate is None  # not retried per call


def test_write_zeroes_large(tmp_path: Path) -> None:
    fd = make_disk(tmp_path, 3 * MiB, fill=b"\x01" * (3 * MiB))
    FdBackend(fd).write_zeroes(10, 2 * MiB + 7)
    assert os.pread(fd, 2 * MiB + 7, 10) == bytes(2 * MiB + 7)
    assert os.pread(fd, 1, 9) == b"\x01" and os.pread(fd, 1, 2 * MiB + 17) == b"\x01"


def test_block_size_validated(tmp_path: Path) -> None:
    fd = make_disk(tmp_path, MiB)
    with pytest.raises(ValueError):
        FdBackend(fd, block_size=1024)


def test_iov_helpers() -> None:
    a, b, c = bytearray(b"abcd"), bytearray(b"efg"), bytearray(b"hijkl")
    views = [memoryview(a), memoryview(b), memoryview(c)]
    assert iov_len(views) == 12
    assert b"".join(bytes(v) for v in iov_slice(views, 2, 7)) == b"cdefghi"
    assert b"".join(bytes(v) for v in iov_slice(views, 10, 99)) == b"kl"
    assert iov_slice(views, 50, 3) == [] and iov_slice(views, 0, 0) == []
    assert b"".join(bytes(v) for v in iov_skip(views, 5)) == b"fghijkl"
    assert gather(views, 3, 3) == b"def"
    assert scatter(b"XYZW", views, 3) == 4 and bytes(a + b) == b"abcXYZW"
    assert scatter(b"0123456789abcdef", views) == 12


def test_rig_handles_4k_unmap_granularity(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size=MiB, block_size=4096, fill=os.urandom(MiB))
    params = bytes((0, 22, 0, 16)) + bytes(4) + (3).to_bytes(8, "big") + (2).to_bytes(4, "big")
    params += bytes(4)
    r = rig.cmd(bytes((0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0)), data_out=params)
    assert r.status == 0 and os.pread(rig.fd, 8192, 3 * 4096) == bytes(8192)
