"""Backend-only mode: the QEMU arguments and libvirt XML that attach a VM to mplaunch."""

from __future__ import annotations

import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from launcher.libvirt import (
    LIBVIRT_PREFIX,
    QEMU_NS,
    attach_args,
    backend_qemu_argv,
    backend_socket,
    format_argv,
    libvirt_xml,
)
from launcher.spec import Spec, parse_spec


def make_spec(tmp_path: Path, **vm: object) -> Spec:
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    (tmp_path / "b.img").write_bytes(b"\0" * 8192)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    data = {
        "vm": {"name": "t1", "memory": "1G", "cpus": 2, "kernel": "vmlinuz",
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
    assert backend_socket(spec.vm.run_dir, "scsi0") == tmp_path / "run,dir" / "vhost-scsi0.sock"


def test_attach_args_use_socket_paths_with_commas_escaped(tmp_path: Path) -> None:
    argv = attach_args(make_spec(tmp_path))
    run = str(tmp_path / "run,,dir")
    assert options(argv, "-chardev") == [
        f"socket,id=vhost-scsi0,path={run}/vhost-scsi0.sock",
        f"socket,id=vhost-scsi1,path={run}/vhost-scsi1.sock",
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


def test_libvirt_xml_parses_and_carries_backing_and_commandline(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    root = ET.fromstring(libvirt_xml(spec))
    assert root.tag == "domain" and root.get("type") == "kvm"
    backing = root.find("memoryBacking")
    assert backing is not None
    source, access = backing.find("source"), backing.find("access")
    assert source is not None and source.get("type") == "memfd"
    assert access is not None and access.get("mode") == "shared"
    commandline = root.find(f"{{{QEMU_NS}}}commandline")
    assert commandline is not None
    args = [a.get("value") for a in commandline.findall(f"{{{QEMU_NS}}}arg")]
    assert args == attach_args(spec, prefix=LIBVIRT_PREFIX)
    assert str(args[1]).startswith("socket,id=mplaunch-vhost-scsi0,path=")
    assert args[3] == ("vhost-user-scsi-pci,id=mplaunch-scsi0,chardev=mplaunch-vhost-scsi0,"
                       "num_queues=4")
    assert 'xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"' in libvirt_xml(spec)


def test_libvirt_domain_type_follows_accel(tmp_path: Path) -> None:
    root = ET.fromstring(libvirt_xml(make_spec(tmp_path, accel="tcg")))
    assert root.get("type") == "qemu"


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
        f"socket,id=vhost-scsi0,path={tmp_path}/run/vhost-scsi0.sock"]
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
        libvirt_xml(spec)
    assert unattachable(make_spec(tmp_path), "--backends-only") is None
