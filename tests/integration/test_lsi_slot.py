"""An ``lsi`` slot with real remote processes and a test proxy.

The slot runs in this process; the test plays the VM's x-pci-proxy-dev on
QEMU's end of the link (PCI config reads, encoded with the mpqemu codec),
so it can kill and freeze remotes at chosen moments, with a read waiting
for its reply or not, and watch the relay carry the link over: every read
gets exactly one answer, the LSI53C895A's ids, from whichever remote serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from launcher.lsi.slot import RemoteSlot
from launcher.mpqemu.codec import PciConfigRead, Ret, encode
from launcher.restart_policy import GiveUp, RunState
from launcher.runfolder import RunFolder
from launcher.slotbase import DiskChangeError
from launcher.spec import load_spec
from launcher.uidpool import UidPool
from launcher.vmcontrol import SupervisorControl
from tests.support.processes import alive

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")]

#: PCI vendor 0x1000 (LSI Logic), device 0x0012 (53C895A): config dword 0.
LSI_IDS = 0x0012_1000
HEADER = 16

SPEC = """\
[vm]
name = "lsi-slot"
accel = "tcg"
kernel = "vmlinuz"
console = "none"
memory = "128M"
run_dir = "run"
uid_range = "64800-64809"

[[emulator]]
id = "lsi-a"
kind = "lsi"
heartbeat_ms = 100
hang_timeout_ms = 1000

[[controller]]
id = "lsi0"
emulator = "lsi-a"

[[disk]]
id = "d0"
controller = "lsi0"
lun = 0
image = "d0.img"

[[disk]]
id = "d1"
controller = "lsi0"
lun = 3
image = "d1.img"
readonly = true
"""


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Rig:
    slot: RemoteSlot
    proxy: socket.socket
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    gave_up: list[GiveUp] = field(default_factory=list)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [data for n, data in self.events if n == name]

    async def until(self, what: Callable[[], Any], timeout: float, why: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := what()):
            assert time.monotonic() < deadline, f"{why}: not within {timeout} s; {self.events}"
            await asyncio.sleep(0.01)
        return value

    def send_read(self) -> None:
        self.proxy.sendall(encode(PciConfigRead(0, 0, 4)))

    async def reply(self, timeout: float) -> int:
        """The next RET's value, as the proxy would read it."""
        loop = asyncio.get_running_loop()
        data = b""
        deadline = loop.time() + timeout
        while len(data) < HEADER + 8:
            left = deadline - loop.time()
            assert left > 0, f"no reply within {timeout} s (got {data!r}); {self.events}"
            chunk = await asyncio.wait_for(loop.sock_recv(self.proxy, 64), left)
            assert chunk, "the relay closed the proxy's link"
            data += chunk
        assert len(data) == HEADER + 8, f"more than one reply: {data!r}"
        assert int.from_bytes(data[:4], "little") == Ret.command
        return int.from_bytes(data[HEADER:], "little")

    async def read_ids(self, timeout: float = 10) -> int:
        self.send_read()
        return await self.reply(timeout)


@contextlib.asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    for name in ("d0", "d1"):
        with open(tmp_path / f"{name}.img", "wb") as f:
            f.truncate(1 << 20)
    (tmp_path / "vm.toml").write_text(SPEC)
    spec = load_spec(tmp_path / "vm.toml")
    uids = UidPool(64800, 64809, owner="lsi-slot", folder=tmp_path / "uids")
    closed: list[str] = []

    async def give_up(action: GiveUp) -> None:
        handle.gave_up.append(action)

    with RunFolder.acquire(tmp_path / "run", "lsi-slot") as run:
        slot = RemoteSlot(spec, spec.emulators[0], run, give_up, uids)
        proxy = slot.qemu_ends["lsi0"].dup()  # what QEMU would inherit
        proxy.setblocking(False)
        handle = Rig(slot, proxy)
        slot.emit = lambda name, data: handle.events.append((name, data))
        task: asyncio.Task[None] | None = None
        try:
            slot.start_keepers(closed.append)
            slot.close_qemu_ends()
            await slot.start()
            task = asyncio.create_task(slot.supervise())
            yield handle
        finally:
            if task is not None:
                task.cancel()
                await asyncio.wait({task})
            pid = slot.remote.pid if slot.remote is not None else None
            await slot.stop()
            slot.close()
            proxy.close()
            assert pid is None or not alive(pid), "the remote outlived stop()"
            assert not uids.leases, "a uid is still leased after stop()"


def test_restarted_after_kill_hang_and_request_with_the_link_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        before = open_fds()
        async with rig(tmp_path) as r:
            slot = r.slot
            assert await r.read_ids() == LSI_IDS
            first = slot.remote
            assert first is not None and slot.uid == 64800
            snap = slot.snapshot()
            assert (snap.kind, snap.pid, snap.uid, snap.state) == ("lsi", first.pid, 64800,
                                                                   "running")
            assert snap.targets == (("d0", 0), ("d1", 3))
            await r.until(lambda: slot.snapshot().heartbeat_rtt_ms is not None, 5, "a ping")

            # SIGKILL while idle: a new remote, the same answer.
            os.kill(first.pid, signal.SIGKILL)
            await r.until(lambda: r.named("EMULATOR_RESTART"), 20, "a restart after SIGKILL")
            [exit1] = r.named("EMULATOR_EXIT")
            assert (exit1["pid"], exit1["signal"], exit1["reason"]) == (
                first.pid, "SIGKILL", "crashed")
            assert await r.read_ids() == LSI_IDS
            second = slot.remote
            assert second is not None and second.pid != first.pid

            # SIGSTOP with a read waiting: judged hung, killed, and the read is
            # sent again to the successor, which answers it once.
            os.kill(second.pid, signal.SIGSTOP)
            r.send_read()
            assert await r.reply(20) == LSI_IDS
            [hang] = r.named("EMULATOR_HANG")
            assert (hang["pid"], hang["why"]) == (second.pid, "no-answer")
            assert r.named("EMULATOR_EXIT")[1]["reason"] == "killed_hung"
            assert slot.relay is not None and slot.relay.stats.resent == 1
            assert len(r.named("EMULATOR_RESTART")) == 2

            # A restart asked for through management.
            control = SupervisorControl(SimpleNamespace(  # type: ignore[arg-type]
                slots=[slot], spec=slot.spec))
            third = slot.remote
            assert third is not None
            await control.emulator_restart("lsi-a")
            assert slot.remote is not None and slot.remote.pid != third.pid
            assert r.named("EMULATOR_EXIT")[2]["reason"] == "requested_restart"
            assert await r.read_ids() == LSI_IDS
            [entry] = await control.query_emulators()
            assert entry["kind"] == "lsi" and entry["targets"] == {"d0": 0, "d1": 3}
            assert entry["pid"] == slot.remote.pid and entry["restarts"] == 3
            assert not alive(first.pid) and not alive(second.pid) and not alive(third.pid)
            assert slot.policy.state is RunState.RUNNING and not r.gave_up
            stalls = slot.stats.stalls_ms
            print(f"\nlsi remote restarts: stalls {[round(s) for s in stalls]} ms, "
                  f"cold starts {[round(s) for s in slot.start_ms]} ms")
        assert open_fds() == before, "the slot left fds open"

    asyncio.run(scenario())


def test_disk_changes_are_refused_naming_the_kind(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            disk = r.slot.disk("d0")
            assert disk is not None and r.slot.disk("nope") is None
            for change in (r.slot.add_disk(disk), r.slot.remove_disk(disk),
                           r.slot.resize_disk(disk, 2 << 20)):
                with pytest.raises(DiskChangeError, match='of kind "lsi"'):
                    await change
            assert (tmp_path / "d0.img").stat().st_size == 1 << 20

    asyncio.run(scenario())
