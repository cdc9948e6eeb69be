"""Fault-point sweep: every registered point fires once, under the guest's
write-verify workload, and the guest notices nothing.

Theory of operation. One VM (two emulators, one controller and one disk
each, plus the script disk) runs the chaos guest (tests/chaos/guest.py):
random 4 KiB O_DIRECT writes read back and compared on both disks, a ledger
the host checks against the images afterwards. mplaunch is started with
``MPLAUNCH_FAULT`` holding every point of :data:`emulators.faults.POINTS`
once, in the order of :data:`PLAN`; the launcher's fault plan
(launcher/faultplan.py) hands one entry at a time to one process, and moves
on once it fired. The test follows the plan's lines on mplaunch's stderr and
makes each entry's point reachable:

* most emulator points need the process to serve: the holder is usually the
  freshly started warm spare, so the test asks for a restart of the slot
  (``emulator-restart``) and the spare takes over, replays the session and
  serves the guest's I/O;
* the control points of disk changes need a disk change on the holder's
  slot: the test adds, resizes and removes a small extra disk there, and
  after each change waits until the guest shows the disk as management has
  it (the guest's `MPL SCSI` lines): it must, whatever step the change was
  killed at, and a change made while the guest still probes the disk would
  fail the guest's own commands;
* ring stop, a ring's fresh start and vhost-user answers (a resumed session
  sends none) happen when the guest reboots: those points come last, one
  reboot each (a device reset QEMU never sends: FRONTEND_ONLY);
* launcher points kill the spare or the new process at a step of the
  hand-over or of a cold start: a restart (with or without a spare ready)
  reaches them.

For every entry the point must be reached (the process that passed it says
so on stderr before its SIGKILL, and the plan sees that SIGKILL), and at the
end the guest must report no mismatch, no SCSI error, abort, reset or
timeout in its kernel log, the images must hold what it wrote, and nothing
may be left running. The outcome table is printed (docs/recovery.md keeps a
copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.qmp_client import ExecuteError

from emulators import faults
from tests.chaos import guest, verdict
from tests.chaos.driver import Fleet, alive
from tests.chaos.vms import two_emulator_vm
from tests.support.vm import Mplaunch, VmDef, lines_of

MiB = 1024 * 1024
UIDS = "64760-64769"
COUNT = 8
#: Points reached when the guest reboots (the device is stopped, reset and
#: set up anew): one reboot each, after the main boot.
REBOOT_POINTS = ("ring.stop.before_reply", "ring.stop.after_reply", "ring.fresh.slot_cleared",
                 "ring.fresh.based", "vhost.reply.before", "vhost.reply.after")
#: Points QEMU never makes the emulator pass: it sends no RESET_OWNER or
#: RESET_DEVICE to vhost-user-scsi when the guest resets. Swept with a test
#: front-end instead (tests/integration/test_fault_point_reset.py).
FRONTEND_ONLY = ("device.reset",)
#: Points of the disk-change control commands: reached through a disk change
#: on the holder's slot.
DISK_POINTS = {
    "events.save.before": "add", "events.save.after": "add",
    "control.lun_add.before_reply": "add", "control.lun_add.after_reply": "add",
    "control.lun_remove.before_reply": "remove", "control.lun_remove.after_reply": "remove",
    "control.lun_resize_check.before_reply": "resize",
    "control.lun_resize_check.after_reply": "resize",
    "control.lun_resize.before_reply": "resize", "control.lun_resize.after_reply": "resize",
    "disk.resize.after_grow": "resize",
}
#: Hand-over points first, each followed by a cold-start point: a hand-over
#: killed at a step makes the next start a cold one.
LAUNCHER_ORDER = ("handover.assign_sent", "cold.process_started", "handover.replay_sent",
                  "cold.occupant_installed", "handover.answer_received",
                  "handover.occupant_installed")
MAIN = tuple(p for p in faults.EMULATOR_POINTS
             if p not in REBOOT_POINTS and p not in DISK_POINTS and p not in FRONTEND_ONLY)
PLAN: tuple[str, ...] = (*MAIN, *LAUNCHER_ORDER,
                         *(p for p in DISK_POINTS if p in faults.POINTS), *REBOOT_POINTS)
#: MPL_SWEEP_POINTS="a,b" sweeps only those points (to look into one).
ONLY = [p for p in os.environ.get("MPL_SWEEP_POINTS", "").split(",") if p]
SWEPT: tuple[str, ...] = tuple(p for p in PLAN if not ONLY or p in ONLY)
BOOTS = 1 + sum(1 for p in SWEPT if p in REBOOT_POINTS)
SHORT_BOOT_S = 8
REACH_TIMEOUT = 12.0
#: Extra disks added at run time, one per controller (sizes apart from the
#: workload's disks, which the ledger tells apart by size).
HOT = {"e0": ("hot0", "scsi0", 1), "e1": ("hot1", "scsi1", 2)}
#: The guest's SCSI host number of each controller (probed in the spec's order).
HOST = {"scsi0": 0, "scsi1": 1}
#: How long the guest may take to show a disk change before the next one.
SETTLE_S = 15.0

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest"), pytest.mark.timeout(900)]

_GIVEN = re.compile(r"fault plan: entry (\d+)/\d+ (\S+)@\d+ given to pid (\d+)")
_ARMED = re.compile(r"fault plan: entry (\d+)/\d+ (\S+)@\d+ armed in the launcher")
_SPENT = re.compile(r"fault plan: entry (\d+)/\d+ (\S+)@\d+ spent \((.*)\)")
_REACHED = re.compile(r"mplaunch-fault: point (\S+) reached, (?:pid (\d+) kills itself|"
                      r"launcher kills pid (\d+))")
_STARTED = re.compile(r"emulator (\S+) (?:started|restarted) \(pid (\d+)")


def _reach_timeout(point: str) -> float:
    """How long a nudge may take to reach `point` before the next one."""
    if point in REBOOT_POINTS:
        return 60.0  # the boot ends (token or timer), the guest reboots
    if point in DISK_POINTS:
        return 4.0  # the disk change answered: the point fired already or not at all
    return REACH_TIMEOUT


def test_plan_covers_every_point_once() -> None:
    assert sorted(PLAN + FRONTEND_ONLY) == sorted(faults.POINTS)


def sweep_vm(folder: Path, seed: int) -> VmDef:
    vm = two_emulator_vm(folder, "sweep", UIDS,
                         guest.script([0, SHORT_BOOT_S], COUNT, BOOTS, 16 * MiB, seed,
                                      watch_disks=True))
    for emulator, (disk_id, _, _) in HOT.items():
        with open(folder / f"{disk_id}.img", "wb") as f:
            f.truncate(2 * MiB if emulator == "e0" else 3 * MiB)
    return vm


@dataclass
class Outcome:
    entry: int
    point: str
    holder: str  # "pid N" or "launcher"
    action: str = ""
    reached: bool = False
    victim: int | None = None
    seconds: float = 0.0
    note: str = ""

    def row(self) -> str:
        took = f"{self.seconds:.1f} s" if self.reached else "-"
        return (f"| {self.entry} | `{self.point}` | {self.action} | "
                f"{'killed pid ' + str(self.victim) if self.reached else 'NOT REACHED'} | "
                f"{took} | {self.note} |")


class Sweep:
    def __init__(self, m: Mplaunch, vm: VmDef) -> None:
        self.m = m
        self.vm = vm
        self.fleet = Fleet(m, list(vm.emulators))
        self.sock = vm.run_dir / "mplaunch.sock"
        self.hot_size = {e: (2 if e == "e0" else 3) * MiB for e in HOT}
        self.outcomes: list[Outcome] = []
        self.boot_stopped = 0

    # -- management

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        async def run() -> Any:
            client = QMPClient("sweep")
            await client.connect(str(self.sock))
            try:
                return await client.execute(command, arguments)
            finally:
                with contextlib.suppress(Exception):
                    await client.disconnect()
        return asyncio.run(run())

    def try_qmp(self, command: str, arguments: dict[str, Any] | None = None) -> str:
        """Run a command whose failure is an expected outcome (the emulator it
        reaches may be the one that dies); return the error, or ""."""
        try:
            self.qmp(command, arguments)
        except ExecuteError as e:
            return str(e)
        return ""

    # -- what the log says

    def lines(self) -> list[str]:
        return list(self.m.stderr_lines)

    def wait_line(self, rx: re.Pattern[str], after: int, timeout: float,
                  check: Any = None) -> tuple[re.Match[str], int] | None:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            for i in range(after, len(lines)):
                if (mm := rx.search(lines[i])) and (check is None or check(mm)):
                    return mm, i
            assert self.m.proc.poll() is None, f"mplaunch ended:\n{self.m.stderr[-6000:]}"
            if time.monotonic() >= deadline:
                return None
            self.m.descendants()
            time.sleep(0.05)

    def occupants(self) -> dict[int, str]:
        """pid -> emulator id of the current occupants."""
        return {pid: eid for eid, pid in self.fleet.current_pids().items()}

    def wait_spare(self, timeout: float = 20.0) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.fleet.spare_pid()
            if pid is not None:
                return pid
            time.sleep(0.05)
        return None

    def slot_of(self, pid: int) -> str | None:
        return self.occupants().get(pid)

    def standby_of(self, pid: int) -> str | None:
        """The emulator `pid` is the hot standby of, if it is one."""
        rx = re.compile(rf"emulator (\S+): standby pid {pid} follows pid")
        found = [mm.group(1) for line in self.m.stderr_lines if (mm := rx.search(line))]
        return found[-1] if found else None

    def make_occupant(self, pid: int, prefer: str = "e1") -> str:
        """Have `pid` (a hot standby, or a waiting spare) take over: e0's place
        if it stands by for e0 (a restart of e0 promotes it), else emulator
        `prefer`'s (one without a standby: its restart takes the warm spare)."""
        slot = self.slot_of(pid)
        if slot is not None:
            return slot
        ready = f"warm spare ready (pid {pid},"
        deadline = time.monotonic() + 20
        while not any(ready in line for line in self.m.stderr_lines):
            if time.monotonic() > deadline or not alive(pid):
                return ""
            time.sleep(0.05)
        time.sleep(0.5)  # a standby is assigned at once once ready
        standby = self.standby_of(pid)
        self.try_qmp("emulator-restart", {"id": standby or prefer})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            slot = self.slot_of(pid)
            if slot is not None or not alive(pid):
                return slot or ""
            time.sleep(0.05)
        return ""

    # -- disks changed on a slot

    def hot_present(self, emulator: str) -> bool:
        disk_id = HOT[emulator][0]
        try:
            return any(d.get("id") == disk_id for d in self.qmp("query-disks"))
        except ExecuteError:
            return False

    def change(self, command: str, arguments: dict[str, Any]) -> str:
        """A disk change, then a wait for the guest to have settled it.

        A guest that is still rescanning or probing a disk when the next
        change removes it fails its own command against the going device
        (Linux: "Read Capacity(10) failed: Result: hostbyte=DID_ERROR"), with
        no emulator involved. A user's tooling waits for the guest between
        changes; so does the sweep, to keep the guest's log a finding."""
        error = self.try_qmp(command, arguments)
        late = self.settle()
        if late and self.outcomes:
            self.outcomes[-1].note += f" {command}: {late};"
        return error

    def settle(self) -> str:
        """Wait until the guest's disks (its `MPL SCSI` lines) show the hot
        disks as mplaunch has them; "" once they do, else what differs. Only
        during the main boot, whose script reports them."""
        if self.boot_stopped:
            return ""
        addresses = {d: f"{HOST[c]}:0:0:{lun}" for d, c, lun in HOT.values()}
        try:
            disks = self.qmp("query-disks")
        except ExecuteError as e:
            return f"query-disks: {e}"
        want = {addresses[d["id"]]: d["size"] for d in disks if d.get("id") in addresses}
        deadline = time.monotonic() + SETTLE_S
        while True:
            seen = guest.guest_disks(self.vm.console.read_text(errors="replace")) or {}
            hot = {a: size for a, size in seen.items() if a in addresses.values()}
            if hot == want:
                return ""
            if time.monotonic() >= deadline:
                return f"the guest shows {hot} after {SETTLE_S:.0f} s, mplaunch {want}"
            time.sleep(0.2)

    def disk_action(self, emulator: str, action: str) -> str:
        disk_id, controller, lun = HOT[emulator]
        image = str(self.vm.folder / f"{disk_id}.img")
        add = {"id": disk_id, "controller": controller, "lun": lun, "image": image}
        present = self.hot_present(emulator)
        if action == "add":
            if present:
                self.change("disk-remove", {"id": disk_id})
            return self.change("disk-add", add)
        if not present:
            self.change("disk-add", add)
        if action == "remove":
            return self.change("disk-remove", {"id": disk_id})
        self.hot_size[emulator] = max(self.hot_size[emulator],
                                      os.path.getsize(image)) + MiB
        return self.change("disk-resize", {"id": disk_id, "size": self.hot_size[emulator]})

    def remove_hot_disks(self) -> None:
        for emulator, (disk_id, _, _) in HOT.items():
            for _ in range(3):
                if not self.hot_present(emulator):
                    break
                self.change("disk-remove", {"id": disk_id})

    # -- the guest's boots

    def end_boot(self) -> None:
        """The main boot runs until told; later boots end on their own."""
        if self.boot_stopped == 0:
            guest.stop_boot(self.vm.image("script"), 1)
            self.boot_stopped = 1

    # -- one entry

    def holder_of(self, number: int, pos: int, timeout: float = 20.0) -> int | None:
        """The live process that holds entry `number` now (the plan gives an
        entry again when its holder ended without reaching the point)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = [int(mm.group(3)) for line in self.lines()[pos:]
                    if (mm := _GIVEN.search(line)) and int(mm.group(1)) == number]
            if pids and alive(pids[-1]):
                return pids[-1]
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def note_reached(self, outcome: Outcome, pos: int, timeout: float) -> bool:
        reached = self.wait_line(_REACHED, pos, timeout, lambda mm: mm.group(1) == outcome.point)
        if reached is None:
            return False
        outcome.reached = True
        outcome.victim = int(reached[0].group(2) or reached[0].group(3))
        return True

    def entry(self, number: int, point: str, after: int) -> int:
        """Drive entry `number` until its point fired; returns the log position."""
        launcher_side = point in faults.LAUNCHER_POINTS
        rx = _ARMED if launcher_side else _GIVEN
        got = self.wait_line(rx, after, 60, lambda mm: int(mm.group(1)) == number)
        assert got is not None, f"entry {number} ({point}) never given:\n{self.m.stderr[-6000:]}"
        pos = got[1]
        outcome = Outcome(number, point, "launcher")
        self.outcomes.append(outcome)
        start = time.monotonic()
        holder: int | None = None
        for attempt in range(4):
            if self.note_reached(outcome, pos, 0.0):
                break
            if not launcher_side:
                holder = self.holder_of(number, pos)
                if holder is None:
                    outcome.note += f" no live holder (attempt {attempt + 1});"
                    continue
                outcome.holder = f"pid {holder}"
            outcome.action = self.nudge(point, holder, attempt)
            if self.note_reached(outcome, pos, _reach_timeout(point)):
                break
        outcome.seconds = time.monotonic() - start
        if not outcome.reached:
            assert not launcher_side, (f"launcher point {point} not reached:\n"
                                       + self.m.stderr[-6000:])
            # Move the plan on (it takes this SIGKILL for the fault) and go on
            # sweeping: the test fails at the end, with every point's outcome.
            holder = self.holder_of(number, pos, timeout=5)
            if holder is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(holder, signal.SIGKILL)
            outcome.note += " killed by the test to move on"
        spent = self.wait_line(_SPENT, pos, 30, lambda mm: int(mm.group(1)) == number)
        if spent is None:
            outcome.note += " plan did not move on"
            return pos
        if not launcher_side and "SIGKILL" not in spent[0].group(3):
            outcome.note += f" spent: {spent[0].group(3)}"
        return spent[1]

    def nudge(self, point: str, holder: int | None, attempt: int) -> str:
        """Make `point` reachable for `holder` (None: a launcher point)."""
        if holder is None:
            if point.startswith("handover."):
                self.wait_spare()
                self.try_qmp("emulator-restart", {"id": "e0"})
                return "restart with a spare ready"
            if point.startswith("cold."):
                # e0's restarts go to its hot standby: e1 has none, and with
                # the waiting spare killed its restart is a cold start.
                spare = self.fleet.spare_pid()
                if spare is not None and self.standby_of(spare) is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(spare, signal.SIGKILL)
                self.try_qmp("emulator-restart", {"id": "e1"})
                return "spare killed, then a restart of e1 (cold)"
            if point == "disk.resize.after_grow":
                error = self.disk_action("e0", "resize")
                return "disk-resize" + (f" ({error})" if error else "")
            return "?"
        if point.startswith("control.heartbeat.") and attempt == 0 \
                and self.slot_of(holder) is None:
            return "a heartbeat of the waiting spare"
        serving = self.slot_of(holder)
        if point.startswith("control.assign.") and serving is not None:
            # A cold-started holder is never assigned: have it replaced, and
            # the plan gives the entry to the next process (a spare).
            self.try_qmp("emulator-restart", {"id": serving})
            return f"holder cold-started on {serving}: restarted, entry given on"
        was = self.slot_of(holder)
        slot = self.make_occupant(holder)
        taken = (f"serving {was}" if was else
                 f"restart: the spare takes over {slot}" if slot else
                 "reached while starting or being assigned")
        if point in DISK_POINTS:
            error = self.disk_action(slot or "e0", DISK_POINTS[point])
            return f"{taken}; disk {DISK_POINTS[point]} on {slot}" + (
                f" ({error[:60]})" if error else "")
        if point in REBOOT_POINTS:
            if attempt == 0:
                self.remove_hot_disks()
            self.end_boot()
            return f"{taken}; guest reboot"
        return taken


def test_every_fault_point_once_under_guest_io(tmp_path: Path) -> None:
    seed = 1 + int.from_bytes(os.urandom(2), "little")
    vm = sweep_vm(tmp_path, seed)
    plan = ",".join(f"{p}@1" for p in SWEPT)
    env = {**os.environ, faults.ENV: plan}
    m = Mplaunch(vm.write(), "-v", console=vm.console, env=env)
    sweep = Sweep(m, vm)
    try:
        m.wait_stderr(r"QEMU started", timeout=60)
        m.wait_console(r"^MPL DISK ", timeout=180)
        pos = 0
        for number, point in enumerate(SWEPT, 1):
            pos = sweep.entry(number, point, pos)
            print(sweep.outcomes[-1].row(), flush=True)
        sweep.remove_hot_disks()
        sweep.end_boot()
        deadline = time.monotonic() + 60 + 40 * BOOTS
        while len(lines_of(vm.console, "DONE")) < BOOTS and time.monotonic() < deadline:
            assert m.proc.poll() is None, m.stderr[-6000:]
            m.descendants()
            time.sleep(0.2)
    except BaseException:
        print("mplaunch's stderr, last lines:\n" + m.stderr[-6000:], flush=True)
        raise
    finally:
        m.descendants()
        m.signal(signal.SIGTERM)
        rc = m.wait(90)
        (tmp_path / "mplaunch.log").write_text(m.stderr)  # to look into a failure
    print("\n".join(o.row() for o in sweep.outcomes))
    assert rc == 0, m.stderr[-6000:]
    missed = [o for o in sweep.outcomes if not o.reached]
    assert not missed, "\n".join(o.row() for o in missed) + "\n" + m.stderr[-6000:]
    # Whatever step a disk change was killed at, the guest ends up seeing the
    # disks as management has them (a successor tells it what is in doubt).
    unsettled = [o for o in sweep.outcomes if "the guest shows" in o.note]
    assert not unsettled, "\n".join(o.row() for o in unsettled)
    assert len(sweep.outcomes) == len(SWEPT)
    assert any(f"all {len(SWEPT)} entries spent" in line for line in m.stderr_lines)

    console = vm.console.read_text(errors="replace")
    result = verdict.check_guest(console, vm, BOOTS, min_io_lines=2)
    assert result.ok, (result, console[-3000:])
    assert not [line for line in m.stderr_lines if "give up" in line]
    m.assert_nothing_left(vm.run_dir)
    assert not verdict.stray_processes(UIDS)
