"""Backend-only mode: how a QEMU that mplaunch did not start attaches to its emulators.

With ``mplaunch --backends-only SPEC``, mplaunch serves each controller's
vhost-user socket under a path in the run folder (``backend_socket``)
instead of handing QEMU an fd. These pure functions render what the
operator's QEMU needs to use them:

- ``backend_qemu_argv``: a complete QEMU command line (``--print-qemu-args``),
  the same machine as mplaunch's own (vmm.qemu_argv) but with socket paths
  and without mplaunch's QMP socket;
- ``attach_args``: only the options that attach the controllers;
- ``libvirt_domain``: a complete libvirt domain (``--print-libvirt-xml``)
  that ``virsh define`` takes as it is: the spec's machine, guest RAM as
  shared memory (vhost-user emulators map the same pages), the console,
  and a ``<qemu:commandline>`` with the chardev and device of each
  controller;
- ``libvirt_fragment``: only the elements a hand-written domain needs added
  (``--print-libvirt-xml --fragment``).

libvirt knows nothing of devices given on ``<qemu:commandline>``, so it
could hand their PCI addresses to its own devices. It never puts an endpoint
device directly on the root bus of a q35 machine (pcie.0) and fills that bus
with its own root ports from slot 0x1 upward, while it may use a free slot
of any root port, even one the domain declares. So each controller goes
directly on pcie.0 from the top down (:func:`pci_addresses`): slot 0x1e,
functions 0 to 7 in spec order, then slots 0x1d and 0x1c (slot 0x1f holds
the ICH9 functions q35 always has). A domain of one's own must leave those
slots free: libvirt itself puts a dmi-to-pci-bridge at 0x1e and ICH9 USB2
controllers at 0x1d when a domain declares them.

In libvirt's XML the chardev and device ids carry an ``mplaunch-``
prefix so they cannot collide with libvirt's own aliases (``scsi0`` is the
alias libvirt gives its first SCSI controller).

A controller of an ``lsi`` emulator cannot be attached this way: its
x-pci-proxy-dev takes only an fd, inherited from the QEMU's parent or passed
over QMP, never a socket path. ``--print-qemu-args`` still shows its device
(with :data:`PROXY_FD_PLACEHOLDER` for the fd) so the whole VM can be read;
backend-only mode and the libvirt XML refuse such a spec
(:func:`unattachable`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.runfolder import FRONTEND_DIR_NAME
from launcher.spec import Accel, EmulatorKind, Spec, render_value
from launcher.vmm import (
    KVM_CPU,
    QEMU_BINARY,
    TCG_CPU,
    controller_args,
    escape_option,
    proxy_args,
    vm_argv,
)

if TYPE_CHECKING:  # the XML is built only when printed: a running mplaunch loads no XML
    import xml.etree.ElementTree as ET  # noqa: N817

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
LIBVIRT_PREFIX = "mplaunch-"
ROOT_BUS = "pcie.0"
"""The q35 root bus, where every controller of libvirt's domain goes."""
TOP_SLOT = 0x1E
"""The first slot controllers take (0x1f holds q35's ICH9 functions)."""
LOWEST_SLOT = 0x1C
"""The last slot controllers may take: libvirt puts an ich9 sound device at
0x1b, its root ports from 0x01 upward."""
SLOT_FUNCTIONS = 8
DEBIAN_LIBVIRT_GROUP = "libvirt-qemu"
"""The group Debian's libvirt runs QEMU with."""
PROXY_FD_PLACEHOLDER = "<fd>"
"""Stands for the proxy's fd, which only mplaunch can hand to a QEMU it starts."""


class NotAttachable(ValueError):
    """A spec whose emulators a QEMU started by someone else cannot reach;
    ``str()`` is the line to show."""


def lsi_controllers(spec: Spec) -> list[str]:
    """The ids of the controllers served by ``lsi`` emulators, in spec order."""
    return [c.id for c in spec.controllers if spec.kind_of_controller(c.id) is EmulatorKind.LSI]


def unattachable(spec: Spec, what: str, file: str | None = None) -> str | None:
    """Why ``what`` (an option such as ``--backends-only``) cannot serve the
    spec, or None. ``file`` is the spec as the user named it."""
    lsi = lsi_controllers(spec)
    if not lsi:
        return None
    names = ", ".join(render_value(c) for c in lsi)
    return (f"{file or spec.path}: {what} cannot serve [[controller]] {names} (its emulator "
            'is of kind "lsi"): x-pci-proxy-dev takes only an fd inherited from its parent '
            "or passed over QMP, no socket path, so a QEMU started by someone else cannot "
            "reach it; run this spec with mplaunch itself")


def proxy_note(spec: Spec, file: str | None = None) -> str | None:
    """What to tell the reader of ``--print-qemu-args`` about proxy devices, or None."""
    lsi = lsi_controllers(spec)
    if not lsi:
        return None
    names = ", ".join(render_value(c) for c in lsi)
    return (f"{file or spec.path}: note: the x-pci-proxy-dev of [[controller]] {names} shows "
            f"fd={PROXY_FD_PLACEHOLDER}: QEMU's end of a socketpair that mplaunch gives only "
            "to a QEMU it starts itself, so this command line cannot be used with "
            "--backends-only; run this spec with mplaunch itself")


def backend_socket(run_dir: Path, controller_id: str) -> Path:
    """Where backend-only mode listens for the controller's vhost-user frontend:
    the run folder's ``vhost-user`` subfolder, which holds these sockets alone
    so that a frontend's group (``[vm] frontend_group``) can be let into it
    without reaching anything else of the run folder."""
    return run_dir / FRONTEND_DIR_NAME / f"{controller_id}.sock"


@dataclass(frozen=True, slots=True)
class PciAddress:
    """A device's place on the root bus; ``multifunction`` is set on function
    0 of a slot that holds more than one (QEMU then probes the others)."""

    slot: int
    function: int
    multifunction: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.slot < 0x20 or not 0 <= self.function < SLOT_FUNCTIONS:
            raise ValueError(f"no PCI slot {self.slot:#x} function {self.function}")

    def qemu_option(self) -> str:
        """The device properties that put it here."""
        extra = ",multifunction=on" if self.multifunction else ""
        return f"bus={ROOT_BUS},addr={self.slot:#x}.{self.function}{extra}"

    def __str__(self) -> str:
        return f"0000:00:{self.slot:02x}.{self.function}"


def pci_addresses(count: int) -> list[PciAddress]:
    """Where ``count`` controllers go, in spec order: slot 0x1e, functions 0
    to 7, then slot 0x1d, and on down to :data:`LOWEST_SLOT`.

    Raises :class:`NotAttachable` when they do not fit."""
    room = (TOP_SLOT - LOWEST_SLOT + 1) * SLOT_FUNCTIONS
    if count > room:
        raise NotAttachable(f"{count} controllers do not fit in the {room} PCI functions of "
                            f"slots {TOP_SLOT:#x} down to {LOWEST_SLOT:#x}, where libvirt puts "
                            "none of its own devices")
    addresses = []
    for i in range(count):
        slot, function = TOP_SLOT - i // SLOT_FUNCTIONS, i % SLOT_FUNCTIONS
        shared = count - (i - function) > 1  # another controller follows on this slot
        addresses.append(PciAddress(slot, function, function == 0 and shared))
    return addresses


def attach_args(spec: Spec, run_dir: Path | None = None, prefix: str = "",
                pci: bool = False) -> list[str]:
    """-chardev/-device pairs connecting QEMU to every controller's socket.

    ``prefix`` is put before every chardev and device id; with ``pci`` each
    device is placed at its :func:`pci_addresses` address.
    """
    folder = spec.vm.run_dir if run_dir is None else run_dir
    places = pci_addresses(len(spec.controllers)) if pci else None
    argv: list[str] = []
    for i, controller in enumerate(spec.controllers):
        if spec.kind_of_controller(controller.id) is EmulatorKind.LSI:
            argv += proxy_args(prefix + controller.id, PROXY_FD_PLACEHOLDER)
            continue
        path = escape_option(str(backend_socket(folder, controller.id)))
        address = None if places is None else places[i].qemu_option()
        argv += controller_args(controller.id, controller.queues, f"path={path}", prefix,
                                address)
    return argv


def _accel_args(accel: Accel) -> list[str]:
    if accel is Accel.AUTO:
        # QEMU tries each -accel in turn; "max" is a CPU model both accept.
        return ["-accel", "kvm", "-accel", "tcg", "-cpu", TCG_CPU]
    return ["-accel", str(accel), "-cpu", KVM_CPU if accel is Accel.KVM else TCG_CPU]


def backend_qemu_argv(spec: Spec, run_dir: Path | None = None,
                      binary: str = QEMU_BINARY) -> list[str]:
    """A complete QEMU command line that boots the spec's VM against backend-only mode."""
    argv = vm_argv(spec, _accel_args(spec.vm.accel), binary)
    argv += attach_args(spec, run_dir)
    return argv


def format_argv(argv: list[str]) -> str:
    """A shell command, one option per line, safe to paste or source."""
    lines: list[str] = [shlex.quote(argv[0])] if argv else []
    i = 1
    while i < len(argv):
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            lines.append(f"{shlex.quote(argv[i])} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(argv[i]))
            i += 1
    return " \\\n    ".join(lines) + "\n"


def frontend_group_warning(spec: Spec, file: str | None = None) -> str | None:
    """The line to show when libvirt's QEMU will be refused by the sockets, or None."""
    if spec.vm.frontend_group is not None:
        return None
    return (f"{file or spec.path}: warning: [vm] frontend_group is not set, so the vhost-user "
            "sockets are root's alone and libvirt's QEMU (user libvirt-qemu on Debian) will not "
            f'be allowed to connect to them; set frontend_group = "{DEBIAN_LIBVIRT_GROUP}"')


def domain_type(accel: Accel) -> str:
    """libvirt's name for an accelerator already resolved (never ``auto``)."""
    if accel is Accel.AUTO:
        raise ValueError("resolve accel = auto before choosing libvirt's domain type")
    return "kvm" if accel is Accel.KVM else "qemu"


def libvirt_domain(spec: Spec, accel: Accel, run_dir: Path | None = None) -> str:
    """A complete domain for ``virsh define``: the spec's VM attached to
    backend-only mode. ``accel`` is resolved (kvm or tcg).

    Raises :class:`NotAttachable` for a spec with an ``lsi`` emulator."""
    import xml.etree.ElementTree as ET  # noqa: N817 (loaded only when XML is printed)
    _refuse_lsi(spec)
    vm = spec.vm
    kib = str(vm.memory // 1024)
    domain = _root({"type": domain_type(accel)})
    _note(domain, spec, "define this domain as it is (virsh define FILE)")
    _text(domain, "name", vm.name)
    _text(domain, "memory", kib, unit="KiB")
    _text(domain, "currentMemory", kib, unit="KiB")
    _backing(domain)
    _text(domain, "vcpu", str(vm.cpus), placement="static")
    os_ = ET.SubElement(domain, "os")
    _text(os_, "type", "hvm", arch="x86_64", machine="q35")
    if vm.kernel is not None:
        _text(os_, "kernel", str(vm.kernel))
        if vm.initrd is not None:
            _text(os_, "initrd", str(vm.initrd))
        if vm.append:
            _text(os_, "cmdline", vm.append)
    # q35 under mplaunch has ACPI; libvirt turns it off unless asked.
    ET.SubElement(ET.SubElement(domain, "features"), "acpi")
    # The guest sees the CPU mplaunch's own QEMU gives it (-cpu host or max).
    cpu = ET.SubElement(domain, "cpu", {
        "mode": "host-passthrough" if accel is Accel.KVM else "maximum"})
    cpus = "0" if vm.cpus == 1 else f"0-{vm.cpus - 1}"
    ET.SubElement(ET.SubElement(cpu, "numa"), "cell", {
        "id": "0", "cpus": cpus, "memory": kib, "unit": "KiB", "memAccess": "shared"})
    _text(domain, "on_poweroff", "destroy")
    _text(domain, "on_reboot", "restart")
    _text(domain, "on_crash", "destroy")
    devices = ET.SubElement(domain, "devices")
    _console(devices, vm.console)
    # Without these libvirt adds a USB controller and a balloon the guest has no use for.
    ET.SubElement(devices, "controller", {"type": "usb", "model": "none"})
    ET.SubElement(devices, "memballoon", {"model": "none"})
    _commandline(domain, spec, run_dir)
    return _render(domain)


def libvirt_fragment(spec: Spec, run_dir: Path | None = None) -> str:
    """The elements to merge into a domain of one's own: shared guest memory
    and the ``<qemu:commandline>``, at the same PCI addresses as
    :func:`libvirt_domain`.

    Raises :class:`NotAttachable` for a spec with an ``lsi`` emulator."""
    _refuse_lsi(spec)
    domain = _root({})
    _note(domain, spec, "merge these elements into your domain (virsh edit NAME)")
    _backing(domain)
    _commandline(domain, spec, run_dir)
    return _render(domain)


def _refuse_lsi(spec: Spec) -> None:
    refusal = unattachable(spec, "--print-libvirt-xml")
    if refusal is not None:
        raise NotAttachable(refusal)


def _root(attributes: dict[str, str]) -> ET.Element:
    import xml.etree.ElementTree as ET  # noqa: N817 (loaded only when XML is printed)
    ET.register_namespace("qemu", QEMU_NS)
    return ET.Element("domain", attributes)


def _note(domain: ET.Element, spec: Spec, what: str) -> None:
    import xml.etree.ElementTree as ET  # noqa: N817 (loaded only when XML is printed)
    addresses = pci_addresses(len(spec.controllers))
    taken = ", ".join(f"{a} ({c.id})" for a, c in zip(addresses, spec.controllers, strict=True))
    lines = [
        f"mplaunch backend-only mode for {spec.vm.name}: {what},",
        "and start it only once mplaunch runs in backend-only mode with the same spec.",
        f"The controllers take these PCI addresses on {ROOT_BUS}; nothing else may use them:",
        taken,
        "The domain needs shared guest memory (memoryBacking memfd, access shared):",
        "the emulators map the guest's RAM.",
    ]
    # XML comments may not hold "--", so options are not spelled out.
    domain.append(ET.Comment(" " + "\n       ".join(lines) + " "))


def _text(parent: ET.Element, tag: str, text: str, **attributes: str) -> ET.Element:
    import xml.etree.ElementTree as ET  # noqa: N817 (loaded only when XML is printed)
    element = ET.SubElement(parent, tag, attributes)
    element.text = text
    return element


def _backing(domain: ET.Element) -> None:
    import xml.etree.ElementTree as ET  # noqa: N817 (loaded only when XML is printed)
    backing = ET.SubElement(domain, "memoryBacking")
    ET.SubElement(backing, "source", {"type": "memfd"})
    ET.SubElement(backing, "access", {"mode": "shared"})


def _console(devices: ET.Element, console: str) -> None:
    """The spec's console as the guest's first serial port: a file, or for
    ``stdio`` (there is no terminal behind libvirt's QEMU) a pty that
    ``virsh console`` reaches."""
    import xml.etree.ElementTree as ET  # noqa: N817 (loaded only when XML is printed)
    if console == "none":
        return
    if console == "stdio":
        serial = ET.SubElement(devices, "serial", {"type": "pty"})
        ET.SubElement(serial, "target", {"port": "0"})
        shown = ET.SubElement(devices, "console", {"type": "pty"})
        ET.SubElement(shown, "target", {"type": "serial", "port": "0"})
        return
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": console})
    ET.SubElement(serial, "target", {"port": "0"})


def _commandline(domain: ET.Element, spec: Spec, run_dir: Path | None) -> None:
    import xml.etree.ElementTree as ET  # noqa: N817 (loaded only when XML is printed)
    commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
    for arg in attach_args(spec, run_dir, LIBVIRT_PREFIX, pci=True):
        ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", {"value": arg})


def _render(domain: ET.Element) -> str:
    import xml.etree.ElementTree as ET  # noqa: N817 (loaded only when XML is printed)
    ET.indent(domain, "  ")
    return ET.tostring(domain, encoding="unicode") + "\n"
