"""QEMU's command line, built from the spec: pure, so tests read it directly.

Choices that matter for what follows:
- guest RAM is a shared memfd (memory-backend-memfd, share=on, bound to a
  NUMA node) because vhost-user emulators map the same pages;
- every socket QEMU uses is made by mplaunch and handed over as an fd, so no
  path is raced and QEMU's own sandbox can forbid it from opening more;
- a controller of a vhost-user emulator is a vhost-user-scsi-pci device on a
  socket chardev; one of an ``lsi`` emulator is an x-pci-proxy-dev, which
  forwards PCI config and BAR accesses over its fd (mpqemu messages) to the
  remote QEMU emulating the LSI53C895A, through mplaunch's relay;
- -nodefaults and -no-user-config: the guest sees only what the spec names;
- QEMU runs unprivileged (:func:`qemu_jail`) and opens no file of the
  spec's itself: the kernel and initrd arrive as sealed memfd copies it
  reads through /proc/self/fd/N (what -kernel and -initrd take is a path),
  the console as an fd in an fd set (/dev/fdset/N).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from launcher.sandbox.jail import UNLIMITED, JailSpec
from launcher.spec import Accel, EmulatorKind, Spec

QEMU_BINARY = "qemu-system-x86_64"
KVM_CPU = "host"
TCG_CPU = "max"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
CONSOLE_FDSET = 1
QEMU_NPROC = 1024
"""Threads QEMU's uid may run (vCPUs, RCU, I/O workers): RLIMIT_NPROC."""
QEMU_DEVICES = ("null", "zero", "urandom", "random")
"""QEMU's private /dev; ``kvm`` is added when the guest runs under KVM."""
QEMU_VIEW = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
             "/etc/ld.so.cache")
"""All QEMU sees of the host's files, read-only: its binary, libraries,
modules and firmware (all under /usr on a merged-/usr system; the top-level
links to it), and the loader's cache. Plus its own /proc and private /dev."""


@dataclass(frozen=True, slots=True)
class QemuFds:
    """Descriptors QEMU inherits: its QMP listening socket, per controller
    id its end of the controller's link (the vhost-user socket, or for an
    ``lsi`` controller the proxy's mpqemu socketpair), and the files mplaunch
    opened for it (kernel and initrd: readable copies; console: the file,
    write-only)."""

    qmp_listener: int
    controller_fds: Mapping[str, int]
    kernel: int | None = None
    initrd: int | None = None
    console: int | None = None

    def all(self) -> list[int]:
        extra = [fd for fd in (self.kernel, self.initrd, self.console) if fd is not None]
        return [self.qmp_listener, *self.controller_fds.values(), *extra]


def qemu_jail(uid: int, gid: int, keep_fds: list[int], kvm: bool) -> JailSpec:
    """QEMU's confinement: the emulators' jail with threads, no address space
    bound (guest RAM, TCG's code buffer), a root holding only :data:`QEMU_VIEW`
    and a private /dev."""
    return JailSpec(uid=uid, gid=gid, keep_fds=tuple(keep_fds), address_space=UNLIMITED,
                    nproc=QEMU_NPROC, dev=QEMU_DEVICES + (("kvm",) if kvm else ()),
                    view=QEMU_VIEW)


def fd_path(fd: int) -> str:
    """A path QEMU can open for an fd it holds, whatever its uid: for a memfd
    (mode 0777) the magic link's permission check always passes."""
    return f"/proc/self/fd/{fd}"


def chardev_id(controller_id: str) -> str:
    return f"vhost-{controller_id}"


def qemu_argv(spec: Spec, accel: Accel, fds: QemuFds, binary: str = QEMU_BINARY,
              incoming: bool = False) -> list[str]:
    """The complete argv; `accel` is already resolved (never AUTO).
    `incoming`: the destination of a live migration: the guest stays paused
    (-S, also once the migration is in), and QEMU waits for mplaunch to hand
    it the stream (-incoming defer, then migrate-incoming over QMP)."""
    if accel is Accel.AUTO:
        raise ValueError("resolve accel = auto before building QEMU's command line")
    cpu = KVM_CPU if accel is Accel.KVM else TCG_CPU
    argv = vm_argv(spec, ["-accel", str(accel), "-cpu", cpu], binary, fds)
    argv += [
        "-chardev", f"socket,id=qmp,fd={fds.qmp_listener},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    for controller in spec.controllers:
        fd = fds.controller_fds[controller.id]
        if spec.kind_of_controller(controller.id) is EmulatorKind.LSI:
            argv += proxy_args(controller.id, str(fd))
        else:
            argv += controller_args(controller.id, controller.queues, f"fd={fd}")
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv


def vm_argv(spec: Spec, accel_args: list[str], binary: str = QEMU_BINARY,
            fds: QemuFds | None = None) -> list[str]:
    """Everything but how QEMU reaches mplaunch: machine, memory, kernel,
    console; files by the fds in `fds` where it names them, else by path."""
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
    fds = fds or QemuFds(-1, {})
    if vm.kernel is not None:
        argv += ["-kernel", str(vm.kernel) if fds.kernel is None else fd_path(fds.kernel)]
        if vm.initrd is not None:
            argv += ["-initrd", str(vm.initrd) if fds.initrd is None else fd_path(fds.initrd)]
        if vm.append:
            argv += ["-append", vm.append]
    argv += _console_args(vm.console, fds.console)
    return argv


def controller_args(
    controller_id: str, queues: int, socket_option: str, prefix: str = "",
    address: str | None = None,
) -> list[str]:
    """One vhost-user-scsi-pci device; `socket_option` is fd=N or path=P,
    `prefix` goes before the QEMU ids (libvirt wants its own out of the way),
    and `address` holds the device's bus and addr properties when it must sit
    at a fixed PCI address (where libvirt will not put its own devices);
    without one QEMU picks a free slot."""
    chardev = prefix + chardev_id(controller_id)
    device = f"vhost-user-scsi-pci,id={prefix}{controller_id},chardev={chardev},num_queues={queues}"
    return [
        "-chardev", f"socket,id={chardev},{socket_option}",
        "-device", device if address is None else f"{device},{address}",
    ]


def proxy_args(controller_id: str, fd: str) -> list[str]:
    """One x-pci-proxy-dev for an ``lsi`` controller. ``fd`` is QEMU's end of
    the mpqemu link as a number (an fd it inherits), never a path: the device
    has no way to connect to one."""
    return ["-device", f"x-pci-proxy-dev,id={controller_id},fd={fd}"]


def _console_args(console: str, fd: int | None = None) -> list[str]:
    if console == "none":
        return []
    if console == "stdio":
        # signal=on keeps Ctrl-C a signal (to mplaunch and QEMU), not a byte for the guest.
        return ["-chardev", "stdio,id=console,signal=on", "-serial", "chardev:console"]
    if fd is not None:  # QEMU's file chardev opens a path; an fd set is one it may open
        return ["-add-fd", f"fd={fd},set={CONSOLE_FDSET}",
                "-chardev", f"file,id=console,path=/dev/fdset/{CONSOLE_FDSET}",
                "-serial", "chardev:console"]
    path = escape_option(console)
    return ["-chardev", f"file,id=console,path={path}", "-serial", "chardev:console"]


def escape_option(value: str) -> str:
    """QEMU's option syntax doubles a comma that belongs to a value."""
    return value.replace(",", ",,")
