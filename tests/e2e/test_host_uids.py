"""Two VMs at once with the default uid_range: their emulators never share a uid."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.support.vm import Mplaunch, VmDef, shell_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest")]


def emulator_uids(m: Mplaunch) -> set[int]:
    """The real uids of mplaunch's emulator processes (serving ones and spares),
    once each has dropped root (the jail starts as root, then changes uid)."""
    deadline = time.monotonic() + 60
    while True:
        uids = set()
        for p in m.descendants():
            try:
                if "launcher.sandbox.jail" in p.cmdline():
                    uids.add(p.uids().real)
            except psutil.NoSuchProcess:
                continue
        if 0 not in uids or time.monotonic() > deadline:
            return uids
        time.sleep(0.1)


def test_two_vms_with_the_default_range_run_disjoint_uids(tmp_path: Path) -> None:
    runs: list[tuple[VmDef, Mplaunch]] = []
    try:
        for name in ("uids-a", "uids-b"):
            (tmp_path / name).mkdir()
            vm = VmDef(tmp_path / name, name, workload="shell",
                       extra_append=shell_cmd("sleep 600"),
                       controllers={"c0": ("e0", 1)}, emulators={"e0": {}})
            runs.append((vm, Mplaunch(vm.write(), console=vm.console)))
        for _, m in runs:
            m.wait_stderr(r"QEMU started \(pid \d+\)", timeout=120)
        a, b = (emulator_uids(m) for _, m in runs)
        assert a and b and all(64000 <= u <= 64999 for u in a | b), (a, b)
        assert not a & b, f"shared uids: {a & b}"
    finally:
        for _, m in runs:
            m.signal(signal.SIGTERM)
        for vm, m in runs:
            assert m.wait(60) == 0, m.stderr
            m.assert_nothing_left(vm.run_dir)
