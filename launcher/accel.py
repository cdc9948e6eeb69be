"""Choose QEMU's accelerator: KVM where it really works, TCG otherwise.

The existence of /dev/kvm proves little: on a host without nested
virtualization the device opens and a VM and a vCPU can even be created, yet
QEMU aborts while setting up the vCPU's MSRs, or the guest never runs. So the
probe asks the real thing: the same QEMU, with KVM and the CPU model mplaunch
would use, runs a 64 KiB firmware whose reset vector writes one byte to an
isa-debug-exit port. QEMU exiting with the status that byte encodes proves a
vCPU ran guest code under KVM. It costs one QEMU start (a fraction of a
second), once per VM start with accel = "auto".

The probe's QEMU is confined as the VM's QEMU will be (same jail, a uid
leased for the probe alone, /dev/kvm a node of that uid in its private
/dev), so "KVM works" means it works for the unprivileged QEMU; the
firmware is a sealed memfd it reads through /proc/self/fd/N.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass

from launcher.spec import Accel, SandboxMode, Spec
from launcher.uidpool import HostUids
from launcher.vmm import KVM_CPU, QEMU_BINARY, fd_path, qemu_jail

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


def _firmware_fd() -> int:
    fd = os.memfd_create("mplaunch-kvm-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, probe_firmware())
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


def hardware_virtualization(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """None when the CPU offers VT-x or AMD-V (the vmx or svm flag), else why
    not. A /dev/kvm without either is not hardware virtualization (seen: a
    host whose /dev/kvm runs the probe's firmware, yet a Linux guest spends
    minutes decompressing its kernel, far slower than TCG), and the probe's
    few instructions cannot tell that apart."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags") and {"vmx", "svm"} & set(line.split()):
                    return None
    except OSError as e:
        return f"{cpuinfo}: {e.strerror}"
    return "the CPU has no vmx or svm flag, so /dev/kvm is not hardware virtualization"


def probe_kvm(binary: str = QEMU_BINARY, device: str = "/dev/kvm",
              uid: int | None = None, gid: int | None = None,
              cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """Return None when QEMU can run guest code under KVM here, else why not.
    With `uid`, QEMU runs confined under it (and `gid`, by default the same
    number; the launcher must be root)."""
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{device} is missing or not accessible"
    problem = hardware_virtualization(cpuinfo)
    if problem is not None:
        return problem
    firmware = _firmware_fd()
    try:
        argv = [
            binary, "-accel", "kvm", "-cpu", KVM_CPU, "-machine", "q35", "-nodefaults",
            "-no-user-config", "-display", "none", "-m", "16", "-bios", fd_path(firmware),
            "-device", f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=1",
        ]
        if uid is not None:
            path = shutil.which(binary)
            if path is None:
                return f"{binary}: not found"
            argv = qemu_jail(uid, uid if gid is None else gid, [firmware],
                             kvm=True).argv([path, *argv[1:]])
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=PROBE_TIMEOUT, check=False, pass_fds=(firmware,),
                env={} if uid is not None else None,
            )
        except subprocess.TimeoutExpired:
            return "a KVM test guest did not run within the probe's timeout"
        except OSError as e:
            return f"{binary}: {e.strerror}"
    finally:
        os.close(firmware)
    if done.returncode == _EXPECTED_STATUS:
        return None
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    return f"a KVM test guest failed (QEMU status {done.returncode}: {last})"


def choose_for(spec: Spec, binary: str = QEMU_BINARY) -> AccelChoice:
    """The spec's accel, probed (for ``auto``) by a QEMU confined under a uid
    leased from the VM's range for the probe alone (unless ``sandbox = "off"``)."""
    if spec.vm.accel is not Accel.AUTO or spec.vm.sandbox is SandboxMode.OFF:
        return choose_accel(spec.vm.accel, binary)
    if spec.vm.qemu_user is not None:
        try:
            user = spec.vm.qemu_user
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            return AccelChoice(Accel.TCG, f"qemu_user {spec.vm.qemu_user!r} does not exist")
        return choose_accel(spec.vm.accel, binary, pw.pw_uid, pw.pw_gid)
    first, last = spec.vm.uid_range
    lease = HostUids(first, last).take(f"{spec.vm.name}/kvm-probe")
    if lease is None:
        return AccelChoice(Accel.TCG, f"no uid left in {first}-{last} for the KVM probe")
    try:
        return choose_accel(spec.vm.accel, binary, lease.uid)
    finally:
        lease.release()  # the probe's QEMU is reaped: subprocess.run waited


def choose_accel(wanted: Accel, binary: str = QEMU_BINARY,
                 uid: int | None = None, gid: int | None = None) -> AccelChoice:
    """Resolve the spec's accel setting. An explicit kvm is honoured even if it
    would fail (QEMU's error then explains why); auto never picks a KVM that
    cannot run."""
    if wanted is Accel.TCG:
        return AccelChoice(Accel.TCG, 'accel = "tcg" in the spec')
    if wanted is Accel.KVM:
        return AccelChoice(Accel.KVM, 'accel = "kvm" in the spec')
    problem = probe_kvm(binary, uid=uid, gid=gid)
    if problem is None:
        return AccelChoice(Accel.KVM, "KVM runs guest code here")
    return AccelChoice(Accel.TCG, f"KVM unusable: {problem}")
