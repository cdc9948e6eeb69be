"""Shared rig for the SCSI tests: a real temp file as the disk, driven through
the virtio-scsi request layer exactly as the queue layer calls it."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from emulators.scsi.backend import FdBackend
from emulators.scsi.lun import LogicalUnit, LunState
from emulators.scsi.sense import Sense
from emulators.scsi.virtio_scsi import VirtioScsiTarget, encode_lun_field

RESP_SIZE = 12 + 96


@dataclass
class Reply:
    used: int
    sense_len: int
    resid: int
    status: int
    response: int
    sense: bytes
    data: bytes

    @property
    def key_asc_ascq(self) -> tuple[int, int, int]:
        assert self.sense_len >= 14, f"no sense data (status {self.status})"
        return self.sense[2] & 0x0F, self.sense[12], self.sense[13]

    def is_sense(self, sense: Sense) -> bool:
        return self.status == 2 and self.key_asc_ascq == (sense.key, sense.asc, sense.ascq)

    @property
    def field_pointer(self) -> int:
        assert self.sense[15] & 0x80, "SKSV not set"
        return int(struct.unpack_from(">H", self.sense, 16)[0])


def make_disk(tmp_path: Path, size: int, name: str = "disk", fill: bytes | None = None) -> int:
    path = tmp_path / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    if fill is not None:
        os.pwrite(fd, fill, 0)
    return fd


class Rig:
    """A target with LUNs backed by temp files; commands go through handle_request."""

    def __init__(
        self,
        tmp_path: Path,
        size: int = 1 << 20,
        block_size: int = 512,
        readonly: bool = False,
        luns: tuple[int, ...] = (0,),
        initial_ua: bool = False,
        unmap: bool | None = None,
        fill: bytes | None = None,
    ) -> None:
        self.fds: dict[int, int] = {}
        lus: dict[int, LogicalUnit] = {}
        for n in luns:
            fd = make_disk(tmp_path, size, f"disk{n}", fill)
            self.fds[n] = fd
            backend = FdBackend(fd, block_size=block_size, readonly=readonly)
            lus[n] = LogicalUnit(
                backend, f"disk-{n}", LunState.fresh(initial_ua), unmap=unmap
            )
        self.lus = lus
        self.target = VirtioScsiTarget(lus)
        self.fd = self.fds[luns[0]] if luns else -1

    def lu(self, n: int = 0) -> LogicalUnit:
        return self.lus[n]

    def cmd(
        self,
        cdb: bytes,
        data_out: bytes = b"",
        data_in_len: int = 0,
        lun: int = 0,
        lun_field: bytes | None = None,
        split_at: int | None = None,
    ) -> Reply:
        field = lun_field if lun_field is not None else encode_lun_field(lun)
        header = field + struct.pack("<QBBB", 7, 0, 0, 0) + cdb.ljust(32, b"\0")
        raw = header + data_out
        if split_at is None:
            readable = [memoryview(bytearray(header))]
            if data_out:
                readable.append(memoryview(bytearray(data_out)))
        else:
            readable = [
                memoryview(bytearray(raw[:split_at])),
                memoryview(bytearray(raw[split_at:])),
            ]
        resp = bytearray(RESP_SIZE)
        data = bytearray(data_in_len)
        writable = [memoryview(resp)]
        if data_in_len:
            writable.append(memoryview(data))
        used = self.target.handle_request(readable, writable)
        return parse_reply(used, resp, bytes(data))


def parse_reply(used: int, resp: bytes | bytearray, data: bytes) -> Reply:
    sense_len, resid, _qual, status, response = struct.unpack_from("<IIHBB", resp)
    return Reply(used, sense_len, resid, status, response, bytes(resp[12:12 + sense_len]), data)


def cdb10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def cdb16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def cdb12(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, n, 0, 0)


def cdb6(op: int, lba: int, n: int) -> bytes:
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n, 0))
