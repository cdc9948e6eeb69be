"""Chaos: mplaunch itself killed again and again while a real guest does I/O.

The VM of tests/chaos/vms.py (two emulators, a writable disk each, the
script disk) runs the chaos guest's write-verify workload with its ledger
(tests/chaos/guest.py). Meanwhile the launcher is SIGKILLed at random
moments (seeded) and the same command is run again each time, which must
re-attach to the same QEMU; some kills land a moment after a re-attach,
while the new launcher is still replacing the spares and restoring the
keepers. Afterwards: no verify mismatch, no SCSI error in the guest's
kernel log, the images hold what the guest last wrote, and nothing of the
VM is left running (every pid seen, and every uid of its range).

MPL_CHAOS_SEED replays a run's choices; MPL_LAUNCHER_KILLS (default 4) sets
how many kills.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from tests.chaos import guest
from tests.chaos.verdict import check_guest, left_running, stray_processes
from tests.chaos.vms import DISK_SIZES, two_emulator_vm
from tests.support.processes import alive
from tests.support.reattach import below, holder_pid
from tests.support.vm import Mplaunch

KILLS = int(os.environ.get("MPL_LAUNCHER_KILLS", "4"))
SECONDS = 10 + 5 * KILLS
UIDS = "64730-64739"  # no other test's VM uses these

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest"),
              pytest.mark.timeout(240 + 30 * KILLS)]


def tree(pid: int) -> set[int]:
    return {pid} | below(pid)


def test_guest_io_survives_repeated_launcher_kills(tmp_path: Path) -> None:
    seed = int(os.environ.get("MPL_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    print(f"\nlauncher-kill seed {seed} (MPL_CHAOS_SEED={seed} replays it); {KILLS} kills",
          flush=True)
    vm = two_emulator_vm(tmp_path, "launcher-kills", UIDS,
                         guest.script(SECONDS, 8, 1, DISK_SIZES["d0"], seed))
    m = Mplaunch(vm.write(), console=vm.console)
    started = [m]
    seen: set[int] = set()
    try:
        m.wait_console(r"^MPL COUNTED boot=1", timeout=180)
        qemu = m.qemu_pid()
        holder = holder_pid(m)
        for kill in range(1, KILLS + 1):
            time.sleep(0 if rng.random() < 0.25 else rng.uniform(0.5, 4.0))
            assert "MPL DONE" not in vm.console.read_text(errors="replace"), \
                f"the workload ended before kill {kill}: raise SECONDS"
            seen |= tree(holder)
            m.proc.kill()
            assert m.wait(10) == -signal.SIGKILL
            assert alive(qemu) and alive(holder), f"kill {kill} took the VM with it"
            m = Mplaunch(vm.spec_path, console=vm.console)
            started.append(m)
            found = m.wait_stderr(r"re-attached to VM launcher-kills \(QEMU pid (\d+),")
            assert int(found.group(1)) == qemu
            print(f"kill {kill}: re-attached", flush=True)
        m.wait_console(r"^MPL DONE workload=shell", timeout=60 + SECONDS)
        seen |= tree(holder)
        m.signal(signal.SIGTERM)
        assert m.wait(60) == 0, m.stderr
    finally:
        for launcher in started:
            if launcher.proc.poll() is None:
                launcher.kill_all()
        (tmp_path / "mplaunch.log").write_text(
            "\n\n".join(launcher.stderr for launcher in started) + "\n")
    for launcher in started[1:]:
        assert not re.search(r"\b(ERROR|Traceback)\b", launcher.stderr), launcher.stderr

    verdict = check_guest(vm.console.read_text(errors="replace"), vm, boots=1)
    assert verdict.ok, verdict
    assert verdict.verified > 0
    deadline = time.monotonic() + 10
    while left_running(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left_running(seen) == []
    assert stray_processes(UIDS) == []
    assert not vm.run_dir.exists()
