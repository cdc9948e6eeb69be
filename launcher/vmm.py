"""QEMU's command line, built from the spec: pure, so tests read it directly.

Choices that matter for what follows:
- guest RAM is a shared memfd (memory-backend-memfd, share=on, bound to a
  NUMA node) because vhost-user emulators map the same pages;
- every socket QEMU uses is made by mplaunch and handed over as an fd, so no
  path is raced and QEMU's own sandbox can forbid it from opening more;
- -nodefaults and -no-user-config: the guest sees only what the spec names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from launcher.spec import Accel, Spec

QEMU_BINARY = "qemu-system-x86_64"
KVM_CPU = "host"
TCG_CPU = "max"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True, slots=True)
class QemuFds:
    """Descriptors QEMU inherits: its QMP listening socket and, per
    controller id, its end of the vhost-user socket."""

    qmp_listener: int
    vhost_user: Mapping[str, int]

    def all(self) -> list[int]:
        return [self.qmp_listener, *self.vhost_user.values()]


def chardev_id(controller_id: str) -> str:
    return f"vhost-{controller_id}"


def qemu_argv(spec: Spec, accel: Accel, fds: QemuFds, binary: str = QEMU_BINARY) -> list[str]:
    """The complete argv; `accel` is already resolved (never AUTO)."""
    if accel is Accel.AUTO:
        raise ValueError("resolve accel = auto before building QEMU's command line")
    cpu = KVM_CPU if accel is Accel.KVM else TCG_CPU
    argv = vm_argv(spec, ["-accel", str(accel), "-cpu", cpu], binary)
    argv += [
        "-chardev", f"socket,id=qmp,fd={fds.qmp_listener},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    for controller in spec.controllers:
        argv += controller_args(controller.id, controller.queues,
                                f"fd={fds.vhost_user[controller.id]}")
    return argv


def vm_argv(spec: Spec, accel_args: list[str], binary: str = QEMU_BINARY) -> list[str]:
    """Everything but how QEMU reaches mplaunch: machine, memory, kernel, console."""
    vm = spec.vm
    mem = f"{vm.memory // (1024 * 1024)}M"
    argv = [
        binary,
        "-name", f"guest={vm.name},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-machine", "q35",
        *accel_args,
        "-smp", str(vm.cpus),
        "-m", mem,
        "-object", f"memory-backend-memfd,id=ram0,size={mem},share=on",
        "-numa", "node,memdev=ram0",
        "-sandbox", SANDBOX,
    ]
    if vm.kernel is not None:
        argv += ["-kernel", str(vm.kernel)]
        if vm.initrd is not None:
            argv += ["-initrd", str(vm.initrd)]
        if vm.append:
            argv += ["-append", vm.append]
    argv += _console_args(vm.console)
    return argv


def controller_args(
    controller_id: str, queues: int, socket_option: str, prefix: str = ""
) -> list[str]:
    """One vhost-user-scsi-pci device; `socket_option` is fd=N or path=P, and
    `prefix` goes before the QEMU ids (libvirt wants its own out of the way)."""
    chardev = prefix + chardev_id(controller_id)
    return [
        "-chardev", f"socket,id={chardev},{socket_option}",
        "-device",
        f"vhost-user-scsi-pci,id={prefix}{controller_id},chardev={chardev},num_queues={queues}",
    ]


def _console_args(console: str) -> list[str]:
    if console == "none":
        return []
    if console == "stdio":
        # signal=on keeps Ctrl-C a signal (to mplaunch and QEMU), not a byte for the guest.
        return ["-chardev", "stdio,id=console,signal=on", "-serial", "chardev:console"]
    path = escape_option(console)
    return ["-chardev", f"file,id=console,path={path}", "-serial", "chardev:console"]


def escape_option(value: str) -> str:
    """QEMU's option syntax doubles a comma that belongs to a value."""
    return value.replace(",", ",,")
