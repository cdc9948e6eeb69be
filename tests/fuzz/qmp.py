"""Fuzz harness for the management socket's parser: QMP framing, negotiation,
and the commands' argument checks (launcher.management).

Input: a chunk size u8 (how the stream is cut into reads, 0 meaning all at
once), then the bytes a client sends. The harness plays the server's loop
(`ManagementServer._converse`) without sockets: every event is answered as
the server answers it, commands go through the real `Dispatcher` to a fake
VM that accepts everything. Invariants: nothing but `CommandError` comes out
of a dispatch, no reply fails to encode, every reply is one JSON object on
a CRLF-terminated line, and the connection ends only by `Closed`.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any

from launcher.management.commands import CommandError, Dispatcher, mplaunch_version
from launcher.management.protocol import (
    NEED_DATA,
    Closed,
    ErrorClass,
    Execute,
    Negotiated,
    Rejected,
    ServerConnection,
)

from .harness import ErrorLog, Harness, Input, OneInput


class AcceptingVm:
    """A VmControl that does whatever it is asked, at once."""

    async def query_status(self) -> dict[str, Any]:
        return {"status": "running", "running": True, "name": "fuzz"}

    async def query_emulators(self) -> list[dict[str, Any]]:
        return [{"id": "disk-proc", "pid": 1}]

    async def query_disks(self) -> list[dict[str, Any]]:
        return [{"id": "d0", "lun": 0}]

    async def emulator_restart(self, id: str) -> None:
        return None

    async def disk_add(self, id: str, controller: str, lun: int, image: str, readonly: bool,
                       block_size: int) -> None:
        return None

    async def disk_remove(self, id: str) -> None:
        return None

    async def disk_resize(self, id: str, size: int) -> None:
        return None

    async def quit(self) -> None:
        return None

    async def upgrade(self) -> dict[str, Any]:
        return {"pid": 1, "package": "mplaunch 0.0.0"}

    async def upgrade_emulators(self) -> list[dict[str, Any]]:
        return []


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (the fake VM answers at once)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("a dispatch waited on something")


def _seeds() -> list[bytes]:
    def session(*commands: dict[str, Any], chunk: int = 0) -> bytes:
        lines = [{"execute": "qmp_capabilities"}, *commands]
        return bytes((chunk,)) + b"".join(json.dumps(c).encode() + b"\n" for c in lines)

    return [
        session({"execute": "query-status", "id": 1}, {"execute": "query-commands"},
                {"execute": "query-version", "id": "v"}),
        session({"execute": "disk-add", "arguments": {
            "id": "d1", "controller": "scsi0", "lun": 1, "image": "/var/lib/images/d1.img",
            "readonly": True, "block_size": 4096}, "id": [1, {"a": None}]}, chunk=7),
        session({"execute": "disk-resize", "arguments": {"id": "d1", "size": "2G"}},
                {"execute": "disk-resize", "arguments": {"id": "d1", "size": 1 << 30}},
                {"execute": "disk-remove", "arguments": {"id": "d1"}}),
        session({"execute": "emulator-restart", "arguments": {"id": "disk-proc"}},
                {"execute": "query-emulators"}, {"execute": "query-disks"}, {"execute": "quit"}),
        b"\0" + b'{"execute": "query-status"}{"execute":"qmp_capabilities","arguments":'
                b'{"enable":[]}}[1,2] "x" {"execute": "nope", "id": 1.5}\n{"exec-oob": 1}',
    ]


def _make() -> OneInput:
    errors = ErrorLog("mplaunch", "launcher")
    dispatcher = Dispatcher(AcceptingVm())
    version = mplaunch_version()

    def answer(conn: ServerConnection, event: Execute | Negotiated | Rejected) -> bytes:
        if isinstance(event, Rejected):
            return conn.send_rejection(event)
        if isinstance(event, Negotiated):
            return conn.send_return(event, {})
        try:
            result = _run(dispatcher.dispatch(event.command, event.arguments))
        except CommandError as exc:
            return conn.send_error(event, exc.error_class, exc.desc)
        return conn.send_return(event, result)

    def one_input(data: bytes) -> None:
        inp = Input(data)
        chunk = inp.u8() or 1 << 20
        stream = inp.rest()
        reads = [stream[i : i + chunk] for i in range(0, len(stream), chunk)] + [b""]
        conn = ServerConnection(version, max_message=4096, max_depth=16)
        replies = [conn.greeting()]
        for read in reads:
            conn.receive_data(read)
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, Closed):
                    break
                assert isinstance(event, Execute | Negotiated | Rejected), event
                replies.append(answer(conn, event))
            else:
                continue
            break
        else:
            raise AssertionError("the stream ended without Closed")
        for reply in replies:
            assert reply.endswith(b"\r\n") and reply.count(b"\n") == 1, reply
            body = json.loads(reply)
            assert isinstance(body, dict), body
            if "error" in body:
                assert body["error"]["class"] in set(ErrorClass), body
        errors.check()

    return one_input


QMP = Harness(
    "qmp",
    "the management socket's QMP parser and command argument checks (launcher.management)",
    _make,
    _seeds,
)
