"""The remote LSI process's command line and jail, read directly (no process)."""

from __future__ import annotations

import pytest

from launcher.lsi.remote import (
    RAM_MAPPINGS,
    REMOTE_HEADROOM,
    RemoteDisk,
    fdset_id,
    node_name,
    remote_argv,
    remote_jail,
)
from launcher.vmm import QEMU_VIEW


def options(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_the_remote_opens_nothing_and_is_sandboxed_by_qemu_too() -> None:
    argv = remote_argv("lsi1", [RemoteDisk(0, 11, 10)], link_fd=5, monitor_fd=6,
                       binary="/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert options(argv, "-machine") == ["x-remote,vfio-user=off"]
    assert {"-nodefaults", "-no-user-config"} <= set(argv)
    assert options(argv, "-display") == ["none"]
    sandbox = options(argv, "-sandbox")[0].split(",")
    assert sandbox[0] == "on" and {"spawn=deny", "elevateprivileges=deny"} <= set(sandbox)
    assert options(argv, "-object") == ["x-remote-object,id=robj,devid=lsi1,fd=5"]
    assert options(argv, "-chardev") == ["socket,id=mon,fd=6"]
    assert options(argv, "-mon") == ["chardev=mon,mode=control"]
    assert options(argv, "-device")[0] == "lsi53c895a,id=lsi1"
    # Every path it is given is an fd set's.
    paths = [o for o in options(argv, "-blockdev") if "filename=" in o]
    assert all("filename=/dev/fdset/" in p for p in paths) and paths


def test_a_read_write_disk_brings_both_fds_a_read_only_one_only_its_read_fd() -> None:
    argv = remote_argv("lsi1", [RemoteDisk(3, ro_fd=21), RemoteDisk(0, ro_fd=11, rw_fd=10)],
                       5, 6)
    assert options(argv, "-add-fd") == [
        f"fd=10,set={fdset_id(0)}", f"fd=11,set={fdset_id(0)}", f"fd=21,set={fdset_id(3)}"]
    blockdevs = options(argv, "-blockdev")
    assert blockdevs == [
        f"driver=file,node-name=t0-file,filename=/dev/fdset/{fdset_id(0)},locking=off",
        "driver=raw,node-name=t0,file=t0-file",
        f"driver=file,node-name=t3-file,filename=/dev/fdset/{fdset_id(3)},locking=off,"
        "read-only=on",
        "driver=raw,node-name=t3,file=t3-file,read-only=on",
    ]
    disks = options(argv, "-device")[1:]
    assert disks == [f"scsi-hd,id=scsi-t{t},bus=lsi1.0,scsi-id={t},lun=0,drive={node_name(t)}"
                     for t in (0, 3)]


@pytest.mark.parametrize(("disks", "controller", "complaint"), [
    ([RemoteDisk(1, 3), RemoteDisk(1, 4)], "lsi1", "two disks on one SCSI target"),
    ([], "1lsi", "not a QEMU id"),
    ([], "lsi,x=1", "not a QEMU id"),
])
def test_bad_input_is_refused(disks: list[RemoteDisk], controller: str,
                              complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        remote_argv(controller, disks, 5, 6)


@pytest.mark.parametrize("target", [-1, 7])
def test_targets_are_0_to_6(target: int) -> None:
    with pytest.raises(ValueError, match="0-6"):
        RemoteDisk(target, 3)


def test_the_jail_is_the_vmm_qemus_with_threads_an_address_space_and_no_processes() -> None:
    jail = remote_jail(64001, 64001, [5, 6, 10, 11], 512 << 20)
    assert (jail.uid, jail.gid, jail.keep_fds) == (64001, 64001, (5, 6, 10, 11))
    assert jail.view == QEMU_VIEW and "kvm" not in jail.dev
    assert jail.no_spawn and 0 < jail.nproc <= 256
    assert jail.address_space == (512 << 20) * RAM_MAPPINGS + REMOTE_HEADROOM
    assert not jail.new_root
