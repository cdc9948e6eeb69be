"""The state channel between two mplaunch instances, without I/O.

Theory of operation, in the manner of h11: :class:`Channel` is one side's
view of the conversation. ``initiate()`` gives the preamble to send first
(magic and version), ``send(message)`` the bytes of a message (raising
:class:`LocalProtocolError` if the conversation does not allow it now),
``receive_data(bytes)`` buffers what the peer sent (``b""``: it hung up)
and ``next_event()`` returns the next message, :data:`NEED_DATA`, or
:class:`ChannelClosed`. Input that breaks the protocol raises
:class:`RemoteProtocolError`, and after any error the channel stays in
``State.ERROR``.

The conversation (one table, ``_TRANSITIONS``; S: source, D: destination)::

    HELLO        S Hello    -> ACCEPT_WAIT
    ACCEPT_WAIT  D Accept   -> TRANSFER      D Refuse -> CLOSED   S Abort -> CLOSED
    TRANSFER     S State    -> TRANSFER      S Done   -> RUNNING_WAIT
                 S Abort    -> CLOSED        D Failed -> CLOSED
    RUNNING_WAIT D Running  -> CLOSED        D Failed -> CLOSED   S Abort -> ABORTING
    ABORTING     D Running  -> CLOSED        D Failed -> CLOSED

Wire: each side first sends ``MAGIC`` and a 4-byte big-endian version. Then
frames: a 4-byte big-endian body length, a 1-byte type, the body. Every
body is a JSON object except a state frame's: emulator id (2-byte length,
UTF-8), state store layout version (4 bytes), the store's bytes. Sizes are
bounded before anything is buffered (``MAX_JSON_BODY``, ``MAX_STATE_BODY``).

Errors::

    ChannelError
     +-- LocalProtocolError   we tried what the conversation forbids (a bug here)
     +-- RemoteProtocolError  the peer broke the protocol (magic, version,
                              framing, sizes, a message out of order)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, ClassVar, Final

MAGIC = b"MPLMIGR\n"
QEMU_MAGIC = b"QEVM"
"""What QEMU's migration stream starts with (QEMU_VM_FILE_MAGIC)."""
CHANNEL_VERSION = 1
MAX_JSON_BODY = 1 << 20
MAX_STATE_BODY = 64 << 20
MAX_DISKS_IN_HELLO = 4096
_PREAMBLE = struct.Struct(">8sI")
_FRAME = struct.Struct(">IB")
_STATE_HEAD = struct.Struct(">H")
_U32 = struct.Struct(">I")


class ChannelError(Exception):
    """Root of the state channel's errors."""


class LocalProtocolError(ChannelError):
    """This side tried to send what the conversation does not allow now."""


class RemoteProtocolError(ChannelError):
    """The peer sent what the protocol does not allow; the migration is over."""


class Role(Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class State(Enum):
    HELLO = "hello"
    ACCEPT_WAIT = "accept-wait"
    TRANSFER = "transfer"
    RUNNING_WAIT = "running-wait"
    ABORTING = "aborting"
    CLOSED = "closed"
    ERROR = "error"


class FrameType(IntEnum):
    HELLO = 1
    ACCEPT = 2
    REFUSE = 3
    STATE = 4
    DONE = 5
    ABORT = 6
    RUNNING = 7
    FAILED = 8


class Kind(Enum):
    """What an accepted connection is, from its first bytes."""

    QEMU = "qemu"
    STATE = "state"
    UNKNOWN = "unknown"


def classify(first: bytes) -> Kind | None:
    """Tell a connection by its first bytes; None: too few bytes to say."""
    for magic, kind in ((QEMU_MAGIC, Kind.QEMU), (MAGIC, Kind.STATE)):
        n = min(len(first), len(magic))
        if first[:n] == magic[:n]:
            return kind if len(first) >= len(magic) else None
    return Kind.UNKNOWN


# --- messages ---------------------------------------------------------------


def _text(value: object, what: str, limit: int = 256) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or "\0" in value:
        raise ValueError(f"{what} must be a non-empty string of at most {limit} characters")
    return value


def _count(value: object, what: str, limit: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"{what} must be an integer from 0 to {limit}")
    return value


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One disk as the source serves it."""

    id: str
    controller: str
    lun: int
    size: int
    block_size: int
    readonly: bool

    def __post_init__(self) -> None:
        _text(self.id, "disk id")
        _text(self.controller, "disk controller")
        _count(self.lun, "disk lun", 1 << 16)
        _count(self.size, "disk size")
        _count(self.block_size, "disk block_size", 1 << 20)
        if not isinstance(self.readonly, bool):
            raise ValueError("disk readonly must be a boolean")


@dataclass(frozen=True, slots=True)
class EmulatorInfo:
    """One emulator: its kind, controllers and state store size."""

    id: str
    kind: str
    controllers: tuple[str, ...]
    store_size: int

    def __post_init__(self) -> None:
        _text(self.id, "emulator id")
        _text(self.kind, "emulator kind")
        if not isinstance(self.controllers, tuple) or len(self.controllers) > 256:
            raise ValueError("emulator controllers must be a list of at most 256 ids")
        for c in self.controllers:
            _text(c, "controller id")
        _count(self.store_size, "emulator store_size", MAX_STATE_BODY)


@dataclass(frozen=True, slots=True)
class Hello:
    """Source -> destination: what is about to arrive."""

    vm: str
    disks: tuple[DiskInfo, ...]
    emulators: tuple[EmulatorInfo, ...]
    store_version: int
    package: str = ""
    TYPE: ClassVar[FrameType] = FrameType.HELLO

    def __post_init__(self) -> None:
        _text(self.vm, "vm")
        if len(self.disks) > MAX_DISKS_IN_HELLO or len(self.emulators) > MAX_DISKS_IN_HELLO:
            raise ValueError(f"at most {MAX_DISKS_IN_HELLO} disks and emulators")
        _count(self.store_version, "store_version", 1 << 31)
        if not isinstance(self.package, str) or len(self.package) > 256:
            raise ValueError("package must be a string of at most 256 characters")


@dataclass(frozen=True, slots=True)
class Accept:
    """Destination -> source: the hello matches; send QEMU's stream."""

    vm: str
    TYPE: ClassVar[FrameType] = FrameType.ACCEPT

    def __post_init__(self) -> None:
        _text(self.vm, "vm")


@dataclass(frozen=True, slots=True)
class _Reason:
    reason: str

    def __post_init__(self) -> None:
        _text(self.reason, "reason", 4096)


@dataclass(frozen=True, slots=True)
class Refuse(_Reason):
    """Destination -> source: the hello does not match (``reason`` says how)."""

    TYPE: ClassVar[FrameType] = FrameType.REFUSE


@dataclass(frozen=True, slots=True)
class Abort(_Reason):
    """Source -> destination: the migration is off; never run the guest."""

    TYPE: ClassVar[FrameType] = FrameType.ABORT


@dataclass(frozen=True, slots=True)
class Failed(_Reason):
    """Destination -> source: it cannot run the guest; the source runs on."""

    TYPE: ClassVar[FrameType] = FrameType.FAILED


@dataclass(frozen=True, slots=True)
class StateBlob:
    """Source -> destination: one emulator's state store, whole."""

    emulator: str
    store_version: int
    data: bytes = field(repr=False)
    TYPE: ClassVar[FrameType] = FrameType.STATE

    def __post_init__(self) -> None:
        _text(self.emulator, "emulator id")
        _count(self.store_version, "store_version", (1 << 32) - 1)
        if len(self.data) > MAX_STATE_BODY - 64 - 6:
            raise ValueError(f"a state blob may hold at most {MAX_STATE_BODY - 70} bytes")


@dataclass(frozen=True, slots=True)
class Done:
    """Source -> destination: every blob was sent (``count`` of them)."""

    count: int
    TYPE: ClassVar[FrameType] = FrameType.DONE

    def __post_init__(self) -> None:
        _count(self.count, "count", MAX_DISKS_IN_HELLO)


@dataclass(frozen=True, slots=True)
class Running:
    """Destination -> source: the guest runs here; the source may stop."""

    TYPE: ClassVar[FrameType] = FrameType.RUNNING


Message = Hello | Accept | Refuse | StateBlob | Done | Abort | Running | Failed


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The peer hung up; ``clean`` if the conversation had ended first."""

    clean: bool


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

S, D = Role.SOURCE, Role.DESTINATION
_TRANSITIONS: dict[tuple[State, Role, FrameType], State] = {
    (State.HELLO, S, FrameType.HELLO): State.ACCEPT_WAIT,
    (State.ACCEPT_WAIT, D, FrameType.ACCEPT): State.TRANSFER,
    (State.ACCEPT_WAIT, D, FrameType.REFUSE): State.CLOSED,
    (State.ACCEPT_WAIT, S, FrameType.ABORT): State.CLOSED,
    (State.TRANSFER, S, FrameType.STATE): State.TRANSFER,
    (State.TRANSFER, S, FrameType.DONE): State.RUNNING_WAIT,
    (State.TRANSFER, S, FrameType.ABORT): State.CLOSED,
    (State.TRANSFER, D, FrameType.FAILED): State.CLOSED,
    (State.RUNNING_WAIT, D, FrameType.RUNNING): State.CLOSED,
    (State.RUNNING_WAIT, D, FrameType.FAILED): State.CLOSED,
    (State.RUNNING_WAIT, S, FrameType.ABORT): State.ABORTING,
    (State.ABORTING, D, FrameType.RUNNING): State.CLOSED,
    (State.ABORTING, D, FrameType.FAILED): State.CLOSED,
}


# --- bodies -------------------------------------------------------------------


def _json_body(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Hello):
        return {"vm": msg.vm, "package": msg.package, "store_version": msg.store_version,
                "disks": [{"id": d.id, "controller": d.controller, "lun": d.lun,
                           "size": d.size, "block_size": d.block_size,
                           "readonly": d.readonly} for d in msg.disks],
                "emulators": [{"id": e.id, "kind": e.kind, "controllers": list(e.controllers),
                               "store_size": e.store_size} for e in msg.emulators]}
    if isinstance(msg, Accept):
        return {"vm": msg.vm}
    if isinstance(msg, (Refuse, Abort, Failed)):
        return {"reason": msg.reason}
    if isinstance(msg, Done):
        return {"count": msg.count}
    return {}


def _members(body: object, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError(f"{what} must be a JSON object")
    if set(body) != keys:
        missing, extra = keys - set(body), set(body) - keys
        raise ValueError(f"{what}: " + "; ".join(
            ([f"missing {sorted(missing)}"] if missing else [])
            + ([f"unexpected {sorted(extra)}"] if extra else [])))
    return body


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > MAX_DISKS_IN_HELLO:
        raise ValueError(f"{what} must be a list of at most {MAX_DISKS_IN_HELLO}")
    return value


def _decode_json(kind: FrameType, raw: bytes) -> Message:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not a JSON object: {e}") from None
    if kind is FrameType.HELLO:
        b = _members(body, "hello", {"vm", "package", "store_version", "disks", "emulators"})
        disks = tuple(DiskInfo(**_members(d, "hello disk", {
            "id", "controller", "lun", "size", "block_size", "readonly"}))
            for d in _list(b["disks"], "disks"))
        emulators = []
        for raw_emulator in _list(b["emulators"], "emulators"):
            em = _members(raw_emulator, "hello emulator",
                          {"id", "kind", "controllers", "store_size"})
            emulators.append(EmulatorInfo(em["id"], em["kind"],
                                          tuple(_list(em["controllers"], "controllers")),
                                          em["store_size"]))
        return Hello(b["vm"], disks, tuple(emulators), b["store_version"], b["package"])
    if kind is FrameType.ACCEPT:
        return Accept(_members(body, "accept", {"vm"})["vm"])
    if kind in (FrameType.REFUSE, FrameType.ABORT, FrameType.FAILED):
        reason = _members(body, kind.name.lower(), {"reason"})["reason"]
        if kind is FrameType.REFUSE:
            return Refuse(reason)
        return Abort(reason) if kind is FrameType.ABORT else Failed(reason)
    if kind is FrameType.DONE:
        return Done(_members(body, "done", {"count"})["count"])
    _members(body, "running", set())
    return Running()


def _decode_state(raw: bytes) -> StateBlob:
    if len(raw) < _STATE_HEAD.size:
        raise ValueError("truncated state frame")
    (n,) = _STATE_HEAD.unpack_from(raw)
    if len(raw) < _STATE_HEAD.size + n + _U32.size:
        raise ValueError("truncated state frame")
    try:
        emulator = raw[_STATE_HEAD.size:_STATE_HEAD.size + n].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the emulator id is not UTF-8") from None
    (version,) = _U32.unpack_from(raw, _STATE_HEAD.size + n)
    return StateBlob(emulator, version, bytes(raw[_STATE_HEAD.size + n + _U32.size:]))


def encode(msg: Message) -> bytes:
    """One frame (no state check: :meth:`Channel.send` does that)."""
    if isinstance(msg, StateBlob):
        name = msg.emulator.encode()
        body = _STATE_HEAD.pack(len(name)) + name + _U32.pack(msg.store_version) + msg.data
    else:
        body = json.dumps(_json_body(msg), separators=(",", ":")).encode()
    limit = MAX_STATE_BODY if isinstance(msg, StateBlob) else MAX_JSON_BODY
    if len(body) > limit:
        raise LocalProtocolError(f"{msg.TYPE.name} frame of {len(body)} bytes is over "
                                 f"{limit}")
    return _FRAME.pack(len(body), msg.TYPE) + body


class Channel:
    """One side of the state channel; see the module's docstring."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.HELLO
        self._buffer = bytearray()
        self._peer_checked = False
        self._eof = False
        self._initiated = False

    @property
    def peer(self) -> Role:
        return D if self.role is S else S

    def initiate(self) -> bytes:
        """The preamble: what this side sends before anything else."""
        if self._initiated:
            raise LocalProtocolError("the preamble was sent already")
        self._initiated = True
        return _PREAMBLE.pack(MAGIC, CHANNEL_VERSION)

    def send(self, msg: Message) -> bytes:
        if not self._initiated:
            raise LocalProtocolError("send the preamble (initiate()) first")
        new = _TRANSITIONS.get((self.state, self.role, msg.TYPE))
        if new is None:
            raise LocalProtocolError(
                f"the {self.role.value} may not send {msg.TYPE.name} in state {self.state.value}")
        data = encode(msg)
        self.state = new
        return data

    def receive_data(self, data: bytes) -> None:
        if self._eof and data:
            raise LocalProtocolError("data after the end of the stream")
        if not data:
            self._eof = True
            return
        self._buffer += data

    def _fail(self, why: str) -> RemoteProtocolError:
        self.state = State.ERROR
        self._buffer.clear()
        return RemoteProtocolError(f"state channel from the {self.peer.value}: {why}")

    def next_event(self) -> Message | ChannelClosed | _NeedData:
        if self.state is State.ERROR:
            raise RemoteProtocolError("the state channel is broken")
        if not self._peer_checked:
            if len(self._buffer) < _PREAMBLE.size:
                if self._buffer and not MAGIC.startswith(bytes(self._buffer[:len(MAGIC)])):
                    raise self._fail(f"bad magic {bytes(self._buffer[:8])!r}, expected {MAGIC!r}")
                return self._closed() if self._eof else NEED_DATA
            magic, version = _PREAMBLE.unpack_from(self._buffer)
            if magic != MAGIC:
                raise self._fail(f"bad magic {magic!r}, expected {MAGIC!r}")
            if version != CHANNEL_VERSION:
                raise self._fail(f"it speaks version {version}, this mplaunch speaks "
                                 f"{CHANNEL_VERSION}")
            del self._buffer[:_PREAMBLE.size]
            self._peer_checked = True
        if len(self._buffer) < _FRAME.size:
            return self._closed() if self._eof else NEED_DATA
        length, raw_type = _FRAME.unpack_from(self._buffer)
        try:
            kind = FrameType(raw_type)
        except ValueError:
            raise self._fail(f"unknown frame type {raw_type}") from None
        limit = MAX_STATE_BODY if kind is FrameType.STATE else MAX_JSON_BODY
        if length > limit:
            raise self._fail(f"{kind.name} frame of {length} bytes is over the limit of {limit}")
        new = _TRANSITIONS.get((self.state, self.peer, kind))
        if new is None:
            raise self._fail(f"{kind.name} is out of order (state {self.state.value})")
        if len(self._buffer) < _FRAME.size + length:
            return self._closed() if self._eof else NEED_DATA
        raw = bytes(self._buffer[_FRAME.size:_FRAME.size + length])
        del self._buffer[:_FRAME.size + length]
        try:
            msg = _decode_state(raw) if kind is FrameType.STATE else _decode_json(kind, raw)
        except (ValueError, TypeError) as e:
            raise self._fail(f"bad {kind.name} frame: {e}") from None
        self.state = new
        return msg

    def _closed(self) -> ChannelClosed:
        """End of stream: clean only after the conversation ended, with nothing
        left half-sent."""
        clean = self.state is State.CLOSED and not self._buffer
        if not clean and self._buffer:
            raise self._fail(f"truncated: the stream ended {len(self._buffer)} bytes into "
                             "a frame")
        return ChannelClosed(clean)
