"""The launcher dies or is replaced under a running guest, with real QEMU and
the test guest doing write-verify I/O: SIGKILL of mplaunch then the same
command again (re-attach), `mpctl upgrade` and `mpctl upgrade-emulators`,
and SIGKILL of the holder. The guest must finish its workload with no
mismatch and no SCSI error, and nothing may be left running."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import psutil
import pytest

from tests.support.reattach import (
    assert_guest_clean,
    below,
    emulators,
    holder_pid,
    io_vm,
    mpctl,
    start_io,
    vm_processes,
    wait_gone,
)
from tests.support.vm import REPO, Mplaunch

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest")]
VERSION_FILE = REPO / "emulators" / "__init__.py"


def test_sigkill_of_the_launcher_then_the_same_command_reattaches(
        tmp_path: Path, launchers: list[Mplaunch]) -> None:
    vm = io_vm(tmp_path, "death-reattach", seconds=40)
    first, qemu, holder, served_by = start_io(vm, launchers, 2)
    first.proc.kill()  # mid-I/O
    first.wait(10)
    assert psutil.pid_exists(qemu) and psutil.pid_exists(holder)

    again = Mplaunch(vm.spec_path, console=vm.console)
    launchers.append(again)
    m = again.wait_stderr(r"re-attached to VM death-reattach \(QEMU pid (\d+), up (\d+) s\)")
    assert int(m.group(1)) == qemu
    assert emulators(vm)["e0"]["pid"] == served_by  # adopted, not restarted

    # A second launcher while this one is attached: one line, non-zero, no change.
    third = Mplaunch(vm.spec_path)
    assert third.wait(30) == 1
    assert "already running" in third.stderr and len(third.stderr_lines) == 1, third.stderr

    os.kill(served_by, signal.SIGKILL)  # the re-attached launcher restarts it
    again.wait_stderr(r"emulator e0 restarted \(pid \d+")
    assert emulators(vm)["e0"]["pid"] != served_by

    late = below(holder)  # the successor and the spares the re-attached launcher made
    assert again.wait(180) == 0, again.stderr
    assert_guest_clean(vm)
    assert wait_gone([qemu, holder, served_by], 10) == []
    assert vm_processes(vm, first, again, pids=late) == []
    assert not vm.run_dir.exists()


def test_upgrade_and_upgrade_emulators_run_the_installed_code(
        tmp_path: Path, launchers: list[Mplaunch]) -> None:
    vm = io_vm(tmp_path, "death-upgrade", seconds=35)
    m = Mplaunch(vm.write(), console=vm.console)
    launchers.append(m)
    m.wait_console(r"^MPL IO name=sda round=1 ")
    qemu = m.qemu_pid()
    holder = holder_pid(m)
    old = emulators(vm)["e0"]
    original = VERSION_FILE.read_text()
    new_version = "0.0.1+upgrade.test"
    try:
        # "Installed now": the editable install runs the tree's code.
        VERSION_FILE.write_text(re.sub(r'__version__ = "[^"]*"',
                                       f'__version__ = "{new_version}"', original))
        done = mpctl(vm, "upgrade", str(vm.run_dir / "mplaunch.sock"))
        assert done["package"] == f"mplaunch {new_version}", done
        assert m.proc.poll() is None  # the same process, now running the new code
        m.wait_stderr(rf"re-attached to VM death-upgrade \(QEMU pid {qemu},")
        assert emulators(vm)["e0"]["pid"] == old["pid"]

        after = {e["id"]: e for e in mpctl(vm, "upgrade-emulators",
                                           str(vm.run_dir / "mplaunch.sock"))}
        assert after["e0"]["version"] == new_version
        assert after["e0"]["pid"] != old["pid"]
    finally:
        VERSION_FILE.write_text(original)
    late = below(holder)
    assert m.wait(180) == 0, m.stderr
    assert_guest_clean(vm)
    assert vm_processes(vm, m, pids=late) == []


def test_sigkill_of_the_holder_takes_everything_and_the_next_start_is_clean(
        tmp_path: Path, launchers: list[Mplaunch]) -> None:
    vm = io_vm(tmp_path, "death-holder", seconds=8)
    first = Mplaunch(vm.write(), console=vm.console)
    launchers.append(first)
    first.wait_console(r"^MPL IO name=sda round=1 ")
    children = [p.pid for p in first.descendants()]
    os.kill(holder_pid(first), signal.SIGKILL)
    assert first.wait(30) == 1, first.stderr
    assert "holder process died" in first.stderr
    assert wait_gone(children, 5) == []
    assert vm_processes(vm, first) == []
    assert not vm.run_dir.exists()

    vm.console.unlink()
    second = Mplaunch(vm.spec_path, console=vm.console)
    launchers.append(second)
    assert second.wait(180) == 0, second.stderr
    assert_guest_clean(vm)
    second.assert_nothing_left(vm.run_dir)


@pytest.mark.parametrize("victim", ["qemu", "emulator"])
def test_sigkill_of_qemu_or_an_emulator_orphans_nothing(
        tmp_path: Path, launchers: list[Mplaunch], victim: str) -> None:
    vm = io_vm(tmp_path, f"death-{victim}", seconds=8)
    m = Mplaunch(vm.write(), console=vm.console)
    launchers.append(m)
    m.wait_console(r"^MPL IO name=sda round=1 ")
    if victim == "qemu":
        os.kill(m.qemu_pid(), signal.SIGKILL)
        assert m.wait(60) == 1, m.stderr
    else:
        os.kill(emulators(vm)["e0"]["pid"], signal.SIGKILL)
        assert m.wait(180) == 0, m.stderr
        assert_guest_clean(vm)
    m.assert_nothing_left(vm.run_dir)
    assert vm_processes(vm, m) == []
