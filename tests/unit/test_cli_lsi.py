"""What the command line says about a spec with lsi emulators, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher import cli
from launcher.accel import AccelChoice
from launcher.spec import Accel, load_spec

SPEC = """\
[vm]
name = "lsi-cli"
accel = "{accel}"
kernel = "vmlinuz"
append = "{append}"
console = "none"
run_dir = "run"

[[emulator]]
id = "lsi-a"
kind = "lsi"

[[controller]]
id = "lsi0"
emulator = "lsi-a"

[[disk]]
id = "d0"
controller = "lsi0"
lun = 0
image = "d0.img"
"""


def write(tmp_path: Path, accel: str = "tcg", append: str = "console=ttyS0") -> str:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "d0.img").write_bytes(bytes(4096))
    path = tmp_path / "vm.toml"
    path.write_text(SPEC.format(accel=accel, append=append))
    return str(path)


def test_check_warns_once_under_tcg_without_irqpoll(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path)
    assert cli.main(["--check", spec]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[1] == f"{spec}: ok"
    assert lines[0].startswith(f'{spec}: [vm] append = "console=ttyS0": warning: ')
    assert "kernel command line lacks irqpoll" in lines[0]
    assert '"irqpoll nolapic noapic"' in lines[0]


@pytest.mark.parametrize("accel,append", [("kvm", "console=ttyS0"),
                                          ("tcg", "console=ttyS0 irqpoll nolapic noapic")])
def test_check_is_quiet_with_kvm_or_polling(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], accel: str, append: str) -> None:
    spec = write(tmp_path, accel, append)
    assert cli.main(["--check", spec]) == 0
    assert capsys.readouterr().err == f"{spec}: ok\n"


def test_start_warning_follows_the_resolved_accel(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "auto"))
    tcg = cli._polling_warning(spec, "vm.toml", AccelChoice(Accel.TCG, "KVM unusable"))
    assert tcg is not None and tcg.startswith("vm.toml: [vm] append")
    assert cli._polling_warning(spec, "vm.toml", AccelChoice(Accel.KVM, "probed")) is None


@pytest.mark.parametrize("option", ["--backends-only", "--print-libvirt-xml"])
def test_attaching_from_outside_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str) -> None:
    spec = write(tmp_path)
    assert cli.main([option, spec]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f'{spec}: {option} cannot serve [[controller]] "lsi0"')
    assert "no socket path" in line
    assert not (tmp_path / "run").exists()


def test_print_qemu_args_shows_the_proxy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(tmp_path)
    assert cli.main(["--print-qemu-args", spec]) == 0
    captured = capsys.readouterr()
    assert "-device 'x-pci-proxy-dev,id=lsi0,fd=<fd>'" in captured.out
    assert captured.err.startswith(f"{spec}: note: the x-pci-proxy-dev")
