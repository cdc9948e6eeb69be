"""Management commands and events: schemas, checks and dispatch onto a fake VmControl."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from launcher.management import events
from launcher.management.commands import CommandError, Dispatcher, mplaunch_version
from launcher.management.protocol import ErrorClass, QmpEvent
from launcher.management.server import EventBus
from launcher.sizes import G, M


class FakeVm:
    """A VmControl that keeps its state in dicts and reports events the way the
    supervisor does, so dispatch and the server can be tested end to end."""

    def __init__(self, bus: EventBus | None = None) -> None:
        self.bus = bus
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.status = "running"
        self.emulators: dict[str, dict[str, Any]] = {
            "disk-proc": {"id": "disk-proc", "kind": "scsi", "pid": 4242, "uid": 1001,
                          "state": "running", "uptime_s": 75.5, "restarts": 0, "last_exit": None,
                          "controllers": ["scsi0"], "disks": ["d0"],
                          "heartbeat_rtt_ms": 0.4, "inflight": 0},
        }
        self.disks: dict[str, dict[str, Any]] = {
            "d0": {"id": "d0", "controller": "scsi0", "lun": 0, "image": "/img/d0.img",
                   "size": 64 * M, "readonly": False, "block_size": 512,
                   "emulator": "disk-proc"},
        }
        self.fail_with: BaseException | None = None

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail_with is not None:
            raise self.fail_with

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self.bus is not None:
            self.bus.emit(name, data)

    async def query_status(self) -> dict[str, Any]:
        self._call("query_status")
        return {"status": self.status, "running": self.status == "running", "name": "demo"}

    async def query_emulators(self) -> list[dict[str, Any]]:
        self._call("query_emulators")
        return list(self.emulators.values())

    async def query_disks(self) -> list[dict[str, Any]]:
        self._call("query_disks")
        return list(self.disks.values())

    async def emulator_restart(self, id: str) -> None:
        self._call("emulator_restart", id)
        emulator = self.emulators.get(id)
        if emulator is None:
            raise CommandError(ErrorClass.DEVICE_NOT_FOUND, f"No emulator with id '{id}'")
        old = emulator["pid"]
        emulator["pid"] += 1
        emulator["restarts"] += 1
        self._emit(events.EMULATOR_RESTART, {"id": id, "pid": emulator["pid"], "old_pid": old,
                                             "restarts": emulator["restarts"], "stall_ms": 3.5,
                                             "reason": "requested"})

    async def disk_add(self, id: str, controller: str, lun: int, image: str, readonly: bool,
                       block_size: int) -> None:
        self._call("disk_add", id, controller, lun, image, readonly, block_size)
        if id in self.disks:
            raise CommandError(ErrorClass.GENERIC_ERROR, f"A disk with id '{id}' exists")
        if controller != "scsi0":
            raise CommandError(ErrorClass.DEVICE_NOT_FOUND, f"No controller '{controller}'")
        if any(d["lun"] == lun and d["controller"] == controller for d in self.disks.values()):
            raise CommandError(ErrorClass.GENERIC_ERROR, f"LUN {lun} of {controller} is in use")
        self.disks[id] = {"id": id, "controller": controller, "lun": lun, "image": image,
                          "size": 16 * M, "readonly": readonly, "block_size": block_size,
                          "emulator": "disk-proc"}
        self._emit(events.DISK_ADDED, {"id": id, "controller": controller, "lun": lun,
                                       "image": image, "size": 16 * M, "readonly": readonly,
                                       "block_size": block_size})

    async def disk_remove(self, id: str) -> None:
        self._call("disk_remove", id)
        disk = self.disks.pop(id, None)
        if disk is None:
            raise CommandError(ErrorClass.DEVICE_NOT_FOUND, f"No disk with id '{id}'")
        self._emit(events.DISK_REMOVED, {"id": id, "controller": disk["controller"],
                                         "lun": disk["lun"]})

    async def disk_resize(self, id: str, size: int) -> None:
        self._call("disk_resize", id, size)
        disk = self.disks.get(id)
        if disk is None:
            raise CommandError(ErrorClass.DEVICE_NOT_FOUND, f"No disk with id '{id}'")
        if size < disk["size"]:
            raise CommandError(ErrorClass.GENERIC_ERROR,
                               f"Disk '{id}' is {disk['size']} bytes; it can only grow")
        old, disk["size"] = disk["size"], size
        self._emit(events.DISK_RESIZED, {"id": id, "old_size": old, "new_size": size})

    async def quit(self) -> None:
        self._call("quit")
        self.status = "shutdown"

    async def upgrade(self) -> dict[str, Any]:
        self._call("upgrade")
        return {"pid": 1, "package": "mplaunch 0.0.0"}

    async def upgrade_emulators(self) -> list[dict[str, Any]]:
        self._call("upgrade-emulators")
        return []

    async def migrate(self, uri: str) -> None:
        self._call("migrate", uri)

    async def query_migrate(self) -> dict[str, Any]:
        self._call("query_migrate")
        return {"status": "none"}

    async def migrate_cancel(self) -> None:
        self._call("migrate_cancel")


def run(dispatcher: Dispatcher, name: str, arguments: dict[str, Any] | None = None) -> Any:
    return asyncio.run(dispatcher.dispatch(name, arguments or {}))


def error_of(dispatcher: Dispatcher, name: str, arguments: dict[str, Any] | None = None
             ) -> CommandError:
    with pytest.raises(CommandError) as info:
        run(dispatcher, name, arguments)
    return info.value


@pytest.fixture
def vm() -> FakeVm:
    return FakeVm()


@pytest.fixture
def dispatcher(vm: FakeVm) -> Dispatcher:
    return Dispatcher(vm)


def test_queries_return_what_the_vm_says(vm: FakeVm, dispatcher: Dispatcher) -> None:
    assert run(dispatcher, "query-status") == {"status": "running", "running": True,
                                               "name": "demo"}
    assert run(dispatcher, "query-emulators")[0]["pid"] == 4242
    assert run(dispatcher, "query-disks")[0]["id"] == "d0"
    assert [c[0] for c in vm.calls] == ["query_status", "query_emulators", "query_disks"]


def test_actions_reach_the_vm_with_checked_arguments(vm: FakeVm,
                                                     dispatcher: Dispatcher) -> None:
    assert run(dispatcher, "emulator-restart", {"id": "disk-proc"}) == {}
    assert run(dispatcher, "disk-add", {"id": "d1", "controller": "scsi0", "lun": 1,
                                        "image": "/img/d1.img"}) == {}
    assert run(dispatcher, "disk-resize", {"id": "d1", "size": "2G"}) == {}
    assert run(dispatcher, "disk-resize", {"id": "d1", "size": 3 * G}) == {}
    assert run(dispatcher, "disk-remove", {"id": "d1"}) == {}
    assert run(dispatcher, "quit") == {}
    assert vm.calls == [
        ("emulator_restart", ("disk-proc",)),
        ("disk_add", ("d1", "scsi0", 1, "/img/d1.img", False, 512)),  # defaults filled
        ("disk_resize", ("d1", 2 * G)),
        ("disk_resize", ("d1", 3 * G)),
        ("disk_remove", ("d1",)),
        ("quit", ()),
    ]


@pytest.mark.parametrize(("name", "arguments", "desc"), [
    ("emulator-restart", {}, "Parameter 'id' is missing"),
    ("emulator-restart", {"id": 3}, "Invalid parameter type for 'id', expected: string"),
    ("emulator-restart", {"id": "e", "force": True}, "Parameter 'force' is unexpected"),
    ("query-status", {"verbose": True}, "Parameter 'verbose' is unexpected"),
    ("query-commands", {"x": 1}, "Parameter 'x' is unexpected"),
    ("disk-add", {"id": "d1", "controller": "scsi0", "image": "/i"},
     "Parameter 'lun' is missing"),
    ("disk-add", {"id": "d1", "controller": "scsi0", "lun": True, "image": "/i"},
     "Invalid parameter type for 'lun', expected: integer"),
    ("disk-add", {"id": "d1", "controller": "scsi0", "lun": 1, "image": "/i", "readonly": 1},
     "Invalid parameter type for 'readonly', expected: boolean"),
    ("disk-resize", {"id": "d0", "size": 1.5},
     "Invalid parameter type for 'size', expected: integer or size string"),
    ("disk-resize", {"id": "d0"}, "Parameter 'size' is missing"),
    ("emulator-restart", {"id": "Bad Id"}, "Parameter 'id' = 'Bad Id' is invalid: must be 1 to"),
    ("disk-add", {"id": "d1", "controller": "scsi0", "lun": 256, "image": "/i"},
     "Parameter 'lun' = 256 is invalid: must be an integer from 0 to 255"),
    ("disk-add", {"id": "d1", "controller": "scsi0", "lun": -1, "image": "/i"},
     "Parameter 'lun' = -1 is invalid"),
    ("disk-add", {"id": "d1", "controller": "scsi0", "lun": 1, "image": "rel.img"},
     "Parameter 'image' = 'rel.img' is invalid: must be an absolute path"),
    ("disk-add", {"id": "d1", "controller": "scsi0", "lun": 1, "image": "/i",
                  "block_size": 1024},
     "Parameter 'block_size' = 1024 is invalid: must be one of 512, 4096"),
    ("disk-add", {"id": "d1", "controller": "Scsi", "lun": 1, "image": "/i"},
     "Parameter 'controller' = 'Scsi' is invalid"),
    ("disk-resize", {"id": "d0", "size": "2X"}, "Parameter 'size' = '2X' is invalid: must be"),
    ("disk-resize", {"id": "d0", "size": 0}, "Parameter 'size' = 0 is invalid: must be greater"),
    ("disk-resize", {"id": "d0", "size": -5}, "Parameter 'size' = -5 is invalid"),
])
def test_bad_arguments_never_reach_the_vm(vm: FakeVm, dispatcher: Dispatcher, name: str,
                                          arguments: dict[str, Any], desc: str) -> None:
    error = error_of(dispatcher, name, arguments)
    assert error.error_class == "GenericError"
    assert error.desc.startswith(desc), error.desc
    assert vm.calls == []


def test_unknown_command(dispatcher: Dispatcher) -> None:
    error = error_of(dispatcher, "device_add", {"driver": "x"})
    assert (error.error_class, error.desc) == ("CommandNotFound",
                                               "The command device_add has not been found")


def test_semantic_errors_from_the_vm_pass_through(dispatcher: Dispatcher) -> None:
    error = error_of(dispatcher, "emulator-restart", {"id": "nope"})
    assert (error.error_class, error.desc) == ("DeviceNotFound", "No emulator with id 'nope'")
    error = error_of(dispatcher, "disk-resize", {"id": "d0", "size": "1M"})
    assert error.error_class == "GenericError" and "only grow" in error.desc
    assert str(error).startswith("GenericError: ")


def test_a_vm_bug_becomes_an_internal_error(vm: FakeVm, dispatcher: Dispatcher) -> None:
    vm.fail_with = RuntimeError("boom")
    error = error_of(dispatcher, "query-status")
    assert error.error_class == "GenericError"
    assert error.desc == "internal error in query-status: boom"


def test_cancellation_is_not_wrapped(vm: FakeVm, dispatcher: Dispatcher) -> None:
    vm.fail_with = asyncio.CancelledError()
    with pytest.raises(asyncio.CancelledError):
        run(dispatcher, "query-status")


def test_query_commands_and_version(dispatcher: Dispatcher) -> None:
    names = {c["name"] for c in run(dispatcher, "query-commands")}
    assert names == {"qmp_capabilities", "query-commands", "query-version", "query-status",
                     "query-emulators", "query-disks", "emulator-restart", "disk-add",
                     "disk-remove", "disk-resize", "quit", "upgrade", "upgrade-emulators",
                     "migrate", "query-migrate", "migrate_cancel"}
    version = run(dispatcher, "query-version")
    assert version == mplaunch_version()
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert version["package"].startswith("mplaunch ")


# --- events ---------------------------------------------------------------------

GOOD_EVENTS: dict[str, dict[str, Any]] = {
    events.EMULATOR_EXIT: {"id": "e", "pid": 5, "signal": "SIGKILL", "status": None,
                           "reason": "crashed"},
    events.EMULATOR_HANG: {"id": "e", "pid": 5, "why": "no-progress", "inflight": 3,
                           "silent_ms": 2100},
    events.EMULATOR_RESTART: {"id": "e", "pid": 6, "restarts": 1, "stall_ms": 12.5},
    events.EMULATOR_GIVE_UP: {"id": "e", "restarts": 5, "action": "pause", "reason": "burst"},
    events.DISK_ADDED: {"id": "d1", "controller": "c", "lun": 1, "image": "/i", "size": 512,
                        "readonly": False},
    events.DISK_REMOVED: {"id": "d1", "controller": "c", "lun": 1},
    events.DISK_RESIZED: {"id": "d1", "old_size": 512, "new_size": 1024},
    events.MIGRATION: {"status": "failed", "error-desc": "the destination refused"},
    events.FRONTEND_REFUSED: {"id": "e", "controller": "c", "request": "SET_VRING_NUM",
                              "reason": "ring size 3 is not a power of two <= 1024",
                              "action": "disconnect"},
}


def test_every_documented_event_has_a_good_example() -> None:
    assert set(GOOD_EVENTS) == set(events.SCHEMAS)
    for name, data in GOOD_EVENTS.items():
        events.check_event(name, data)


@pytest.mark.parametrize(("name", "data", "why"), [
    (events.DISK_REMOVED, {"id": "d1", "controller": "c"}, "lacks data member 'lun'"),
    (events.DISK_REMOVED, {"id": "d1", "controller": "c", "lun": "1"}, "wrong type"),
    (events.DISK_REMOVED, {"id": "d1", "controller": "c", "lun": True}, "wrong type"),
    (events.DISK_REMOVED, {"id": "d1", "controller": "c", "lun": 1, "x": 1}, "undocumented"),
    (events.EMULATOR_HANG, {"id": "e", "pid": 5, "why": "x", "inflight": 0, "silent_ms": "1"},
     "wrong type"),
    ("DISK_EXPLODED", {}, "unknown event"),
])
def test_badly_built_events_are_refused(name: str, data: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        events.check_event(name, data)


def test_qemu_events_pass_unchecked() -> None:
    events.check_event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})


def test_event_bus_stamps_with_its_clock_and_isolates_subscribers() -> None:
    bus = EventBus(clock=lambda: 1000.5)
    got: list[QmpEvent] = []

    def broken(event: QmpEvent) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(got.append)
    event = bus.emit(events.DISK_REMOVED, GOOD_EVENTS[events.DISK_REMOVED])
    assert got == [event]
    assert (event.seconds, event.microseconds) == (1000, 500000)
    qemu = bus.emit("STOP", {}, when=7.0)
    assert got[-1] == qemu and qemu.seconds == 7
    unsubscribe()
    unsubscribe()  # twice is harmless
    bus.emit("RESUME", {})
    assert len(got) == 2
    with pytest.raises(ValueError):
        bus.emit(events.DISK_ADDED, {})


# --- migration ------------------------------------------------------------------

def test_migrate_takes_a_checked_uri(dispatcher: Dispatcher) -> None:
    assert run(dispatcher, "migrate", {"uri": "tcp:dest:4444"}) == {}
    assert run(dispatcher, "query-migrate") == {"status": "none"}
    assert run(dispatcher, "migrate_cancel") == {}
    with pytest.raises(CommandError, match="scheme 'exec' is not supported"):
        run(dispatcher, "migrate", {"uri": "exec:cat"})
    with pytest.raises(CommandError, match="Parameter 'uri' is missing"):
        run(dispatcher, "migrate", {})
    with pytest.raises(CommandError, match="expected: string"):
        run(dispatcher, "migrate", {"uri": 4444})
    vm = dispatcher.control
    assert isinstance(vm, FakeVm)
    assert [c for c in vm.calls if c[0] == "migrate"] == [("migrate", ("tcp:dest:4444",))]
