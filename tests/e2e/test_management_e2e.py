"""Management against a real VM through mplaunch.sock, with QEMU's own QMP
client library: a disk added, resized and removed is seen by the running
guest, and an emulator restart under guest I/O costs no error."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.qmp_client import ExecuteError

from tests.support.vm import DiskDef, Mplaunch, VmDef, lines_of, shell_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest")]

MiB = 1024 * 1024

# The guest reports each step on its console as it happens (MARK lines), so
# the test can act on it; the shell workload's own output comes only at the end.
GUEST = r"""
mark() { echo "MARK $*" > /dev/console; }
wait_for() {
  i=0; while ! eval "$1" && [ $i -lt 900 ]; do usleep 100000; i=$((i+1)); done; eval "$1"
}
mark ready
wait_for "[ -e /sys/block/sdb ]" || { mark noadd; dmesg | tail -5 > /dev/console; exit 1; }
mark added size=$(($(cat /sys/block/sdb/size) * 512))
dd if=/dev/urandom of=/tmp/x bs=4096 count=8 2>/dev/null
dd if=/tmp/x of=/dev/sdb bs=4096 count=8 oflag=direct 2>/dev/null
a=$(md5sum < /tmp/x); b=$(dd if=/dev/sdb bs=4096 count=8 iflag=direct 2>/dev/null | md5sum)
[ "$a" = "$b" ] && mark io ok || mark io bad
s0=$(cat /sys/block/sdb/size)
mark waiting-resize
wait_for '[ "$(cat /sys/block/sdb/size)" != "$s0" ]'
mark resized size=$(($(cat /sys/block/sdb/size) * 512))
wait_for '[ ! -e /sys/block/sdb ]' && mark removed || mark noremove
n=0; bad=0; end=$(( $(cut -d. -f1 /proc/uptime) + 6 ))
mark io-loop
while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do
  at=$((n % 64 * 8))
  dd if=/tmp/x of=/dev/sda bs=4096 count=8 seek=$at oflag=direct 2>/dev/null || bad=$((bad+1))
  c=$(dd if=/dev/sda bs=4096 count=8 skip=$at iflag=direct 2>/dev/null | md5sum)
  [ "$c" = "$a" ] || bad=$((bad+1)); n=$((n+1))
done
mark io-loop rounds=$n bad=$bad
"""


def _events(client: QMPClient, sink: list[dict[str, Any]]) -> asyncio.Task[None]:
    async def pump() -> None:
        async for event in client.events:
            sink.append(dict(event))
    return asyncio.create_task(pump())


async def _drive(vm: VmDef, m: Mplaunch, extra: Path) -> dict[str, Any]:
    client = QMPClient("test")
    await client.connect(str(vm.run_dir / "mplaunch.sock"))
    seen: list[dict[str, Any]] = []
    pump = _events(client, seen)
    out: dict[str, Any] = {"events": seen}
    loop = asyncio.get_running_loop()

    async def console(pattern: str, timeout: float = 120) -> None:
        await loop.run_in_executor(None, m.wait_console, pattern, timeout)

    try:
        await console(r"^MARK ready")
        status = await client.execute("query-status")
        assert status["running"] is True and status["name"] == vm.name, status
        # Errors first: each names what is wrong, nothing changes.
        for args, cls in (
            ({"id": "d0", "controller": "scsi0", "lun": 1, "image": str(extra)}, "GenericError"),
            ({"id": "dx", "controller": "nope", "lun": 1, "image": str(extra)}, "DeviceNotFound"),
            ({"id": "dx", "controller": "scsi0", "lun": 0, "image": str(extra)}, "GenericError"),
            ({"id": "dx", "controller": "scsi0", "lun": 1, "image": "/nonexistent.img"},
             "GenericError"),
        ):
            with pytest.raises(ExecuteError) as info:
                await client.execute("disk-add", args)
            assert info.value.error_class == cls, (args, info.value)
        # Two adds of one id at once: exactly one passes the checks.
        both = await asyncio.gather(*(
            client.execute("disk-add", {"id": "hot", "controller": "scsi0", "lun": lun,
                                        "image": str(extra), "readonly": False})
            for lun in (1, 2)
        ), return_exceptions=True)
        out["concurrent"] = both
        await console(r"^MARK added")
        await console(r"^MARK waiting-resize")
        with pytest.raises(ExecuteError):
            await client.execute("disk-resize", {"id": "hot", "size": 1 * MiB})  # shrinking
        await client.execute("disk-resize", {"id": "hot", "size": 24 * MiB})
        await console(r"^MARK resized")
        disks = {d["id"]: d for d in await client.execute("query-disks")}
        out["disks"] = disks
        await client.execute("disk-remove", {"id": "hot"})
        await console(r"^MARK removed")
        with pytest.raises(ExecuteError) as missing:
            await client.execute("disk-remove", {"id": "hot"})
        assert missing.value.error_class == "DeviceNotFound"
        await console(r"^MARK io-loop$")
        before = await client.execute("query-emulators")
        for _ in range(3):
            await client.execute("emulator-restart", {"id": "e0"})
            await asyncio.sleep(1.0)
        out["before"], out["after"] = before, await client.execute("query-emulators")
        await console(r"^MARK io-loop rounds")
    finally:
        pump.cancel()
        # The VM may already be gone (the guest powers off when done).
        with contextlib.suppress(EOFError, OSError):
            await client.disconnect()
    return out


def test_disk_add_resize_remove_and_restart_seen_by_the_guest(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "mgmt", workload="shell", extra_append=shell_cmd(GUEST))
    vm.emulators = {"e0": {}}
    vm.controllers = {"scsi0": ("e0", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0, size=8 * MiB)]
    extra = tmp_path / "extra.img"
    with open(extra, "wb") as f:
        f.truncate(16 * MiB)
    m = Mplaunch(vm.write(), console=vm.console)
    try:
        m.wait_stderr(r"QEMU started")
        deadline = time.monotonic() + 30
        while not (vm.run_dir / "mplaunch.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = asyncio.run(_drive(vm, m, extra))
        rc = m.wait(120)
    finally:
        if m.proc.poll() is None:
            m.signal(signal.SIGTERM)
            m.wait(60)
    text = vm.console.read_text()
    assert rc == 0, m.stderr
    assert "MARK added size=16777216" in text, text
    assert "MARK io ok" in text, text
    assert "MARK resized size=25165824" in text, text
    assert "MARK removed" in text, text
    assert "bad=0" in text.split("MARK io-loop rounds", 1)[1].splitlines()[0], text
    assert extra.stat().st_size == 24 * MiB
    assert out["disks"]["hot"]["size"] == 24 * MiB and out["disks"]["hot"]["lun"] in (1, 2)
    assert len(out["disks"]) == 2, out["disks"]
    refused = [x for x in out["concurrent"] if isinstance(x, ExecuteError)]
    assert len(refused) == 1 and "already in use" in str(refused[0]), out["concurrent"]
    assert out["after"][0]["restarts"] == out["before"][0]["restarts"] + 3
    names = [e["event"] for e in out["events"]]
    for name in ("DISK_ADDED", "DISK_RESIZED", "DISK_REMOVED", "EMULATOR_EXIT",
                 "EMULATOR_RESTART"):
        assert name in names, names
    assert lines_of(vm.console, "SHELL") == [{"rc": "0"}], text
    klog = [line for line in text.splitlines() if line.startswith("MPL KLOG")]
    assert all("Power-on or device reset occurred" in line for line in klog), klog
    m.assert_nothing_left(vm.run_dir)
