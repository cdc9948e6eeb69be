"""Backend-only mode under a real libvirtd, as an operator would use it:
``mplaunch --backends-only SPEC`` serves the emulators, the domain XML that
``--print-libvirt-xml`` prints is defined with virsh unchanged, and the
QEMU that libvirt starts (as user libvirt-qemu, group libvirt-qemu, through
``frontend_group``) boots the test guest against it.

Each domain has a name of its own (a prefix and a random part), so it cannot
meet an operator's domain of the same name; every domain defined here is
undefined again, whatever happens.

Where files live: libvirt's QEMU opens the kernel and initrd itself (libvirt
hands them to libvirt-qemu while the domain runs, but not the folders above
them) and connects to the sockets in the run folder, so every folder on
those paths must be traversable by libvirt-qemu. pytest's tmp_path is under
a folder only root may enter, so each test works in a folder of its own
under the system's temporary folder, mode 0711, removed afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.verdict import POWER_ON
from tests.support.libvirtd import defined_domain, domains, virsh, wait_shut_off
from tests.support.reattach import emulators, io_vm, vm_processes
from tests.support.vm import REPO, DiskDef, Mplaunch, VmDef, lines_of

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.usefixtures("guest", "libvirtd"),
              pytest.mark.timeout(240)]

FRONTEND_GROUP = "libvirt-qemu"  # the group Debian's libvirt runs QEMU with
UIDS = "64870-64879"  # no other test's VM uses these
BOOT_S = 120  # one boot of the test guest under libvirt, TCG, to its power-off


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder libvirt-qemu may traverse (not list), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="mplaunch-libvirt-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unique_name(what: str) -> str:
    return f"mplaunch-test-{what}-{secrets.token_hex(4)}"


def for_libvirt(vm: VmDef) -> VmDef:
    vm.vm_extra.update({"frontend_group": FRONTEND_GROUP, "uid_range": UIDS})
    return vm


def start_backend(vm: VmDef, launchers: list[Mplaunch]) -> tuple[Mplaunch, Path]:
    """``mplaunch --backends-only`` on the spec, waiting for QEMU; and the
    domain XML it prints, written to a file as it is."""
    spec = vm.write()
    m = Mplaunch(spec, "--backends-only", console=vm.console)
    launchers.append(m)
    for controller in vm.controllers:
        m.wait_stderr(rf"controller {controller} waits for QEMU")
    printed = subprocess.run(
        [sys.executable, "-m", "launcher", "--print-libvirt-xml", str(spec)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    xml = vm.folder / "domain.xml"
    xml.write_text(printed.stdout)
    return m, xml


def stop_backend(m: Mplaunch, vm: VmDef) -> None:
    """No domain of the VM left in libvirt; SIGTERM ends the backend cleanly
    and nothing of the VM is left."""
    assert vm.name not in domains()
    assert m.proc.poll() is None, f"the backend stopped by itself:\n{m.stderr}"
    m.signal(signal.SIGTERM)
    assert m.wait(60) == 0, m.stderr
    m.assert_nothing_left(vm.run_dir)
    assert vm_processes(vm, m) == []


def wait_count(m: Mplaunch, text: str, count: int, timeout: float = 30) -> None:
    """Until ``text`` is in ``count`` lines of mplaunch's stderr."""
    deadline = time.monotonic() + timeout
    while sum(text in line for line in list(m.stderr_lines)) < count:
        assert time.monotonic() < deadline, f"not {count} times /{text}/:\n{m.stderr}"
        assert m.proc.poll() is None, f"mplaunch exited:\n{m.stderr}"
        time.sleep(0.05)


def kernel_errors(console: Path, luns: int) -> list[str]:
    """The guest's kernel log lines about its disks, except the one power-on
    unit attention each LUN's first probe sees from a fresh device."""
    klog = [line for line in console.read_text(errors="replace").splitlines()
            if line.startswith("MPL KLOG")]
    power_on = [m.group(1) for line in klog if (m := POWER_ON.search(line))]
    errors = [line for line in klog if not POWER_ON.search(line)]
    if not len(power_on) == len(set(power_on)) <= luns:
        errors.append(f"repeated power-on: {power_on}")
    return errors


def test_a_libvirt_domain_boots_twice_against_one_backend(
        folder: Path, launchers: list[Mplaunch]) -> None:
    """virsh define of the printed XML as it is, two starts of the domain,
    each booting the guest to a clean verify; the backend meets a fresh
    QEMU each time and stops on SIGTERM only."""
    vm = for_libvirt(VmDef(folder, unique_name("boot"), workload="verify",
                           extra_append="mpl.count=8"))
    vm.emulators = {"e0": {}}
    vm.controllers = {"scsi0": ("e0", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0)]
    m, xml = start_backend(vm, launchers)
    with defined_domain(vm.name, xml):
        for boot in (1, 2):
            vm.console.write_text("")
            virsh("start", vm.name)
            wait_shut_off(vm.name, BOOT_S)
            text = vm.console.read_text(errors="replace")
            assert lines_of(vm.console, "VERIFY") == [
                {"name": "sda", "blocks": "8", "ok": "8", "bad": "0"}], text
            assert lines_of(vm.console, "DONE") == [{"workload": "verify", "rc": "0"}], text
            assert kernel_errors(vm.console, 1) == [], text
            wait_count(m, "emulator e0 is a fresh device again", boot)
            assert m.stderr.count("QEMU connected to controller scsi0") == boot, m.stderr
        virsh("undefine", vm.name)
    assert m.stderr.count("QEMU closed every connection of emulator e0") == 2, m.stderr
    stop_backend(m, vm)


def test_an_emulator_killed_under_a_libvirt_guest_goes_unnoticed(
        folder: Path, launchers: list[Mplaunch]) -> None:
    """SIGKILL of the emulator while the guest writes and reads back: the
    backend restarts it behind QEMU's connection, which libvirt's QEMU never
    sees close, and the guest finishes with nothing wrong."""
    vm = for_libvirt(io_vm(folder, unique_name("kill"), seconds=25))
    m, xml = start_backend(vm, launchers)
    with defined_domain(vm.name, xml):
        virsh("start", vm.name)
        m.wait_console(r"^MPL IO name=sda round=2 ", timeout=BOOT_S)
        served_by = emulators(vm)["e0"]["pid"]
        os.kill(served_by, signal.SIGKILL)
        m.wait_stderr(r"emulator e0 restarted \(pid \d+")
        assert emulators(vm)["e0"]["pid"] != served_by
        assert "QEMU closed every connection" not in m.stderr, m.stderr
        wait_shut_off(vm.name, BOOT_S)
        virsh("undefine", vm.name)
    text = vm.console.read_text(errors="replace")
    rounds = lines_of(vm.console, "IO")
    assert len(rounds) >= 4, text
    assert [r for r in rounds if r["bad"] != "0"] == [], text
    assert kernel_errors(vm.console, 1) == [], text
    assert lines_of(vm.console, "DONE") == [{"workload": "io", "rc": "0"}], text
    # One QEMU from start to power-off: it never had to connect again.
    assert m.stderr.count("QEMU connected to controller c0") == 1, m.stderr
    stop_backend(m, vm)
