"""Backend-only mode: mplaunch serves the emulators on sockets in the run
folder, and a QEMU started by hand with the printed arguments boots the test
guest and uses its disks."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.libvirt import backend_qemu_argv
from launcher.spec import load_spec
from tests.support.vm import REPO, DiskDef, Mplaunch, VmDef, lines_of

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest")]


def test_qemu_started_by_hand_boots_against_the_backends(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "backends", workload="verify", extra_append="mpl.count=8")
    vm.emulators = {"e0": {}}
    vm.controllers = {"scsi0": ("e0", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0, size=8 * 1024 * 1024)]
    spec_path = vm.write()
    printed = subprocess.run(
        [sys.executable, "-m", "launcher", "--print-qemu-args", str(spec_path)],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout
    assert f"path={vm.run_dir}/vhost-scsi0.sock" in printed
    m = Mplaunch(spec_path, "--backends-only", console=vm.console)
    qemu: subprocess.Popen[bytes] | None = None
    try:
        m.wait_stderr(r"controller scsi0 waits for QEMU")
        qemu = subprocess.Popen(backend_qemu_argv(load_spec(spec_path)),
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert qemu.wait(180) == 0, qemu.stderr.read() if qemu.stderr else ""
        rc = m.wait(60)
    finally:
        if qemu is not None and qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    assert rc == 0, m.stderr
    assert "QEMU connected to controller scsi0" in m.stderr
    assert lines_of(vm.console, "VERIFY") == [{"name": "sda", "blocks": "8", "ok": "8", "bad": "0"}]
    assert lines_of(vm.console, "DONE") == [{"workload": "verify", "rc": "0"}]
    time.sleep(0.1)
    m.assert_nothing_left(vm.run_dir)
