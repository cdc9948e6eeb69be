"""The domain ``mplaunch --print-libvirt-xml`` prints is one a real libvirtd
defines as it is, keeps our QEMU arguments in, and lays out its own devices
around: nothing of libvirt's lands on the PCI slots the controllers take."""

from __future__ import annotations

import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.libvirt import QEMU_NS
from tests.support.libvirtd import domains, virsh
from tests.support.vm import REPO

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("libvirtd")]

TAKEN_SLOTS = {0x1E, 0x1D}

SPEC = """\
[vm]
name = "{name}"
memory = "256M"
cpus = 2
accel = "tcg"
kernel = "vmlinuz"
append = "console=ttyS0"
console = "console.log"
run_dir = "run"

[[emulator]]
id = "e0"

[[controller]]
id = "scsi0"
emulator = "e0"
queues = 2

[[controller]]
id = "scsi1"
emulator = "e0"

[[disk]]
id = "d0"
controller = "scsi0"
lun = 0
image = "d0.img"

[[disk]]
id = "d1"
controller = "scsi1"
lun = 0
image = "d1.img"
"""


@pytest.fixture
def domain_name(libvirtd: None) -> Iterator[str]:
    """A name no other domain has; whatever the test defined under it is undefined."""
    name = f"mplaunch-define-{uuid.uuid4().hex[:12]}"
    yield name
    if name in domains():
        virsh("undefine", name, check=False)


def printed_domain(tmp_path: Path, name: str) -> str:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    for disk in ("d0.img", "d1.img"):
        (tmp_path / disk).write_bytes(bytes(4096))
    spec = tmp_path / "vm.toml"
    spec.write_text(SPEC.format(name=name))
    return subprocess.run(
        [sys.executable, "-m", "launcher", "--print-libvirt-xml", str(spec)],
        capture_output=True, text=True, check=True, cwd=REPO, timeout=60,
    ).stdout


def qemu_args(root: ET.Element) -> list[str | None]:
    return [a.get("value") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]


def test_virsh_defines_the_printed_domain_unchanged(tmp_path: Path, domain_name: str) -> None:
    printed = printed_domain(tmp_path, domain_name)
    ours = ET.fromstring(printed)
    file = tmp_path / "domain.xml"
    file.write_text(printed)
    virsh("define", str(file))
    kept = ET.fromstring(virsh("dumpxml", domain_name).stdout)

    assert qemu_args(kept) == qemu_args(ours)
    assert len(qemu_args(ours)) == 8  # two chardevs, two devices
    assert kept.get("type") == "qemu"
    assert kept.findtext("name") == domain_name
    assert kept.findtext("memory") == str(256 * 1024)
    cell = kept.find("cpu/numa/cell")
    assert cell is not None and cell.get("memAccess") == "shared"
    backing = kept.find("memoryBacking/access")
    assert backing is not None and backing.get("mode") == "shared"
    assert kept.findtext("os/kernel") == str(tmp_path / "vmlinuz")
    serial = kept.find("devices/serial/source")
    assert serial is not None and serial.get("path") == str(tmp_path / "console.log")
    assert kept.find("devices/memballoon[@model='none']") is not None
    assert kept.find("devices/controller[@type='usb'][@model='none']") is not None

    on_root_bus = [(e.get("slot"), e.get("function"))
                   for e in kept.iterfind("devices/*/address[@type='pci']")
                   if int(str(e.get("bus")), 16) == 0]
    assert on_root_bus  # libvirt did place devices of its own there (q35's SATA at 0x1f)
    assert not [a for a in on_root_bus if int(str(a[0]), 16) in TAKEN_SLOTS], on_root_bus

    virsh("undefine", domain_name)
    assert domain_name not in domains()
