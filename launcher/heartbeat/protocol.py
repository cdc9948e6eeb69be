"""The control protocol between mplaunch and one emulator process, sans-I/O.

Theory of operation
-------------------
Every emulator has a control socketpair to mplaunch: AF_UNIX, SOCK_SEQPACKET.
The kernel keeps message boundaries, so the framing is one message per
datagram, and file descriptors ride on the datagram that needs them as
SCM_RIGHTS.  A datagram is at most `MAX_DATAGRAM` bytes; the I/O layer reads
with a buffer one byte larger (or checks MSG_TRUNC) so a longer one is seen
as too long instead of silently cut.

A datagram is an 8-byte header, little-endian::

    magic u16 | version u8 | type u8 | seq u32

followed by the payload of that type:

    READY     emulator -> launcher  pid u32, flags u8 (bit 0: locked down),
                                    then optionally: state store layout
                                    version u16, package version (ASCII,
                                    the rest; at most 64 bytes)
    ASSIGN    launcher -> emulator  fd count u8, UTF-8 JSON config (the rest)
    ASSIGNED  emulator -> launcher  ok u8 (0 or 1), UTF-8 error text (the rest)
    PING      launcher -> emulator  sent_ns u64
    PONG      emulator -> launcher  sent_ns u64, entry count u16, entries of
                                    controller u8, queue u16, completed u64,
                                    in_flight u32
    SHUTDOWN  launcher -> emulator  nothing
    COMMAND   launcher -> emulator  fd count u8, op u8, lun u16, controller
                                    id length u8, controller id (UTF-8), then
                                    by op:
                LUN_ADD             flags u8 (bit 0: read-only), block size
                                    u32, disk id length u8, disk id; one fd
                LUN_REMOVE          nothing
                LUN_RESIZE_CHECK    size u64 (bytes)
                LUN_RESIZE          size u64 (bytes)
    RESULT    emulator -> launcher  as ASSIGNED; its seq is the COMMAND's
                                    (or the PROMOTE's)
    PROMOTE   launcher -> emulator  nothing

READY is sent once the emulator is sandboxed and waiting, before it has any
work: a warm spare sits in that state until mplaunch ASSIGNs it a config and
the fds that go with it (the config JSON is opaque here).  PING carries the
launcher's monotonic clock, which PONG echoes with the per-queue progress the
hang detector watches.  SHUTDOWN asks for a graceful stop: finish what is in
flight, then exit 0.

A hot standby is an ASSIGN whose config names a pidfd of the emulator it
stands by for (emulators.process, "Hot standby"); it follows that
emulator's session without answering it. PROMOTE tells it that it serves
the slot now: it applies what its session keepers sent it so far, answers
from then on, and sends one RESULT with the PROMOTE's seq.

A COMMAND changes the disks of an emulator that is serving: each op is its
own message class (`LunAdd`, `LunRemove`, `LunResizeCheck`, `LunResize`),
decoded here and nowhere else.  A disk grows in three steps so that the
guest never sees blocks the file does not have yet and a refusal changes
nothing: LUN_RESIZE_CHECK asks whether the LUN may become ``size`` bytes
(the emulator checks, changes nothing), the launcher then grows the file,
and LUN_RESIZE tells the emulator the file now holds ``size`` bytes (it
checks that, then shows the guest the new capacity).  Every COMMAND has a
seq of its own and is answered by one RESULT with the same seq, so an
answer that comes after its command was given up on completes nothing.
The codec checks what the wire can say (lengths, UTF-8, flags, fd count);
whether a LUN number, block size or disk id obeys the VM's rules
(``emulators.limits``) is checked by the emulator when it acts.

`encode(message)` returns the datagram and the fds to send with it;
`decode(datagram, fds)` returns one message.  Decoding checks syntax only:
magic, version, known type, exact lengths, value ranges, fd count.  Whether a
message makes sense now (a PONG for a ping never sent, ASSIGN twice) is the
business of whoever acts on it (STYLE.md, two-stage validation).  The codec
never owns fds: when `decode` raises, the caller still holds (and closes) the
fds it passed in.

This module is imported by the emulator too, so it uses the standard library
only and nothing from the launcher outside this package.

Errors
------
::

    ControlProtocolError        anything this module raises on purpose
     +-- LocalControlError      we tried to build or send a message the
     |                          protocol forbids: a bug on our side
     +-- RemoteControlError     the peer sent a datagram that breaks the
          |                     protocol (bad magic, version, type, length,
          |                     value, fd count)
          +-- ControlSessionError  the peer sent a well-formed message that
                                makes no sense now (a PONG for a ping never
                                sent, a second READY)

A `RemoteControlError` from an emulator means the emulator is broken or
compromised: mplaunch kills it, and a restart may help (a fresh process).
A `RemoteControlError` seen by an emulator means its launcher is not the one
it was built for: the emulator exits, and a restart does not help.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

MAGIC: Final = 0x484D  # b"MH" on the wire
VERSION: Final = 1
HEADER: Final = struct.Struct("<HBBI")
HEADER_SIZE: Final = HEADER.size
MAX_DATAGRAM: Final = 64 * 1024
MAX_PAYLOAD: Final = MAX_DATAGRAM - HEADER_SIZE
MAX_FDS: Final = 253  # SCM_MAX_FD: the most fds Linux passes in one sendmsg()
# What one heartbeat reply can report bounds the shape of an emulator: the
# spec (launcher.spec) and the emulator's config check take these bounds from here.
MAX_CONTROLLERS: Final = 16
"""Controllers one emulator serves."""
MAX_REQUEST_QUEUES: Final = 16
"""Request queues per controller (the spec's ``queues``)."""
MAX_RINGS: Final = 2 + MAX_REQUEST_QUEUES
"""Virtqueues per controller: control, event, then the request queues."""
MAX_PROGRESS_ENTRIES: Final = MAX_CONTROLLERS * MAX_RINGS
U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1

_READY: Final = struct.Struct("<IB")
_READY_VERSIONS: Final = struct.Struct("<H")
_VERSION_TEXT: Final = re.compile(r"[\x21-\x7e]{0,64}")
_ASSIGN_HEAD: Final = struct.Struct("<B")
_ASSIGNED_HEAD: Final = struct.Struct("<B")
_PING: Final = struct.Struct("<Q")
_PONG_HEAD: Final = struct.Struct("<QH")
_PROGRESS: Final = struct.Struct("<BHQI")
_READY_LOCKED_DOWN: Final = 0x01
_COMMAND_HEAD: Final = struct.Struct("<BBHB")  # fd count, op, lun, controller id length
_LUN_ADD: Final = struct.Struct("<BIB")  # flags, block size, disk id length
_LUN_SIZE: Final = struct.Struct("<Q")
_LUN_ADD_READONLY: Final = 0x01
U16_MAX: Final = 2**16 - 1
MAX_NAME_BYTES: Final = 255  # an id's length travels in one byte


class MessageType(enum.IntEnum):
    READY = 1
    ASSIGN = 2
    ASSIGNED = 3
    PING = 4
    PONG = 5
    SHUTDOWN = 6
    COMMAND = 7
    RESULT = 8
    PROMOTE = 9


class CommandOp(enum.IntEnum):
    """What a COMMAND asks; one message class each."""

    LUN_ADD = 1
    LUN_REMOVE = 2
    LUN_RESIZE_CHECK = 3
    LUN_RESIZE = 4


class Sender(enum.Enum):
    """Which end may send a message type: a launcher never sends READY."""

    LAUNCHER = "launcher"
    EMULATOR = "emulator"


SENT_BY: Final[dict[MessageType, Sender]] = {
    MessageType.READY: Sender.EMULATOR,
    MessageType.ASSIGN: Sender.LAUNCHER,
    MessageType.ASSIGNED: Sender.EMULATOR,
    MessageType.PING: Sender.LAUNCHER,
    MessageType.PONG: Sender.EMULATOR,
    MessageType.SHUTDOWN: Sender.LAUNCHER,
    MessageType.COMMAND: Sender.LAUNCHER,
    MessageType.RESULT: Sender.EMULATOR,
    MessageType.PROMOTE: Sender.LAUNCHER,
}


class ControlProtocolError(Exception):
    """Base of every error this module raises on purpose.

    ``message_type`` and ``seq`` name the message concerned when the header
    was readable; ``datagram`` holds the first bytes of the offending datagram
    (for a log line), empty when encoding.
    """

    def __init__(
        self,
        message: str,
        *,
        message_type: MessageType | None = None,
        seq: int | None = None,
        datagram: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.message_type = message_type
        self.seq = seq
        self.datagram = datagram[:64]

    def __str__(self) -> str:
        if self.message_type is None:
            return self.message
        return f"{self.message_type.name} (seq {self.seq}): {self.message}"


class LocalControlError(ControlProtocolError):
    """We tried to build or encode a message that the protocol forbids."""


class RemoteControlError(ControlProtocolError):
    """The peer sent a datagram that breaks the control protocol."""


class ControlSessionError(RemoteControlError):
    """The peer sent a well-formed message that is wrong at this point."""


def _check_uint(name: str, value: int, maximum: int) -> None:
    # bool is an int subclass; a flag where a number belongs is a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise LocalControlError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise LocalControlError(f"{name} = {value} is out of range 0..{maximum}")


def _check_seq(seq: int) -> None:
    _check_uint("seq", seq, U32_MAX)


def _check_text(name: str, text: str, limit: int) -> None:
    if not isinstance(text, str):
        raise LocalControlError(f"{name} must be a str, not {type(text).__name__}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise LocalControlError(f"{name} is not encodable as UTF-8: {exc.reason}") from None
    if size > limit:
        raise LocalControlError(f"{name} is {size} bytes of UTF-8, more than {limit}")


@dataclass(frozen=True, slots=True)
class Ready:
    """The emulator is sandboxed and waiting for work (a warm spare says it early)."""

    pid: int
    locked_down: bool
    seq: int = 0
    #: The emulator's package version and the state store layout it reads
    #: ("" and 0: an emulator that does not say, the short form).
    version: str = ""
    store_version: int = 0

    def __post_init__(self) -> None:
        _check_uint("pid", self.pid, U32_MAX)
        if self.pid == 0:
            raise LocalControlError("pid 0 is not a process")
        if not isinstance(self.locked_down, bool):
            raise LocalControlError("locked_down must be a bool")
        _check_seq(self.seq)
        _check_uint("store_version", self.store_version, 0xFFFF)
        if not isinstance(self.version, str) or not _VERSION_TEXT.fullmatch(self.version):
            raise LocalControlError(f"version {self.version!r:.80}: not 0-64 printable ASCII")


_ASSIGN_MAX_CONFIG: Final = MAX_PAYLOAD - _ASSIGN_HEAD.size


@dataclass(frozen=True, slots=True)
class Assign:
    """Give a waiting emulator its config and the fds the config refers to.

    ``config`` is the emulator's JSON config: UTF-8 text, opaque here (the
    emulator parses and checks it).  ``fds`` are opaque ints; the datagram declares how many travel
    with it so that a lost or extra descriptor is caught at once.
    """

    config: str
    fds: tuple[int, ...] = ()
    seq: int = 0

    def __post_init__(self) -> None:
        _check_text("config", self.config, _ASSIGN_MAX_CONFIG)
        if not isinstance(self.fds, tuple):
            raise LocalControlError("fds must be a tuple")
        if len(self.fds) > MAX_FDS:
            raise LocalControlError(f"{len(self.fds)} fds, more than the {MAX_FDS} one send takes")
        for fd in self.fds:
            _check_uint("fd", fd, 2**31 - 1)
        _check_seq(self.seq)


_ASSIGNED_MAX_ERROR: Final = MAX_PAYLOAD - _ASSIGNED_HEAD.size


@dataclass(frozen=True, slots=True)
class Assigned:
    """The emulator's answer to ASSIGN: ``ok``, or why not in ``error``."""

    ok: bool
    error: str = ""
    seq: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.ok, bool):
            raise LocalControlError("ok must be a bool")
        _check_text("error", self.error, _ASSIGNED_MAX_ERROR)
        # One meaning per datagram: success says nothing, failure says why.
        if self.ok and self.error:
            raise LocalControlError("an ok ASSIGNED carries no error text")
        if not self.ok and not self.error:
            raise LocalControlError("a failed ASSIGNED must say why")
        _check_seq(self.seq)


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you alive?  ``sent_ns`` is the launcher's monotonic clock, echoed back."""

    seq: int
    sent_ns: int

    def __post_init__(self) -> None:
        _check_seq(self.seq)
        _check_uint("sent_ns", self.sent_ns, U64_MAX)


@dataclass(frozen=True, slots=True)
class QueueProgress:
    """Counters of one virtqueue: requests ``completed`` so far, ``in_flight`` now."""

    controller: int
    queue: int
    completed: int
    in_flight: int

    def __post_init__(self) -> None:
        _check_uint("controller", self.controller, MAX_CONTROLLERS - 1)
        _check_uint("queue", self.queue, MAX_RINGS - 1)
        _check_uint("completed", self.completed, U64_MAX)
        _check_uint("in_flight", self.in_flight, U32_MAX)

    @property
    def key(self) -> tuple[int, int]:
        return (self.controller, self.queue)


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to PING ``seq``: the echoed clock and per-queue progress."""

    seq: int
    sent_ns: int
    progress: tuple[QueueProgress, ...] = ()

    def __post_init__(self) -> None:
        _check_seq(self.seq)
        _check_uint("sent_ns", self.sent_ns, U64_MAX)
        if not isinstance(self.progress, tuple):
            raise LocalControlError("progress must be a tuple")
        if len(self.progress) > MAX_PROGRESS_ENTRIES:
            raise LocalControlError(
                f"{len(self.progress)} progress entries, more than {MAX_PROGRESS_ENTRIES}"
            )
        seen: set[tuple[int, int]] = set()
        for entry in self.progress:
            if not isinstance(entry, QueueProgress):
                raise LocalControlError("progress entries must be QueueProgress")
            if entry.key in seen:
                raise LocalControlError(
                    f"queue {entry.controller}.{entry.queue} is reported twice"
                )
            seen.add(entry.key)


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Finish what is in flight, then exit 0."""

    seq: int = 0

    def __post_init__(self) -> None:
        _check_seq(self.seq)


@dataclass(frozen=True, slots=True)
class Promote:
    """A hot standby serves its slot from now on: answer the session keepers
    (a RESULT with this seq says it does)."""

    seq: int = 0

    def __post_init__(self) -> None:
        _check_seq(self.seq)


def _check_name(name: str, value: str) -> None:
    _check_text(name, value, MAX_NAME_BYTES)
    if not value:
        raise LocalControlError(f"{name} must not be empty")


@dataclass(frozen=True, slots=True)
class LunAdd:
    """Serve the disk behind ``fd`` as LUN ``lun`` of ``controller``; the
    guest is told. The emulator owns ``fd`` from the moment it receives it."""

    controller: str
    lun: int
    disk_id: str
    fd: int
    readonly: bool
    block_size: int
    seq: int = 0

    def __post_init__(self) -> None:
        _check_name("controller", self.controller)
        _check_uint("lun", self.lun, U16_MAX)
        _check_name("disk_id", self.disk_id)
        _check_uint("fd", self.fd, 2**31 - 1)
        if not isinstance(self.readonly, bool):
            raise LocalControlError("readonly must be a bool")
        _check_uint("block_size", self.block_size, U32_MAX)
        _check_seq(self.seq)


@dataclass(frozen=True, slots=True)
class LunRemove:
    """Stop serving LUN ``lun`` of ``controller``; the guest is told."""

    controller: str
    lun: int
    seq: int = 0

    def __post_init__(self) -> None:
        _check_name("controller", self.controller)
        _check_uint("lun", self.lun, U16_MAX)
        _check_seq(self.seq)


@dataclass(frozen=True, slots=True)
class LunResizeCheck:
    """May LUN ``lun`` of ``controller`` become ``size`` bytes? Changes nothing."""

    controller: str
    lun: int
    size: int
    seq: int = 0

    def __post_init__(self) -> None:
        _check_name("controller", self.controller)
        _check_uint("lun", self.lun, U16_MAX)
        _check_uint("size", self.size, U64_MAX)
        _check_seq(self.seq)


@dataclass(frozen=True, slots=True)
class LunResize:
    """The image of LUN ``lun`` of ``controller`` now holds ``size`` bytes:
    show the guest its new capacity."""

    controller: str
    lun: int
    size: int
    seq: int = 0

    def __post_init__(self) -> None:
        _check_name("controller", self.controller)
        _check_uint("lun", self.lun, U16_MAX)
        _check_uint("size", self.size, U64_MAX)
        _check_seq(self.seq)


Command = LunAdd | LunRemove | LunResizeCheck | LunResize
"""Every COMMAND; ``isinstance(message, Command)`` tells one."""

_OP_OF: Final[dict[type[Command], CommandOp]] = {
    LunAdd: CommandOp.LUN_ADD,
    LunRemove: CommandOp.LUN_REMOVE,
    LunResizeCheck: CommandOp.LUN_RESIZE_CHECK,
    LunResize: CommandOp.LUN_RESIZE,
}


@dataclass(frozen=True, slots=True)
class Result(Assigned):
    """The answer to the COMMAND with the same ``seq``; same wire form as ASSIGNED."""


Message = Ready | Assign | Assigned | Ping | Pong | Shutdown | Command | Result | Promote

_TYPE_OF: Final[dict[type[Message], MessageType]] = {
    Ready: MessageType.READY,
    Assign: MessageType.ASSIGN,
    Assigned: MessageType.ASSIGNED,
    Ping: MessageType.PING,
    Pong: MessageType.PONG,
    Shutdown: MessageType.SHUTDOWN,
    LunAdd: MessageType.COMMAND,
    LunRemove: MessageType.COMMAND,
    LunResizeCheck: MessageType.COMMAND,
    LunResize: MessageType.COMMAND,
    Result: MessageType.RESULT,
    Promote: MessageType.PROMOTE,
}


def message_type(message: Message) -> MessageType:
    """The wire type of ``message``."""
    try:
        return _TYPE_OF[type(message)]
    except KeyError:
        raise LocalControlError(f"not a control message: {type(message).__name__}") from None


def encode(message: Message) -> tuple[bytes, list[int]]:
    """Return the datagram for ``message`` and the fds to send with it."""
    kind = message_type(message)
    fds: list[int] = []
    match message:
        case Ready(pid=pid, locked_down=locked_down, version=version,
                   store_version=store_version):
            payload = _READY.pack(pid, _READY_LOCKED_DOWN if locked_down else 0)
            if version or store_version:
                payload += _READY_VERSIONS.pack(store_version) + version.encode("ascii")
        case Assign(config=config, fds=assign_fds):
            payload = _ASSIGN_HEAD.pack(len(assign_fds)) + config.encode("utf-8")
            fds = list(assign_fds)
        case LunAdd() | LunRemove() | LunResizeCheck() | LunResize():
            payload, fds = _encode_command(message)
        case Result(ok=ok, error=error) | Assigned(ok=ok, error=error):
            payload = _ASSIGNED_HEAD.pack(1 if ok else 0) + error.encode("utf-8")
        case Ping(sent_ns=sent_ns):
            payload = _PING.pack(sent_ns)
        case Pong(sent_ns=sent_ns, progress=progress):
            payload = _PONG_HEAD.pack(sent_ns, len(progress)) + b"".join(
                _PROGRESS.pack(p.controller, p.queue, p.completed, p.in_flight) for p in progress
            )
        case Shutdown() | Promote():
            payload = b""
    datagram = HEADER.pack(MAGIC, VERSION, kind, message.seq) + payload
    if len(datagram) > MAX_DATAGRAM:  # the dataclasses bound every field; this is a backstop
        raise LocalControlError(
            f"{len(datagram)}-byte datagram exceeds {MAX_DATAGRAM}", message_type=kind,
            seq=message.seq,
        )
    return datagram, fds


def _encode_command(command: Command) -> tuple[bytes, list[int]]:
    controller = command.controller.encode("utf-8")
    fds = [command.fd] if isinstance(command, LunAdd) else []
    head = _COMMAND_HEAD.pack(len(fds), _OP_OF[type(command)], command.lun, len(controller))
    match command:
        case LunAdd(disk_id=disk_id, readonly=readonly, block_size=block_size):
            disk = disk_id.encode("utf-8")
            flags = _LUN_ADD_READONLY if readonly else 0
            body = _LUN_ADD.pack(flags, block_size, len(disk)) + disk
        case LunResizeCheck(size=size) | LunResize(size=size):
            body = _LUN_SIZE.pack(size)
        case LunRemove():
            body = b""
    return head + controller + body, fds


def decode(datagram: bytes, fds: list[int], *, sender: Sender | None = None) -> Message:
    """Parse one datagram and the fds that arrived with it.

    With ``sender`` given, a message type that end never sends is refused too
    (a launcher has no business reading a PING).  Raises `RemoteControlError`;
    on error the caller keeps ownership of ``fds``.
    """
    data = bytes(datagram)
    if len(data) < HEADER_SIZE:
        raise RemoteControlError(
            f"{len(data)}-byte datagram is shorter than the {HEADER_SIZE}-byte header",
            datagram=data,
        )
    if len(data) > MAX_DATAGRAM:
        raise RemoteControlError(
            f"{len(data)}-byte datagram exceeds {MAX_DATAGRAM}", datagram=data
        )
    magic, version, raw_type, seq = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RemoteControlError(f"bad magic {magic:#06x}, expected {MAGIC:#06x}", datagram=data)
    if version != VERSION:
        raise RemoteControlError(
            f"unsupported protocol version {version}, this end speaks {VERSION}", datagram=data
        )
    try:
        kind = MessageType(raw_type)
    except ValueError:
        raise RemoteControlError(f"unknown message type {raw_type}", datagram=data) from None

    def fail(text: str) -> RemoteControlError:
        return RemoteControlError(text, message_type=kind, seq=seq, datagram=data)

    if sender is not None and SENT_BY[kind] is not sender:
        raise fail(f"the {sender.value} does not send {kind.name}")
    if kind not in (MessageType.ASSIGN, MessageType.COMMAND) and fds:
        raise fail(f"{len(fds)} fds arrived with a message that carries none")
    payload = data[HEADER_SIZE:]
    try:
        return _decode_payload(kind, seq, payload, fds, fail)
    except LocalControlError as exc:  # a field the dataclass refuses: the peer's fault
        raise fail(exc.message) from None


def _decode_payload(
    kind: MessageType,
    seq: int,
    payload: bytes,
    fds: list[int],
    fail: Callable[[str], RemoteControlError],
) -> Message:
    def exact(size: int) -> None:
        if len(payload) != size:
            raise fail(f"payload is {len(payload)} bytes, expected {size}")

    def at_least(size: int) -> None:
        if len(payload) < size:
            raise fail(f"payload is {len(payload)} bytes, expected at least {size}")

    def text(raw: bytes, name: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail(f"{name} is not valid UTF-8 at byte {exc.start}") from None

    match kind:
        case MessageType.READY:
            if len(payload) != _READY.size:
                at_least(_READY.size + _READY_VERSIONS.size)
            pid, flags = _READY.unpack_from(payload)
            if flags & ~_READY_LOCKED_DOWN:
                raise fail(f"unknown READY flags {flags:#04x}")
            store_version, version = 0, ""
            if len(payload) > _READY.size:
                (store_version,) = _READY_VERSIONS.unpack_from(payload, _READY.size)
                raw = payload[_READY.size + _READY_VERSIONS.size:]
                version = raw.decode("ascii", "replace")
                if not _VERSION_TEXT.fullmatch(version):
                    raise fail(f"version {raw[:80]!r}: not 0-64 printable ASCII")
            return Ready(pid, bool(flags & _READY_LOCKED_DOWN), seq, version, store_version)
        case MessageType.ASSIGN:
            at_least(_ASSIGN_HEAD.size)
            (declared,) = _ASSIGN_HEAD.unpack_from(payload)
            if declared != len(fds):
                raise fail(f"declares {declared} fds but {len(fds)} arrived")
            return Assign(text(payload[_ASSIGN_HEAD.size :], "config"), tuple(fds), seq)
        case MessageType.COMMAND:
            return _decode_command(seq, payload, fds, fail)
        case MessageType.ASSIGNED | MessageType.RESULT:
            at_least(_ASSIGNED_HEAD.size)
            (ok,) = _ASSIGNED_HEAD.unpack_from(payload)
            if ok > 1:
                raise fail(f"ok flag is {ok}, expected 0 or 1")
            answer = Assigned if kind is MessageType.ASSIGNED else Result
            return answer(ok == 1, text(payload[_ASSIGNED_HEAD.size :], "error"), seq)
        case MessageType.PING:
            exact(_PING.size)
            (sent_ns,) = _PING.unpack(payload)
            return Ping(seq, sent_ns)
        case MessageType.PONG:
            at_least(_PONG_HEAD.size)
            sent_ns, count = _PONG_HEAD.unpack_from(payload)
            if count > MAX_PROGRESS_ENTRIES:
                raise fail(f"{count} progress entries, more than {MAX_PROGRESS_ENTRIES}")
            exact(_PONG_HEAD.size + count * _PROGRESS.size)
            progress = tuple(
                QueueProgress(*entry)
                for entry in _PROGRESS.iter_unpack(payload[_PONG_HEAD.size :])
            )
            return Pong(seq, sent_ns, progress)
        case MessageType.SHUTDOWN:
            exact(0)
            return Shutdown(seq)
        case MessageType.PROMOTE:
            exact(0)
            return Promote(seq)
    raise AssertionError(kind)  # pragma: no cover - every MessageType is matched



def _decode_command(
    seq: int, payload: bytes, fds: list[int], fail: Callable[[str], RemoteControlError]
) -> Command:
    rest = payload

    def take(size: int, what: str) -> bytes:
        nonlocal rest
        if len(rest) < size:
            raise fail(f"payload ends inside the {what}")
        out, rest = rest[:size], rest[size:]
        return out

    def text(raw: bytes, name: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail(f"{name} is not valid UTF-8 at byte {exc.start}") from None

    declared, raw_op, lun, name_size = _COMMAND_HEAD.unpack(take(_COMMAND_HEAD.size, "header"))
    if declared != len(fds):
        raise fail(f"declares {declared} fds but {len(fds)} arrived")
    try:
        op = CommandOp(raw_op)
    except ValueError:
        raise fail(f"unknown command op {raw_op}") from None
    wanted = 1 if op is CommandOp.LUN_ADD else 0
    if len(fds) != wanted:
        raise fail(f"{op.name} carries {wanted} fds, not {len(fds)}")
    controller = text(take(name_size, "controller id"), "controller id")
    command: Command
    match op:
        case CommandOp.LUN_ADD:
            flags, block_size, disk_size = _LUN_ADD.unpack(take(_LUN_ADD.size, "LUN_ADD fields"))
            if flags & ~_LUN_ADD_READONLY:
                raise fail(f"unknown LUN_ADD flags {flags:#04x}")
            disk_id = text(take(disk_size, "disk id"), "disk id")
            command = LunAdd(controller, lun, disk_id, fds[0], bool(flags), block_size, seq)
        case CommandOp.LUN_REMOVE:
            command = LunRemove(controller, lun, seq)
        case CommandOp.LUN_RESIZE_CHECK | CommandOp.LUN_RESIZE:
            (size,) = _LUN_SIZE.unpack(take(_LUN_SIZE.size, "size"))
            cls = LunResizeCheck if op is CommandOp.LUN_RESIZE_CHECK else LunResize
            command = cls(controller, lun, size, seq)
    if rest:
        raise fail(f"{len(rest)} bytes after the end of {op.name}")
    return command
