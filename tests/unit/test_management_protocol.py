"""QMP server protocol, driven without sockets: bytes in, events and bytes out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from launcher.management.protocol import (
    NEED_DATA,
    Closed,
    ConnectionState,
    ErrorClass,
    Execute,
    LocalProtocolError,
    Negotiated,
    QmpEvent,
    Rejected,
    ServerConnection,
)

VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "mplaunch 0.1.0"}


def greeted() -> ServerConnection:
    conn = ServerConnection(VERSION)
    conn.greeting()
    return conn


def negotiated() -> ServerConnection:
    conn = greeted()
    conn.receive_data(b'{"execute": "qmp_capabilities"}\n')
    event = conn.next_event()
    assert isinstance(event, Negotiated)
    assert json.loads(conn.send_return(event, {})) == {"return": {}}
    return conn


def decode(data: bytes) -> dict[str, Any]:
    assert data.endswith(b"\r\n") and data.count(b"\n") == 1
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


def feed(conn: ServerConnection, data: bytes) -> Any:
    conn.receive_data(data)
    return conn.next_event()


def test_greeting_has_version_and_no_capabilities() -> None:
    conn = ServerConnection(VERSION)
    assert conn.state.value == "greeting"
    greeting = decode(conn.greeting())
    assert greeting == {"QMP": {"version": VERSION, "capabilities": []}}
    assert conn.state is ConnectionState.NEGOTIATION
    with pytest.raises(LocalProtocolError):
        conn.greeting()


def test_reading_before_the_greeting_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ServerConnection(VERSION).next_event()


def test_commands_before_negotiation_are_refused_like_qemu() -> None:
    conn = greeted()
    event = feed(conn, b'{"execute": "query-status", "id": "a"}')
    assert event == Rejected("a", True, ErrorClass.COMMAND_NOT_FOUND,
                             "Expecting capabilities negotiation with 'qmp_capabilities'")
    reply = decode(conn.send_rejection(event))
    assert reply == {"id": "a", "error": {"class": "CommandNotFound",
                                          "desc": event.desc}}
    assert conn.state is ConnectionState.NEGOTIATION


def test_negotiation_completes_when_answered_and_only_once() -> None:
    conn = greeted()
    event = feed(conn, b'{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 1}')
    assert isinstance(event, Negotiated) and event.id == 1
    assert conn.state.value == "negotiation"
    assert decode(conn.send_return(event, {})) == {"return": {}, "id": 1}
    assert conn.state is ConnectionState.COMMAND
    again = feed(conn, b'{"execute": "qmp_capabilities"}')
    assert isinstance(again, Rejected)
    assert again.error_class is ErrorClass.COMMAND_NOT_FOUND
    assert "already complete" in again.desc


@pytest.mark.parametrize(("arguments", "desc"), [
    ({"enable": ["oob"]}, "Capability 'oob' not available"),
    ({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array of strings"),
    ({"enable": [1]}, "Invalid parameter type for 'enable', expected: array of strings"),
    ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
])
def test_bad_capabilities_requests(arguments: dict[str, Any], desc: str) -> None:
    conn = greeted()
    msg = {"execute": "qmp_capabilities", "arguments": arguments}
    event = feed(conn, json.dumps(msg).encode())
    assert isinstance(event, Rejected) and event.desc == desc
    assert event.error_class is ErrorClass.GENERIC_ERROR
    assert not event.has_id
    assert "id" not in decode(conn.send_rejection(event))


def test_execute_carries_command_arguments_and_any_json_id() -> None:
    conn = negotiated()
    for ident in ("x", 7, None, [1, {"a": 2}], {"k": "v"}):
        msg = {"execute": "disk-resize", "arguments": {"id": "d0", "size": "2G"}, "id": ident}
        event = feed(conn, json.dumps(msg).encode())
        assert event == Execute(ident, True, "disk-resize", {"id": "d0", "size": "2G"})
        assert decode(conn.send_return(event, {"ok": True})) == {"return": {"ok": True},
                                                                  "id": ident}


def test_reply_without_id_when_the_request_had_none() -> None:
    conn = negotiated()
    event = feed(conn, b'{"execute": "quit"}')
    assert isinstance(event, Execute) and not event.has_id and event.arguments == {}
    assert decode(conn.send_error(event, ErrorClass.GENERIC_ERROR, "no")) == {
        "error": {"class": "GenericError", "desc": "no"}}


def test_concatenated_values_split_at_every_byte() -> None:
    stream = (b'{"execute":"a","id":"{\\"}"}{"execute":"b","arguments":{"x":[1,{"y":"]"}]}}'
              b'\n\n  {"execute": "c"} ')
    for cut in range(1, len(stream)):
        conn = negotiated()
        seen: list[str] = []
        for part in (stream[:cut], stream[cut:]):
            conn.receive_data(part)
            while isinstance(event := conn.next_event(), Execute):
                seen.append(event.command)
            assert event is NEED_DATA
        assert seen == ["a", "b", "c"], cut


def test_one_byte_at_a_time() -> None:
    conn = negotiated()
    out = []
    for byte in b'{"execute": "x", "arguments": {"s": "a\\\\"}, "id": "q"}':
        event = feed(conn, bytes([byte]))
        if event is not NEED_DATA:
            out.append(event)
    assert out == [Execute("q", True, "x", {"s": "a\\"})]


@pytest.mark.parametrize(("data", "desc"), [
    (b'{"execute": }', "JSON parse error"),
    (b'{"execute": "a", "execute": "b"}', "JSON parse error, duplicate key 'execute'"),
    (b'{"execute": "a", "arguments": {"n": NaN}}', "JSON parse error"),
    (b'[1, 2]', "QMP input must be a JSON object"),
    (b'123 ', "QMP input must be a JSON object"),
    (b'"text" ', "QMP input must be a JSON object"),
    (b'bogus ', "JSON parse error"),
    (b'{"execute": "a"]', "JSON parse error"),
    (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
    (b'{"execute": 5}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "a", "arguments": [1]}', "QMP input member 'arguments' must be an object"),
    (b'{"execute": "a", "extra": 1}', "QMP input member 'extra' is unexpected"),
    (b'{"exec-oob": "a"}', "QMP input member 'exec-oob' is unexpected"),
    (b'{"execute": "\xff"}', "JSON parse error, invalid UTF-8"),
    (b"[" * 100 + b"]" * 100, "JSON parse error, nesting too deep"),
    (b'{"execute": "a", "arguments": ' + b'{"a":' * 70 + b"1" + b"}" * 71,
     "JSON parse error, nesting too deep"),
])
def test_malformed_input_is_an_error_reply_not_a_disconnect(data: bytes, desc: str) -> None:
    conn = negotiated()
    event = feed(conn, data)
    assert isinstance(event, Rejected), event
    assert event.desc.startswith(desc), event.desc
    assert event.error_class is ErrorClass.GENERIC_ERROR
    conn.send_rejection(event)
    assert conn.state is ConnectionState.COMMAND
    after = feed(conn, b'{"execute": "next", "id": 2}')
    assert after == Execute(2, True, "next", {})


def test_errors_keep_the_id_when_it_could_be_read() -> None:
    conn = negotiated()
    event = feed(conn, b'{"execute": "a", "bogus": 1, "id": "keep"}')
    assert isinstance(event, Rejected)
    assert decode(conn.send_rejection(event))["id"] == "keep"


def test_events_only_after_negotiation_with_a_timestamp() -> None:
    event = QmpEvent.at("DISK_REMOVED", {"id": "d1"}, 1700000000.25)
    assert (event.seconds, event.microseconds) == (1700000000, 250000)
    conn = greeted()
    assert conn.send_event(event) == b""
    conn = negotiated()
    assert decode(conn.send_event(event)) == {
        "event": "DISK_REMOVED", "data": {"id": "d1"},
        "timestamp": {"seconds": 1700000000, "microseconds": 250000}}


def test_event_validates_itself() -> None:
    with pytest.raises(ValueError):
        QmpEvent("", {}, 0, 0)
    with pytest.raises(ValueError):
        QmpEvent("X", {}, 0, 1_000_000)
    assert QmpEvent.at("X", {}, 5.9999999).microseconds <= 999_999


def test_eof_closes_and_reports_a_half_message() -> None:
    conn = negotiated()
    assert feed(conn, b"") == Closed("hung up")
    assert conn.state is ConnectionState.CLOSED
    assert isinstance(conn.next_event(), Closed)
    conn = negotiated()
    conn.receive_data(b'{"execute": "a"}{"exec')
    assert isinstance(conn.next_event(), Execute)
    closed = feed(conn, b"")
    assert isinstance(closed, Closed) and "mid-message (6 bytes)" in closed.reason


def test_an_overlong_message_closes_the_connection() -> None:
    conn = ServerConnection(VERSION, max_message=64)
    conn.greeting()
    event = feed(conn, b'{"execute": "' + b"a" * 100)
    assert isinstance(event, Closed) and "longer than 64" in event.reason
    assert conn.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send_error(Rejected(), ErrorClass.GENERIC_ERROR, "late")
