"""The management socket for real: asyncio server on a temp socket, a fake VmControl,
driven by qemu.qmp's QMPClient (and by mpctl, and by raw bytes where a client
library would hide what is tested)."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import io
import json
import os
import socket
import stat
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from launcher import mpctl
from launcher.management import events
from launcher.management.server import EventBus, ManagementServer
from launcher.sizes import G, M
from tests.unit.test_management_commands import GOOD_EVENTS, FakeVm

pytestmark = pytest.mark.timeout(30)
GROUP = "daemon"


@contextlib.asynccontextmanager
async def serving(folder: Path, group: str | None = None
                  ) -> AsyncIterator[tuple[ManagementServer, FakeVm]]:
    bus = EventBus()
    vm = FakeVm(bus)
    server = ManagementServer(folder / "mplaunch.sock", vm, bus, group=group)
    await server.start()
    try:
        yield server, vm
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def connected(path: Path) -> AsyncIterator[QMPClient]:
    client = QMPClient("test")
    await client.connect(str(path))
    try:
        yield client
    finally:
        await client.disconnect()


async def qmp_error(client: QMPClient, name: str, arguments: dict[str, Any] | None = None
                    ) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as info:
        await client.execute(name, arguments)
    return info.value.error_class, str(info.value)


async def next_event(client: QMPClient) -> dict[str, Any]:
    event = await asyncio.wait_for(client.events.get(), 5)
    return dict(event)


def test_socket_is_0660_with_its_group_and_appears_only_when_ready(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, GROUP) as (server, _):
            st = server.path.stat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert st.st_gid == grp.getgrnam(GROUP).gr_gid
            assert [p.name for p in tmp_path.iterdir()] == ["mplaunch.sock"]
        assert not (tmp_path / "mplaunch.sock").exists()
    asyncio.run(main())


def test_unknown_group_is_refused_by_name(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="no such group: 'no-such-group-x'"):
            async with serving(tmp_path, "no-such-group-x"):
                pass
    asyncio.run(main())
    assert list(tmp_path.iterdir()) == []


def _connect_as(path: Path, uid: int, gid: int, groups: list[int]) -> int:
    """Fork a child that takes ``uid``/``gid``/``groups`` and connects: its exit
    status is 0 if it read the greeting, 13 if refused (EACCES)."""
    pid = os.fork()
    if pid == 0:  # the child does only system calls, then _exit
        code = 1
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(5)
            sock.connect(str(path))
            code = 0 if b'"QMP"' in sock.recv(4096) else 2
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change uid")
def test_only_root_and_the_group_may_connect() -> None:
    gid = grp.getgrnam(GROUP).gr_gid

    async def main() -> None:
        # pytest's tmp_path is 0700 all the way up: the socket's own mode would not matter.
        with tempfile.TemporaryDirectory() as folder:
            os.chmod(folder, 0o755)
            async with serving(Path(folder), GROUP) as (server, _):
                outsider = await asyncio.to_thread(_connect_as, server.path, 65534, 65534, [])
                member = await asyncio.to_thread(_connect_as, server.path, 65534, 65534, [gid])
                assert (outsider, member) == (13, 0)
    asyncio.run(main())


def test_greeting_and_negotiation_through_qemu_qmp(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _), connected(server.path) as client:
            greeting = client.greeting
            assert greeting is not None
            assert greeting.QMP.capabilities == []
            assert str(greeting.QMP.version["package"]).startswith("mplaunch ")
            assert await client.execute("query-version") == greeting.QMP.version
            assert (await qmp_error(client, "qmp_capabilities"))[0] == "CommandNotFound"
    asyncio.run(main())


def test_every_command(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, vm), connected(server.path) as client:
            assert await client.execute("query-status") == {"status": "running",
                                                            "running": True, "name": "demo"}
            emulators = await client.execute("query-emulators")
            assert isinstance(emulators, list) and emulators[0]["id"] == "disk-proc"
            assert await client.execute("query-disks") == list(vm.disks.values())
            assert await client.execute("emulator-restart", {"id": "disk-proc"}) == {}
            assert await client.execute("disk-add", {
                "id": "d1", "controller": "scsi0", "lun": 1, "image": "/img/d1.img",
                "readonly": True, "block_size": 4096}) == {}
            assert await client.execute("disk-resize", {"id": "d1", "size": "1G"}) == {}
            assert vm.disks["d1"]["size"] == G
            assert await client.execute("disk-remove", {"id": "d1"}) == {}
            commands = await client.execute("query-commands")
            assert {"name": "disk-add"} in commands  # type: ignore[operator]
            assert await client.execute("quit") == {}
            assert [c[0] for c in vm.calls] == [
                "query_status", "query_emulators", "query_disks", "emulator_restart",
                "disk_add", "disk_resize", "disk_remove", "quit"]
            assert vm.calls[4][1] == ("d1", "scsi0", 1, "/img/d1.img", True, 4096)
    asyncio.run(main())


ERRORS: list[tuple[str, dict[str, Any] | None, str, str]] = [
    ("no-such-command", None, "CommandNotFound", "The command no-such-command has not been found"),
    ("query-status", {"x": 1}, "GenericError", "Parameter 'x' is unexpected"),
    ("emulator-restart", None, "GenericError", "Parameter 'id' is missing"),
    ("emulator-restart", {"id": 1}, "GenericError",
     "Invalid parameter type for 'id', expected: string"),
    ("emulator-restart", {"id": "ghost"}, "DeviceNotFound", "No emulator with id 'ghost'"),
    ("emulator-restart", {"id": "../x"}, "GenericError", "Parameter 'id' = '../x' is invalid"),
    ("disk-add", {"id": "d0", "controller": "scsi0", "lun": 5, "image": "/i"}, "GenericError",
     "A disk with id 'd0' exists"),
    ("disk-add", {"id": "d2", "controller": "scsi9", "lun": 5, "image": "/i"},
     "DeviceNotFound", "No controller 'scsi9'"),
    ("disk-add", {"id": "d2", "controller": "scsi0", "lun": 0, "image": "/i"}, "GenericError",
     "LUN 0 of scsi0 is in use"),
    ("disk-add", {"id": "d2", "controller": "scsi0", "lun": 300, "image": "/i"},
     "GenericError", "Parameter 'lun' = 300 is invalid"),
    ("disk-add", {"id": "d2", "controller": "scsi0", "lun": 1, "image": "i.img"},
     "GenericError", "Parameter 'image' = 'i.img' is invalid"),
    ("disk-add", {"id": "d2", "controller": "scsi0", "lun": 1, "image": "/i",
                  "block_size": 520}, "GenericError", "Parameter 'block_size' = 520"),
    ("disk-add", {"id": "d2", "controller": "scsi0", "image": "/i"}, "GenericError",
     "Parameter 'lun' is missing"),
    ("disk-remove", {"id": "ghost"}, "DeviceNotFound", "No disk with id 'ghost'"),
    ("disk-remove", {}, "GenericError", "Parameter 'id' is missing"),
    ("disk-resize", {"id": "ghost", "size": "1G"}, "DeviceNotFound", "No disk with id 'ghost'"),
    ("disk-resize", {"id": "d0", "size": "1M"}, "GenericError", "Disk 'd0' is 67108864 bytes"),
    ("disk-resize", {"id": "d0", "size": "lots"}, "GenericError",
     "Parameter 'size' = 'lots' is invalid"),
    ("disk-resize", {"id": "d0", "size": True}, "GenericError",
     "Invalid parameter type for 'size'"),
    ("quit", {"now": True}, "GenericError", "Parameter 'now' is unexpected"),
]


def test_every_error_path(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, vm), connected(server.path) as client:
            for name, arguments, error_class, desc in ERRORS:
                got_class, got_desc = await qmp_error(client, name, arguments)
                assert got_class == error_class, (name, arguments, got_desc)
                assert got_desc.startswith(desc), (name, arguments, got_desc)
            vm.fail_with = RuntimeError("state lost")
            assert await qmp_error(client, "query-disks") == (
                "GenericError", "internal error in query-disks: state lost")
            vm.fail_with = None
            # The connection survived every error.
            assert (await client.execute("query-status"))["running"] is True  # type: ignore[index]
            assert vm.disks["d0"]["size"] == 64 * M
    asyncio.run(main())


def test_commands_emit_events_with_timestamps(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _), connected(server.path) as client:
            await client.execute("emulator-restart", {"id": "disk-proc"})
            event = await next_event(client)
            assert event["event"] == "EMULATOR_RESTART"
            assert event["data"] == {"id": "disk-proc", "pid": 4243, "old_pid": 4242,
                                     "restarts": 1, "stall_ms": 3.5, "reason": "requested"}
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
            await client.execute("disk-add", {"id": "d5", "controller": "scsi0", "lun": 5,
                                              "image": "/img/5"})
            assert (await next_event(client))["event"] == "DISK_ADDED"
            await client.execute("disk-resize", {"id": "d5", "size": "32M"})
            assert (await next_event(client))["data"] == {"id": "d5", "old_size": 16 * M,
                                                          "new_size": 32 * M}
            await client.execute("disk-remove", {"id": "d5"})
            assert (await next_event(client))["data"] == {"id": "d5", "controller": "scsi0",
                                                          "lun": 5}
    asyncio.run(main())


def test_every_event_reaches_every_negotiated_client(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _), connected(server.path) as one, \
                connected(server.path) as two:
            assert server.client_count == 2
            sent = [(name, data) for name, data in GOOD_EVENTS.items()]
            sent.append(("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}))
            for name, data in sent:
                server.broadcast(name, data)
            server.bus.emit("STOP", {}, when=1234.5)
            for client in (one, two):
                got = [await next_event(client) for _ in range(len(sent) + 1)]
                assert [(e["event"], e["data"]) for e in got[:-1]] == sent
                assert got[-1]["timestamp"] == {"seconds": 1234, "microseconds": 500000}
    asyncio.run(main())


async def _raw_line(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(reader.readline(), 5)
    assert line.endswith(b"\r\n"), line
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def test_raw_protocol_negotiation_malformed_input_and_event_gating(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _):
            reader, writer = await asyncio.open_unix_connection(str(server.path))
            assert "QMP" in await _raw_line(reader)
            server.broadcast(events.DISK_REMOVED, GOOD_EVENTS[events.DISK_REMOVED])
            writer.write(b'{"execute": "query-status", "id": 1}')
            reply = await _raw_line(reader)  # no event before it: not negotiated yet
            assert reply == {"id": 1, "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
            writer.write(b'{"execute": ]\n')
            reply = await _raw_line(reader)
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"].startswith("JSON parse error")
            assert "id" not in reply
            # Two commands in one write, no newline between them.
            writer.write(b'{"execute":"qmp_capabilities","id":"n"}{"execute":"quit","id":"q"}')
            assert await _raw_line(reader) == {"return": {}, "id": "n"}
            assert await _raw_line(reader) == {"return": {}, "id": "q"}
            server.broadcast(events.DISK_REMOVED, GOOD_EVENTS[events.DISK_REMOVED])
            assert (await _raw_line(reader))["event"] == "DISK_REMOVED"
            writer.close()
            await writer.wait_closed()
            for _ in range(100):
                if server.client_count == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.client_count == 0
    asyncio.run(main())


def test_close_disconnects_clients_and_removes_the_socket(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _):
            reader, writer = await asyncio.open_unix_connection(str(server.path))
            await _raw_line(reader)
            await server.close()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert not server.path.exists()
            writer.close()
    asyncio.run(main())


# --- mpctl against a live socket ---------------------------------------------------

class Background:
    """A server on its own event loop thread, so mpctl can run its own loop."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.loop = asyncio.new_event_loop()
        self.bus = EventBus()
        self.vm = FakeVm(self.bus)
        self.server = ManagementServer(folder / "mplaunch.sock", self.vm, self.bus)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Background:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    def emit(self, name: str, data: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.bus.emit, name, data)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Background]:
    (tmp_path / "demo").mkdir()
    with Background(tmp_path / "demo") as background:
        yield background


def mpctl_run(live: Background, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = mpctl.main(["--run-dir", str(live.folder.parent), *argv], out=out)
    return code, out.getvalue()


def test_mpctl_tables(live: Background) -> None:
    code, text = mpctl_run(live, "status", "demo")
    assert code == 0 and "status: running" in text and "running: yes" in text
    code, text = mpctl_run(live, "emulators", "demo")
    header, row = text.splitlines()
    assert header.split()[:5] == ["ID", "KIND", "PID", "UID", "STATE"]
    assert row.split()[:7] == ["disk-proc", "scsi", "4242", "1001", "running", "1:15", "0"]
    code, text = mpctl_run(live, "disks", "demo")
    assert text.splitlines()[1].split() == ["d0", "scsi0", "0", "64M", "no", "512",
                                            "disk-proc", "/img/d0.img"]
    code, text = mpctl_run(live, "list")
    assert code == 0
    assert text.splitlines()[1].split() == ["demo", "running",
                                            str(live.folder / "mplaunch.sock")]


def test_mpctl_actions_and_json(live: Background, tmp_path: Path) -> None:
    assert mpctl_run(live, "restart", "demo", "disk-proc") == (0,
                                                               "emulator disk-proc restarted\n")
    image = tmp_path / "new.img"
    code, text = mpctl_run(live, "disk-add", "demo", "d7", "--controller", "scsi0", "--lun",
                           "7", "--image", str(image), "--readonly")
    assert (code, text) == (0, "disk d7 added\n")
    assert live.vm.calls[-1] == ("disk_add", ("d7", "scsi0", 7, str(image), True, 512))
    assert mpctl_run(live, "disk-resize", "demo", "d7", "1G")[0] == 0
    assert live.vm.disks["d7"]["size"] == G
    code, text = mpctl_run(live, "--json", "disks", "demo")
    assert code == 0 and [d["id"] for d in json.loads(text)] == ["d0", "d7"]
    assert mpctl_run(live, "disk-remove", "demo", "d7")[0] == 0
    code, text = mpctl_run(live, "--json", "status", str(live.folder / "mplaunch.sock"))
    assert json.loads(text)["name"] == "demo"
    assert mpctl_run(live, "quit", "demo") == (0, "VM stopping\n")
    assert live.vm.status == "shutdown"


def test_mpctl_errors(live: Background, capsys: pytest.CaptureFixture[str]) -> None:
    assert mpctl_run(live, "restart", "demo", "ghost") == (1, "")
    assert "mpctl: DeviceNotFound: No emulator with id 'ghost'" in capsys.readouterr().err
    assert mpctl_run(live, "disk-resize", "demo", "d0", "12Q")[0] == 1
    assert "Parameter 'size' = '12Q' is invalid" in capsys.readouterr().err
    assert mpctl_run(live, "status", "absent")[0] == 1
    assert "no such VM socket" in capsys.readouterr().err
    (live.folder.parent / "stale").mkdir()
    (live.folder.parent / "stale" / "mplaunch.sock").write_text("")
    code, text = mpctl_run(live, "--json", "list")
    rows = {row["name"]: row for row in json.loads(text)}
    assert rows["demo"]["status"] == "running"
    assert rows["stale"]["status"] == "unreachable" and rows["stale"]["error"]


def test_mpctl_events_follows_until_the_vm_stops(live: Background) -> None:
    out = io.StringIO()
    result: list[int] = []
    follower = threading.Thread(target=lambda: result.append(mpctl.main(
        ["--run-dir", str(live.folder.parent), "events", "demo"], out=out)))
    follower.start()
    for _ in range(200):
        if live.server.client_count:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)  # negotiation done before the events go out
    live.emit(events.EMULATOR_HANG, GOOD_EVENTS[events.EMULATOR_HANG])
    live.emit(events.DISK_RESIZED, GOOD_EVENTS[events.DISK_RESIZED])
    for _ in range(200):
        if out.getvalue().count("\n") >= 2:
            break
        threading.Event().wait(0.01)
    asyncio.run_coroutine_threadsafe(live.server.close(), live.loop).result(5)
    follower.join(10)
    assert result == [0]
    lines = out.getvalue().splitlines()
    assert lines[0].split()[1:] == ["EMULATOR_HANG", "id=e", "pid=5", "why=no-progress",
                                    "inflight=3", "silent_ms=2100"]
    assert lines[1].endswith("DISK_RESIZED id=d1 old_size=512 new_size=1024")
