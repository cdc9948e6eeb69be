"""mplaunch's own lifecycle with real QEMU and the test guest: boot, power
off, signals during boot and while running, QEMU dying, a second instance.
After each: no process left behind and no run folder left."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from launcher.runfolder import MARKER_NAME, Marker
from tests.support.vm import DiskDef, Mplaunch, VmDef, lines_of, run_to_end, shell_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest")]
SLEEP = shell_cmd("sleep 600")


def test_boots_and_exits_0_when_the_guest_powers_off(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "life-boot")
    rc, m = run_to_end(vm)
    assert rc == 0, m.stderr
    assert lines_of(vm.console, "BOOT"), vm.console.read_text()
    assert lines_of(vm.console, "DONE") == [{"workload": "boot", "rc": "0"}]
    assert "guest powered off" in m.stderr
    assert f"run folder {vm.run_dir}" in m.stderr
    m.assert_nothing_left(vm.run_dir)


def test_a_power_off_ends_the_hot_standby_without_a_warning(tmp_path: Path) -> None:
    """QEMU closes the session at the power-off, the keeper closes the
    standby's socket with it, and the standby ends: expected, so not
    reported as a standby that broke its control protocol."""
    vm = VmDef(tmp_path, "life-standby", workload="shell", extra_append=shell_cmd("sleep 4"),
               disks=[DiskDef("d0", "scsi0", 0)], controllers={"scsi0": ("e0", 1)},
               emulators={"e0": {}})
    rc, m = run_to_end(vm, args=("-v",))
    assert rc == 0, m.stderr
    assert "guest powered off" in m.stderr
    assert [line for line in m.stderr_lines if "follows pid" in line], m.stderr  # it stood by
    assert not [line for line in m.stderr_lines if "its standby" in line
                and "ended with the session" not in line], m.stderr
    m.assert_nothing_left(vm.run_dir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_boot_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    vm = VmDef(tmp_path, f"life-early-{sig.name.lower()}")
    m = Mplaunch(vm.write(), console=vm.console)
    m.wait_stderr(r"QEMU started \(pid \d+\)")
    m.signal(sig)
    assert m.wait(60) == 0, m.stderr
    assert f"{sig.name} received" in m.stderr
    assert not lines_of(vm.console, "DONE")
    m.assert_nothing_left(vm.run_dir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_running_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    vm = VmDef(tmp_path, f"life-run-{sig.name.lower()}", workload="shell",
               extra_append=shell_cmd("echo ready; sleep 600"))
    m = Mplaunch(vm.write(), console=vm.console)
    m.wait_console(r"^MPL BOOT")
    qemu = m.qemu_pid()
    m.signal(sig)
    assert m.wait(60) == 0, m.stderr
    assert not Path(f"/proc/{qemu}").exists()
    m.assert_nothing_left(vm.run_dir)


def test_qemu_killed_is_an_error_and_cleans_up(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "life-qkill", workload="shell", extra_append=SLEEP)
    m = Mplaunch(vm.write(), console=vm.console)
    m.wait_console(r"^MPL BOOT")
    os.kill(m.qemu_pid(), signal.SIGKILL)
    assert m.wait(60) == 1, m.stderr
    assert "QEMU died unexpectedly (killed by SIGKILL)" in m.stderr
    m.assert_nothing_left(vm.run_dir)


def test_a_second_instance_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "life-twice", workload="shell", extra_append=SLEEP)
    first = Mplaunch(vm.write(), console=vm.console)
    try:
        first.wait_console(r"^MPL BOOT")
        second = Mplaunch(vm.spec_path)
        assert second.wait(30) == 1
        assert "already running" in second.stderr and str(first.proc.pid) in second.stderr
        assert vm.run_dir.exists()
    finally:
        first.signal(signal.SIGTERM)
        assert first.wait(60) == 0, first.stderr
    first.assert_nothing_left(vm.run_dir)


def test_a_stale_run_folder_is_cleaned(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "life-stale")
    vm.run_dir.mkdir()
    (vm.run_dir / MARKER_NAME).write_bytes(Marker("life-stale", made_folder=True).render())
    (vm.run_dir / "mplaunch.lock").write_text("999999\n")
    (vm.run_dir / "qemu.sock").write_text("")
    rc, m = run_to_end(vm)
    assert rc == 0, m.stderr
    assert "cleaned a stale run folder" in m.stderr
    m.assert_nothing_left(vm.run_dir)
