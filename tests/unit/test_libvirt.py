"""Backend-only mode: the QEMU arguments and libvirt XML that attach a VM to mplaunch."""

from __future__ import annotations

import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from launcher.libvirt import (
    LIBVIRT_PREFIX,
    QEMU_NS,
    NotAttachable,
    PciAddress,
    attach_args,
    backend_qemu_argv,
    backend_socket,
    domain_type,
    format_argv,
    frontend_group_warning,
    libvirt_domain,
    libvirt_fragment,
    pci_addresses,
)
from launcher.spec import Accel, Spec, parse_spec


def make_spec(tmp_path: Path, **vm: object) -> Spec:
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    (tmp_path / "b.img").write_bytes(b"\0" * 8192)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")
    data = {
        "vm": {"name": "t1", "memory": "1G", "cpus": 2, "kernel": "vmlinuz",
               "initrd": "initrd.img",
               "append": "console=ttyS0 quiet", "console": "none",
               "run_dir": str(tmp_path / "run,dir"), **vm},
        "emulator": [{"id": "e0"}],
        "controller": [{"id": "scsi0", "emulator": "e0", "queues": 4},
                       {"id": "scsi1", "emulator": "e0"}],
        "disk": [{"id": "d0", "controller": "scsi0", "lun": 0, "image": "a.img"},
                 {"id": "d1", "controller": "scsi1", "lun": 3, "image": "b.img"}],
    }
    return parse_spec(data, tmp_path / "vm.toml")


def options(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == name]


def test_sockets_live_in_the_run_folder(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    assert backend_socket(spec.vm.run_dir, "scsi0") == (
        tmp_path / "run,dir" / "vhost-user" / "scsi0.sock")


def test_attach_args_use_socket_paths_with_commas_escaped(tmp_path: Path) -> None:
    argv = attach_args(make_spec(tmp_path))
    run = str(tmp_path / "run,,dir")
    assert options(argv, "-chardev") == [
        f"socket,id=vhost-scsi0,path={run}/vhost-user/scsi0.sock",
        f"socket,id=vhost-scsi1,path={run}/vhost-user/scsi1.sock",
    ]
    assert options(argv, "-device") == [
        "vhost-user-scsi-pci,id=scsi0,chardev=vhost-scsi0,num_queues=4",
        "vhost-user-scsi-pci,id=scsi1,chardev=vhost-scsi1,num_queues=1",
    ]


def test_full_command_line_for_backend_only_mode(tmp_path: Path) -> None:
    argv = backend_qemu_argv(make_spec(tmp_path), binary="/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert options(argv, "-object") == ["memory-backend-memfd,id=ram0,size=1024M,share=on"]
    assert options(argv, "-numa") == ["node,memdev=ram0"]
    assert options(argv, "-accel") == ["kvm", "tcg"]  # auto: QEMU tries them in order
    assert options(argv, "-cpu") == ["max"]
    assert options(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert not any("addr=" in a for a in argv)  # QEMU places the devices itself
    assert not any("fd=" in a for a in argv)  # no inherited descriptors in this mode
    assert "-mon" not in argv and "-serial" not in argv
    assert options(argv, "-chardev") == options(attach_args(make_spec(tmp_path)), "-chardev")
    tcg = backend_qemu_argv(make_spec(tmp_path, accel="tcg"))
    assert options(tcg, "-accel") == ["tcg"]


def test_formatted_command_is_the_same_argv_for_a_shell(tmp_path: Path) -> None:
    argv = backend_qemu_argv(make_spec(tmp_path, append="console=ttyS0 root='/dev/sda'"))
    text = format_argv(argv)
    assert text.count("\n") > 10
    assert shlex.split(text.replace("\\\n", "")) == argv


def lsi_spec(tmp_path: Path) -> Spec:
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    return parse_spec({
        "vm": {"name": "t1", "console": "none", "run_dir": str(tmp_path / "run")},
        "emulator": [{"id": "e0"}, {"id": "lsi-a", "kind": "lsi"}],
        "controller": [{"id": "scsi0", "emulator": "e0"}, {"id": "lsi0", "emulator": "lsi-a"}],
        "disk": [{"id": "d0", "controller": "lsi0", "lun": 0, "image": "a.img"}],
    }, tmp_path / "vm.toml")


def test_qemu_args_show_the_proxy_device_of_an_lsi_controller(tmp_path: Path) -> None:
    from launcher.libvirt import PROXY_FD_PLACEHOLDER, proxy_note

    spec = lsi_spec(tmp_path)
    argv = backend_qemu_argv(spec)
    assert options(argv, "-device") == [
        "vhost-user-scsi-pci,id=scsi0,chardev=vhost-scsi0,num_queues=1",
        f"x-pci-proxy-dev,id=lsi0,fd={PROXY_FD_PLACEHOLDER}",
    ]
    assert options(argv, "-chardev") == [
        f"socket,id=vhost-scsi0,path={tmp_path}/run/vhost-user/scsi0.sock"]
    note = proxy_note(spec, "vm.toml")
    assert note is not None and note.startswith('vm.toml: note: the x-pci-proxy-dev of '
                                                '[[controller]] "lsi0" shows fd=<fd>')
    assert proxy_note(make_spec(tmp_path)) is None


def test_libvirt_and_backend_only_refuse_an_lsi_emulator(tmp_path: Path) -> None:
    from launcher.libvirt import NotAttachable, unattachable

    spec = lsi_spec(tmp_path)
    line = unattachable(spec, "--backends-only", "vm.toml")
    assert line == (
        'vm.toml: --backends-only cannot serve [[controller]] "lsi0" (its emulator is of kind '
        '"lsi"): x-pci-proxy-dev takes only an fd inherited from its parent or passed over '
        "QMP, no socket path, so a QEMU started by someone else cannot reach it; run this "
        "spec with mplaunch itself")
    with pytest.raises(NotAttachable, match="--print-libvirt-xml cannot serve"):
        libvirt_domain(spec, Accel.KVM)
    with pytest.raises(NotAttachable, match="--print-libvirt-xml cannot serve"):
        libvirt_fragment(spec)
    assert unattachable(make_spec(tmp_path), "--backends-only") is None


def wide_spec(tmp_path: Path, controllers: int, **vm: object) -> Spec:
    """``controllers`` controllers, one disk each, spread over emulators of 8."""
    emulators = (controllers + 7) // 8
    disks = []
    for i in range(controllers):
        (tmp_path / f"d{i}.img").write_bytes(bytes(4096))
        disks.append({"id": f"d{i}", "controller": f"c{i}", "lun": 0, "image": f"d{i}.img"})
    return parse_spec({
        "vm": {"name": "wide", "console": "none", "run_dir": str(tmp_path / "run"), **vm},
        "emulator": [{"id": f"e{i}"} for i in range(emulators)],
        "controller": [{"id": f"c{i}", "emulator": f"e{i // 8}"} for i in range(controllers)],
        "disk": disks,
    }, tmp_path / "vm.toml")


def qemu_args(root: ET.Element) -> list[str]:
    commandline = root.find(f"{{{QEMU_NS}}}commandline")
    assert commandline is not None
    return [str(a.get("value")) for a in commandline.findall(f"{{{QEMU_NS}}}arg")]


def one(root: ET.Element, path: str) -> ET.Element:
    found = root.findall(path)
    assert len(found) == 1, (path, found)
    return found[0]


def text(root: ET.Element, path: str) -> str | None:
    return one(root, path).text


def test_complete_domain_has_the_specs_machine(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    printed = libvirt_domain(spec, Accel.KVM)
    assert 'xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"' in printed
    root = ET.fromstring(printed)
    assert root.tag == "domain" and root.get("type") == "kvm"
    assert text(root, "name") == "t1"
    for tag in ("memory", "currentMemory"):
        assert text(root, tag) == str(1024 * 1024) and one(root, tag).get("unit") == "KiB"
    assert text(root, "vcpu") == "2"
    os_type = one(root, "os/type")
    assert (os_type.text, os_type.get("arch"), os_type.get("machine")) == ("hvm", "x86_64", "q35")
    assert text(root, "os/kernel") == str(tmp_path / "vmlinuz")
    assert text(root, "os/initrd") == str(tmp_path / "initrd.img")
    assert text(root, "os/cmdline") == "console=ttyS0 quiet"
    one(root, "features/acpi")
    assert one(root, "cpu").get("mode") == "host-passthrough"
    assert one(root, "cpu/numa/cell").attrib == {
        "id": "0", "cpus": "0-1", "memory": str(1024 * 1024), "unit": "KiB",
        "memAccess": "shared"}
    assert one(root, "memoryBacking/source").attrib == {"type": "memfd"}
    assert one(root, "memoryBacking/access").attrib == {"mode": "shared"}
    assert [text(root, f"on_{e}") for e in ("poweroff", "reboot", "crash")] == [
        "destroy", "restart", "destroy"]
    assert one(root, "devices/controller").attrib == {"type": "usb", "model": "none"}
    assert one(root, "devices/memballoon").attrib == {"model": "none"}
    assert qemu_args(root) == attach_args(spec, prefix=LIBVIRT_PREFIX, pci=True)


def test_domain_without_a_kernel_has_only_the_machine_type(tmp_path: Path) -> None:
    root = ET.fromstring(libvirt_domain(wide_spec(tmp_path, 1, cpus=1), Accel.TCG))
    assert [e.tag for e in one(root, "os")] == ["type"]
    assert one(root, "cpu/numa/cell").get("cpus") == "0"


def test_domain_type_and_cpu_follow_the_resolved_accel(tmp_path: Path) -> None:
    root = ET.fromstring(libvirt_domain(make_spec(tmp_path, accel="tcg"), Accel.TCG))
    assert root.get("type") == "qemu"
    assert one(root, "cpu").get("mode") == "maximum"  # as mplaunch's own -cpu max
    assert domain_type(Accel.KVM) == "kvm"
    with pytest.raises(ValueError, match="resolve accel = auto"):
        libvirt_domain(make_spec(tmp_path), Accel.AUTO)


@pytest.mark.parametrize("count,expected", [
    (1, ["bus=pcie.0,addr=0x1e.0"]),
    (2, ["bus=pcie.0,addr=0x1e.0,multifunction=on", "bus=pcie.0,addr=0x1e.1"]),
    (9, ["bus=pcie.0,addr=0x1e.0,multifunction=on"]
        + [f"bus=pcie.0,addr=0x1e.{f}" for f in range(1, 8)] + ["bus=pcie.0,addr=0x1d.0"]),
])
def test_devices_take_root_bus_addresses_from_slot_0x1e_down(
        tmp_path: Path, count: int, expected: list[str]) -> None:
    assert [a.qemu_option() for a in pci_addresses(count)] == expected
    spec = wide_spec(tmp_path, count)
    devices = [a for a in qemu_args(ET.fromstring(libvirt_domain(spec, Accel.KVM)))
               if a.startswith("vhost-user-scsi-pci,")]
    assert [d.split(",num_queues=1,")[1] for d in devices] == expected
    fragment = qemu_args(ET.fromstring(libvirt_fragment(spec)))
    assert [a for a in fragment if a.startswith("vhost-user-scsi-pci,")] == devices


def test_pci_addresses_stop_above_libvirts_own_slots() -> None:
    assert str(PciAddress(0x1D, 3)) == "0000:00:1d.3"
    three_slots = pci_addresses(3 * 8)
    assert str(three_slots[-1]) == "0000:00:1c.7" and three_slots[-8].multifunction
    with pytest.raises(NotAttachable, match="25 controllers do not fit in the 24 PCI functions"):
        pci_addresses(3 * 8 + 1)  # 0x1b is where libvirt puts an ich9 sound device


def test_ids_carry_the_mplaunch_prefix(tmp_path: Path) -> None:
    args = qemu_args(ET.fromstring(libvirt_domain(make_spec(tmp_path), Accel.KVM)))
    assert args[0::2] == ["-chardev", "-device"] * 2
    assert args[1] == (f"socket,id=mplaunch-vhost-scsi0,"
                       f"path={tmp_path}/run,,dir/vhost-user/scsi0.sock")
    assert args[3] == ("vhost-user-scsi-pci,id=mplaunch-scsi0,chardev=mplaunch-vhost-scsi0,"
                       "num_queues=4,bus=pcie.0,addr=0x1e.0,multifunction=on")
    assert args[5].startswith("socket,id=mplaunch-vhost-scsi1,")
    assert args[7].startswith("vhost-user-scsi-pci,id=mplaunch-scsi1,chardev=mplaunch-vhost-scsi1,")


def test_fragment_holds_only_what_a_domain_must_add(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    printed = libvirt_fragment(spec)
    root = ET.fromstring(printed)
    assert root.tag == "domain" and "type" not in root.attrib  # the user's domain keeps its own
    assert [e.tag for e in root] == ["memoryBacking", f"{{{QEMU_NS}}}commandline"]
    assert one(root, "memoryBacking/source").get("type") == "memfd"
    assert one(root, "memoryBacking/access").get("mode") == "shared"
    assert qemu_args(root) == qemu_args(ET.fromstring(libvirt_domain(spec, Accel.KVM)))
    comment = printed.split("<!--")[1].split("-->")[0]
    assert "0000:00:1e.0 (scsi0), 0000:00:1e.1 (scsi1)" in comment
    assert "shared guest memory" in comment and "merge" in comment


@pytest.mark.parametrize("console", ["none", "stdio", "file"])
def test_console_becomes_the_first_serial_port(tmp_path: Path, console: str) -> None:
    path = tmp_path / "console.log"
    spec = make_spec(tmp_path, console=str(path) if console == "file" else console)
    devices = one(ET.fromstring(libvirt_domain(spec, Accel.KVM)), "devices")
    serials, consoles = devices.findall("serial"), devices.findall("console")
    if console == "none":
        assert serials == [] and consoles == []
    elif console == "stdio":  # no terminal behind libvirt's QEMU: a pty for virsh console
        assert [s.get("type") for s in serials] == ["pty"]
        assert [c.get("type") for c in consoles] == ["pty"]
        assert one(devices, "console/target").attrib == {"type": "serial", "port": "0"}
    else:
        assert [s.get("type") for s in serials] == ["file"]
        assert one(devices, "serial/source").attrib == {"path": str(path)}
        assert consoles == []  # libvirt shows the first serial port as the console itself


def test_warns_that_libvirts_qemu_needs_the_frontend_group(tmp_path: Path) -> None:
    line = frontend_group_warning(make_spec(tmp_path), "vm.toml")
    assert line is not None and "\n" not in line
    assert line.startswith("vm.toml: warning: [vm] frontend_group is not set")
    assert "libvirt-qemu" in line and line.endswith('set frontend_group = "libvirt-qemu"')
    assert frontend_group_warning(make_spec(tmp_path, frontend_group=0)) is None
