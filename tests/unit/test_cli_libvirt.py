"""What ``--print-libvirt-xml`` (and ``--fragment``) print, and the usage they refuse."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from launcher import cli
from launcher.libvirt import QEMU_NS

SPEC = """\
[vm]
name = "lv-cli"
accel = "{accel}"
console = "none"
run_dir = "run"

[[emulator]]
id = "e0"

[[controller]]
id = "scsi0"
emulator = "e0"

[[disk]]
id = "d0"
controller = "scsi0"
lun = 0
image = "d0.img"
"""


def write(tmp_path: Path, accel: str = "kvm", extra: str = "") -> str:
    (tmp_path / "d0.img").write_bytes(bytes(4096))
    path = tmp_path / "vm.toml"
    path.write_text(SPEC.format(accel=accel).replace('run_dir = "run"\n',
                                                     f'run_dir = "run"\n{extra}'))
    return str(path)


@pytest.mark.parametrize("accel,kind", [("kvm", "kvm"), ("tcg", "qemu")])
def test_prints_a_complete_domain_of_the_specs_accel(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], accel: str, kind: str) -> None:
    spec = write(tmp_path, accel)
    assert cli.main(["--print-libvirt-xml", spec]) == 0
    captured = capsys.readouterr()
    root = ET.fromstring(captured.out)
    assert root.get("type") == kind
    assert root.findtext("name") == "lv-cli"
    assert root.find(f"{{{QEMU_NS}}}commandline") is not None
    assert not (tmp_path / "run").exists()  # printing starts nothing


def test_fragment_is_the_merge_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--print-libvirt-xml", "--fragment", write(tmp_path)]) == 0
    root = ET.fromstring(capsys.readouterr().out)
    assert [e.tag for e in root] == ["memoryBacking", f"{{{QEMU_NS}}}commandline"]


@pytest.mark.parametrize("fragment", [[], ["--fragment"]])
def test_warns_once_without_a_frontend_group(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fragment: list[str]) -> None:
    spec = write(tmp_path)
    assert cli.main(["--print-libvirt-xml", *fragment, spec]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{spec}: warning: [vm] frontend_group is not set")
    assert "user libvirt-qemu on Debian" in line
    assert 'frontend_group = "libvirt-qemu"' in line


def test_quiet_with_a_frontend_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--print-libvirt-xml", write(tmp_path, extra="frontend_group = 0\n")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("<domain ")


@pytest.mark.parametrize("others", [[], ["--print-qemu-args"], ["--backends-only"]])
def test_fragment_alone_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], others: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--fragment", *others, write(tmp_path)])
    assert exit_.value.code == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--fragment goes only with --print-libvirt-xml" in captured.err


def test_too_many_controllers_for_the_slots_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["[vm]", 'name = "wide"', 'accel = "tcg"', 'console = "none"', 'run_dir = "run"']
    for e in range(2):
        lines += ["[[emulator]]", f'id = "e{e}"']
    for c in range(25):
        (tmp_path / f"d{c}.img").write_bytes(bytes(4096))
        lines += ["[[controller]]", f'id = "c{c}"', f'emulator = "e{c // 16}"',
                  "[[disk]]", f'id = "d{c}"', f'controller = "c{c}"', "lun = 0",
                  f'image = "d{c}.img"']
    spec = tmp_path / "vm.toml"
    spec.write_text("\n".join(lines) + "\n")
    for fragment in ([], ["--fragment"]):
        assert cli.main(["--print-libvirt-xml", *fragment, str(spec)]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        (line,) = captured.err.splitlines()
        assert line.startswith(f"{spec}: --print-libvirt-xml: 25 controllers do not fit")
