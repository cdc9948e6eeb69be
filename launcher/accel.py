"""Choose QEMU's accelerator: KVM where it really works, TCG otherwise.

The existence of /dev/kvm proves little: on a host without nested
virtualization the device opens, a VM and a vCPU can be created, and only
running the vCPU fails. So the probe runs one: a page of guest memory holding
a single HLT instruction, executed in real mode. KVM is usable when KVM_RUN
comes back with a HLT exit.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

from launcher.spec import Accel

_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_GET_VCPU_MMAP_SIZE = 0xAE04
_KVM_CREATE_VCPU = 0xAE41
_KVM_SET_USER_MEMORY_REGION = 0x4020AE46
_KVM_RUN = 0xAE80
_KVM_SET_REGS = 0x4090AE82
_KVM_GET_SREGS = 0x8138AE83
_KVM_SET_SREGS = 0x4138AE84
_KVM_EXIT_HLT = 5
_HLT = b"\xf4"
_SEGMENT = struct.Struct("=QIH8B")  # struct kvm_segment, 24 bytes


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The accelerator to use and, for a log line, why."""

    accel: Accel
    reason: str


def probe_kvm(device: str = "/dev/kvm") -> str | None:
    """Return None when KVM can run a vCPU here, else why it cannot."""
    try:
        kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{device}: {e.strerror}"
    fds = [kvm]
    try:
        if fcntl.ioctl(kvm, _KVM_GET_API_VERSION) != 12:
            return f"{device}: unexpected KVM API version"
        vm = fcntl.ioctl(kvm, _KVM_CREATE_VM, 0)
        fds.append(vm)
        with mmap.mmap(-1, mmap.PAGESIZE) as guest_page:
            guest_page[0:1] = _HLT
            address = _buffer_address(guest_page)
            region = struct.pack("=IIQQQ", 0, 0, 0, mmap.PAGESIZE, address)
            fcntl.ioctl(vm, _KVM_SET_USER_MEMORY_REGION, region)
            vcpu = fcntl.ioctl(vm, _KVM_CREATE_VCPU, 0)
            fds.append(vcpu)
            _point_vcpu_at_zero(vcpu)
            run_size = fcntl.ioctl(kvm, _KVM_GET_VCPU_MMAP_SIZE)
            with mmap.mmap(vcpu, run_size) as run:
                fcntl.ioctl(vcpu, _KVM_RUN)
                exit_reason = struct.unpack_from("=I", run, 8)[0]
        if exit_reason != _KVM_EXIT_HLT:
            return f"a test vCPU exited with reason {exit_reason}, not HLT"
        return None
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        return f"KVM cannot run a vCPU here ({name}: {e.strerror})"
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _buffer_address(buffer: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _point_vcpu_at_zero(vcpu: int) -> None:
    """Real mode, CS base 0, RIP 0: the HLT at guest physical address 0."""
    sregs = bytearray(312)
    fcntl.ioctl(vcpu, _KVM_GET_SREGS, sregs, True)
    base, limit, selector, *rest = _SEGMENT.unpack_from(sregs, 0)
    _SEGMENT.pack_into(sregs, 0, 0, limit, 0, *rest)
    fcntl.ioctl(vcpu, _KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(144)
    struct.pack_into("=QQ", regs, 16 * 8, 0, 2)  # rip, rflags (bit 1 is reserved, set)
    fcntl.ioctl(vcpu, _KVM_SET_REGS, bytes(regs))


def choose_accel(wanted: Accel, device: str = "/dev/kvm") -> AccelChoice:
    """Resolve the spec's accel setting; kvm is honoured even if the probe fails,
    so QEMU's own error explains it, but auto never picks a KVM that cannot run."""
    if wanted is Accel.TCG:
        return AccelChoice(Accel.TCG, "accel = \"tcg\" in the spec")
    if wanted is Accel.KVM:
        return AccelChoice(Accel.KVM, "accel = \"kvm\" in the spec")
    problem = probe_kvm(device)
    if problem is None:
        return AccelChoice(Accel.KVM, "KVM runs a test vCPU here")
    return AccelChoice(Accel.TCG, f"TCG, since {problem}")
