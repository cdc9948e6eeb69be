"""The names under which the holder keeps a VM's long-lived fds.

One place for them because two launchers must agree: the one that PUTs an
fd and the one that, after a crash or an upgrade, finds it in the holder's
inventory. Spec ids ([a-z0-9-]) and uids fit the holder's name rule as they
are; the kind word before the first colon says what the fds are.
"""

from __future__ import annotations

RUN_LOCK = "runlock"
"""The run folder's lock fd: while the holder lives, the VM's folder is taken."""
MANAGEMENT = "mgmt"
"""The listening management socket (mplaunch.sock): clients reconnect to one path."""
QEMU_OUTPUT = "qemu:out"
"""The read end of QEMU's stderr pipe."""
TETHER = "tether"
"""Name and kind of an entry that ties the VM to its launcher: while the
holder keeps one, the attached launcher's end stops the holder and every
child (an incoming migration whose guest never ran has nothing to keep)."""


def disk(emulator_id: str, disk_id: str) -> str:
    """One disk image's fd (the emulator's successor is handed the same one)."""
    return f"disk:{emulator_id}:{disk_id}"


def state(emulator_id: str) -> str:
    """The emulator's state store."""
    return f"state:{emulator_id}"


def keeper(emulator_id: str, controller_id: str) -> str:
    """The session keeper's end of QEMU's vhost-user socket."""
    return f"keeper:{emulator_id}:{controller_id}"


def record(emulator_id: str, controller_id: str) -> str:
    """The fds a keeper's recorded session refers to (memory, kick, call)."""
    return f"record:{emulator_id}:{controller_id}"


def occupant(emulator_id: str) -> str:
    """The serving emulator's fds on the launcher's side: its control link,
    then its keeper-side vhost-user sockets in controller order, then the
    read end of its output pipe."""
    return f"occ:{emulator_id}"


def lease(uid: int) -> str:
    """A uid lease's lock fd: the uid stays taken host-wide while a process
    of this VM may run under it, launcher or not."""
    return f"lease:{uid}"
