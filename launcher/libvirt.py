"""Backend-only mode: how a QEMU that mplaunch did not start attaches to its emulators.

With ``mplaunch --backends-only SPEC``, mplaunch serves each controller's
vhost-user socket under a path in the run folder (``backend_socket``)
instead of handing QEMU an fd. These pure functions render what the
operator's QEMU needs to use them:

- ``backend_qemu_argv``: a complete QEMU command line (``--print-qemu-args``),
  the same machine as mplaunch's own (vmm.qemu_argv) but with socket paths
  and without mplaunch's QMP socket;
- ``attach_args``: only the options that attach the controllers;
- ``libvirt_xml``: a domain XML fragment (``--print-libvirt-xml``) holding
  the shared memory backing vhost-user needs and a ``<qemu:commandline>``
  with the chardev and device of each controller.

In libvirt's fragment the chardev and device ids carry an ``mplaunch-``
prefix so they cannot collide with libvirt's own aliases (``scsi0`` is the
alias libvirt gives its first SCSI controller).

A controller of an ``lsi`` emulator cannot be attached this way: its
x-pci-proxy-dev takes only an fd, inherited from the QEMU's parent or passed
over QMP, never a socket path. ``--print-qemu-args`` still shows its device
(with :data:`PROXY_FD_PLACEHOLDER` for the fd) so the whole VM can be read;
backend-only mode and the libvirt fragment refuse such a spec
(:func:`unattachable`).
"""

from __future__ import annotations

import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

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

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
LIBVIRT_PREFIX = "mplaunch-"
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
    """Where backend-only mode listens for the controller's vhost-user frontend."""
    return run_dir / f"vhost-{controller_id}.sock"


def attach_args(spec: Spec, run_dir: Path | None = None, prefix: str = "") -> list[str]:
    """-chardev/-device pairs connecting QEMU to every controller's socket.

    ``prefix`` is put before every chardev and device id.
    """
    folder = spec.vm.run_dir if run_dir is None else run_dir
    argv: list[str] = []
    for controller in spec.controllers:
        if spec.kind_of_controller(controller.id) is EmulatorKind.LSI:
            argv += proxy_args(prefix + controller.id, PROXY_FD_PLACEHOLDER)
            continue
        path = escape_option(str(backend_socket(folder, controller.id)))
        argv += controller_args(controller.id, controller.queues, f"path={path}", prefix)
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


def libvirt_xml(spec: Spec, run_dir: Path | None = None) -> str:
    """The domain XML fragment to merge into a libvirt domain definition.

    Raises :class:`NotAttachable` for a spec with an ``lsi`` emulator."""
    refusal = unattachable(spec, "--print-libvirt-xml")
    if refusal is not None:
        raise NotAttachable(refusal)
    ET.register_namespace("qemu", QEMU_NS)
    domain_type = "qemu" if spec.vm.accel is Accel.TCG else "kvm"
    domain = ET.Element("domain", {"type": domain_type})
    domain.append(ET.Comment(
        # XML comments may not hold "--", so the option is not spelled out.
        " mplaunch backend-only mode: merge these elements into the domain; start "
        "mplaunch in backend-only mode with the same spec first "))
    backing = ET.SubElement(domain, "memoryBacking")
    ET.SubElement(backing, "source", {"type": "memfd"})
    ET.SubElement(backing, "access", {"mode": "shared"})
    commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
    for arg in attach_args(spec, run_dir, LIBVIRT_PREFIX):
        ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", {"value": arg})
    ET.indent(domain, "  ")
    return ET.tostring(domain, encoding="unicode") + "\n"
