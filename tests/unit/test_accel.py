"""The accelerator choice: a real probe with the real QEMU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.accel import (
    _EXPECTED_STATUS,
    choose_accel,
    hardware_virtualization,
    probe_firmware,
    probe_kvm,
)
from launcher.spec import Accel

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def test_explicit_choices_are_honoured() -> None:
    assert choose_accel(Accel.TCG).accel is Accel.TCG
    assert choose_accel(Accel.KVM).accel is Accel.KVM


@needs_qemu
def test_probe_firmware_really_exits_under_tcg(tmp_path: Path) -> None:
    """The probe's firmware works: under TCG it reaches the exit port."""
    bios = tmp_path / "probe.bin"
    bios.write_bytes(probe_firmware())
    done = subprocess.run(
        [str(QEMU), "-accel", "tcg", "-machine", "q35", "-nodefaults", "-display", "none",
         "-m", "16", "-bios", str(bios), "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
        capture_output=True, timeout=30, check=False,
    )
    assert done.returncode == _EXPECTED_STATUS


def test_missing_device_means_tcg(tmp_path: Path) -> None:
    assert "missing or not accessible" in (probe_kvm(device=str(tmp_path / "kvm")) or "")


@needs_qemu
def test_auto_agrees_with_the_probe() -> None:
    problem = probe_kvm()
    choice = choose_accel(Accel.AUTO)
    assert choice.accel is (Accel.KVM if problem is None else Accel.TCG)
    if problem is not None:
        assert problem in choice.reason


def _cpuinfo(tmp_path: Path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n\n")
    return str(path)


def test_a_broken_binary_is_reported(tmp_path: Path) -> None:
    cpuinfo = _cpuinfo(tmp_path, "vmx")
    problem = probe_kvm("/nonexistent/no-such-qemu", device="/dev/null", cpuinfo=cpuinfo)
    assert "no-such-qemu" in (problem or "")


def test_kvm_without_vmx_or_svm_is_not_used(tmp_path: Path) -> None:
    assert hardware_virtualization(_cpuinfo(tmp_path, "vmx")) is None
    assert hardware_virtualization(_cpuinfo(tmp_path, "svm")) is None
    problem = probe_kvm(device="/dev/null", cpuinfo=_cpuinfo(tmp_path, "hypervisor"))
    assert problem is not None and "no vmx or svm flag" in problem
