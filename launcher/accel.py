"""Choose QEMU's accelerator: KVM where it really works, TCG otherwise.

The existence of /dev/kvm proves little: on a host without nested
virtualization the device opens and a VM and a vCPU can even be created, yet
QEMU aborts while setting up the vCPU's MSRs, or the guest never runs. So the
probe asks the real thing: the same QEMU, with KVM and the CPU model mplaunch
would use, runs a 64 KiB firmware whose reset vector writes one byte to an
isa-debug-exit port. QEMU exiting with the status that byte encodes proves a
vCPU ran guest code under KVM. It costs one QEMU start (a fraction of a
second), once per VM start with accel = "auto".
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass

from launcher.spec import Accel
from launcher.vmm import KVM_CPU, QEMU_BINARY

_RESET_VECTOR = 0xFFF0
_EXIT_PORT = 0xF4
_EXIT_VALUE = 0x31
_EXPECTED_STATUS = (_EXIT_VALUE << 1) | 1  # isa-debug-exit's rule
_HLT = 0xF4
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The accelerator to use and, for a status line, why."""

    accel: Accel
    reason: str


def probe_firmware() -> bytes:
    """mov al, 0x31; out 0xf4, al; then halt forever (the probe times out)."""
    image = bytearray([_HLT]) * 0x10000
    code = bytes([0xB0, _EXIT_VALUE, 0xE6, _EXIT_PORT, _HLT, 0xEB, 0xFD])
    image[_RESET_VECTOR : _RESET_VECTOR + len(code)] = code
    return bytes(image)


def probe_kvm(binary: str = QEMU_BINARY, device: str = "/dev/kvm") -> str | None:
    """Return None when QEMU can run guest code under KVM here, else why not."""
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{device} is missing or not accessible"
    with tempfile.NamedTemporaryFile(prefix="mplaunch-kvm-probe-", suffix=".bin") as firmware:
        firmware.write(probe_firmware())
        firmware.flush()
        argv = [
            binary, "-accel", "kvm", "-cpu", KVM_CPU, "-machine", "q35", "-nodefaults",
            "-no-user-config", "-display", "none", "-m", "16", "-bios", firmware.name,
            "-device", f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=1",
        ]
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=PROBE_TIMEOUT, check=False,
            )
        except subprocess.TimeoutExpired:
            return "a KVM test guest did not run within the probe's timeout"
        except OSError as e:
            return f"{binary}: {e.strerror}"
    if done.returncode == _EXPECTED_STATUS:
        return None
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    return f"a KVM test guest failed (QEMU status {done.returncode}: {last})"


def choose_accel(wanted: Accel, binary: str = QEMU_BINARY) -> AccelChoice:
    """Resolve the spec's accel setting. An explicit kvm is honoured even if it
    would fail (QEMU's error then explains why); auto never picks a KVM that
    cannot run."""
    if wanted is Accel.TCG:
        return AccelChoice(Accel.TCG, 'accel = "tcg" in the spec')
    if wanted is Accel.KVM:
        return AccelChoice(Accel.KVM, 'accel = "kvm" in the spec')
    problem = probe_kvm(binary)
    if problem is None:
        return AccelChoice(Accel.KVM, "KVM runs guest code here")
    return AccelChoice(Accel.TCG, f"KVM unusable: {problem}")
