"""Re-attach, as a user sees it: mplaunch dies under a guest doing
write-verify I/O, the guest's disks carry on without it, and the same command
run again takes the VM over.

tests/e2e/test_launcher_death.py proves the main path and the deaths of a
holder, QEMU or emulator while a launcher is attached. This file covers what
happens around the launcher's absence: that the guest's I/O goes on while no
launcher runs at all, that the re-attached launcher serves a whole reboot
(the front-end's control messages go through its restored keepers), answers
on the management socket, replaces the spares, restarts an emulator and
stops the VM in order on SIGTERM; that a second launcher refused while one
is attached changes nothing; and that a holder, QEMU or emulator that dies
while no launcher is attached is dealt with by the next one, with nothing
left running.

Each VM has a uid range of its own, so that "no process under one of its
uids" holds even while other tests run VMs.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.chaos.verdict import POWER_ON, boots_of, stray_processes
from tests.support.processes import alive
from tests.support.reattach import (
    assert_guest_clean,
    below,
    emulators,
    io_vm,
    start_io,
    vm_processes,
    wait_gone,
)
from tests.support.vm import Mplaunch, VmDef, lines_of, pids_alive

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest")]
UIDS = "64720-64729"  # no other test's VM uses these


def vm_of(folder: Path, name: str, seconds: int, then: str = "poweroff") -> VmDef:
    vm = io_vm(folder, name, seconds)
    vm.extra_append += f" mpl.then={then}"
    vm.vm_extra = {"uid_range": UIDS}
    return vm


def wait_until(what: str, ok: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def io_rounds(vm: VmDef) -> list[dict[str, str]]:
    return lines_of(vm.console, "IO")


def spares_of(holder: int) -> set[int]:
    """The holder's children that are waiting spares."""
    found = set()
    for child in psutil.Process(holder).children():
        try:
            if "--spare" in child.cmdline():
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def tree(pid: int) -> set[int]:
    return {pid} | below(pid)


def described(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.append(f"{pid} uid {p.uids().real} ppid {p.ppid()} {p.status()} "
                       f"{' '.join(p.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            continue
    return out


def assert_nothing_of(vm: VmDef, launched: list[Mplaunch], seen: set[int]) -> None:
    """No process of the VM: none of those seen, none by its run folder or
    QEMU's name, none under a uid of its range."""
    assert wait_gone(sorted(seen), 10) == []
    assert vm_processes(vm, *launched, pids=seen) == []
    assert described(stray_processes(UIDS)) == []
    assert not vm.run_dir.exists()


def assert_boot_clean(text: str) -> None:
    """One boot's console: rounds all verified, no SCSI error in its kernel
    log (beyond a first probe's power-on attention), a clean end."""
    io = [line for line in text.splitlines() if line.startswith("MPL IO ")]
    assert io, text[-2000:]
    assert all(line.endswith(" bad=0") for line in io), io
    klog = [line for line in text.splitlines()
            if line.startswith("MPL KLOG") and not POWER_ON.search(line)]
    assert klog == [], klog
    assert "MPL DONE workload=io rc=0" in text, text[-2000:]


def test_the_guest_runs_on_without_a_launcher_and_the_reattached_one_carries_it(
        tmp_path: Path, launchers: list[Mplaunch]) -> None:
    vm = vm_of(tmp_path, "reattach-story", seconds=20, then="reboot")
    first, qemu, holder, served_by = start_io(vm, launchers, 2)
    wait_until("a warm spare", lambda: bool(spares_of(holder)), 30)
    old_spares = spares_of(holder)
    seen = tree(holder)

    first.proc.kill()  # mid-I/O
    assert first.wait(10) == -signal.SIGKILL
    # No launcher at all: the guest's I/O goes on (the data plane never
    # passed through the launcher).
    rounds = len(io_rounds(vm))
    wait_until("two more I/O rounds with no launcher",
               lambda: len(io_rounds(vm)) >= rounds + 2, 30)
    assert pids_alive([qemu, holder, served_by]) == [qemu, holder, served_by]

    again = Mplaunch(vm.spec_path, console=vm.console)
    launchers.append(again)
    m = again.wait_stderr(r"re-attached to VM reattach-story \(QEMU pid (\d+), up (\d+) s\)")
    assert int(m.group(1)) == qemu and int(m.group(2)) >= 10
    assert emulators(vm)["e0"]["pid"] == served_by  # adopted, not restarted
    # The spares of the launcher that went are replaced by new ones.
    assert wait_gone(sorted(old_spares), 10) == []
    wait_until("a new warm spare", lambda: bool(spares_of(holder) - old_spares), 30)
    seen |= tree(holder)

    # A second launcher while this one is attached: refused in one line,
    # and the VM it would have touched is unaffected.
    lines_before = len(again.stderr_lines)
    refused = Mplaunch(vm.spec_path)
    launchers.append(refused)
    assert refused.wait(30) != 0
    assert len(refused.stderr_lines) == 1 and "already running" in refused.stderr, \
        refused.stderr
    rounds = len(io_rounds(vm))
    wait_until("an I/O round after the refusal", lambda: len(io_rounds(vm)) > rounds, 30)
    assert again.proc.poll() is None
    assert again.stderr_lines[lines_before:] == []
    assert emulators(vm)["e0"]["pid"] == served_by
    assert pids_alive([qemu, holder, served_by]) == [qemu, holder, served_by]

    # The first boot completes clean, and the guest reboots: the front-end
    # resets and sets up its rings again through the re-attached keepers.
    def second_boot_does_io() -> bool:
        found = boots_of(vm.console.read_text(errors="replace"))
        return len(found) >= 2 and "\nMPL IO " in found[1]

    wait_until("I/O in the second boot", second_boot_does_io, 120)
    assert again.proc.poll() is None, again.stderr
    boots = boots_of(vm.console.read_text(errors="replace"))
    assert len(boots) == 2
    assert_boot_clean(boots[0])

    # An emulator killed now is restarted by the re-attached launcher.
    os.kill(served_by, signal.SIGKILL)
    again.wait_stderr(r"emulator e0 restarted \(pid \d+")
    assert emulators(vm)["e0"]["pid"] != served_by
    seen |= tree(holder)
    rounds = len(io_rounds(vm))
    wait_until("two I/O rounds after the restart", lambda: len(io_rounds(vm)) >= rounds + 2, 60)
    assert all(r["bad"] == "0" for r in io_rounds(vm)), io_rounds(vm)

    # SIGTERM: the VM stops in order, and nothing of it is left.
    seen |= tree(holder)
    again.signal(signal.SIGTERM)
    assert again.wait(60) == 0, again.stderr
    assert_nothing_of(vm, launchers, seen)
    assert "Traceback" not in again.stderr, again.stderr


@pytest.mark.parametrize("victim", ["emulator", "qemu", "holder"])
def test_a_death_while_no_launcher_is_attached(
        tmp_path: Path, launchers: list[Mplaunch], victim: str) -> None:
    vm = vm_of(tmp_path, f"detached-{victim}", seconds=10)
    first, qemu, holder, served_by = start_io(vm, launchers, 1)
    seen = tree(holder)
    first.proc.kill()
    first.wait(10)
    os.kill({"emulator": served_by, "qemu": qemu, "holder": holder}[victim], signal.SIGKILL)

    if victim == "holder":
        # Everything goes with it at once, with no launcher to see it.
        assert wait_gone(sorted(seen), 5) == []
        assert vm_processes(vm, first, pids=seen) == []
        assert described(stray_processes(UIDS)) == []
        vm.console.unlink()
    else:
        assert alive(holder)
        time.sleep(1)  # the holder records the exit for the next launcher
    again = Mplaunch(vm.spec_path, console=vm.console)
    launchers.append(again)
    if victim == "holder":  # a stale run folder: booted afresh
        assert again.wait(180) == 0, again.stderr
        assert "re-attached" not in again.stderr
        assert_guest_clean(vm)
        again.assert_nothing_left(vm.run_dir)
    elif victim == "qemu":  # the VM is over: the rest is stopped
        again.wait_stderr(r"re-attached to VM detached-qemu ")
        assert again.wait(60) != 0
        assert re.search(r"QEMU (ended|died)\b.*killed by SIGKILL", again.stderr), again.stderr
    else:  # the exit the holder recorded restarts the emulator
        again.wait_stderr(r"re-attached to VM detached-emulator ")
        again.wait_stderr(r"emulator e0 restarted \(pid \d+")
        assert emulators(vm)["e0"]["pid"] != served_by
        seen |= tree(holder)
        assert again.wait(180) == 0, again.stderr
        assert_guest_clean(vm)
    assert_nothing_of(vm, launchers, seen)
    assert "Traceback" not in again.stderr, again.stderr
