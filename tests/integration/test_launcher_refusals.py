"""Front-end faults through the whole launcher: events, and no restart.

mplaunch runs in backend-only mode (the vhost-user sockets wait in the run
folder) and the test front-end plays QEMU on two controllers served by one
emulator, with guest I/O through its drivers.  Bad messages on the first
controller must come out as FRONTEND_REFUSED events on the management socket,
carrying the emulator's id; the emulator is never restarted (same pid, no
restarts in query-emulators); the first controller's session goes on after a
failure status, and the second controller goes on after the first is dropped.

A real QEMU cannot take the front-end's part here: it only sends good
messages.  tests/e2e covers the good path with QEMU; this file covers the
hostile one with the front-end that can send anything.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from emulators.vhost_user.constants import Request
from emulators.vhost_user.messages import MemoryRegion, MemoryTable, VringState
from launcher.libvirt import backend_socket
from tests.support.emulator_harness import ControllerRig, ControllerSpec, Disk, _make_rig
from tests.support.vhost_frontend import UVA_BASE, FrontendError
from tests.support.vm import DiskDef, Mplaunch, VmDef

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
MEMORY = 4 * MIB


def roundtrip(rig: ControllerRig, lba: int, seed: int) -> None:
    data = bytes((seed + i) & 0xFF for i in range(4096))
    w = rig.command(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 8, 0), data_out=[data])
    assert (w.response, w.status) == (0, 0), w
    r = rig.command(struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0), data_in=[4096])
    assert (r.response, r.status, r.data) == (0, 0, data)


def connect(run_dir: Path, cid: str, tmp: Path) -> ControllerRig:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(backend_socket(run_dir, cid)))
    rig = _make_rig(ControllerSpec(cid, (Disk(tmp / f"{cid}.unused"),), memory_size=MEMORY), sock)
    rig.frontend.init()
    rig.start()
    rig.command(bytes(6))  # TEST UNIT READY takes the power-on unit attention
    return rig


async def _drive(vm: VmDef, m: Mplaunch, tmp: Path) -> dict[str, Any]:
    loop = asyncio.get_running_loop()

    async def blocking(fn: Any, *args: Any) -> Any:
        return await loop.run_in_executor(None, fn, *args)

    await blocking(m.wait_stderr, r"controller scsi1 waits for QEMU")
    client = QMPClient("test")
    await client.connect(str(vm.run_dir / "mplaunch.sock"))
    seen: list[dict[str, Any]] = []

    async def pump() -> None:
        async for event in client.events:
            seen.append(dict(event))

    events = asyncio.create_task(pump())

    async def wait_events(count: int) -> None:
        for _ in range(200):
            if len([e for e in seen if e["event"] == "FRONTEND_REFUSED"]) >= count:
                return
            await asyncio.sleep(0.05)

    out: dict[str, Any] = {"events": seen}
    try:
        c0 = await blocking(connect, vm.run_dir, "scsi0", tmp)
        c1 = await blocking(connect, vm.run_dir, "scsi1", tmp)
        out["before"] = await client.execute("query-emulators")
        await blocking(roundtrip, c0, 1, 1)

        # A memory table its fd cannot hold, with REPLY_ACK asked: a failure status.
        table = MemoryTable((MemoryRegion(0, 2 * MEMORY, UVA_BASE, 0),))
        with pytest.raises(FrontendError, match="failed: ack 1"):
            await blocking(lambda: c0.frontend.request(
                Request.SET_MEM_TABLE, table, fds=(c0.frontend.memfd,), need_reply=True))
        await wait_events(1)
        await blocking(roundtrip, c0, 2, 2)  # the session goes on

        # A ring that does not exist, nothing asked: that controller is dropped.
        await blocking(c0.frontend.stop)
        await blocking(lambda: c0.frontend.request(Request.SET_VRING_NUM, VringState(9, 64)))
        with pytest.raises(FrontendError, match="closed"):
            await blocking(c0.frontend.request, Request.GET_FEATURES)
        await wait_events(2)
        await blocking(roundtrip, c1, 3, 3)  # the other controller goes on
        out["after"] = await client.execute("query-emulators")
        c0.close()
        c1.close()  # QEMU's last connection gone: the emulator becomes a fresh device
        await blocking(m.wait_stderr, r"emulator e0 is a fresh device again")
    finally:
        events.cancel()
        await client.disconnect()
    return out


def test_refused_messages_are_events_not_restarts(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "refusals")
    vm.emulators = {"e0": {}}
    vm.controllers = {"scsi0": ("e0", 1), "scsi1": ("e0", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0), DiskDef("d1", "scsi1", 0)]
    spec = vm.write()
    m = Mplaunch(spec, "--backends-only")
    try:
        out = asyncio.run(_drive(vm, m, tmp_path))
        m.signal(signal.SIGTERM)  # a backend outlives its QEMUs: it stops when told to
        rc = m.wait(30)
    finally:
        m.kill_all()
    assert rc == 0, m.stderr
    refused = [e["data"] for e in out["events"] if e["event"] == "FRONTEND_REFUSED"]
    assert [(r["id"], r["controller"], r["request"], r["action"]) for r in refused] == [
        ("e0", "scsi0", "SET_MEM_TABLE", "failure-ack"),
        ("e0", "scsi0", "SET_VRING_NUM", "disconnect"),
    ], refused
    assert "holds only" in refused[0]["reason"]
    assert "ring 9 does not exist" in refused[1]["reason"]
    [before], [after] = out["before"], out["after"]
    assert after["pid"] == before["pid"] and after["restarts"] == 0, (before, after)
    assert not [e for e in out["events"] if e["event"].startswith("EMULATOR_")], out["events"]
    time.sleep(0.1)
    m.assert_nothing_left(vm.run_dir)
