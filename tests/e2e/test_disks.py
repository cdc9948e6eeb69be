"""The guest's disks, served by emulator processes, end to end: two emulators,
three controllers, four disks (one read-only), a guest reboot, and the data
in the image files after power-off."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.vm import DiskDef, Mplaunch, VmDef, lines_of, run_to_end, shell_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest")]

MiB = 1024 * 1024


def four_disk_vm(folder: Path, name: str, workload: str, extra: str = "") -> VmDef:
    vm = VmDef(folder, name, workload=workload, extra_append=extra)
    vm.emulators = {"emu-a": {}, "emu-b": {}}
    vm.controllers = {"scsi0": ("emu-a", 1), "scsi1": ("emu-a", 2), "scsi2": ("emu-b", 1)}
    vm.disks = [
        DiskDef("d0", "scsi0", 0, size=8 * MiB),
        DiskDef("d1", "scsi0", 1, size=12 * MiB, block_size=4096),
        DiskDef("d2", "scsi1", 0, size=16 * MiB),
        DiskDef("d3", "scsi2", 5, size=20 * MiB, readonly=True),
    ]
    return vm


def test_every_disk_seen_verified_and_survives_a_reboot(tmp_path: Path) -> None:
    vm = four_disk_vm(tmp_path, "disks-verify", "verify", "mpl.count=8 mpl.then=reboot")
    m = Mplaunch(vm.write(), console=vm.console)
    try:
        m.wait_console(r"(?s)MPL DONE workload=verify.*MPL DONE workload=verify", timeout=240)
        assert len(m.descendants()) >= 3  # QEMU and both emulators still there
    finally:
        m.signal(signal.SIGTERM)
        rc = m.wait(60)
    console = vm.console.read_text()
    assert rc == 0, m.stderr
    assert len(lines_of(vm.console, "BOOT")) >= 2, console
    done = lines_of(vm.console, "DONE")[:2]
    assert done == [{"workload": "verify", "rc": "0"}] * 2, console
    disks = lines_of(vm.console, "DISK")
    sizes = sorted(int(d["size"]) for d in disks[:4])
    assert sizes == [8 * MiB, 12 * MiB, 16 * MiB, 20 * MiB], console
    assert {d["vendor"] for d in disks} == {"MPLAUNCH"}
    ro = [d for d in disks[:4] if d["ro"] == "1"]
    assert [int(d["size"]) for d in ro] == [20 * MiB]
    verify = lines_of(vm.console, "VERIFY")
    assert len(verify) >= 6 and all(v["bad"] == "0" and v["ok"] == "8" for v in verify), console
    refused = lines_of(vm.console, "RO")
    assert refused and all(r["write_refused"] == "1" for r in refused), console
    assert not lines_of(vm.console, "KLOG"), console
    m.assert_nothing_left(vm.run_dir)


def test_written_data_is_in_the_image_files_after_power_off(tmp_path: Path) -> None:
    # Each writable disk gets a marker naming its own size, 1 MiB in; the
    # test finds which image is which by that size.
    script = (
        "for d in /sys/block/sd*; do n=${d##*/}; [ $(cat $d/ro) = 1 ] && continue; "
        "s=$(($(cat $d/size) * 512)); printf 'MPLMARK-%012d' $s > /tmp/m; "
        "dd if=/tmp/m of=/dev/$n bs=20 seek=52429 count=1 conv=notrunc,fsync 2>/dev/null "
        "&& echo wrote $n $s; done; sync"
    )
    vm = four_disk_vm(tmp_path, "disks-data", "shell", shell_cmd(script))
    rc, m = run_to_end(vm)
    assert rc == 0, m.stderr
    assert lines_of(vm.console, "SHELL") == [{"rc": "0"}], vm.console.read_text()
    for disk in vm.disks:
        with open(vm.image(disk.id), "rb") as f:
            f.seek(52429 * 20)
            found = f.read(20)
        if disk.readonly:
            assert found == bytes(20)
        else:
            assert found == f"MPLMARK-{disk.size:012d}".encode(), disk
    m.assert_nothing_left(vm.run_dir)
