"""Emulators of kind "lsi" serving a real guest: QEMU's x-remote LSI53C895A,
confined and relayed by mplaunch, seen by the guest's sym53c8xx driver.

The LSI flavour of the test guest runs under TCG with the polling command
line (tests.support.vm adds it). Each remote process is checked as the
kernel reports it: a uid of its own from uid_range, no capabilities,
no_new_privs, seccomp filters (the jail's and QEMU's own), its own network,
IPC, UTS and mount namespaces. Afterwards nothing mplaunch started runs.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from launcher.sandbox import check
from tests.support.vm import DiskDef, Mplaunch, VmDef, lines_of, pids_alive

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest"), pytest.mark.timeout(420)]

if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="the sandbox needs root (run the tests as root)"))

MiB = 1024 * 1024
COUNT = 24
REMOTE = re.compile(r"LSI remote (\S+) started \(pid (\d+), uid (\d+)\)")
#: What every LSI boot logs once: the driver resets the bus when it probes
#: the controller, and each disk then reports that reset (a unit attention).
BOOT_TIME_KLOG = re.compile(r"sym\d+: SCSI BUS has been reset|Power-on or device reset occurred")


def remotes(m: Mplaunch, count: int) -> dict[str, tuple[int, int]]:
    """Controller id -> (pid, uid) of each remote, once all have started."""
    m.wait_stderr(r"QEMU started", timeout=120)
    found = {c: (int(pid), int(uid)) for c, pid, uid in REMOTE.findall(m.stderr)}
    assert len(found) == count, m.stderr
    return found


def assert_confined(pid: int, uid: int) -> dict[str, str]:
    """The remote as the kernel sees it; its /proc status."""
    status = check.parse_status(Path(f"/proc/{pid}/status").read_text())
    assert uid != 0 and status["Uid"].split() == [str(uid)] * 4, status
    assert check.judge(status, check.Expected(uid, uid, check.QEMU_STAGES)) == [], status
    assert status["CapEff"] == "0000000000000000" and status["NoNewPrivs"] == "1", status
    assert status["Seccomp"] == "2" and int(status.get("Seccomp_filters", "2")) >= 2, status
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert check.namespace_problems(pid) == []
    return status


def qmp(vm: VmDef, command: str, args: dict[str, Any] | None = None) -> Any:
    """One command on mplaunch's management socket."""
    async def run() -> Any:
        client = QMPClient("test")
        await client.connect(str(vm.run_dir / "mplaunch.sock"))
        try:
            return await client.execute(command, args)
        finally:
            await client.disconnect()
    return asyncio.run(run())


def assert_clean_guest(vm: VmDef, disks: int) -> None:
    """Every writable disk verified with 0 mismatches, no SCSI error, abort
    or reset beyond the probe's, and the workload's status 0."""
    text = vm.console.read_text(errors="replace")
    assert len(lines_of(vm.console, "DISK")) == disks, text[-3000:]
    verified = lines_of(vm.console, "VERIFY")
    assert len(verified) == disks, text[-3000:]
    assert all(v["ok"] == str(COUNT) and v["bad"] == "0" for v in verified), verified
    assert not lines_of(vm.console, "ERROR") and not lines_of(vm.console, "WARN"), text[-3000:]
    klog = [line for line in text.splitlines() if line.startswith("MPL KLOG")]
    assert all(BOOT_TIME_KLOG.search(line) for line in klog), klog
    assert lines_of(vm.console, "DONE") == [{"workload": "verify", "rc": "0"}]


def test_two_lsi_emulators_verify_their_disks_confined(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "lsi-two", workload="verify", extra_append=f"mpl.count={COUNT}")
    vm.emulators = {"lsi-a": {"kind": "lsi"}, "lsi-b": {"kind": "lsi"}}
    vm.controllers = {"lsi0": ("lsi-a", 1), "lsi1": ("lsi-b", 1)}
    vm.disks = [DiskDef("d0", "lsi0", 0, size=16 * MiB), DiskDef("d1", "lsi1", 0, size=17 * MiB)]
    vm.vm_extra = {"uid_range": "64820-64829"}
    m = Mplaunch(vm.write(), console=vm.console)
    try:
        started = remotes(m, 2)
        assert {uid for _, uid in started.values()} == {64820, 64821}
        for pid, uid in started.values():
            assert_confined(pid, uid)
        rc = m.wait(300)
    finally:
        if m.proc.poll() is None:
            m.kill_all()
    assert rc == 0, m.stderr
    assert_clean_guest(vm, 2)
    assert "SIGSYS" not in m.stderr and "restarted" not in m.stderr, m.stderr
    assert not pids_alive(pid for pid, _ in started.values())
    m.assert_nothing_left(vm.run_dir)


def test_an_lsi_controller_beside_a_vhost_user_controller(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "lsi-mixed", workload="verify", extra_append=f"mpl.count={COUNT}")
    vm.emulators = {"lsi-a": {"kind": "lsi"}, "emu-b": {}}
    vm.controllers = {"lsi0": ("lsi-a", 1), "scsi0": ("emu-b", 1)}
    vm.disks = [DiskDef("d0", "lsi0", 2, size=16 * MiB), DiskDef("d1", "scsi0", 0, size=17 * MiB)]
    vm.vm_extra = {"uid_range": "64830-64839"}
    m = Mplaunch(vm.write(), console=vm.console)
    try:
        [(pid, uid)] = remotes(m, 1).values()
        assert_confined(pid, uid)
        by_id = {e["id"]: e for e in qmp(vm, "query-emulators")}
        assert by_id["lsi-a"]["kind"] == "lsi" and by_id["emu-b"]["kind"] == "scsi"
        assert (by_id["lsi-a"]["pid"], by_id["lsi-a"]["uid"]) == (pid, uid)
        assert by_id["lsi-a"]["targets"] == {"d0": 2} and by_id["emu-b"]["targets"] is None
        assert by_id["lsi-a"]["controllers"] == ["lsi0"]
        refused = None
        try:
            qmp(vm, "disk-add", {"id": "dx", "controller": "lsi0", "lun": 3,
                                 "image": str(vm.image("d0"))})
        except Exception as e:  # the QMP error, as a client sees it
            refused = str(e)
        assert refused is not None and 'of kind "lsi"' in refused, refused
        rc = m.wait(300)
    finally:
        if m.proc.poll() is None:
            m.kill_all()
    assert rc == 0, m.stderr
    assert_clean_guest(vm, 2)
    assert not pids_alive([pid])
    m.assert_nothing_left(vm.run_dir)
