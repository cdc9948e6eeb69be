"""Chaos: emulators killed and hung at random while a real guest does I/O.

One VM (two emulators, three controllers, four writable disks and the
read-only script disk) boots twice; in each boot the guest writes and
verifies random blocks of every writable disk (tests/chaos/guest.py). The
driver (tests/chaos/driver.py) meanwhile fires events at random moments in
every phase: firmware, driver probe, I/O, reboot. Afterwards: no verify
mismatch, no SCSI error, abort, reset or timeout in either boot's kernel log
(beyond the one POWER ON attention per LUN a first probe sees), the image
files hold exactly what the guest last wrote, every event was handled and
every restart is explained by an event, and nothing is left running.

Environment: MPL_CHAOS_SEED replays a run's choices (the seed is printed);
MPL_CHAOS_EVENTS (default 30) and MPL_CHAOS_SECONDS (guest I/O seconds per
boot; default from the event count) make a long run (bench/soak.py is the
soak benchmark); MPL_CHAOS_HANG, MPL_CHAOS_SPARE and MPL_CHAOS_HANDOVER (1 or
0) force event kinds on or off. The kinds include the warm spare's: killed
or frozen while it waits, killed or frozen while it is handed a dead
emulator's place, and the spare-death sequence (tests/chaos/driver.py).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.chaos import guest
from tests.chaos.driver import Capabilities, Driver, Fleet, Phase, phase_of
from tests.chaos.verdict import POWER_ON, boots_of
from tests.support.vm import DiskDef, Mplaunch, VmDef, lines_of, shell_cmd

MiB = 1024 * 1024
EVENTS = int(os.environ.get("MPL_CHAOS_EVENTS", "30"))
BOOTS = 2
COUNT = 8
#: Events per boot in the phases before I/O, and across the reboot; the rest
#: are shared by the two I/O phases. A phase's unused events pass to the next.
EARLY = {Phase.FIRMWARE: 2, Phase.PROBE: 2}
ACROSS_REBOOT = 3
SECONDS = int(os.environ.get("MPL_CHAOS_SECONDS", "0")) or max(
    20, int(1.3 * (EVENTS - 2 * sum(EARLY.values()) - ACROSS_REBOOT) / BOOTS) + 5)
#: No new guest line for this long while it should be working means a lost
#: completion: Linux's virtio_scsi never times a command out.
STALL_S = 60.0
UIDS = "64700-64709"  # away from other VMs' default range

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest"),
              pytest.mark.timeout(240 + 3 * BOOTS * SECONDS + 10 * EVENTS)]


def chaos_vm(folder: Path, seed: int) -> VmDef:
    vm = VmDef(folder, "chaos", workload="shell")
    policy: dict[str, object] = {"restart_burst": 1000, "restart_window_s": 1,
                                 "heartbeat_ms": 100, "hang_timeout_ms": 1000}
    vm.emulators = {"e0": dict(policy), "e1": dict(policy)}
    vm.controllers = {"scsi0": ("e0", 1), "scsi1": ("e0", 2), "scsi2": ("e1", 1)}
    vm.disks = [
        DiskDef("d0", "scsi0", 0, size=16 * MiB),
        DiskDef("d1", "scsi0", 1, size=17 * MiB, block_size=4096),
        DiskDef("d2", "scsi1", 0, size=18 * MiB),
        DiskDef("d3", "scsi2", 0, size=19 * MiB),
        DiskDef("script", "scsi2", 1, size=guest.SCRIPT_DISK_SIZE, readonly=True),
    ]
    vm.vm_extra = {"uid_range": UIDS}
    guest.script_image(vm.image("script"),
                       guest.script(SECONDS, COUNT, BOOTS, 16 * MiB, seed))
    vm.extra_append = "mpl.then=reboot " + shell_cmd(guest.loader())
    return vm


def quotas() -> list[tuple[int, Phase, int]]:
    """(boot, phase, events) in the order the guest goes through them."""
    io = EVENTS - BOOTS * sum(EARLY.values()) - ACROSS_REBOOT * (BOOTS - 1)
    plan = []
    for boot in range(1, BOOTS + 1):
        if boot > 1:
            plan.append((boot - 1, Phase.REBOOT, ACROSS_REBOOT))
        plan += [(boot, phase, n) for phase, n in EARLY.items()]
        plan.append((boot, Phase.IO, io // BOOTS + (io % BOOTS if boot == BOOTS else 0)))
    return plan


def run_chaos(m: Mplaunch, vm: VmDef, driver: Driver) -> None:
    """Fire the planned events as the guest goes through its phases; return
    once the last counted boot is done."""
    plan = quotas()
    m.wait_stderr(r"QEMU started", timeout=60)
    carried = 0
    step = 0
    next_at = time.monotonic()
    last_text, last_change = "", time.monotonic()
    while True:
        text = vm.console.read_text(errors="replace") if vm.console.exists() else ""
        now = time.monotonic()
        if text != last_text:
            last_text, last_change = text, now
        boot, phase = phase_of(text)
        if len(lines_of(vm.console, "DONE")) >= BOOTS:
            break
        assert m.proc.poll() is None, f"mplaunch ended early:\n{m.stderr}\n{text[-3000:]}"
        stalled = now - last_change
        assert stalled < STALL_S, (
            f"guest silent for {stalled:.0f} s in boot {boot} {phase.value}: lost I/O?\n"
            + "\n".join(e.line() for e in driver.events) + f"\n{m.stderr}\n{text[-3000:]}")
        # Move along the plan: phases the guest has left give their events on.
        while step < len(plan) and (plan[step][0], _order(plan[step][1])) < (boot, _order(phase)):
            carried += plan[step][2]
            step += 1
            if step < len(plan):
                plan[step] = (plan[step][0], plan[step][1], plan[step][2] + carried)
                carried = 0
        here = step < len(plan) and plan[step][:2] == (boot, phase) and plan[step][2] > 0
        if here and now >= next_at and len(driver.events) < EVENTS:
            event = driver.fire(driver.pick_kind(EVENTS - len(driver.events)), boot, phase)
            print(event.line(), flush=True)
            assert not event.problem, f"{event.line()}\n{m.stderr}"
            plan[step] = (boot, phase, plan[step][2] - 1)
            pause = driver.rng.uniform(0, 1.0) if phase is Phase.IO else \
                driver.rng.uniform(0, 0.3)
            next_at = time.monotonic() + (0 if driver.rng.random() < 0.15 else pause)
        time.sleep(0.03)


def _order(phase: Phase) -> int:
    return [Phase.FIRMWARE, Phase.PROBE, Phase.IO, Phase.REBOOT].index(phase)


def test_guest_io_survives_random_kills_and_hangs(tmp_path: Path) -> None:
    seed = int(os.environ.get("MPL_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    caps = Capabilities.detect()
    print(f"\nchaos seed {seed} (MPL_CHAOS_SEED={seed} replays it); {EVENTS} events, "
          f"{SECONDS} s of guest I/O per boot; {caps.why}", flush=True)
    vm = chaos_vm(tmp_path, seed)
    m = Mplaunch(vm.write(), "-v", console=vm.console)
    driver = Driver(m, Fleet(m, list(vm.emulators)), random.Random(seed), caps)
    try:
        run_chaos(m, vm, driver)
    finally:
        m.descendants()
        m.signal(signal.SIGTERM)
        rc = m.wait(90)
        (tmp_path / "mplaunch.log").write_text(m.stderr + "\n")  # whole, for a failure
    console = vm.console.read_text(errors="replace")
    print(driver.summary(), flush=True)
    print(f"mplaunch's log: {tmp_path / 'mplaunch.log'}", flush=True)
    assert rc == 0, m.stderr

    # Every event fired, handled, and explains every restart; all kinds ran.
    assert len(driver.events) == EVENTS, (
        f"only {len(driver.events)} of {EVENTS} events fit; raise MPL_CHAOS_SECONDS")
    assert all(e.handled and not e.problem for e in driver.events), \
        "\n".join(e.line() for e in driver.events)
    assert not driver.unexplained(), (driver.unexplained(), m.stderr)
    assert {e.kind for e in driver.events} == set(caps.kinds())
    early = [e for e in driver.events if e.phase in (Phase.FIRMWARE, Phase.PROBE)]
    assert any(e.phase is Phase.PROBE for e in early), "no event during the guest's probe"
    assert any(e.phase is Phase.REBOOT for e in driver.events), "no event across the reboot"

    # The guest: both boots counted, every round verified, nothing odd.
    boots = boots_of(console)
    assert len(boots) >= BOOTS, console[-3000:]
    luns = len(vm.disks)
    for number, text in enumerate(boots[:BOOTS], 1):
        assert f"MPL COUNTED boot={number}" in text, text[-3000:]
        assert "MPL DONE workload=shell rc=0" in text, text[-3000:]
        assert not re.search(r"^MPL (ERROR|WARN)", text, re.M), text[-3000:]
        io = [line for line in text.splitlines() if line.startswith("MPL IO ")]
        assert len(io) >= 4, text[-3000:]
        bad = [line for line in io if not re.search(r" ok=[1-9]\d* bad=0$", line)]
        assert not bad, bad
        klog = [line for line in text.splitlines() if line.startswith("MPL KLOG")]
        power_on = [mm.group(1) for line in klog if (mm := POWER_ON.search(line))]
        others = [line for line in klog if not POWER_ON.search(line)]
        assert not others, f"boot {number}: {others}"
        assert len(power_on) == len(set(power_on)) <= luns, f"boot {number}: {klog}"

    # The images hold what the guest last wrote.
    entries = guest.ledger(console)
    writable = [(d.size, vm.image(d.id)) for d in vm.disks if not d.readonly]
    assert len(entries) > 4 * COUNT and {s for s, _ in entries} == {s for s, _ in writable}
    mismatches = guest.compare_images(entries, writable)
    assert not mismatches, mismatches[:10]

    # Nothing left: no process of this VM, no process with one of its uids.
    m.assert_nothing_left(vm.run_dir)
    first, last = (int(x) for x in UIDS.split("-"))
    stray = [p.pid for p in psutil.process_iter(["uids"])
             if p.info["uids"] and first <= p.info["uids"].real <= last]
    assert not stray, stray
