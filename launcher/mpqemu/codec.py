"""mpqemu message framing (QEMU 7.2's x-pci-proxy-dev link), sans-I/O.

Theory of operation
-------------------
A message is a 16-byte header (int32 command, 4 bytes of padding, uint64
payload size, native endian: both ends are QEMU on this host) and then
`size` bytes of payload, at most 192 (the size of QEMU's payload union).
File descriptors ride beside the bytes as SCM_RIGHTS, fewer than 8 (QEMU
refuses 8 or more). The proxy sends requests; the remote answers the ones
that want an answer with RET.

Which message do fds belong to? A sender writes a message (header, payload
and fds) in one sendmsg; Linux hands its fds out with the first read that
reaches its bytes and ends that read inside that message. So the fds of a
read belong to the message holding the read's last byte: the decoder anchors
each batch at that byte and gives a message exactly the batches anchored in
it. QEMU itself reads the header alone and takes the fds with it; a relay
reading larger chunks ends its read at the same message.

Checks (syntax only, two-stage validation: whether a message is welcome now
is the relay's business): known command, payload size exactly what the
command carries, fd count per command, and the fields QEMU's remote would
trust: config accesses of 1, 2 or 4 bytes inside the 256-byte config space,
BAR accesses of 1, 2, 4 or 8 bytes with a 0/1 memory flag, memory regions
that are non-empty, used from slot 0 on with one fd each, and do not wrap.
A RET carries a u64, or nothing when it answers DEVICE_RESET: the caller
says which request a reply answers.

Fd ownership is closed: every fd given to `Decoder.receive_data` leaves in
exactly one message (whose consumer owns it) or is closed by the decoder
(on error, on `close()`, or when it arrives after an error).

Errors::

    MpqemuError                 anything wrong on an mpqemu link
     +-- LocalProtocolError     we built or encoded a message the format cannot carry
     +-- RemoteProtocolError    the peer sent one (`command`: what it claimed to be)
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

HEADER: Final = struct.Struct("=i4xQ")
HEADER_SIZE: Final = HEADER.size
MAX_PAYLOAD: Final = 192
"""sizeof the payload union: SYNC_SYSMEM's three arrays of 8 u64."""
MAX_MESSAGE_FDS: Final = 7
"""QEMU's remote refuses a message with 8 (REMOTE_MAX_FDS) or more fds."""
MAX_REGIONS: Final = 8
CONFIG_SPACE: Final = 256
"""Conventional PCI config space: the proxy device and the LSI53C895A."""
CONFIG_LENS: Final = frozenset({1, 2, 4})
BAR_SIZES: Final = frozenset({1, 2, 4, 8})
U64_MAX: Final = (1 << 64) - 1
I64_MIN: Final = -(1 << 63)
I64_MAX: Final = (1 << 63) - 1

_SYSMEM = struct.Struct("=8Q8Q8q")
_CONFIG = struct.Struct("=IIi")
_BAR = struct.Struct("=QQIB3x")
_U64 = struct.Struct("=Q")
assert _SYSMEM.size == MAX_PAYLOAD and HEADER_SIZE == 16


class Command(enum.IntEnum):
    SYNC_SYSMEM = 0
    RET = 1
    PCI_CFGWRITE = 2
    PCI_CFGREAD = 3
    BAR_WRITE = 4
    BAR_READ = 5
    SET_IRQFD = 6
    DEVICE_RESET = 7


class MpqemuError(Exception):
    """Anything wrong on an mpqemu link."""


class LocalProtocolError(MpqemuError):
    """We built or encoded a message the wire format cannot carry (a bug here)."""


class RemoteProtocolError(MpqemuError):
    """The peer sent a malformed message. `command` is what it claimed to be
    (a `Command`, a bare int for an unknown one, None before a header)."""

    def __init__(self, message: str, command: Command | int | None = None) -> None:
        self.message = message
        self.command = command
        super().__init__(message)

    def __str__(self) -> str:
        if self.command is None:
            return self.message
        name = self.command.name if isinstance(self.command, Command) else str(self.command)
        return f"{name}: {self.message}"


# --- messages -------------------------------------------------------------------


def _check_u64(what: str, value: int) -> None:
    if not 0 <= value <= U64_MAX:
        raise LocalProtocolError(f"{what} {value} does not fit in a u64")


@dataclass(frozen=True, slots=True)
class Region:
    """One guest RAM region of SYNC_SYSMEM: `size` bytes at guest physical
    `gpa`, found at `offset` in the region's fd."""

    gpa: int
    size: int
    offset: int

    def __post_init__(self) -> None:
        _check_u64("gpa", self.gpa)
        _check_u64("size", self.size)
        if self.size == 0:
            raise LocalProtocolError("a region of size 0")
        if self.gpa + self.size - 1 > U64_MAX:
            raise LocalProtocolError(
                f"region {self.gpa:#x}+{self.size:#x} wraps around the address space")
        if not 0 <= self.offset <= I64_MAX or self.offset + self.size - 1 > I64_MAX:
            raise LocalProtocolError(f"offset {self.offset} (size {self.size:#x}) out of range")


@dataclass(frozen=True, slots=True)
class SyncSysmem:
    """The guest's RAM layout; `fds[i]` holds `regions[i]`. No reply."""

    regions: tuple[Region, ...]
    fds: tuple[int, ...]

    command: ClassVar[Command] = Command.SYNC_SYSMEM

    def __post_init__(self) -> None:
        if not 1 <= len(self.regions) <= MAX_MESSAGE_FDS:
            raise LocalProtocolError(f"{len(self.regions)} regions, 1 to {MAX_MESSAGE_FDS} allowed")
        if len(self.fds) != len(self.regions):
            raise LocalProtocolError(f"{len(self.fds)} fds for {len(self.regions)} regions")


@dataclass(frozen=True, slots=True)
class Ret:
    """A reply: `value` is the u64 (a read's data, 0 for a done write), None
    for the empty reply to DEVICE_RESET."""

    value: int | None

    command: ClassVar[Command] = Command.RET
    fds: ClassVar[tuple[int, ...]] = ()

    def __post_init__(self) -> None:
        if self.value is not None:
            _check_u64("RET value", self.value)


def _check_config(addr: int, val: int, length: int) -> None:
    if length not in CONFIG_LENS:
        raise LocalProtocolError(f"config access of {length} bytes (1, 2 or 4)")
    if addr < 0 or addr + length > CONFIG_SPACE:
        raise LocalProtocolError(
            f"config access at {addr:#x}+{length} outside the {CONFIG_SPACE}-byte space")
    if not 0 <= val < 1 << 32:
        raise LocalProtocolError(f"config value {val} does not fit in a u32")


@dataclass(frozen=True, slots=True)
class PciConfigWrite:
    """Write `len` bytes of `val` at `addr` of the config space. Reply: RET."""

    addr: int
    val: int
    len: int

    command: ClassVar[Command] = Command.PCI_CFGWRITE
    fds: ClassVar[tuple[int, ...]] = ()

    def __post_init__(self) -> None:
        _check_config(self.addr, self.val, self.len)


@dataclass(frozen=True, slots=True)
class PciConfigRead:
    """Read `len` bytes at `addr` of the config space (`val` is unused but
    carried). Reply: RET with the value."""

    addr: int
    val: int
    len: int

    command: ClassVar[Command] = Command.PCI_CFGREAD
    fds: ClassVar[tuple[int, ...]] = ()

    def __post_init__(self) -> None:
        _check_config(self.addr, self.val, self.len)


def _check_bar(addr: int, val: int, size: int) -> None:
    _check_u64("BAR address", addr)
    _check_u64("BAR value", val)
    if size not in BAR_SIZES:
        raise LocalProtocolError(f"BAR access of {size} bytes (1, 2, 4 or 8)")


@dataclass(frozen=True, slots=True)
class BarWrite:
    """Write `size` bytes of `val` at guest address `addr` (memory space when
    `memory`, else I/O space). Reply: RET 0."""

    addr: int
    val: int
    size: int
    memory: bool

    command: ClassVar[Command] = Command.BAR_WRITE
    fds: ClassVar[tuple[int, ...]] = ()

    def __post_init__(self) -> None:
        _check_bar(self.addr, self.val, self.size)


@dataclass(frozen=True, slots=True)
class BarRead:
    """Read `size` bytes at `addr` (`val` unused but carried). Reply: RET."""

    addr: int
    val: int
    size: int
    memory: bool

    command: ClassVar[Command] = Command.BAR_READ
    fds: ClassVar[tuple[int, ...]] = ()

    def __post_init__(self) -> None:
        _check_bar(self.addr, self.val, self.size)


@dataclass(frozen=True, slots=True)
class SetIrqfd:
    """The device's interrupt eventfd and its resample eventfd. No reply."""

    intr: int
    resample: int

    command: ClassVar[Command] = Command.SET_IRQFD

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.intr, self.resample)


@dataclass(frozen=True, slots=True)
class DeviceReset:
    """Reset the device. Reply: an empty RET."""

    command: ClassVar[Command] = Command.DEVICE_RESET
    fds: ClassVar[tuple[int, ...]] = ()


Message = SyncSysmem | Ret | PciConfigWrite | PciConfigRead | BarWrite | BarRead | SetIrqfd \
    | DeviceReset
Request = PciConfigWrite | PciConfigRead | BarWrite | BarRead | DeviceReset
"""The requests the proxy waits on: each gets exactly one RET."""
REQUEST_TYPES: Final = (PciConfigWrite, PciConfigRead, BarWrite, BarRead, DeviceReset)

_PAYLOAD_SIZE: Final[dict[Command, int]] = {
    Command.SYNC_SYSMEM: _SYSMEM.size,
    Command.PCI_CFGWRITE: _CONFIG.size,
    Command.PCI_CFGREAD: _CONFIG.size,
    Command.BAR_WRITE: _BAR.size,
    Command.BAR_READ: _BAR.size,
    Command.SET_IRQFD: 0,
    Command.DEVICE_RESET: 0,
}
"""Payload size of every request (RET depends on what it answers)."""


# --- encoding -------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """The bytes of `message`; its `fds` go beside them in the same sendmsg."""
    body: bytes
    if isinstance(message, SyncSysmem):
        slots = [*message.regions] + [None] * (MAX_REGIONS - len(message.regions))
        body = _SYSMEM.pack(
            *(r.gpa if r else 0 for r in slots),
            *(r.size if r else 0 for r in slots),
            *(r.offset if r else 0 for r in slots),
        )
    elif isinstance(message, Ret):
        body = b"" if message.value is None else _U64.pack(message.value)
    elif isinstance(message, PciConfigWrite | PciConfigRead):
        body = _CONFIG.pack(message.addr, message.val, message.len)
    elif isinstance(message, BarWrite | BarRead):
        body = _BAR.pack(message.addr, message.val, message.size, int(message.memory))
    elif isinstance(message, SetIrqfd | DeviceReset):
        body = b""
    else:
        raise LocalProtocolError(f"not an mpqemu message: {message!r}")
    return HEADER.pack(message.command, len(body)) + body


# --- decoding -------------------------------------------------------------------


class Role(enum.Enum):
    """Which end decodes: the proxy's peer reads requests, the proxy's side
    (the relay reading a remote) reads replies."""

    REQUESTS = "requests"
    REPLIES = "replies"


class DecoderState(enum.Enum):
    """READY decodes; ERROR and CLOSED are final."""

    READY = "ready"
    ERROR = "error"
    CLOSED = "closed"


class NeedData(enum.Enum):
    """`next_message` found no complete message buffered."""

    NEED_DATA = "need data"


class ConnectionClosed(enum.Enum):
    """`next_message`: the peer closed the stream between two messages."""

    CONNECTION_CLOSED = "connection closed"


NEED_DATA: Final = NeedData.NEED_DATA
CONNECTION_CLOSED: Final = ConnectionClosed.CONNECTION_CLOSED


def _parse(command: Command, body: bytes, fds: list[int], reply_to: Command | None) -> Message:
    """Build the message; every check raises RemoteProtocolError."""
    want_fds = 0
    if command is Command.RET:
        allowed = {0, 8} if reply_to is Command.DEVICE_RESET else {8}
        if len(body) not in allowed:
            what = "DEVICE_RESET's reply" if reply_to is Command.DEVICE_RESET else (
                f"{reply_to.name}'s reply" if reply_to is not None else "a RET")
            raise RemoteProtocolError(
                f"payload is {len(body)} bytes, {what} carries "
                f"{' or '.join(str(n) for n in sorted(allowed))}", command)
    else:
        want = _PAYLOAD_SIZE[command]
        if len(body) != want:
            raise RemoteProtocolError(f"payload is {len(body)} bytes, expected {want}", command)
    if command is Command.SYNC_SYSMEM:
        values = _SYSMEM.unpack(body)
        gpas, sizes, offsets = values[:8], values[8:16], values[16:]
        used = sum(1 for size in sizes if size)
        if used == 0:
            raise RemoteProtocolError("no region has a size", command)
        if any(sizes[i] == 0 for i in range(used)) or any(
                (gpas[i], sizes[i], offsets[i]) != (0, 0, 0) for i in range(used, MAX_REGIONS)):
            raise RemoteProtocolError(
                "regions must fill slots from 0 on, unused slots all zero", command)
        want_fds = used
        if len(fds) != want_fds:
            raise RemoteProtocolError(
                f"message came with {len(fds)} fds, its {used} regions need {used}", command)
    elif command is Command.SET_IRQFD:
        want_fds = 2
    if len(fds) != want_fds:
        raise RemoteProtocolError(
            f"message came with {len(fds)} fds, it must carry {want_fds}", command)
    try:
        if command is Command.SYNC_SYSMEM:
            regions = tuple(Region(gpas[i], sizes[i], offsets[i]) for i in range(used))
            return SyncSysmem(regions, tuple(fds))
        if command is Command.RET:
            return Ret(_U64.unpack(body)[0] if body else None)
        if command in (Command.PCI_CFGWRITE, Command.PCI_CFGREAD):
            addr, val, length = _CONFIG.unpack(body)
            cls = PciConfigWrite if command is Command.PCI_CFGWRITE else PciConfigRead
            return cls(addr, val, length)
        if command in (Command.BAR_WRITE, Command.BAR_READ):
            addr, val, size, memory = _BAR.unpack(body)
            if memory > 1:
                raise RemoteProtocolError(f"memory flag is {memory}, not 0 or 1", command)
            bar = BarWrite if command is Command.BAR_WRITE else BarRead
            return bar(addr, val, size, bool(memory))
        if command is Command.SET_IRQFD:
            return SetIrqfd(fds[0], fds[1])
        return DeviceReset()
    except LocalProtocolError as e:  # a field the message's own checks refuse
        raise RemoteProtocolError(str(e), command) from None


CloseFd = Callable[[int], None]


class Decoder:
    """Turns a byte stream plus fds into messages. See the module docstring."""

    def __init__(self, role: Role, close_fd: CloseFd) -> None:
        self.role = role
        self.state = DecoderState.READY
        self._close_fd = close_fd
        self._buf = bytearray()
        self._base = 0  # stream offset of self._buf[0]
        self._batches: list[tuple[int, list[int]]] = []  # (anchor offset, fds)
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def pending_fds(self) -> int:
        """Fds received but not yet handed out in a message."""
        return sum(len(fds) for _, fds in self._batches)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf)

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Feed what one read returned; `data == b""` without fds is end of stream."""
        if self.state is not DecoderState.READY:
            self._close_all(fds)
            if self._error is not None:
                raise self._error
            raise LocalProtocolError("decoder is closed")
        if self._eof:
            self._close_all(fds)
            raise LocalProtocolError("data received after end of stream")
        if not data and not fds:
            self._eof = True
            return
        if fds and not data:
            self._close_all(fds)
            self._fail(RemoteProtocolError("fds arrived without bytes"))
            assert self._error is not None
            raise self._error
        if fds:
            self._batches.append((self._base + len(self._buf) + len(data) - 1, list(fds)))
        self._buf += data

    def next_message(self, reply_to: Command | None = None) -> Message | NeedData \
            | ConnectionClosed:
        """The next complete message, NEED_DATA, or CONNECTION_CLOSED.
        `reply_to`: the request a RET would answer (its payload size depends
        on it); only meaningful for Role.REPLIES."""
        if self.state is DecoderState.ERROR:
            assert self._error is not None
            raise self._error
        if self.state is DecoderState.CLOSED:
            raise LocalProtocolError("decoder is closed")
        try:
            return self._next(reply_to)
        except RemoteProtocolError as error:
            self._fail(error)
            raise

    def close(self) -> None:
        """End of the connection: close every fd not handed out."""
        self._buf.clear()
        self._drop_batches()
        if self.state is DecoderState.READY:
            self.state = DecoderState.CLOSED

    # -- internals

    def _next(self, reply_to: Command | None) -> Message | NeedData | ConnectionClosed:
        if len(self._buf) < HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            if self._buf or self._batches:
                raise RemoteProtocolError(
                    f"stream ended inside a header ({len(self._buf)} bytes left over)")
            return CONNECTION_CLOSED
        code, size = HEADER.unpack_from(self._buf)
        try:
            command = Command(code)
        except ValueError:
            raise RemoteProtocolError(f"unknown command {code}", code) from None
        if self.role is Role.REQUESTS and command is Command.RET:
            raise RemoteProtocolError("a reply where a request was expected", command)
        if self.role is Role.REPLIES and command is not Command.RET:
            raise RemoteProtocolError("a request where a reply was expected", command)
        if size > MAX_PAYLOAD:
            raise RemoteProtocolError(f"payload size {size}, at most {MAX_PAYLOAD}", command)
        total = HEADER_SIZE + size
        if len(self._buf) < total:
            if self._eof:
                raise RemoteProtocolError("stream ended inside a message", command)
            return NEED_DATA
        end = self._base + total
        fds: list[int] = []
        while self._batches and self._batches[0][0] < end:
            fds.extend(self._batches.pop(0)[1])
        try:
            if len(fds) > MAX_MESSAGE_FDS:
                raise RemoteProtocolError(f"{len(fds)} fds, at most {MAX_MESSAGE_FDS}", command)
            message = _parse(command, bytes(self._buf[HEADER_SIZE:total]), fds, reply_to)
        except RemoteProtocolError:
            self._close_all(fds)
            raise
        del self._buf[:total]
        self._base = end
        return message

    def _fail(self, error: RemoteProtocolError) -> None:
        self.state = DecoderState.ERROR
        self._error = error
        self._buf.clear()
        self._drop_batches()

    def _drop_batches(self) -> None:
        batches, self._batches = self._batches, []
        for _, fds in batches:
            self._close_all(fds)

    def _close_all(self, fds: Sequence[int]) -> None:
        for fd in fds:
            self._close_fd(fd)
