"""QEMU's command line as built from specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.spec import Accel, Spec, parse_spec
from launcher.vmm import QemuFds, qemu_argv


def make_spec(tmp_path: Path, **vm: object) -> Spec:
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    (tmp_path / "b.img").write_bytes(b"\0" * 8192)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")
    data = {
        "vm": {"name": "t1", "memory": "1G", "cpus": 2, "kernel": "vmlinuz", "initrd": "initrd.img",
               "append": "console=ttyS0 quiet", "console": "none", **vm},
        "emulator": [{"id": "e0"}],
        "controller": [{"id": "scsi0", "emulator": "e0", "queues": 4},
                       {"id": "scsi1", "emulator": "e0"}],
        "disk": [{"id": "d0", "controller": "scsi0", "lun": 0, "image": "a.img"},
                 {"id": "d1", "controller": "scsi1", "lun": 3, "image": "b.img", "readonly": True}],
    }
    return parse_spec(data, tmp_path / "vm.toml")


def argv_pairs(argv: list[str]) -> list[tuple[str, str]]:
    return [(argv[i], argv[i + 1]) for i in range(1, len(argv) - 1) if argv[i].startswith("-")
            and not argv[i + 1].startswith("-")]


FDS = QemuFds(qmp_listener=7, controller_fds={"scsi0": 9, "scsi1": 11})


def test_memory_is_a_shared_memfd_on_a_numa_node(tmp_path: Path) -> None:
    argv = qemu_argv(make_spec(tmp_path), Accel.TCG, FDS)
    pairs = argv_pairs(argv)
    assert ("-m", "1024M") in pairs
    assert ("-object", "memory-backend-memfd,id=ram0,size=1024M,share=on") in pairs
    assert ("-numa", "node,memdev=ram0") in pairs
    assert ("-smp", "2") in pairs


def test_isolation_defaults(tmp_path: Path) -> None:
    argv = qemu_argv(make_spec(tmp_path), Accel.TCG, FDS)
    assert "-nodefaults" in argv and "-no-user-config" in argv
    sandbox = argv[argv.index("-sandbox") + 1]
    assert sandbox.startswith("on,")
    assert "spawn=deny" in sandbox and "elevateprivileges=deny" in sandbox


@pytest.mark.parametrize("accel,cpu", [(Accel.TCG, "max"), (Accel.KVM, "host")])
def test_accel_and_cpu(tmp_path: Path, accel: Accel, cpu: str) -> None:
    pairs = argv_pairs(qemu_argv(make_spec(tmp_path), accel, FDS))
    assert ("-accel", str(accel)) in pairs and ("-cpu", cpu) in pairs


def test_auto_must_be_resolved_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resolve accel"):
        qemu_argv(make_spec(tmp_path), Accel.AUTO, FDS)


def test_qmp_is_the_passed_listening_fd(tmp_path: Path) -> None:
    pairs = argv_pairs(qemu_argv(make_spec(tmp_path), Accel.TCG, FDS))
    assert ("-chardev", "socket,id=qmp,fd=7,server=on,wait=off") in pairs
    assert ("-mon", "chardev=qmp,mode=control") in pairs


def test_one_vhost_user_scsi_device_per_controller(tmp_path: Path) -> None:
    pairs = argv_pairs(qemu_argv(make_spec(tmp_path), Accel.TCG, FDS))
    assert ("-chardev", "socket,id=vhost-scsi0,fd=9") in pairs
    assert ("-device", "vhost-user-scsi-pci,id=scsi0,chardev=vhost-scsi0,num_queues=4") in pairs
    assert ("-chardev", "socket,id=vhost-scsi1,fd=11") in pairs
    assert ("-device", "vhost-user-scsi-pci,id=scsi1,chardev=vhost-scsi1,num_queues=1") in pairs


def test_direct_kernel_boot(tmp_path: Path) -> None:
    pairs = argv_pairs(qemu_argv(make_spec(tmp_path), Accel.TCG, FDS))
    assert ("-kernel", str(tmp_path / "vmlinuz")) in pairs
    assert ("-initrd", str(tmp_path / "initrd.img")) in pairs
    argv = qemu_argv(make_spec(tmp_path), Accel.TCG, FDS)
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet"


def test_console_none_has_no_serial(tmp_path: Path) -> None:
    argv = qemu_argv(make_spec(tmp_path), Accel.TCG, FDS)
    assert "-serial" not in argv


def test_console_stdio_keeps_ctrl_c_a_signal(tmp_path: Path) -> None:
    pairs = argv_pairs(qemu_argv(make_spec(tmp_path, console="stdio"), Accel.TCG, FDS))
    assert ("-chardev", "stdio,id=console,signal=on") in pairs
    assert ("-serial", "chardev:console") in pairs


def test_console_file_is_relative_to_the_spec_and_escaped(tmp_path: Path) -> None:
    pairs = argv_pairs(qemu_argv(make_spec(tmp_path, console="con,sole.log"), Accel.TCG, FDS))
    assert ("-chardev", f"file,id=console,path={tmp_path}/con,,sole.log") in pairs


def test_files_mplaunch_opened_are_given_by_fd(tmp_path: Path) -> None:
    """Unprivileged QEMU opens none of the spec's files by their own path."""
    spec = make_spec(tmp_path, console=str(tmp_path / "console.log"))
    fds = QemuFds(7, {"scsi0": 9, "scsi1": 11}, kernel=12, initrd=13, console=14)
    argv = qemu_argv(spec, Accel.TCG, fds)
    pairs = argv_pairs(argv)
    assert ("-kernel", "/proc/self/fd/12") in pairs
    assert ("-initrd", "/proc/self/fd/13") in pairs
    assert ("-add-fd", "fd=14,set=1") in pairs
    assert ("-chardev", "file,id=console,path=/dev/fdset/1") in pairs
    assert not [a for a in argv if str(tmp_path) in a]
    assert sorted(fds.all()) == [7, 9, 11, 12, 13, 14]


def test_qemu_jail_has_threads_no_memory_bound_and_a_private_dev() -> None:
    from launcher.sandbox.jail import UNLIMITED
    from launcher.vmm import qemu_jail

    tcg = qemu_jail(64010, 64010, [7, 9], kvm=False)
    assert tcg.uid == tcg.gid == 64010 and tcg.keep_fds == (7, 9)
    assert tcg.nproc > 0 and tcg.address_space == UNLIMITED and not tcg.new_root
    assert "kvm" not in tcg.dev and "null" in tcg.dev
    assert "kvm" in qemu_jail(64010, 64010, [], kvm=True).dev
    argv = tcg.argv(["/usr/bin/qemu-system-x86_64", "-m", "16"])
    assert argv[argv.index("--dev") + 1] == ",".join(tcg.dev)
    assert argv[-3:] == ["/usr/bin/qemu-system-x86_64", "-m", "16"]


def mixed_spec(tmp_path: Path) -> Spec:
    """One vhost-user controller and two LSI53C895As, each on its own lsi emulator."""
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    (tmp_path / "b.img").write_bytes(b"\0" * 4096)
    return parse_spec({
        "vm": {"name": "mixed", "console": "none"},
        "emulator": [{"id": "py"}, {"id": "lsi-a", "kind": "lsi"}, {"id": "lsi-b", "kind": "lsi"}],
        "controller": [{"id": "scsi0", "emulator": "py", "queues": 2},
                       {"id": "lsi0", "emulator": "lsi-a"}, {"id": "lsi1", "emulator": "lsi-b"}],
        "disk": [{"id": "d0", "controller": "lsi0", "lun": 0, "image": "a.img"},
                 {"id": "d1", "controller": "lsi1", "lun": 6, "image": "b.img"}],
    }, tmp_path / "vm.toml")


def test_lsi_controller_is_a_proxy_device_on_its_fd(tmp_path: Path) -> None:
    fds = QemuFds(7, {"scsi0": 9, "lsi0": 10, "lsi1": 12})
    argv = qemu_argv(mixed_spec(tmp_path), Accel.TCG, fds)
    pairs = argv_pairs(argv)
    assert ("-device", "x-pci-proxy-dev,id=lsi0,fd=10") in pairs
    assert ("-device", "x-pci-proxy-dev,id=lsi1,fd=12") in pairs
    assert ("-device", "vhost-user-scsi-pci,id=scsi0,chardev=vhost-scsi0,num_queues=2") in pairs
    # No vhost-user chardev for an LSI controller: its link is the proxy's own fd.
    assert not [a for a in argv if "vhost-lsi" in a]
    # The proxy's remote maps guest RAM: it must stay a shared memfd.
    assert ("-object", "memory-backend-memfd,id=ram0,size=512M,share=on") in pairs
    assert sorted(fds.all()) == [7, 9, 10, 12]
