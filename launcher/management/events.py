"""The events mplaunch's management socket reports, with their data fields.

Each event is a name in QMP's style (upper case, underscores) and a data
object whose members are fixed here: clients such as libvirt-like tools key
on these names and fields, so they are part of the interface. ``check_event``
is how the bus refuses an event mplaunch itself built wrongly (a bug in
mplaunch, raised at once, never sent half-formed to a client).

QEMU's own events (SHUTDOWN, RESET, STOP, RESUME, ...) are passed on as QEMU
sent them, with QEMU's timestamp when known; their data is QEMU's and is not
checked here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EMULATOR_EXIT = "EMULATOR_EXIT"
EMULATOR_HANG = "EMULATOR_HANG"
EMULATOR_RESTART = "EMULATOR_RESTART"
EMULATOR_GIVE_UP = "EMULATOR_GIVE_UP"
DISK_ADDED = "DISK_ADDED"
DISK_REMOVED = "DISK_REMOVED"
DISK_RESIZED = "DISK_RESIZED"
FRONTEND_REFUSED = "FRONTEND_REFUSED"
MIGRATION = "MIGRATION"


@dataclass(frozen=True, slots=True)
class EventSchema:
    """Required and optional data members of one event, with their JSON types."""

    name: str
    doc: str
    required: Mapping[str, type | tuple[type, ...]]
    optional: Mapping[str, type | tuple[type, ...]]


_OPT_INT = (int, type(None))

SCHEMAS: dict[str, EventSchema] = {
    schema.name: schema
    for schema in (
        EventSchema(
            EMULATOR_EXIT,
            "An emulator process ended. Exactly one of 'signal' (its name, e.g. "
            "\"SIGKILL\") and 'status' (its exit status) is non-null. 'reason' says "
            "why, e.g. \"crashed\", \"killed after hang\", \"stopped\".",
            {"id": str, "pid": int, "signal": (str, type(None)), "status": _OPT_INT,
             "reason": str},
            {},
        ),
        EventSchema(
            EMULATOR_HANG,
            "An emulator missed its heartbeat or made no progress with requests in "
            "flight; it is killed and (by policy) restarted. 'why' is \"no-answer\" or "
            "\"no-progress\".",
            {"id": str, "pid": int, "why": str, "inflight": int},
            {"silent_ms": int},
        ),
        EventSchema(
            EMULATOR_RESTART,
            "A new emulator process took over and resumed the session; 'stall_ms' is "
            "how long the guest's I/O on its controllers waited.",
            {"id": str, "pid": int, "restarts": int, "stall_ms": (int, float)},
            {"reason": str, "old_pid": int},
        ),
        EventSchema(
            EMULATOR_GIVE_UP,
            "An emulator hit its restart limit; 'action' is what the VM undergoes: "
            "\"pause\" or \"poweroff\".",
            {"id": str, "restarts": int, "action": str, "reason": str},
            {},
        ),
        EventSchema(
            DISK_ADDED,
            "A disk was attached; the guest was told through the virtio-scsi event queue.",
            {"id": str, "controller": str, "lun": int, "image": str, "size": int,
             "readonly": bool},
            {"block_size": int},
        ),
        EventSchema(
            DISK_REMOVED,
            "A disk was detached; the guest was told through the virtio-scsi event queue.",
            {"id": str, "controller": str, "lun": int},
            {},
        ),
        EventSchema(
            FRONTEND_REFUSED,
            "The front-end (QEMU) sent a control message that no correct front-end "
            "sends; it was refused, never reached the emulator and is not replayed. "
            "'request' is the vhost-user request's name (\"unknown\" when it could not "
            "be decoded), 'action' how it was refused: \"failure-ack\" (QEMU asked "
            "for a status and got a failure; the session goes on) or \"disconnect\" "
            "(the controller's connection was closed).",
            {"id": str, "controller": str, "request": str, "reason": str, "action": str},
            {},
        ),
        EventSchema(
            MIGRATION,
            "A live migration's status changed (on the source and on the destination): "
            "\"setup\", \"active\", \"completed\", \"failed\" (with 'error-desc') or "
            "\"cancelled\".",
            {"status": str},
            {"error-desc": str},
        ),
        EventSchema(
            DISK_RESIZED,
            "A disk's image grew; the guest sees the new capacity.",
            {"id": str, "old_size": int, "new_size": int},
            {},
        ),
    )
}

# QEMU's lifecycle events mplaunch passes on unchanged.
QEMU_EVENTS = frozenset({
    "SHUTDOWN", "POWERDOWN", "RESET", "STOP", "RESUME", "SUSPEND", "WAKEUP",
    "GUEST_PANICKED", "GUEST_CRASHLOADED", "WATCHDOG", "DEVICE_DELETED",
})


def _type_ok(value: object, expected: type | tuple[type, ...]) -> bool:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # bool is an int subclass; True is not a pid
    return isinstance(value, kinds)


def check_event(name: str, data: Mapping[str, Any]) -> None:
    """Raise ValueError if ``data`` is not what event ``name`` promises clients.

    QEMU's passed-on events are only checked for being JSON objects.
    """
    if name in QEMU_EVENTS:
        return
    schema = SCHEMAS.get(name)
    if schema is None:
        raise ValueError(f"unknown event {name!r}")
    for key, kind in schema.required.items():
        if key not in data:
            raise ValueError(f"event {name} lacks data member {key!r}")
        if not _type_ok(data[key], kind):
            raise ValueError(f"event {name} member {key!r} has the wrong type: {data[key]!r}")
    for key, value in data.items():
        found = schema.required.get(key) or schema.optional.get(key)
        if found is None:
            raise ValueError(f"event {name} has an undocumented member {key!r}")
        if not _type_ok(value, found):
            raise ValueError(f"event {name} member {key!r} has the wrong type: {value!r}")
