"""QMP's wire protocol, server side, without I/O.

Theory of operation. ``ServerConnection`` is one client's view of the
protocol, in the manner of h11: ``greeting()`` gives the bytes to send first,
``receive_data(bytes)`` buffers what the client sent (``b""`` means it hung
up), and ``next_event()`` returns the next thing the server must act on:

- ``Execute``: a well-formed command, to dispatch and answer with
  ``send_return`` or ``send_error``;
- ``Negotiated``: a valid ``qmp_capabilities``; answering it with
  ``send_return(event, {})`` completes negotiation;
- ``Rejected``: input the protocol refused itself (malformed JSON, a command
  before negotiation, ...), to answer with ``send_error``;
- ``Closed``: the client hung up, or sent more than ``max_message`` bytes in
  one value; the server closes the connection;
- ``NEED_DATA``: nothing complete yet.

Every state transition is in ``_TRANSITIONS``; sending a reply the state
does not allow raises ``LocalProtocolError`` (a bug in the server, not the
client's fault). Events are only sent once negotiation is complete, as QEMU
does. Malformed input never closes the connection: QMP clients expect an
error reply and go on.

Framing follows QEMU: the input is a stream of JSON values, one after the
other, with or without newlines between them (qemu.qmp sends one per line).
A value's end is found by counting brackets outside strings, so the scanner
never waits for a newline and never parses a value twice. Replies are one
JSON object per line, ending with CRLF like QEMU's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Final

__all__ = [
    "NEED_DATA", "Closed", "ConnectionState", "ErrorClass", "Execute", "LocalProtocolError",
    "Negotiated", "QmpEvent", "Rejected", "ServerConnection",
]


class ErrorClass(StrEnum):
    """QMP error classes mplaunch uses; the same names QEMU uses."""

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_FOUND = "DeviceNotFound"


class ConnectionState(Enum):
    GREETING = "greeting"  # nothing sent yet
    NEGOTIATION = "negotiation"  # greeting sent, waiting for qmp_capabilities
    COMMAND = "command"  # negotiated: commands run, events flow
    CLOSED = "closed"  # the client hung up or broke framing


class LocalProtocolError(Exception):
    """The server tried something the protocol state does not allow."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class _Request:
    """What every reply needs: the request's id, echoed if it had one."""

    id: Any = None
    has_id: bool = False


@dataclass(frozen=True, slots=True)
class Execute(_Request):
    """A command to dispatch. ``arguments`` is a JSON object (maybe empty)."""

    command: str = ""
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Negotiated(_Request):
    """A valid qmp_capabilities; ``enable`` lists the capabilities asked for."""

    enable: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rejected(_Request):
    """Input the protocol refused; answer with this error."""

    error_class: ErrorClass = ErrorClass.GENERIC_ERROR
    desc: str = ""


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over; ``reason`` is for the server's log."""

    reason: str


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """An asynchronous event with QMP's timestamp (seconds and microseconds)."""

    name: str
    data: Mapping[str, Any]
    seconds: int
    microseconds: int

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("an event needs a name")
        if not 0 <= self.microseconds < 1_000_000:
            raise ValueError(f"microseconds out of range: {self.microseconds}")

    @classmethod
    def at(cls, name: str, data: Mapping[str, Any], when: float) -> QmpEvent:
        """The event stamped at ``when`` (seconds since the epoch, as time.time())."""
        seconds = math.floor(when)
        micro = min(int(round((when - seconds) * 1_000_000)), 999_999)
        return cls(name, data, seconds, micro)

    def to_json(self) -> dict[str, Any]:
        return {"event": self.name, "data": dict(self.data),
                "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds}}


Event = Execute | Negotiated | Rejected | Closed | _NeedData

_WS = frozenset(b" \t\r\n")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_ALLOWED_KEYS = frozenset({"execute", "arguments", "id"})

# (state, what happens) -> next state. Anything else is a LocalProtocolError.
_TRANSITIONS: dict[tuple[ConnectionState, str], ConnectionState] = {
    (ConnectionState.GREETING, "greet"): ConnectionState.NEGOTIATION,
    (ConnectionState.NEGOTIATION, "negotiated"): ConnectionState.COMMAND,
    (ConnectionState.NEGOTIATION, "reply"): ConnectionState.NEGOTIATION,
    (ConnectionState.COMMAND, "reply"): ConnectionState.COMMAND,
    (ConnectionState.GREETING, "close"): ConnectionState.CLOSED,
    (ConnectionState.NEGOTIATION, "close"): ConnectionState.CLOSED,
    (ConnectionState.COMMAND, "close"): ConnectionState.CLOSED,
    (ConnectionState.CLOSED, "close"): ConnectionState.CLOSED,
}


class _Scanner:
    """Finds where each top-level JSON value ends in a growing buffer.

    Keeps its position between calls, so each byte is looked at once.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self._pos = 0
        self._start = -1  # -1: between values
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False

    def pending(self) -> int:
        """Bytes of the value being read (0 between values)."""
        return 0 if self._start < 0 else self._pos - self._start

    def next_value(self) -> bytes | None:
        buf = self.buf
        i = self._pos
        end = -1
        while i < len(buf):
            c = buf[i]
            if self._start < 0:
                if c not in _WS:
                    self._start = i
                    self._scalar = c not in _OPEN
                    self._depth = 0 if self._scalar else 1
                    self._in_string = c == 0x22  # '"'
                i += 1
                continue
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_string = False
            elif self._scalar:
                # A bare token ends at white space or where a bracket begins.
                if c in _WS or c in _OPEN:
                    end = i
                    break
            elif c == 0x22:
                self._in_string = True
            elif c in _OPEN:
                self._depth += 1
            elif c in _CLOSE:
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
            i += 1
        if end < 0:
            self._pos = i
            return None
        value = bytes(buf[self._start:end])
        del buf[:end]
        self._pos = 0
        self._start = -1
        self._in_string = self._escape = False
        return value

    def rest(self) -> bytes:
        """Whatever is left at end of input: an unterminated value, if any."""
        if self._start < 0:
            return b""
        return bytes(self.buf[self._start:])


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid literal {name}")


def _finite_float(text: str) -> float:
    # 1e999 parses as inf, which no reply can echo (an id is sent back as is).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key '{key}'")
        obj[key] = value
    return obj


def _encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode() + b"\r\n"


class ServerConnection:
    """One client connection's protocol state. See the module docstring."""

    def __init__(self, version: Mapping[str, Any], capabilities: tuple[str, ...] = (),
                 max_message: int = 1 << 20, max_depth: int = 64) -> None:
        self.state = ConnectionState.GREETING
        self._version = dict(version)
        self._capabilities = capabilities
        self._max_message = max_message
        self._max_depth = max_depth
        self._scanner = _Scanner()
        self._eof = False

    def _move(self, what: str) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, what)]
        except KeyError:
            raise LocalProtocolError(f"cannot {what} in state {self.state.value}") from None

    # --- outgoing -----------------------------------------------------------

    def greeting(self) -> bytes:
        self._move("greet")
        return _encode({"QMP": {"version": self._version,
                                "capabilities": list(self._capabilities)}})

    def send_return(self, request: Execute | Negotiated, value: Any) -> bytes:
        """The successful reply to ``request``; for Negotiated, ``value`` is {}."""
        self._move("negotiated" if isinstance(request, Negotiated) else "reply")
        return self._reply(request, {"return": value})

    def send_error(self, request: Execute | Rejected, error_class: ErrorClass | str,
                   desc: str) -> bytes:
        self._move("reply")
        return self._reply(request, {"error": {"class": str(error_class), "desc": desc}})

    def send_rejection(self, rejected: Rejected) -> bytes:
        return self.send_error(rejected, rejected.error_class, rejected.desc)

    def send_event(self, event: QmpEvent) -> bytes:
        """The event's bytes, or b"" before negotiation (QEMU sends none then)."""
        if self.state is not ConnectionState.COMMAND:
            return b""
        return _encode(event.to_json())

    @staticmethod
    def _reply(request: _Request, body: dict[str, Any]) -> bytes:
        if request.has_id:
            body["id"] = request.id
        return _encode(body)

    # --- incoming -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        if not data:
            self._eof = True
        else:
            self._scanner.buf += data

    def next_event(self) -> Event:
        if self.state is ConnectionState.CLOSED:
            return Closed("closed")
        if self.state is ConnectionState.GREETING:
            raise LocalProtocolError("send the greeting before reading commands")
        raw = self._scanner.next_value()
        if raw is None:
            if self._scanner.pending() > self._max_message:
                self._move("close")
                return Closed(f"a message longer than {self._max_message} bytes")
            if self._eof:
                self._move("close")
                left = self._scanner.rest()
                return Closed("hung up" + (f" mid-message ({len(left)} bytes)" if left else ""))
            return NEED_DATA
        if len(raw) > self._max_message:
            self._move("close")
            return Closed(f"a message longer than {self._max_message} bytes")
        return self._parse(raw)

    def _parse(self, raw: bytes) -> Execute | Negotiated | Rejected:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return Rejected(desc="JSON parse error, invalid UTF-8 sequence")
        try:
            msg = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                             object_pairs_hook=_no_duplicates)
        except RecursionError:
            return Rejected(desc="JSON parse error, nesting too deep")
        except ValueError as exc:
            return Rejected(desc=f"JSON parse error, {_short(exc)}")
        if _too_deep(msg, self._max_depth):
            return Rejected(desc="JSON parse error, nesting too deep")
        if not isinstance(msg, dict):
            return Rejected(desc="QMP input must be a JSON object")
        has_id = "id" in msg
        ident = msg.get("id")
        for key in msg:
            if key == "exec-oob":
                return Rejected(ident, has_id, desc="QMP input member 'exec-oob' is "
                                "unexpected: out-of-band execution is not supported")
            if key not in _ALLOWED_KEYS:
                return Rejected(ident, has_id, desc=f"QMP input member '{key}' is unexpected")
        if "execute" not in msg:
            return Rejected(ident, has_id, desc="QMP input lacks member 'execute'")
        command = msg["execute"]
        if not isinstance(command, str):
            return Rejected(ident, has_id, desc="QMP input member 'execute' must be a string")
        arguments = msg.get("arguments", {})
        if not isinstance(arguments, dict):
            return Rejected(ident, has_id,
                            desc="QMP input member 'arguments' must be an object")
        if command == "qmp_capabilities":
            return self._capabilities_request(ident, has_id, arguments)
        if self.state is ConnectionState.NEGOTIATION:
            return Rejected(ident, has_id, ErrorClass.COMMAND_NOT_FOUND,
                            "Expecting capabilities negotiation with 'qmp_capabilities'")
        return Execute(ident, has_id, command, arguments)

    def _capabilities_request(self, ident: Any, has_id: bool,
                              arguments: dict[str, Any]) -> Negotiated | Rejected:
        if self.state is ConnectionState.COMMAND:
            return Rejected(ident, has_id, ErrorClass.COMMAND_NOT_FOUND,
                            "Capabilities negotiation is already complete, command ignored")
        for key in arguments:
            if key != "enable":
                return Rejected(ident, has_id, desc=f"Parameter '{key}' is unexpected")
        enable = arguments.get("enable", [])
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            return Rejected(ident, has_id,
                            desc="Invalid parameter type for 'enable', expected: array of "
                            "strings")
        for cap in enable:
            if cap not in self._capabilities:
                return Rejected(ident, has_id, desc=f"Capability '{cap}' not available")
        return Negotiated(ident, has_id, tuple(enable))


def _too_deep(value: object, limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` levels. A loop, not
    recursion: json parses deeper than Python's recursion limit allows a
    recursive walk (600 levels fit in 1.2 KB)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def _short(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg.lower()} at character {exc.pos}"
    return str(exc)
