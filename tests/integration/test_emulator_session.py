"""The emulator process across queues, controllers, ring restarts and a hostile front-end.

- Several request queues and two controllers in one process all do I/O.
- A ring stop (GET_VRING_BASE) and restart at the returned bases, as QEMU
  does on a guest reset, loses nothing and goes on.
- A front-end that breaks the vhost-user protocol gets its connection
  closed (exit status 3, or the socket closes), never a traceback.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from emulators.vhost_user.codec import encode_request
from emulators.vhost_user.constants import HEADER, Request
from emulators.vhost_user.messages import MemoryRegion, MemoryTable, VringState
from tests.support.emulator_harness import (
    FIRST_REQUEST_QUEUE,
    ControllerRig,
    ControllerSpec,
    Disk,
    EmulatorHarness,
)
from tests.support.vhost_frontend import UVA_BASE, FrontendError

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
EXIT_PROTOCOL = 3


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def write_read(rig: ControllerRig, queue: int, lba: int, data: bytes, lun: int = 0) -> None:
    blocks = len(data) // 512
    w = rig.command(rw10(0x2A, lba, blocks), queue=queue, data_out=[data], lun=lun)
    assert w.status == 0
    r = rig.command(rw10(0x28, lba, blocks), queue=queue, data_in=[len(data)], lun=lun)
    assert (r.status, r.data) == (0, data)


def test_four_queues_two_controllers(tmp_path: Path) -> None:
    specs = [
        ControllerSpec("c0", (Disk(tmp_path / "a.img"),), queues=4, memory_size=6 * MIB),
        ControllerSpec("c1", (Disk(tmp_path / "b.img", lun=2),), queues=2),
    ]
    with EmulatorHarness.start(specs) as emu:
        expected: dict[tuple[str, int], bytes] = {}
        for rig in emu.rigs:
            lun = rig.spec.disks[0].lun
            for q in range(FIRST_REQUEST_QUEUE, rig.num_rings):
                data = os.urandom(8192)
                write_read(rig, q, 64 * q, data, lun)
                expected[(rig.spec.id, q)] = data
        # Queue depth on every queue at once: all kicked before any wait.
        heads = {}
        for rig in emu.rigs:
            lun = rig.spec.disks[0].lun
            for q in range(FIRST_REQUEST_QUEUE, rig.num_rings):
                heads[(rig.spec.id, q)] = [
                    rig.submit_command(rw10(0x28, 64 * q, 16), queue=q, data_in=[8192], lun=lun)
                    for _ in range(8)
                ]
        for rig in emu.rigs:
            for q in range(FIRST_REQUEST_QUEUE, rig.num_rings):
                for used_len, writable in rig.wait_all(q, heads[(rig.spec.id, q)]):
                    assert used_len == 108 + 8192
                    assert writable[1] == expected[(rig.spec.id, q)]
        status, err = emu.stop()
    assert status == 0 and "Traceback" not in err
    for (cid, q), data in expected.items():
        image = tmp_path / ("a.img" if cid == "c0" else "b.img")
        with open(image, "rb") as f:
            f.seek(64 * q * 512)
            assert f.read(len(data)) == data


def test_stop_and_restart_rings_at_their_bases(tmp_path: Path) -> None:
    spec = ControllerSpec("c0", (Disk(tmp_path / "a.img"),), queues=2)
    with EmulatorHarness.start([spec]) as emu:
        rig = emu.rig
        data = os.urandom(4096)
        write_read(rig, 2, 8, data)
        write_read(rig, 3, 16, data)
        rig.control(struct.pack("<II8sQ", 0, 0, bytes([1, 0, 0x40, 0, 0, 0, 0, 0]), 0))
        for cycle in range(3):
            bases = rig.stop()
            assert bases[2] == rig.drivers[2].avail_idx
            assert bases[3] == rig.drivers[3].avail_idx
            assert bases[0] == rig.drivers[0].avail_idx
            # While stopped, a kick is not served.
            while rig.frontend.wait_call(2, 0):
                pass  # signals left over from before the stop
            head = rig.submit_command(rw10(0x28, 8, 8), queue=2, data_in=[4096])
            assert not rig.frontend.wait_call(2, 0.1)
            assert rig.drivers[2].used_idx() == bases[2]
            rig.start(bases)
            used_len, writable = rig.wait(2, head)
            assert writable[1] == data, cycle
            write_read(rig, 3, 16 + cycle, os.urandom(512))
        status, err = emu.stop()
    assert status == 0 and "Traceback" not in err


# -- protocol abuse -------------------------------------------------------------


def _abuse(tmp_path: Path, send: bytes, fds: list[int] | None = None) -> None:
    """Send ``send`` after QEMU's init; the emulator must hang up cleanly."""
    spec = ControllerSpec("c0", (Disk(tmp_path / "a.img"),), memory_size=MIB)
    with EmulatorHarness.start([spec], start_rings=False) as emu:
        rig = emu.rig
        rig.frontend.send_raw(send, fds or [])
        # The connection is closed: a request gets no answer.
        with pytest.raises(FrontendError, match="closed"):
            rig.frontend.request(Request.GET_FEATURES)
        status = emu.wait_exit(5.0)
        _, err = emu.stop()
    assert status == EXIT_PROTOCOL, err
    assert "Traceback" not in err, err
    assert "closing" in err


def test_message_with_a_bad_size(tmp_path: Path) -> None:
    # SET_VRING_NUM carries 8 bytes; this one says 4.
    _abuse(tmp_path, HEADER.pack(Request.SET_VRING_NUM, 1, 4) + bytes(4))


def test_message_larger_than_any_request(tmp_path: Path) -> None:
    _abuse(tmp_path, HEADER.pack(Request.SET_OWNER, 1, 1 << 30) + bytes(64))


def test_unknown_request(tmp_path: Path) -> None:
    _abuse(tmp_path, HEADER.pack(999, 1, 8) + bytes(8))


def test_vring_index_out_of_range(tmp_path: Path) -> None:
    _abuse(tmp_path, encode_request(Request.SET_VRING_NUM, VringState(40, 128)))


def test_overlapping_memory_regions(tmp_path: Path) -> None:
    fd = os.memfd_create("overlap")
    os.ftruncate(fd, 2 * MIB)
    try:
        table = MemoryTable(
            (MemoryRegion(0, 2 * MIB, UVA_BASE, 0), MemoryRegion(MIB, MIB, UVA_BASE + 4 * MIB, 0))
        )
        _abuse(tmp_path, encode_request(Request.SET_MEM_TABLE, table, fds=[fd, fd]), [fd, fd])
    finally:
        os.close(fd)


def test_region_larger_than_its_file(tmp_path: Path) -> None:
    """64 MiB claimed over a 4 KiB memfd: refused, not mapped (no SIGBUS later)."""
    small = os.memfd_create("small")
    os.ftruncate(small, 4096)
    try:
        table = MemoryTable((MemoryRegion(0, 64 * MIB, UVA_BASE, 0),))
        _abuse(tmp_path, encode_request(Request.SET_MEM_TABLE, table, fds=[small]), [small])
    finally:
        os.close(small)


def test_half_a_message_then_hang_up(tmp_path: Path) -> None:
    spec = ControllerSpec("c0", (Disk(tmp_path / "a.img"),), memory_size=MIB)
    with EmulatorHarness.start([spec], start_rings=False) as emu:
        rig = emu.rig
        rig.frontend.sock.sendall(HEADER.pack(Request.SET_VRING_NUM, 1, 8)[:7])
        rig.frontend.sock.shutdown(socket.SHUT_RDWR)
        status = emu.wait_exit(5.0)
        _, err = emu.stop()
    assert status in (0, EXIT_PROTOCOL)
    assert "Traceback" not in err, err
