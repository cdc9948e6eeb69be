"""The management commands: their argument schemas, checks, and dispatch.

Theory of operation. Each command is a ``Command`` holding its argument
schema and a handler that calls one method of ``VmControl``, the interface
the supervisor implements. Arguments are validated in two stages, as for
every message mplaunch receives: first the schema (each argument's JSON
type, required ones present, no unknown ones: the same messages QEMU gives),
then meaning (an id's syntax, a LUN in range, a size that parses). Only
arguments that pass both reach ``VmControl``; whether an emulator or a disk
with that id exists is the supervisor's to say, by raising ``CommandError``.

Nothing here does I/O; tests drive ``Dispatcher`` with a fake ``VmControl``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePosixPath
from typing import Any, Protocol

from emulators import __version__
from emulators.limits import BLOCK_SIZE_RULE, BLOCK_SIZES, ID_RULE, LUN_RULE, MAX_LUN, is_id
from launcher.management.protocol import ErrorClass
from launcher.sizes import SIZE_SYNTAX, parse_size

LOG = logging.getLogger("mplaunch")



class CommandError(Exception):
    """A command that cannot be done; answered with ``error_class`` and ``desc``.

    Raised by the argument checks here and by ``VmControl`` for semantic
    errors (no such emulator: DeviceNotFound; a LUN already taken:
    GenericError). ``desc`` is shown to operators as is: make it say what
    was wrong and what is allowed.
    """

    def __init__(self, error_class: ErrorClass | str, desc: str) -> None:
        super().__init__(error_class, desc)
        self.error_class = str(error_class)
        self.desc = desc

    def __str__(self) -> str:
        return f"{self.error_class}: {self.desc}"


class VmControl(Protocol):
    """What the management socket asks of the VM's supervisor.

    Every method raises ``CommandError`` when the request cannot be done;
    any other exception is reported to the client as an internal error.
    """

    async def query_status(self) -> dict[str, Any]:
        """{"status": "running"|"paused"|..., "running": bool, "name": str}."""
        ...

    async def query_emulators(self) -> list[dict[str, Any]]:
        """One object per emulator; see docs/management.md for the members."""
        ...

    async def query_disks(self) -> list[dict[str, Any]]:
        ...

    async def emulator_restart(self, id: str) -> None:
        """Hand the emulator's session over to a new process; returns once it serves."""
        ...

    async def disk_add(self, id: str, controller: str, lun: int, image: str, readonly: bool,
                       block_size: int) -> None:
        ...

    async def disk_remove(self, id: str) -> None:
        ...

    async def disk_resize(self, id: str, size: int) -> None:
        """``size`` in bytes; the image only grows."""
        ...

    async def quit(self) -> None:
        """Start stopping the VM and return: the reply goes out before the socket closes."""
        ...

    async def upgrade_emulators(self) -> list[dict[str, Any]]:
        """Hand every emulator's role to a process of the code installed now,
        one at a time, and return query-emulators' answer."""
        ...

    async def migrate(self, uri: str) -> None:
        """Start a live migration to ``uri`` and return at once."""
        ...

    async def query_migrate(self) -> dict[str, Any]:
        """{"status": ...} and, while active, "phase" and QEMU's "ram" figures."""
        ...

    async def migrate_cancel(self) -> None:
        ...

    async def upgrade(self) -> dict[str, Any]:
        """Start handing the VM over to a new launcher process started from the
        installed code and return ({"pid": ..., "package": ...} of this one):
        the reply goes out before the socket closes; the successor answers on
        the same path."""
        ...


class ArgType(Enum):
    """JSON types of arguments, named as QEMU's error messages name them."""

    STRING = "string"
    INT = "integer"
    BOOL = "boolean"
    SIZE = "size"  # an integer of bytes or a size string such as "2G"


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    type: ArgType
    doc: str
    required: bool = True
    default: object = None


Handler = Callable[[VmControl, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    doc: str
    args: tuple[Arg, ...]
    handler: Handler
    returns: str = "{}"


def _type_ok(value: object, kind: ArgType) -> bool:
    if kind is ArgType.STRING:
        return isinstance(value, str)
    if kind is ArgType.BOOL:
        return isinstance(value, bool)
    if kind is ArgType.INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def check_arguments(command: Command, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Stage one: types, required, unknown. Returns the arguments with defaults filled."""
    out: dict[str, Any] = {}
    for arg in command.args:
        if arg.name not in arguments:
            if arg.required:
                raise CommandError(ErrorClass.GENERIC_ERROR, f"Parameter '{arg.name}' is missing")
            out[arg.name] = arg.default
            continue
        value = arguments[arg.name]
        if not _type_ok(value, arg.type):
            expected = "integer or size string" if arg.type is ArgType.SIZE else arg.type.value
            raise CommandError(ErrorClass.GENERIC_ERROR,
                               f"Invalid parameter type for '{arg.name}', expected: {expected}")
        out[arg.name] = value
    known = {arg.name for arg in command.args}
    for name in arguments:
        if name not in known:
            raise CommandError(ErrorClass.GENERIC_ERROR, f"Parameter '{name}' is unexpected")
    return out


# --- stage two: meaning -------------------------------------------------------

def _bad(name: str, value: object, rule: str) -> CommandError:
    return CommandError(ErrorClass.GENERIC_ERROR,
                        f"Parameter '{name}' = {value!r} is invalid: must be {rule}")


def _ident(args: dict[str, Any], name: str) -> str:
    value = args[name]
    if not is_id(value):
        raise _bad(name, value, ID_RULE)
    return str(value)


def _size(args: dict[str, Any], name: str) -> int:
    try:
        size = parse_size(args[name])
    except ValueError:
        raise _bad(name, args[name], SIZE_SYNTAX) from None
    if size <= 0:
        raise _bad(name, args[name], "greater than 0")
    return size


async def _query_status(vm: VmControl, args: dict[str, Any]) -> Any:
    return await vm.query_status()


async def _query_emulators(vm: VmControl, args: dict[str, Any]) -> Any:
    return await vm.query_emulators()


async def _query_disks(vm: VmControl, args: dict[str, Any]) -> Any:
    return await vm.query_disks()


async def _emulator_restart(vm: VmControl, args: dict[str, Any]) -> Any:
    await vm.emulator_restart(_ident(args, "id"))
    return {}


async def _disk_add(vm: VmControl, args: dict[str, Any]) -> Any:
    ident = _ident(args, "id")
    controller = _ident(args, "controller")
    lun = args["lun"]
    if not 0 <= lun <= MAX_LUN:
        raise _bad("lun", lun, LUN_RULE)
    image = args["image"]
    if not image or "\0" in image or not PurePosixPath(image).is_absolute():
        raise _bad("image", image, "an absolute path to an image file")
    block_size = args["block_size"]
    if block_size not in BLOCK_SIZES:
        raise _bad("block_size", block_size, BLOCK_SIZE_RULE)
    await vm.disk_add(ident, controller, lun, image, args["readonly"], block_size)
    return {}


async def _disk_remove(vm: VmControl, args: dict[str, Any]) -> Any:
    await vm.disk_remove(_ident(args, "id"))
    return {}


async def _disk_resize(vm: VmControl, args: dict[str, Any]) -> Any:
    ident = _ident(args, "id")
    await vm.disk_resize(ident, _size(args, "size"))
    return {}


async def _quit(vm: VmControl, args: dict[str, Any]) -> Any:
    await vm.quit()
    return {}


async def _migrate(vm: VmControl, args: dict[str, Any]) -> Any:
    from launcher.migration.uri import BadUri, parse_uri

    try:
        uri = parse_uri(args["uri"])
    except BadUri as e:
        raise CommandError(ErrorClass.GENERIC_ERROR, str(e)) from None
    await vm.migrate(uri.text)
    return {}


async def _query_migrate(vm: VmControl, args: dict[str, Any]) -> Any:
    return await vm.query_migrate()


async def _migrate_cancel(vm: VmControl, args: dict[str, Any]) -> Any:
    await vm.migrate_cancel()
    return {}


async def _upgrade(vm: VmControl, args: dict[str, Any]) -> Any:
    return await vm.upgrade()


async def _upgrade_emulators(vm: VmControl, args: dict[str, Any]) -> Any:
    return await vm.upgrade_emulators()


_ID = Arg("id", ArgType.STRING, "the emulator's id")
_DISK_ID = Arg("id", ArgType.STRING, "the disk's id")

COMMANDS: tuple[Command, ...] = (
    Command("query-status", "The VM's run state.", (), _query_status,
            '{"status": str, "running": bool, "name": str}'),
    Command("query-emulators", "Every emulator process and what it serves.", (),
            _query_emulators, "[emulator objects]"),
    Command("query-disks", "Every disk (LUN) of the VM.", (), _query_disks, "[disk objects]"),
    Command("emulator-restart", "Hand an emulator's work to a new process; the guest "
            "notices nothing.", (_ID,), _emulator_restart),
    Command("disk-add", "Attach an image as a new LUN; the guest is told and rescans.", (
        Arg("id", ArgType.STRING, "a new disk id"),
        Arg("controller", ArgType.STRING, "the controller's id"),
        Arg("lun", ArgType.INT, f"a free LUN, 0 to {MAX_LUN}"),
        Arg("image", ArgType.STRING, "absolute path of a raw image or block device"),
        Arg("readonly", ArgType.BOOL, "attach read-only", False, False),
        Arg("block_size", ArgType.INT, "logical block size: " + BLOCK_SIZE_RULE, False,
            BLOCK_SIZES[0]),
    ), _disk_add),
    Command("disk-remove", "Detach a disk; the guest is told.", (_DISK_ID,), _disk_remove),
    Command("disk-resize", "Grow a disk's image; the guest sees the new capacity.", (
        _DISK_ID, Arg("size", ArgType.SIZE, 'new size: bytes, or a string such as "2G"'),
    ), _disk_resize),
    Command("quit", "Stop the VM and mplaunch.", (), _quit),
    Command("upgrade", "Hand the VM over to a new mplaunch process started from the code "
            "installed now; the guest notices nothing. The successor answers on this "
            "socket's path.", (), _upgrade, '{"pid": int, "package": str}'),
    Command("upgrade-emulators", "Hand each emulator's role, one at a time, to a process "
            "of the code installed now (a warm spare's stall each).", (),
            _upgrade_emulators, "[emulator objects]"),
    Command("migrate", "Live-migrate the VM to an `mplaunch --incoming URI` (returns at "
            "once; follow it with query-migrate or MIGRATION events).",
            (Arg("uri", ArgType.STRING, "unix:PATH or tcp:HOST:PORT"),), _migrate),
    Command("query-migrate", "The live migration's status.", (), _query_migrate,
            '{"status": str, ...}'),
    Command("migrate_cancel", "Cancel the live migration under way; the guest runs on here.",
            (), _migrate_cancel),
)


def mplaunch_version() -> dict[str, Any]:
    """The version object of the greeting and query-version, shaped like QEMU's
    (qmp-shell prints ``qemu.major.minor.micro``)."""
    text = __version__  # the code running now: after an upgrade, the new one's
    parts = [int(p) if p.isdigit() else 0 for p in (text.split(".") + ["0", "0"])[:3]]
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
            "package": f"mplaunch {text}"}


class Dispatcher:
    """Runs commands against one VmControl."""

    def __init__(self, control: VmControl) -> None:
        self.control = control
        self.commands: dict[str, Command] = {c.name: c for c in COMMANDS}

    def names(self) -> list[str]:
        """Every command a client may execute, qmp_capabilities included."""
        return ["qmp_capabilities", "query-commands", "query-version", *self.commands]

    async def dispatch(self, name: str, arguments: Mapping[str, Any]) -> Any:
        """The command's return value; raises CommandError for every failure."""
        if name == "query-commands":
            check_arguments(Command(name, "", (), _quit), arguments)
            return [{"name": n} for n in self.names()]
        if name == "query-version":
            check_arguments(Command(name, "", (), _quit), arguments)
            return mplaunch_version()
        command = self.commands.get(name)
        if command is None:
            raise CommandError(ErrorClass.COMMAND_NOT_FOUND,
                               f"The command {name} has not been found")
        args = check_arguments(command, arguments)
        try:
            return await command.handler(self.control, args)
        except CommandError:
            raise
        except Exception as exc:  # a supervisor bug must not take the socket down
            LOG.exception("management command %s failed", name)
            raise CommandError(ErrorClass.GENERIC_ERROR,
                               f"internal error in {name}: {exc}") from exc
