"""The holder's control protocol: messages, their encoding and a checking decoder.

Theory of operation. Launcher and holder talk over an AF_UNIX SOCK_SEQPACKET
socket, so one message is one datagram: the kernel keeps the boundaries and
attaches the fds (SCM_RIGHTS) to the datagram they travel with, and no length
framing is needed. A message is a JSON object (this is a control plane of a
few messages per VM start, not a data plane) of at most ``MAX_MESSAGE``
bytes, with at most ``HOLDER_MAX_FDS`` fds. This module is pure: it turns bytes and
an fd count into a message and back; the fds themselves stay with the caller.

The decoder checks syntax only (type, field names, sizes, counts, names, that
the fd count matches what the message says it carries); whether a name is
held or a pid is a child is for the holder to decide. Everything it refuses
raises :class:`ProtocolError`.

Conversation::

    launcher                         holder
    Hello(version)           ->
                             <-      Welcome(version, pid, inventory, children, exits)
                             <-      Handover(name) + fds     (one per inventory entry)
    Put(name, kind) + fds    ->      Ok | Failed
    Drop(name)               ->      Ok | Failed
    Spawn(argv, env, ...)    ->      Spawned(pid) + pidfd | Failed
    Signal(pid, sig)         ->      Ok | Failed
    Shutdown()               ->      Ok, then the holder exits
                             <-      Exit(pid, status, ...)   (at any time)

One request is outstanding at a time; an Exit may arrive before any reply. A
refused peer (busy, wrong version) gets one ``Refused(message)`` and is closed.

Errors::

    HolderError
     +-- ProtocolError      a message broke this protocol (says which rule)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

#: Bumped on any incompatible change; a peer with another version is refused.
VERSION = 1
#: One datagram's JSON, at most (a welcome with a full inventory fits).
MAX_MESSAGE = 256 * 1024
#: Fds in one datagram (the kernel allows 253).
HOLDER_MAX_FDS = 253  # SCM_MAX_FD: the most one message can carry (a keeper record of many rings)
MAX_ENTRIES = 1024     # inventory entries, children, or pending exits in a welcome
MAX_ARGV = 256
MAX_ARG = 4096
MAX_ENV = 256
MAX_TEXT = 1024        # a refusal's or failure's message
MAX_CHILD_FD = 1023
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")


class HolderError(Exception):
    """Root of every error about the holder."""


class ProtocolError(HolderError):
    """A message that breaks the protocol (the text says which rule)."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ProtocolError(what)


def _name(value: object, what: str = "name") -> str:
    _check(isinstance(value, str) and _NAME.match(value) is not None,
           f"{what} {value!r} is not 1-128 of [A-Za-z0-9._:@-] starting alnum")
    assert isinstance(value, str)
    return value


def _int(value: object, what: str, low: int, high: int) -> int:
    _check(type(value) is int and low <= value <= high,  # noqa: E721 (bool is no int here)
           f"{what} {value!r} is not an integer in {low}..{high}")
    assert isinstance(value, int)
    return value


def _num(value: object, what: str) -> float:
    _check(type(value) in (int, float) and value == value and 0 <= value < 1e12,  # type: ignore[operator]
           f"{what} {value!r} is not a time")
    return float(value)  # type: ignore[arg-type]


def _text(value: object, what: str, limit: int = MAX_TEXT) -> str:
    _check(isinstance(value, str) and len(value) <= limit and "\0" not in value,
           f"{what} is not a string of at most {limit} characters without NUL")
    assert isinstance(value, str)
    return value


def _list(value: object, what: str, limit: int) -> list[Any]:
    _check(isinstance(value, list) and len(value) <= limit,
           f"{what} is not a list of at most {limit} items")
    assert isinstance(value, list)
    return value


def _obj(value: object, what: str, keys: set[str]) -> dict[str, Any]:
    _check(isinstance(value, dict), f"{what} is not an object")
    assert isinstance(value, dict)
    _check(set(value) == keys, f"{what} has fields {sorted(value)}, wants {sorted(keys)}")
    return value


# -- parts ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Entry:
    """One held name: its kind (the launcher's word, opaque here) and fd count."""
    name: str
    kind: str
    nfds: int

    def __post_init__(self) -> None:
        _name(self.name)
        _name(self.kind, "kind")
        _int(self.nfds, "fd count", 1, HOLDER_MAX_FDS)


@dataclass(frozen=True, slots=True)
class Child:
    """A live child of the holder, as spawned (`tag` is the launcher's label)."""
    pid: int
    tag: str
    started: float

    def __post_init__(self) -> None:
        _int(self.pid, "pid", 1, 2**22)
        _name(self.tag, "tag")
        _num(self.started, "start time")


@dataclass(frozen=True, slots=True)
class Placement:
    """Put fd `index` of held entry `name` (or, `name` None, of the fds sent
    with the SPAWN itself) at fd number `target` in the child."""
    target: int
    index: int
    name: str | None = None

    def __post_init__(self) -> None:
        _int(self.target, "child fd", 0, MAX_CHILD_FD)
        _int(self.index, "fd index", 0, HOLDER_MAX_FDS - 1)
        if self.name is not None:
            _name(self.name)


# -- messages ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    TYPE: ClassVar[str] = "hello"

    def __post_init__(self) -> None:
        _int(self.version, "version", 0, 2**31)


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    pid: int
    started: float
    inventory: tuple[Entry, ...] = ()
    children: tuple[Child, ...] = ()
    exits: tuple[Exit, ...] = ()
    TYPE: ClassVar[str] = "welcome"

    def __post_init__(self) -> None:
        _int(self.version, "version", 0, 2**31)
        _int(self.pid, "pid", 1, 2**22)
        _num(self.started, "start time")
        for what, items in (("inventory", self.inventory), ("children", self.children),
                            ("exits", self.exits)):
            _check(len(items) <= MAX_ENTRIES, f"{what} has more than {MAX_ENTRIES} items")
        names = [e.name for e in self.inventory]
        _check(len(set(names)) == len(names), "inventory names a held entry twice")


@dataclass(frozen=True, slots=True)
class Handover:
    """Carries the fds of one inventory entry, in the welcome's order."""
    name: str
    nfds: int
    TYPE: ClassVar[str] = "handover"

    def __post_init__(self) -> None:
        _name(self.name)
        _int(self.nfds, "fd count", 1, HOLDER_MAX_FDS)


@dataclass(frozen=True, slots=True)
class Refused:
    message: str
    TYPE: ClassVar[str] = "refused"

    def __post_init__(self) -> None:
        _text(self.message, "message")


@dataclass(frozen=True, slots=True)
class Put:
    """Hold these fds under `name` (replacing nothing: a held name is refused)."""
    name: str
    kind: str
    nfds: int
    TYPE: ClassVar[str] = "put"

    def __post_init__(self) -> None:
        Entry(self.name, self.kind, self.nfds)


@dataclass(frozen=True, slots=True)
class Drop:
    name: str
    TYPE: ClassVar[str] = "drop"

    def __post_init__(self) -> None:
        _name(self.name)


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start `argv` (argv[0] a path) with exactly `env` and the placed fds."""
    tag: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    fds: tuple[Placement, ...] = ()
    passed: int = 0    # fds sent with this message (placed with name None)
    TYPE: ClassVar[str] = "spawn"

    def __post_init__(self) -> None:
        _name(self.tag, "tag")
        _check(1 <= len(self.argv) <= MAX_ARGV, f"argv has not 1-{MAX_ARGV} items")
        for arg in self.argv:
            _text(arg, "argument", MAX_ARG)
        _check(self.argv[0].startswith("/"), "argv[0] is not an absolute path")
        _check(len(self.env) <= MAX_ENV, f"env has more than {MAX_ENV} entries")
        for key, value in self.env:
            _check(isinstance(key, str) and _ENV_KEY.match(key) is not None,
                   f"env name {key!r} is not a valid name")
            _text(value, "env value", MAX_ARG)
        _check(len(self.fds) <= HOLDER_MAX_FDS, f"more than {HOLDER_MAX_FDS} fd placements")
        targets = [p.target for p in self.fds]
        _check(len(set(targets)) == len(targets), "two fds placed at one child fd")
        _int(self.passed, "passed fd count", 0, HOLDER_MAX_FDS)
        for p in self.fds:
            _check(p.name is not None or p.index < self.passed,
                   f"placement of passed fd {p.index} but {self.passed} passed")


@dataclass(frozen=True, slots=True)
class Spawned:
    """The child's pid; its pidfd travels with this message."""
    pid: int
    TYPE: ClassVar[str] = "spawned"

    def __post_init__(self) -> None:
        _int(self.pid, "pid", 1, 2**22)


@dataclass(frozen=True, slots=True)
class Signal:
    pid: int
    sig: int
    TYPE: ClassVar[str] = "signal"

    def __post_init__(self) -> None:
        _int(self.pid, "pid", 1, 2**22)
        _int(self.sig, "signal", 1, 64)


@dataclass(frozen=True, slots=True)
class Shutdown:
    TYPE: ClassVar[str] = "shutdown"


@dataclass(frozen=True, slots=True)
class Ok:
    TYPE: ClassVar[str] = "ok"


@dataclass(frozen=True, slots=True)
class Failed:
    message: str
    TYPE: ClassVar[str] = "failed"

    def __post_init__(self) -> None:
        _text(self.message, "message")


@dataclass(frozen=True, slots=True)
class Exit:
    """A child of the holder ended: its raw wait status, and when (wall clock)."""
    pid: int
    tag: str
    status: int
    time: float
    TYPE: ClassVar[str] = "exit"

    def __post_init__(self) -> None:
        _int(self.pid, "pid", 1, 2**22)
        _name(self.tag, "tag")
        _int(self.status, "wait status", 0, 0xFFFF)
        _num(self.time, "exit time")


Message = (Hello | Welcome | Handover | Refused | Put | Drop | Spawn | Spawned | Signal
           | Shutdown | Ok | Failed | Exit)
_TYPES: dict[str, type[Any]] = {c.TYPE: c for c in (
    Hello, Welcome, Handover, Refused, Put, Drop, Spawn, Spawned, Signal, Shutdown, Ok,
    Failed, Exit)}


def fd_count(msg: Message) -> int:
    """How many fds travel with `msg` (exactly these, no more, no fewer)."""
    if isinstance(msg, (Put, Handover)):
        return msg.nfds
    if isinstance(msg, Spawn):
        return msg.passed
    if isinstance(msg, Spawned):
        return 1
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


def encode(msg: Message) -> bytes:
    body = _plain(msg)
    body["type"] = msg.TYPE
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{msg.TYPE} message of {len(data)} bytes > {MAX_MESSAGE}")
    return data


def _entry(v: object) -> Entry:
    d = _obj(v, "inventory entry", {"name", "kind", "nfds"})
    return Entry(d["name"], d["kind"], d["nfds"])


def _child(v: object) -> Child:
    d = _obj(v, "child", {"pid", "tag", "started"})
    return Child(d["pid"], d["tag"], d["started"])


def _exit(v: object) -> Exit:
    d = _obj(v, "exit", {"pid", "tag", "status", "time"})
    return Exit(d["pid"], d["tag"], d["status"], d["time"])


def _placement(v: object) -> Placement:
    d = _obj(v, "placement", {"target", "index", "name"})
    return Placement(d["target"], d["index"], d["name"])


def _pair(v: object) -> tuple[str, str]:
    items = _list(v, "env entry", 2)
    _check(len(items) == 2, "env entry is not a [name, value] pair")
    return (items[0], items[1])


def decode(data: bytes, nfds: int) -> Message:
    """The message in one datagram that came with `nfds` fds."""
    _check(len(data) <= MAX_MESSAGE, f"message of {len(data)} bytes > {MAX_MESSAGE}")
    _check(0 <= nfds <= HOLDER_MAX_FDS, f"{nfds} fds with one message (at most {HOLDER_MAX_FDS})")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"message is not JSON: {e}") from None
    _check(isinstance(body, dict), "message is not a JSON object")
    kind = body.pop("type", None)
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    _check(cls is not None, f"unknown message type {kind!r}")
    assert cls is not None
    _obj(body, f"{kind} message", {f.name for f in fields(cls)})
    args = dict(body)
    try:
        if cls is Welcome:
            args["inventory"] = tuple(_entry(e) for e in
                                      _list(body["inventory"], "inventory", MAX_ENTRIES))
            args["children"] = tuple(_child(c) for c in
                                     _list(body["children"], "children", MAX_ENTRIES))
            args["exits"] = tuple(_exit(x) for x in _list(body["exits"], "exits", MAX_ENTRIES))
        elif cls is Spawn:
            args["argv"] = tuple(_list(body["argv"], "argv", MAX_ARGV))
            args["env"] = tuple(_pair(p) for p in _list(body["env"], "env", MAX_ENV))
            args["fds"] = tuple(_placement(p) for p in _list(body["fds"], "fds", HOLDER_MAX_FDS))
        msg: Message = cls(**args)
    except TypeError as e:  # a field of the wrong shape met a check that expected another
        raise ProtocolError(f"{kind} message: {e}") from None
    _check(fd_count(msg) == nfds,
           f"{kind} message came with {nfds} fds, says {fd_count(msg)}")
    return msg
