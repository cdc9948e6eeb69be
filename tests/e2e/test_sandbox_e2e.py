"""The sandbox with a real guest doing disk I/O: every emulator confined as
the kernel reports it, each with its own uid; "log" and "off" warn loudly."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from launcher.sandbox import check
from tests.support.vm import DiskDef, Mplaunch, VmDef, lines_of, run_to_end, shell_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.usefixtures("guest")]

if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="the sandbox needs root (run the tests as root)"))

STARTED = re.compile(r"emulator (\S+) started \(pid (\d+), uid (\d+), sandbox (\w+)\)")
IO = shell_cmd("for d in /sys/block/sd*; do dd if=/dev/zero of=/dev/${d##*/} bs=64k count=16 "
               "conv=fsync 2>/dev/null; done; echo io-done > /dev/console; sleep 600")


def two_emulator_vm(folder: Path, name: str, **vm_extra: object) -> VmDef:
    vm = VmDef(folder, name, workload="shell", extra_append=IO)
    vm.emulators = {"emu-a": {}, "emu-b": {}}
    vm.controllers = {"scsi0": ("emu-a", 1), "scsi1": ("emu-b", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0), DiskDef("d1", "scsi1", 0)]
    vm.vm_extra = {"uid_range": "64200-64299", **vm_extra}
    return vm


def test_emulators_serving_a_guest_are_confined_with_distinct_uids(tmp_path: Path) -> None:
    vm = two_emulator_vm(tmp_path, "sandbox-on")
    m = Mplaunch(vm.write(), console=vm.console)
    try:
        m.wait_console(r"io-done", timeout=180)
        started = {s[0]: (int(s[1]), int(s[2]), s[3]) for s in STARTED.findall(m.stderr)}
        assert set(started) == {"emu-a", "emu-b"}, m.stderr
        assert {uid for _, uid, _ in started.values()} == {64200, 64201}
        for pid, uid, mode in started.values():
            assert mode == "on"
            status = check.parse_status(Path(f"/proc/{pid}/status").read_text())
            assert check.judge(status, check.Expected(uid, uid)) == [], status
            assert check.namespace_problems(pid) == []
        # QEMU started only after both were confined.
        assert m.stderr.index("QEMU started") > max(
            m.stderr.index(f"emulator {e} started") for e in started)
        # QEMU itself: a uid of its own from the range, no capabilities, no_new_privs,
        # its own namespaces, its own filter on top of the jail's, stderr a pipe.
        qemu_pid = int(re.findall(r"QEMU started \(pid (\d+)\)", m.stderr)[0])
        status = check.parse_status(Path(f"/proc/{qemu_pid}/status").read_text())
        qemu_uid = int(status["Uid"].split()[0])
        assert 64200 <= qemu_uid <= 64299 and qemu_uid not in {64200, 64201}, status
        assert check.judge(status, check.Expected(qemu_uid, qemu_uid)) == [], status
        assert status["CapEff"] == "0000000000000000" and status["NoNewPrivs"] == "1"
        assert check.namespace_problems(qemu_pid) == []
        assert os.readlink(f"/proc/{qemu_pid}/fd/2").startswith("pipe:[")
    finally:
        m.signal(signal.SIGTERM)
        rc = m.wait(60)
    assert rc == 0, m.stderr
    assert "SIGSYS" not in m.stderr
    m.assert_nothing_left(vm.run_dir)


@pytest.mark.parametrize(("mode", "warning"), [
    ("log", 'WARNING: sandbox = "log"'),
    ("off", 'WARNING: sandbox = "off"'),
])
def test_a_weakened_sandbox_is_announced_loudly(tmp_path: Path, mode: str, warning: str) -> None:
    vm = VmDef(tmp_path, f"sandbox-{mode}", workload="verify", extra_append="mpl.count=2")
    vm.emulators = {"emu-a": {}}
    vm.controllers = {"scsi0": ("emu-a", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0)]
    vm.vm_extra = {"sandbox": mode}
    rc, m = run_to_end(vm)
    assert rc == 0, m.stderr
    assert warning in m.stderr
    assert lines_of(vm.console, "DONE") == [{"workload": "verify", "rc": "0"}]
    if mode == "off":
        assert "started UNCONFINED" in m.stderr
    m.assert_nothing_left(vm.run_dir)
