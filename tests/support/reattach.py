"""What the tests of a launcher's death share: a VM doing write-verify I/O,
management calls through mpctl, and proof that nothing of a VM runs on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from tests.support.vm import REPO, DiskDef, Mplaunch, VmDef, lines_of, pids_alive


def io_vm(folder: Path, name: str, seconds: int) -> VmDef:
    return VmDef(folder, name, workload="io", extra_append=f"mpl.seconds={seconds} mpl.seed=5",
                 disks=[DiskDef("d0", "c0", 0)], controllers={"c0": ("e0", 1)},
                 emulators={"e0": {"kind": "scsi", "heartbeat_ms": 200,
                                   "hang_timeout_ms": 3000}})


def mpctl(vm: VmDef, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "launcher.mpctl", "--json",
                           "--timeout", "30", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def emulators(vm: VmDef) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in mpctl(vm, "emulators", str(vm.run_dir / "mplaunch.sock"))}


def holder_pid(m: Mplaunch) -> int:
    for p in m.descendants():
        try:
            if "launcher.holder" in " ".join(p.cmdline()):
                return int(p.pid)
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no holder child")


class FirstLauncher(NamedTuple):
    """A VM's first launcher, its guest doing I/O, and the pids a test follows
    across that launcher's death."""

    launcher: Mplaunch
    qemu: int
    holder: int
    served_by: int  # the emulator serving e0


def start_io(vm: VmDef, launchers: list[Mplaunch], io_round: int) -> FirstLauncher:
    """Boot ``vm`` (see `io_vm`) under a launcher the test's ``launchers``
    cleans up, and wait until the guest reports I/O round ``io_round``."""
    first = Mplaunch(vm.write(), console=vm.console)
    launchers.append(first)
    first.wait_console(rf"^MPL IO name=sda round={io_round} ")
    return FirstLauncher(first, first.qemu_pid(), holder_pid(first), emulators(vm)["e0"]["pid"])


def below(pid: int) -> set[int]:
    """The pids below `pid` now (a holder's: QEMU, emulators, spares)."""
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def vm_processes(vm: VmDef, *launchers: Mplaunch, pids: Iterable[int] = ()) -> list[str]:
    """Every process of this VM still running, found from /proc rather than
    from what a launcher knew: its holder (named by its socket's path), its
    QEMU (by -name, whatever its uid), every process the given launchers were
    ever seen to have below them, and `pids` (e.g. what was `below` the
    holder of a re-attached launcher, which is not the holder's parent)."""
    seen = {pid for m in launchers for pid in m.seen_descendants} | set(pids)
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        line = " ".join(p.info["cmdline"] or [])
        if str(vm.run_dir) in line or f"guest={vm.name}," in line or p.info["pid"] in seen:
            found.append(f"{p.info['pid']} {line[:100]}")
    return found


def assert_guest_clean(vm: VmDef) -> None:
    rounds = lines_of(vm.console, "IO")
    assert rounds, vm.console.read_text()
    assert all(r["bad"] == "0" for r in rounds), [r for r in rounds if r["bad"] != "0"]
    assert lines_of(vm.console, "KLOG") == [], "the guest saw SCSI errors"
    assert lines_of(vm.console, "DONE") == [{"workload": "io", "rc": "0"}]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pids_alive(pids):
        time.sleep(0.1)
    return pids_alive(pids)
