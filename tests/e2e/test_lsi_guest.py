"""The LSI flavour of the test guest drives an LSI53C895A.

QEMU's in-process ``lsi53c895a`` stands in for the remote process here, so
this pins down the guest alone: its kernel has sym53c8xx, the builder loads
it after its dependencies, the polling command line the docs prescribe for
TCG works, and targets map to the H:C:T:L the guest reports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.guest import GuestReport, Workload, kernel_append, parse_report
from launcher.spec import LSI_POLLING_APPEND
from tests.support.vm import ensure_lsi_guest_built

pytestmark = pytest.mark.e2e

QEMU = "qemu-system-x86_64"
TIMEOUT = 180.0
#: What every LSI boot logs once: the driver resets the bus when it probes
#: the controller, and each disk then reports that reset (a unit attention).
BOOT_TIME_KLOG = re.compile(r"sym0: SCSI BUS has been reset|Power-on or device reset occurred")


def test_lsi_guest_verifies_disks_on_targets_0_and_6(tmp_path: Path) -> None:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    kernel, initrd = ensure_lsi_guest_built()
    args = ["-device", "lsi53c895a,id=l"]
    for name, target in (("d0", 0), ("d6", 6)):
        image = tmp_path / f"{name}.img"
        with image.open("wb") as handle:
            handle.truncate(16 << 20)
        args += ["-drive", f"if=none,id={name},file={image},format=raw",
                 "-device", f"scsi-hd,bus=l.0,scsi-id={target},drive={name}"]
    append = f"{kernel_append(Workload.VERIFY, disks=2, count=16)} {LSI_POLLING_APPEND}"
    console = tmp_path / "console.log"
    done = subprocess.run(
        [QEMU, "-accel", "tcg", "-m", "512M", "-nodefaults", "-no-user-config",
         "-display", "none", "-kernel", str(kernel), "-initrd", str(initrd),
         "-append", append, "-serial", f"file:{console}", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    text = console.read_text(errors="replace")
    assert done.returncode == 0, done.stderr + text[-3000:]
    reports = [r for r in map(parse_report, text.splitlines()) if r is not None]

    def of(kind: str) -> list[GuestReport]:
        return [r for r in reports if r.kind == kind]

    assert [d.fields["hctl"] for d in of("DISK")] == ["0:0:0:0", "0:0:6:0"], text[-3000:]
    assert [r.fields["ok"] for r in of("VERIFY")] == ["16", "16"]
    assert [r.fields["bad"] for r in of("VERIFY")] == ["0", "0"]
    assert not of("ERROR") and not of("WARN")
    unexpected = [r for r in of("KLOG") if not BOOT_TIME_KLOG.search(r.text)]
    assert not unexpected, unexpected
    assert of("DONE")[-1].fields == {"workload": "verify", "rc": "0"}
