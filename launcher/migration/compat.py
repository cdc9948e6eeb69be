"""What a migration's two ends must agree on, and what cannot migrate.

Pure: the destination builds its own :class:`~launcher.migration.channel.Hello`
from its spec and images and compares it with the source's; every
difference is one sentence naming the disk or emulator and both values.
"""

from __future__ import annotations

from collections.abc import Mapping

from launcher.migration.channel import DiskInfo, EmulatorInfo, Hello
from launcher.spec import EmulatorKind, Spec


def unmigratable(spec: Spec) -> str | None:
    """Why a VM of this spec cannot migrate, or None: an ``lsi`` emulator's
    remote QEMU process has no migration support here."""
    for emulator in spec.emulators:
        if emulator.kind is EmulatorKind.LSI:
            return (f"emulator '{emulator.id}' is of kind lsi, which cannot migrate "
                    "(only scsi emulators do)")
    return None


def hello_problems(ours: Hello, theirs: Hello) -> list[str]:
    """Every way the source (`theirs`) and this destination (`ours`) differ
    in what the migration needs equal; empty: they match."""
    problems: list[str] = []
    if theirs.store_version != ours.store_version:
        problems.append(f"state store layout {theirs.store_version} at the source, "
                        f"{ours.store_version} here")
    problems += _disk_problems({d.id: d for d in ours.disks}, {d.id: d for d in theirs.disks})
    problems += _emulator_problems({e.id: e for e in ours.emulators},
                                   {e.id: e for e in theirs.emulators})
    return problems


def _one_side_only(what: str, ours: Mapping[str, object],
                   theirs: Mapping[str, object]) -> list[str]:
    """The ids one end has and the other lacks, each named with its end."""
    return ([f"{what} {i}: at the source, not in this spec"
             for i in sorted(theirs.keys() - ours.keys())]
            + [f"{what} {i}: in this spec, not at the source"
               for i in sorted(ours.keys() - theirs.keys())])


def _disk_problems(ours: dict[str, DiskInfo], theirs: dict[str, DiskInfo]) -> list[str]:
    out = _one_side_only("disk", ours, theirs)
    for disk_id in sorted(ours.keys() & theirs.keys()):
        here, there = ours[disk_id], theirs[disk_id]
        if here.size != there.size:
            out.append(f"disk {disk_id}: {here.size} bytes here, {there.size} at the source")
        for name in ("controller", "lun", "block_size", "readonly"):
            a, b = getattr(here, name), getattr(there, name)
            if a != b:
                out.append(f"disk {disk_id}: {name} {a} here, {b} at the source")
    return out


def _emulator_problems(ours: dict[str, EmulatorInfo],
                       theirs: dict[str, EmulatorInfo]) -> list[str]:
    out = _one_side_only("emulator", ours, theirs)
    for emu_id in sorted(ours.keys() & theirs.keys()):
        here, there = ours[emu_id], theirs[emu_id]
        if here.kind != there.kind:
            out.append(f"emulator {emu_id}: kind {here.kind} here, {there.kind} at the source")
        if here.kind != "scsi" or there.kind != "scsi":
            out.append(f"emulator {emu_id}: kind {there.kind} cannot migrate (only scsi)")
        if here.controllers != there.controllers:
            out.append(f"emulator {emu_id}: controllers {', '.join(here.controllers)} here, "
                       f"{', '.join(there.controllers)} at the source")
        if here.store_size != there.store_size:
            out.append(f"emulator {emu_id}: state store of {here.store_size} bytes here, "
                       f"{there.store_size} at the source")
    return out
