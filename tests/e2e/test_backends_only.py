"""Backend-only mode: mplaunch serves the emulators on sockets in the run
folder, and QEMUs started by hand with the printed arguments boot the test
guest and use its disks, one after another, against the same backend."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.libvirt import backend_qemu_argv, backend_socket
from launcher.spec import load_spec
from tests.support.vm import REPO, DiskDef, Mplaunch, VmDef, lines_of

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest")]

QEMU_RUN_S = 180


def _backend_vm(tmp_path: Path) -> VmDef:
    vm = VmDef(tmp_path, "backends", workload="verify", extra_append="mpl.count=8")
    vm.emulators = {"e0": {}}
    vm.controllers = {"scsi0": ("e0", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0, size=8 * 1024 * 1024)]
    return vm


def _boot(argv: list[str], m: Mplaunch) -> None:
    """One QEMU started by hand, to the guest's power-off."""
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert qemu.wait(QEMU_RUN_S) == 0, qemu.stderr.read() if qemu.stderr else ""
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    assert m.proc.poll() is None, f"the backend stopped with its QEMU:\n{m.stderr}"


def _wait_count(m: Mplaunch, text: str, count: int, timeout: float = 30) -> None:
    """Until ``text`` is on mplaunch's stderr ``count`` times."""
    deadline = time.monotonic() + timeout
    while m.stderr.count(text) < count:
        assert time.monotonic() < deadline, m.stderr
        time.sleep(0.01)


def _verified(vm: VmDef) -> None:
    assert lines_of(vm.console, "VERIFY") == [{"name": "sda", "blocks": "8", "ok": "8", "bad": "0"}]
    assert lines_of(vm.console, "DONE") == [{"workload": "verify", "rc": "0"}]


def test_qemus_started_by_hand_boot_one_after_another(tmp_path: Path) -> None:
    """Two QEMUs one after the other, and a third that dies while it sets the
    device up: each new one meets a fresh device, and the backend runs on
    until SIGTERM."""
    vm = _backend_vm(tmp_path)
    spec_path = vm.write()
    printed = subprocess.run(
        [sys.executable, "-m", "launcher", "--print-qemu-args", str(spec_path)],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout
    sock_path = backend_socket(vm.run_dir, "scsi0")
    assert f"path={sock_path}" in printed
    argv = backend_qemu_argv(load_spec(spec_path))
    m = Mplaunch(spec_path, "--backends-only", console=vm.console)
    try:
        m.wait_stderr(r"controller scsi0 waits for QEMU")
        _boot(argv, m)
        _verified(vm)
        m.wait_stderr(r"emulator e0 is a fresh device again")

        # A QEMU killed while it sets the device up: a failed start.
        doomed = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_count(m, "QEMU connected to controller scsi0", 2)
        finally:
            doomed.kill()
            doomed.wait()
        _wait_count(m, "is a fresh device again", 2)

        vm.console.write_text("")
        second = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_count(m, "QEMU connected to controller scsi0", 3)
            # A second front-end while one is connected is turned away.
            intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            intruder.settimeout(10)
            intruder.connect(str(sock_path))
            assert intruder.recv(1) == b"", "a second front-end was served"
            intruder.close()
            assert second.wait(QEMU_RUN_S) == 0, second.stderr.read() if second.stderr else ""
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
        _verified(vm)
        assert "a second QEMU connected while one is connected: turned away" in m.stderr
        assert m.proc.poll() is None, m.stderr
        m.signal(signal.SIGTERM)
        rc = m.wait(60)
    finally:
        if m.proc.poll() is None:
            m.kill_all()
    assert rc == 0, m.stderr
    assert m.stderr.count("QEMU closed every connection of emulator e0") == 3, m.stderr
    time.sleep(0.1)
    m.assert_nothing_left(vm.run_dir)
