"""Boots the test guest in real QEMU (TCG) and checks its workloads' reports.

QEMU is run the way the launcher runs it (memfd-backed shared RAM, q35,
direct kernel boot, serial console on stdio), with QEMU's own in-process
virtio-scsi standing in for the emulator, so these tests pin down the
guest itself: its parameters, its report lines, and that poweroff and
reboot really reach the machine.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from launcher.guest import (
    GuestImage,
    GuestReport,
    Then,
    Workload,
    ensure_guest,
    kernel_append,
    parse_report,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 120.0
#: The POWER ON unit attention every LUN reports once when first probed.
POWER_ON = "Power-on or device reset occurred"


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    return ensure_guest(REPO / "build" / "guest")


class Vm:
    """One QEMU process with the guest's serial console on its stdin/stdout."""

    def __init__(self, image: GuestImage, append: str, extra: Sequence[str] = ()) -> None:
        self.lines: list[str] = []
        self.started = time.monotonic()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            [QEMU, "-accel", "tcg", "-nodefaults", "-no-user-config",
             "-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
             "-numa", "node,memdev=mem", "-machine", "q35", "-display", "none",
             "-kernel", str(image.kernel), "-initrd", str(image.initrd),
             "-append", append, "-serial", "stdio", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._queue.put(raw.decode(errors="replace").rstrip("\r\n"))
        self._queue.put(None)

    def wait_for(self, wanted: Callable[[GuestReport], bool],
                 timeout: float = BOOT_TIMEOUT) -> GuestReport:
        """The next report that satisfies ``wanted``; fails on timeout or QEMU exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no expected report within {timeout} s; console:\n{self.transcript()}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"QEMU exited first; console:\n{self.transcript()}")
            self.lines.append(line)
            report = parse_report(line)
            if report is not None and wanted(report):
                return report

    def wait_done(self) -> GuestReport:
        return self.wait_for(lambda r: r.kind == "DONE")

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def wait_exit(self, timeout: float = 30.0) -> int:
        """QEMU's exit status once the guest has powered the machine off."""
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU did not exit after the guest's poweroff:\n{self.transcript()}")
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return status

    def reports(self, kind: str | None = None) -> list[GuestReport]:
        found = [r for r in map(parse_report, self.lines) if r is not None]
        return [r for r in found if kind is None or r.kind == kind]

    def transcript(self) -> str:
        return "\n".join(self.lines[-60:])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def boot(guest: GuestImage) -> Iterator[Callable[..., Vm]]:
    vms: list[Vm] = []

    def start(append: str, extra: Sequence[str] = ()) -> Vm:
        vms.append(Vm(guest, append, extra))
        return vms[-1]

    yield start
    for vm in vms:
        vm.close()


def scsi_disks(tmp_path: Path, disks: Sequence[tuple[str, int, int, int, bool]]) -> list[str]:
    """QEMU arguments for one in-process virtio-scsi controller with the given disks.

    Each disk is (name, size in MiB, scsi target, lun, read-only).
    """
    args = ["-device", "virtio-scsi-pci,id=s"]
    for name, mib, target, lun, readonly in disks:
        image = tmp_path / f"{name}.img"
        with image.open("wb") as handle:
            handle.truncate(mib << 20)
        ro = ",readonly=on" if readonly else ""
        args += ["-drive", f"file={image},format=raw,if=none,id={name}{ro}",
                 "-device", f"scsi-hd,drive={name},bus=s.0,scsi-id={target},lun={lun}"]
    return args


def nonzero_blocks(image: Path) -> int:
    data = image.read_bytes()
    zero = bytes(4096)
    return sum(1 for offset in range(0, len(data), 4096) if data[offset:offset + 4096] != zero)


def test_init_script_is_valid_busybox_shell(guest: GuestImage) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    script = REPO / "launcher" / "guest" / "init.sh"
    result = subprocess.run([busybox, "sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_boot_reports_and_powers_the_machine_off(boot: Callable[..., Vm],
                                                 guest: GuestImage) -> None:
    vm = boot(kernel_append(Workload.BOOT))
    first = vm.wait_for(lambda r: r.kind == "BOOT")
    assert first.fields["kernel"] == guest.kernel_release
    done = vm.wait_done()
    assert done.fields == {"workload": "boot", "rc": "0"}
    # Poweroff goes through ACPI: QEMU must exit by itself, cleanly.
    assert vm.wait_exit() == 0
    elapsed = time.monotonic() - vm.started
    print(f"guest boot to poweroff under TCG: {elapsed:.1f} s")
    assert not vm.reports("ERROR") and not vm.reports("WARN") and not vm.reports("KLOG")


def test_disks_are_listed_and_verified_on_virtio_scsi(boot: Callable[..., Vm],
                                                      tmp_path: Path) -> None:
    extra = scsi_disks(tmp_path, [("d0", 64, 0, 0, False), ("d1", 32, 0, 1, True),
                                  ("d2", 16, 1, 0, False)])
    vm = boot(kernel_append(Workload.VERIFY, disks=3, seed=5, count=12), extra)
    done = vm.wait_done()
    assert vm.wait_exit() == 0
    disks = vm.reports("DISK")
    assert [d.fields["hctl"] for d in disks] == ["0:0:0:0", "0:0:0:1", "0:0:1:0"]
    assert [d.number("size") for d in disks] == [64 << 20, 32 << 20, 16 << 20]
    assert [d.fields["ro"] for d in disks] == ["0", "1", "0"]
    assert all(d.fields["vendor"] == "QEMU" and d.fields["model"] == "QEMU_HARDDISK"
               for d in disks)
    by_hctl = {d.fields["hctl"]: d.fields["name"] for d in disks}
    verified = {r.fields["name"]: r.fields for r in vm.reports("VERIFY")}
    assert set(verified) == {by_hctl["0:0:0:0"], by_hctl["0:0:1:0"]}
    for fields in verified.values():
        assert fields == {"name": fields["name"], "blocks": "12", "ok": "12", "bad": "0"}
    (ro,) = vm.reports("RO")
    assert ro.fields == {"name": by_hctl["0:0:0:1"], "write_refused": "1"}
    assert done.fields == {"workload": "verify", "rc": "0"}
    # The data really reached the images, at distinct blocks, and not the read-only one.
    assert nonzero_blocks(tmp_path / "d0.img") == 12
    assert nonzero_blocks(tmp_path / "d2.img") == 12
    assert nonzero_blocks(tmp_path / "d1.img") == 0
    # Only the POWER ON unit attention of each LUN's first probe may show.
    klog = vm.reports("KLOG")
    assert all(POWER_ON in r.text for r in klog), vm.transcript()
    assert len(klog) <= 3


def test_same_seed_writes_the_same_blocks(boot: Callable[..., Vm], tmp_path: Path) -> None:
    extra = scsi_disks(tmp_path, [("d0", 8, 0, 0, False)])
    vm = boot(kernel_append(Workload.VERIFY, disks=1, seed=9, count=5), extra)
    assert vm.wait_done().fields["rc"] == "0"
    vm.wait_exit()
    data = (tmp_path / "d0.img").read_bytes()
    first = {o for o in range(0, len(data), 4096) if any(data[o:o + 4096])}
    (tmp_path / "d0.img").write_bytes(bytes(len(data)))
    vm = boot(kernel_append(Workload.VERIFY, disks=1, seed=9, count=5), extra)
    assert vm.wait_done().fields["rc"] == "0"
    vm.wait_exit()
    data = (tmp_path / "d0.img").read_bytes()
    assert {o for o in range(0, len(data), 4096) if any(data[o:o + 4096])} == first
    assert len(first) == 5


def test_shell_workload_returns_status_and_output(boot: Callable[..., Vm]) -> None:
    command = "echo 'first line'; echo second >&2; printf 'no newline'; exit 3"
    vm = boot(kernel_append(Workload.SHELL, command=command))
    done = vm.wait_done()
    (shell,) = vm.reports("SHELL")
    assert shell.fields == {"rc": "3"}
    assert [r.text for r in vm.reports("OUT")] == ["first line", "second", "no newline"]
    assert done.fields == {"workload": "shell", "rc": "3"}
    assert vm.wait_exit() == 0


def test_reboot_boots_the_guest_again(boot: Callable[..., Vm]) -> None:
    vm = boot(kernel_append(Workload.BOOT, then=Then.REBOOT))
    vm.wait_for(lambda r: r.kind == "DONE")
    vm.wait_for(lambda r: r.kind == "BOOT")  # the second boot
    assert vm.process.poll() is None, "QEMU must survive a guest reboot"
    assert len(vm.reports("BOOT")) == 2


def test_io_runs_until_stopped_from_the_console(boot: Callable[..., Vm],
                                                tmp_path: Path) -> None:
    extra = scsi_disks(tmp_path, [("d0", 16, 0, 0, False)])
    vm = boot(kernel_append(Workload.IO, disks=1, count=4), extra)
    vm.wait_for(lambda r: r.kind == "IO" and r.fields["round"] == "2")
    vm.send("mpl-stop\n")
    done = vm.wait_done()
    assert vm.wait_exit() == 0
    rounds = vm.reports("IO")
    assert [r.number("round") for r in rounds] == list(range(1, len(rounds) + 1))
    assert all(r.fields["ok"] == "4" and r.fields["bad"] == "0" for r in rounds)
    assert done.fields == {"workload": "io", "rc": "0"}


def test_io_stops_after_the_given_seconds(boot: Callable[..., Vm], tmp_path: Path) -> None:
    extra = scsi_disks(tmp_path, [("d0", 16, 0, 0, False)])
    vm = boot(kernel_append(Workload.IO, disks=1, count=2, seconds=2), extra)
    done = vm.wait_done()
    assert done.fields == {"workload": "io", "rc": "0"}
    assert vm.reports("IO")
    assert vm.wait_exit() == 0


def test_bad_parameters_are_reported(boot: Callable[..., Vm]) -> None:
    vm = boot(kernel_append(Workload.BOOT) + " mpl.count=lots mpl.workload=dance")
    done = vm.wait_done()
    errors = [r.fields for r in vm.reports("ERROR")]
    assert {"param": "mpl.count", "value": "lots", "expected": "number"} in errors
    assert done.fields == {"workload": "dance", "rc": "2"}
    assert vm.wait_exit() == 0
