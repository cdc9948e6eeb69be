"""The VM the soak benchmark and the fault sweep run: two emulators, one
writable disk each (sizes differ, so a mix-up shows), and the read-only disk
that carries the guest's script. A short heartbeat and a generous burst, so
that many deaths in a row are each repaired rather than given up on."""

from __future__ import annotations

from pathlib import Path

from tests.chaos import guest
from tests.support.vm import DiskDef, VmDef, shell_cmd

MiB = 1024 * 1024
DISK_SIZES = {"d0": 16 * MiB, "d1": 17 * MiB}
POLICY: dict[str, object] = {"restart_burst": 1000, "restart_window_s": 1,
                             "heartbeat_ms": 100, "hang_timeout_ms": 1000}


def two_emulator_vm(folder: Path, name: str, uids: str, script: str) -> VmDef:
    """`script` is the guest's shell script (tests.chaos.guest.script)."""
    vm = VmDef(folder, name, workload="shell")
    vm.emulators = {"e0": dict(POLICY), "e1": dict(POLICY)}
    vm.controllers = {"scsi0": ("e0", 1), "scsi1": ("e1", 1)}
    vm.disks = [
        DiskDef("d0", "scsi0", 0, size=DISK_SIZES["d0"]),
        DiskDef("d1", "scsi1", 0, size=DISK_SIZES["d1"]),
        DiskDef("script", "scsi1", 1, size=guest.SCRIPT_DISK_SIZE, readonly=True),
    ]
    vm.vm_extra = {"uid_range": uids}
    guest.script_image(vm.image("script"), script)
    vm.extra_append = "mpl.then=reboot " + shell_cmd(guest.loader())
    return vm
