"""Disks changed at run time, end to end inside one process: management
(SupervisorControl) -> the slot's disk methods -> a real ControlLink -> the
emulator's own command handler (an in-process Emulator, whose control
channel is pumped by the test's event loop, so the test decides when the
emulator answers).

- A late answer completes nothing: each RESULT is matched by its seq.
- A refused LUN_ADD leaves no fd open on either side.
- Concurrent disk-adds cannot both pass the id and LUN checks.
- A resize grows the file behind the held fd, and only after the emulator
  agreed; a refusal leaves the file as it was.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from emulators.process import Emulator
from launcher import slots
from launcher.heartbeat import protocol as proto
from launcher.heartbeat.link import ControlLink, LinkClosed, control_pair
from launcher.management.commands import CommandError
from launcher.slots import EmulatorSlot
from launcher.spec import DiskSpec
from launcher.vmcontrol import SupervisorControl

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


def _image(path: Path, size: int = MIB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _open_fds() -> int:
    """Fds open now; objects other tests left to the garbage collector (an
    in-process emulator's epoll fd) are collected first, so that their fds
    cannot close between two counts and look like a fix of our own."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Rig:
    """One VM with one emulator (id e0) serving controller c0, LUN 0 = disk d0."""

    control: SupervisorControl
    slot: EmulatorSlot
    emulator: Emulator
    link: ControlLink
    d0: Path
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def pump(self) -> None:
        """Let the emulator answer from now on (until now its messages wait)."""
        assert self.emulator.control is not None
        asyncio.get_running_loop().add_reader(
            self.emulator.control.fileno(), self.emulator._on_control)

    def emulator_luns(self) -> set[int]:
        return set(self.emulator.controllers[0].target.scsi.luns)


@asynccontextmanager
async def rig(tmp_path: Path, *, hidden_lun: bool = False, pump: bool = True
              ) -> AsyncIterator[Rig]:
    """``hidden_lun``: the emulator also serves LUN 1, which the launcher does
    not know of, so only the emulator's own check refuses a LUN_ADD there."""
    d0 = _image(tmp_path / "d0.img")
    ours, theirs = control_pair()
    guest_end, emulator_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    luns = [LunConfig(0, "d0", os.open(d0, os.O_RDWR), False, 512)]
    if hidden_lun:
        hidden = _image(tmp_path / "hidden.img")
        luns.append(LunConfig(1, "hidden", os.open(hidden, os.O_RDWR), False, 512))
    config = EmulatorConfig(
        "e0", (ControllerConfig("c0", emulator_end.detach(), 1, tuple(luns)),),
        control_fd=theirs.detach(),
    )
    emulator = Emulator(config)
    link = ControlLink("e0", ours)
    slot = EmulatorSlot.__new__(EmulatorSlot)  # only its disk methods are used
    slot.id = "e0"
    slot.disks = {"c0": [DiskSpec("d0", "c0", 0, d0, "raw", False, 512)]}
    slot.disk_fds = {"d0": os.open(d0, os.O_RDWR)}
    slot._commands = asyncio.Lock()
    slot.hot_standby = None  # no hot standby to drop before a change
    slot.on_change = lambda: None  # no vm-state.json to keep here
    # No pid: a fault point armed by a test never signals anything here.
    slot.occupant = SimpleNamespace(  # type: ignore[assignment]
        link=link, proc=SimpleNamespace(pid=None))
    events: list[tuple[str, dict[str, Any]]] = []
    vm = SimpleNamespace(image_dirs=(tmp_path.resolve(),), devices=())
    supervisor = SimpleNamespace(slots=[slot], emit=lambda name, data: events.append((name, data)),
                                 spec=SimpleNamespace(vm=vm), incoming_pending=False,
                                 migration=None)  # no migration under way
    control = SupervisorControl(supervisor)  # type: ignore[arg-type]
    r = Rig(control, slot, emulator, link, d0, events)
    if pump:
        r.pump()
    try:
        yield r
    finally:
        assert emulator.control is not None
        asyncio.get_running_loop().remove_reader(emulator.control.fileno())
        link.close()
        for c in emulator.controllers:
            c.close()
        emulator.control.close()
        guest_end.close()
        for fd in slot.disk_fds.values():
            os.close(fd)


def run(test: Callable[[], Any]) -> None:
    asyncio.run(test())


# -- replies are matched by seq ----------------------------------------------------


def test_a_late_answer_does_not_complete_the_next_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slots, "COMMAND_TIMEOUT", 0.3)

    async def test() -> None:
        async with rig(tmp_path, hidden_lun=True, pump=False) as r:
            # The emulator is slow: the removal times out, its answer comes later.
            with pytest.raises(CommandError, match="did not answer"):
                await r.control.disk_remove("d0")
            r.pump()
            # The emulator answers the removal (ok) first, then refuses this add:
            # LUN 1 is taken on its side. The late "ok" must not answer the add.
            _image(tmp_path / "new.img")
            with pytest.raises(CommandError, match="refused"):
                await r.control.disk_add("d5", "c0", 1, str(tmp_path / "new.img"))
            assert r.slot.disk("d5") is None

    run(test)


def test_an_add_left_in_doubt_keeps_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer to a LUN add (the emulator ended or hung mid-change) may mean
    the guest was already told of the disk: it stays, for the successor."""
    monkeypatch.setattr(slots, "COMMAND_TIMEOUT", 0.3)

    async def test() -> None:
        async with rig(tmp_path, pump=False) as r:
            _image(tmp_path / "new.img")
            await r.control.disk_add("d5", "c0", 1, str(tmp_path / "new.img"))
            disk = r.slot.disk("d5")
            assert disk is not None and disk.lun == 1
            assert "d5" in r.slot.disk_fds

    run(test)


def test_link_matches_results_by_seq() -> None:
    async def test() -> None:
        ours, theirs = control_pair()
        link = ControlLink("e0", ours)
        try:
            with pytest.raises(TimeoutError):
                await link.command(proto.LunRemove("c0", 1), 0.05)
            second = asyncio.create_task(link.command(proto.LunRemove("c0", 2), 5))
            await asyncio.sleep(0.05)
            first_sent = proto.decode(theirs.recv(proto.MAX_DATAGRAM), [])
            second_sent = proto.decode(theirs.recv(proto.MAX_DATAGRAM), [])
            assert isinstance(first_sent, proto.LunRemove)
            assert isinstance(second_sent, proto.LunRemove)
            assert first_sent.seq != second_sent.seq
            theirs.send(proto.encode(proto.Result(True, seq=first_sent.seq))[0])  # late
            theirs.send(proto.encode(proto.Result(False, "no LUN 2", second_sent.seq))[0])
            assert await second == proto.Result(False, "no LUN 2", second_sent.seq)
            assert not link.hung.done()  # a late answer is no protocol violation
            # An answer to a command never sent is one.
            theirs.send(proto.encode(proto.Result(True, seq=second_sent.seq + 7))[0])
            verdict = await asyncio.wait_for(link.hung, 5)
            assert "never sent" in verdict.reason
        finally:
            link.close()
            theirs.close()

    run(test)


def test_a_command_in_flight_ends_when_the_link_closes() -> None:
    async def test() -> None:
        ours, theirs = control_pair()
        link = ControlLink("e0", ours)
        try:
            pending = asyncio.create_task(link.command(proto.LunRemove("c0", 1), 30))
            await asyncio.sleep(0.05)
            link.close()  # the emulator died: its answer will never come
            with pytest.raises(LinkClosed):
                await asyncio.wait_for(pending, 2)
            with pytest.raises(LinkClosed):
                await link.command(proto.LunRemove("c0", 1), 30)
        finally:
            link.close()
            theirs.close()

    run(test)


# -- fds -----------------------------------------------------------------------------


def test_a_refused_lun_add_leaves_no_fd_open(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path, hidden_lun=True) as r:
            _image(tmp_path / "new.img")
            before = _open_fds()
            with pytest.raises(CommandError, match="LUN 1 is already in use"):
                await r.control.disk_add("d5", "c0", 1, str(tmp_path / "new.img"))
            # Neither the launcher's fd nor the copy the emulator received is open.
            assert _open_fds() == before
            assert r.emulator_luns() == {0, 1}

    run(test)


def test_the_emulator_checks_a_new_lun_by_the_shared_rules(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            fd = os.open(_image(tmp_path / "new.img"), os.O_RDWR)
            before = _open_fds()
            result = await r.link.command(proto.LunAdd("c0", 300, "d5", fd, False, 512), 5)
            assert not result.ok and "lun 300 is out of range 0..255" in result.error
            result = await r.link.command(proto.LunAdd("c0", 2, "D5!", fd, False, 512), 5)
            assert not result.ok and "disk_id 'D5!' must be 1 to 32 characters" in result.error
            result = await r.link.command(proto.LunAdd("c0", 2, "d5", fd, False, 1024), 5)
            assert not result.ok and "block_size 1024 must be one of 512, 4096" in result.error
            result = await r.link.command(proto.LunAdd("c9", 2, "d5", fd, False, 512), 5)
            assert not result.ok and "no controller 'c9'" in result.error
            assert _open_fds() == before  # every copy the emulator received was closed
            result = await r.link.command(proto.LunAdd("c0", 2, "d5", fd, True, 4096), 5)
            assert result.ok
            assert r.emulator_luns() == {0, 2}
            os.close(fd)

    run(test)


# -- concurrent changes --------------------------------------------------------------


def test_concurrent_adds_cannot_both_pass_the_checks(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            image = str(_image(tmp_path / "new.img"))
            same_id = await asyncio.gather(
                r.control.disk_add("d5", "c0", 2, image, readonly=True),
                r.control.disk_add("d5", "c0", 3, image, readonly=True),
                return_exceptions=True,
            )
            assert sum(x is None for x in same_id) == 1, same_id
            assert any("disk id 'd5' is already in use" in str(x) for x in same_id), same_id
            same_lun = await asyncio.gather(
                r.control.disk_add("d6", "c0", 4, image, readonly=True),
                r.control.disk_add("d7", "c0", 4, image, readonly=True),
                return_exceptions=True,
            )
            assert sum(x is None for x in same_lun) == 1, same_lun
            assert any("LUN 4 is already in use on c0" in str(x) for x in same_lun), same_lun
            ids = [d.id for d in r.slot.disks["c0"]]
            assert len(ids) == len(set(ids)) == 3, ids
            assert r.emulator_luns() == {0, 2, 4}

    run(test)


# -- resize --------------------------------------------------------------------------


def test_resize_grows_the_held_file_not_the_path(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            # The path now names another file; the disk is still the held one.
            held = tmp_path / "held.img"
            r.d0.rename(held)
            impostor = _image(r.d0, 4096)
            await r.control.disk_resize("d0", 2 * MIB)
            assert held.stat().st_size == 2 * MIB
            assert impostor.stat().st_size == 4096
            unit = r.emulator.controllers[0].target.scsi.luns[0]
            assert unit.num_blocks * unit.block_size == 2 * MIB
            assert ("DISK_RESIZED", {"id": "d0", "old_size": MIB, "new_size": 2 * MIB}) in r.events

    run(test)


def test_a_refused_resize_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            # The emulator no longer serves LUN 0 (a stale launcher record): it refuses.
            r.emulator.controllers[0].remove_lun(0)
            with pytest.raises(CommandError, match="refused.*no LUN 0"):
                await r.control.disk_resize("d0", 2 * MIB)
            assert r.d0.stat().st_size == MIB
            assert not [e for e in r.events if e[0] == "DISK_RESIZED"]

    run(test)


def test_resize_refusals_checked_before_anything_changes(tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(tmp_path) as r:
            for size, why in ((MIB // 2, "shrinking would lose data"),
                              (MIB + 100, "not a positive multiple of the block size 512")):
                with pytest.raises(CommandError, match=why):
                    await r.control.disk_resize("d0", size)
                assert r.d0.stat().st_size == MIB
            # The emulator's own check: LUN_RESIZE_CHECK changes nothing, LUN_RESIZE
            # refuses a size the file does not have.
            result = await r.link.command(proto.LunResizeCheck("c0", 0, MIB // 2), 5)
            assert not result.ok and "shrinking" in result.error
            result = await r.link.command(proto.LunResizeCheck("c0", 0, 4 * MIB), 5)
            assert result.ok
            result = await r.link.command(proto.LunResize("c0", 0, 4 * MIB), 5)
            assert not result.ok and f"holds {MIB} bytes, not {4 * MIB}" in result.error
            unit = r.emulator.controllers[0].target.scsi.luns[0]
            assert unit.num_blocks * unit.block_size == MIB

    run(test)
