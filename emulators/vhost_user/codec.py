"""vhost-user message framing, sans-I/O.

Theory of operation
-------------------
A vhost-user message is a 12-byte header (request u32, flags u32, size u32)
followed by `size` bytes of payload; file descriptors ride beside the bytes as
SCM_RIGHTS ancillary data.  The I/O layer reads from the socket and feeds
whatever arrived to `Decoder.receive_data(data, fds)`; `Decoder.next_message()`
then returns one `Message` at a time, or `NEED_DATA`.  Several messages may
arrive in one read, one message may be split across many.

Which message do the fds belong to?  Linux hands out the fds of one
`sendmsg()` with the read that reaches that send's bytes, and ends the read
there: so the fds of a read belong to the message holding the last byte of
that read.  The decoder records each batch of fds at that byte and gives a
message exactly the batches anchored inside it.  A message then must carry
exactly the number of fds its request defines (SET_MEM_TABLE: one per
region; SET_VRING_KICK/CALL/ERR: one unless the "no fd" bit is set; a few
others: one; everything else: none).  Anything else is a protocol error.

Fd ownership is closed: every fd handed to `receive_data` either leaves in a
`Message.fds` (its consumer owns it from then on) or is closed by the decoder
through the `close_fd` function it was built with, on error, on `close()`,
and when fds arrive after the decoder has failed.  Nothing can leak.

Only syntax is checked here: known request, allowed flags, payload size,
fd count.  Whether a message makes sense now is the session's business
(STYLE.md, two-stage validation).  After the first error the decoder stays
in the ERROR state, like h11: a byte stream that lost its framing cannot be
trusted again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from .constants import (
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    VERSION_MASK,
    HeaderFlag,
    Request,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    U64,
    Config,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    Payload,
    RawPayload,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
)

CloseFd = Callable[[int], None]


class Role(enum.Enum):
    """Which end decodes: a back-end reads requests, a front-end reads replies."""

    BACKEND = "backend"
    FRONTEND = "frontend"


class DecoderState(enum.Enum):
    """READY decodes; ERROR and CLOSED are final."""

    READY = "ready"
    ERROR = "error"
    CLOSED = "closed"


class NeedData:
    """Returned by `next_message` when no complete message is buffered."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


class ConnectionClosed:
    """Returned by `next_message` once the peer closed the stream between messages."""

    _instance: ConnectionClosed | None = None

    def __new__(cls) -> ConnectionClosed:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CONNECTION_CLOSED"


NEED_DATA: Final = NeedData()
CONNECTION_CLOSED: Final = ConnectionClosed()


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message; it owns `fds` (whoever takes the message must close them)."""

    request: Request
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.REPLY)


# --- the request table -------------------------------------------------------

_Parse = Callable[[Request, bytes], Payload]
_FdCount = Callable[[Payload], int]


def _fixed(
    cls: type[U64 | VringState | VringAddr | VringFd | SingleMemoryRegion | LogDescription],
) -> _Parse:
    def parse(request: Request, data: bytes) -> Payload:
        if len(data) != cls.SIZE:
            raise RemoteProtocolError(
                f"payload is {len(data)} bytes, {cls.__name__} is {cls.SIZE}", request
            )
        if cls is VringFd and int.from_bytes(data, "little") & ~0x1FF:
            raise RemoteProtocolError(
                f"ring fd payload {int.from_bytes(data, 'little'):#x} sets reserved bits",
                request,
            )
        return cls.unpack(data)

    return parse


def _none(request: Request, data: bytes) -> Payload:
    if data:
        raise RemoteProtocolError(f"payload is {len(data)} bytes, expected none", request)
    return None


def _mem_table(request: Request, data: bytes) -> Payload:
    if len(data) < 8:
        raise RemoteProtocolError(f"payload is {len(data)} bytes, too short", request)
    count = int.from_bytes(data[:4], "little")
    if count > MAX_MEM_REGIONS:
        raise RemoteProtocolError(f"{count} regions, at most {MAX_MEM_REGIONS}", request)
    expected = 8 + MemoryRegion.SIZE * count
    if len(data) != expected:
        raise RemoteProtocolError(
            f"payload is {len(data)} bytes, {count} regions need {expected}", request
        )
    return MemoryTable.unpack(data)


def _config(request: Request, data: bytes) -> Payload:
    if len(data) < Config.HEADER.size:
        raise RemoteProtocolError(f"payload is {len(data)} bytes, too short", request)
    _offset, size, _flags = Config.HEADER.unpack_from(data)
    if size > MAX_CONFIG_SIZE:
        raise RemoteProtocolError(f"config size {size}, at most {MAX_CONFIG_SIZE}", request)
    if len(data) != Config.HEADER.size + size:
        raise RemoteProtocolError(
            f"payload is {len(data)} bytes, config header says {Config.HEADER.size + size}",
            request,
        )
    return Config.unpack(data)


def _raw(request: Request, data: bytes) -> Payload:
    return RawPayload.unpack(data)


def _no_fds(payload: Payload) -> int:
    return 0


def _one_fd(payload: Payload) -> int:
    return 1


def _per_region(payload: Payload) -> int:
    assert isinstance(payload, MemoryTable)
    return len(payload.regions)


def _vring_fd(payload: Payload) -> int:
    assert isinstance(payload, VringFd)
    return 0 if payload.no_fd else 1


@dataclass(frozen=True, slots=True)
class _Spec:
    parse: _Parse
    fds: _FdCount
    payload_type: type | None  # None: no payload at all


_u64 = _Spec(_fixed(U64), _no_fds, U64)
_state = _Spec(_fixed(VringState), _no_fds, VringState)
_empty = _Spec(_none, _no_fds, None)
_raw_spec = _Spec(_raw, _no_fds, RawPayload)
_vring_fd_spec = _Spec(_fixed(VringFd), _vring_fd, VringFd)

REQUESTS: Final[dict[Request, _Spec]] = {
    Request.GET_FEATURES: _empty,
    Request.SET_FEATURES: _u64,
    Request.SET_OWNER: _empty,
    Request.RESET_OWNER: _empty,
    Request.SET_MEM_TABLE: _Spec(_mem_table, _per_region, MemoryTable),
    Request.SET_LOG_BASE: _Spec(_fixed(LogDescription), _one_fd, LogDescription),
    Request.SET_LOG_FD: _Spec(_none, _one_fd, None),
    Request.SET_VRING_NUM: _state,
    Request.SET_VRING_ADDR: _Spec(_fixed(VringAddr), _no_fds, VringAddr),
    Request.SET_VRING_BASE: _state,
    Request.GET_VRING_BASE: _state,
    Request.SET_VRING_KICK: _vring_fd_spec,
    Request.SET_VRING_CALL: _vring_fd_spec,
    Request.SET_VRING_ERR: _vring_fd_spec,
    Request.GET_PROTOCOL_FEATURES: _empty,
    Request.SET_PROTOCOL_FEATURES: _u64,
    Request.GET_QUEUE_NUM: _empty,
    Request.SET_VRING_ENABLE: _state,
    Request.SEND_RARP: _u64,
    Request.NET_SET_MTU: _u64,
    Request.SET_BACKEND_REQ_FD: _Spec(_none, _one_fd, None),
    Request.IOTLB_MSG: _raw_spec,
    Request.SET_VRING_ENDIAN: _state,
    Request.GET_CONFIG: _Spec(_config, _no_fds, Config),
    Request.SET_CONFIG: _Spec(_config, _no_fds, Config),
    Request.CREATE_CRYPTO_SESSION: _raw_spec,
    Request.CLOSE_CRYPTO_SESSION: _u64,
    Request.POSTCOPY_ADVISE: _empty,
    Request.POSTCOPY_LISTEN: _empty,
    Request.POSTCOPY_END: _empty,
    Request.GET_INFLIGHT_FD: _raw_spec,
    Request.SET_INFLIGHT_FD: _Spec(_raw, _one_fd, RawPayload),
    Request.GPU_SET_SOCKET: _Spec(_none, _one_fd, None),
    Request.RESET_DEVICE: _empty,
    Request.VRING_KICK: _state,
    Request.GET_MAX_MEM_SLOTS: _empty,
    Request.ADD_MEM_REG: _Spec(_fixed(SingleMemoryRegion), _one_fd, SingleMemoryRegion),
    Request.REM_MEM_REG: _Spec(_fixed(SingleMemoryRegion), _no_fds, SingleMemoryRegion),
    Request.SET_STATUS: _u64,
    Request.GET_STATUS: _empty,
}
"""Syntax of every front-end request: payload shape and fd count."""

_REPLIES: Final[dict[Request, _Spec]] = {
    Request.GET_VRING_BASE: _state,
    Request.GET_CONFIG: _Spec(_config, _no_fds, Config),
    Request.GET_INFLIGHT_FD: _Spec(_raw, _one_fd, RawPayload),
    Request.POSTCOPY_ADVISE: _Spec(_u64.parse, _one_fd, U64),
}
"""Replies whose shape differs from the u64 that every other reply carries
(feature words, counts, and REPLY_ACK's status)."""


def _reply_spec(request: Request) -> _Spec:
    return _REPLIES.get(request, _u64)


def expected_fds(request: Request, payload: Payload, *, reply: bool = False) -> int:
    """How many fds a message of this request with this payload must carry."""
    spec = _reply_spec(request) if reply else REQUESTS[request]
    return spec.fds(payload)


# --- encoding -----------------------------------------------------------------


def _encode(request: Request, flags: int, spec: _Spec, payload: Payload, nfds: int) -> bytes:
    if spec.payload_type is None:
        if payload is not None:
            raise LocalProtocolError("this request carries no payload", request)
        body = b""
    else:
        if payload is None or not isinstance(payload, spec.payload_type):
            raise LocalProtocolError(
                f"payload must be {spec.payload_type.__name__}, not {type(payload).__name__}",
                request,
            )
        body = payload.pack()
    if len(body) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"payload of {len(body)} bytes is too large", request)
    want = spec.fds(payload)
    if nfds != want:
        raise LocalProtocolError(f"{nfds} fds given, the message carries {want}", request)
    return HEADER.pack(request, flags, len(body)) + body


def encode_request(
    request: Request,
    payload: Payload = None,
    *,
    need_reply: bool = False,
    fds: Sequence[int] = (),
) -> bytes:
    """Encode a front-end request.  `fds` are only counted (they go beside the
    bytes, in the same sendmsg); a wrong count raises `LocalProtocolError`."""
    flags = HeaderFlag.VERSION_1 | (HeaderFlag.NEED_REPLY if need_reply else 0)
    return _encode(Request(request), flags, REQUESTS[request], payload, len(fds))


def encode_reply(request: Request, payload: Payload, *, fds: Sequence[int] = ()) -> bytes:
    """Encode a back-end reply to `request`."""
    flags = HeaderFlag.VERSION_1 | HeaderFlag.REPLY
    return _encode(Request(request), flags, _reply_spec(request), payload, len(fds))


def encode_ack(request: Request, ok: bool) -> bytes:
    """Encode REPLY_ACK's answer: u64 0 for success, 1 for failure."""
    return encode_reply(request, U64(0 if ok else 1))


# --- decoding -----------------------------------------------------------------


class Decoder:
    """Turns a byte stream plus fds into `Message`s.  See the module docstring."""

    def __init__(self, role: Role, close_fd: CloseFd) -> None:
        self.role = role
        self._close_fd = close_fd
        self.state = DecoderState.READY
        self._buf = bytearray()
        self._base = 0  # stream offset of self._buf[0]
        self._batches: list[tuple[int, list[int]]] = []  # (anchor offset, fds)
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def pending_fds(self) -> int:
        """Fds received but not yet handed out in a message."""
        return sum(len(fds) for _, fds in self._batches)

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Feed what one read returned.  `data == b""` with no fds means end of stream."""
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
        end = self._base + len(self._buf) + len(data)
        if fds:
            # The fds belong to the message that holds the last byte of this read
            # (or, for a read of no bytes, the next byte to come).
            anchor = end - 1 if data else end
            self._batches.append((anchor, list(fds)))
        self._buf += data

    def next_message(self) -> Message | NeedData | ConnectionClosed:
        """Return the next complete message, NEED_DATA, or CONNECTION_CLOSED."""
        if self.state is DecoderState.ERROR:
            assert self._error is not None
            raise self._error
        if self.state is DecoderState.CLOSED:
            raise LocalProtocolError("decoder is closed")
        try:
            return self._next()
        except RemoteProtocolError as error:
            self._fail(error)
            raise

    def close(self) -> None:
        """End of the connection: close every fd not yet handed out."""
        self._drop_batches()
        if self.state is DecoderState.READY:
            self.state = DecoderState.CLOSED

    # -- internals

    def _next(self) -> Message | NeedData | ConnectionClosed:
        if len(self._buf) < HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            if self._buf or self._batches:
                raise RemoteProtocolError(
                    f"stream ended inside a message ({len(self._buf)} bytes left over)"
                )
            return CONNECTION_CLOSED
        code, flags, size = HEADER.unpack_from(self._buf)
        request = self._check_header(code, flags, size)
        total = HEADER_SIZE + size
        if len(self._buf) < total:
            if self._eof:
                raise RemoteProtocolError("stream ended inside a message", request)
            return NEED_DATA
        end = self._base + total
        fds: list[int] = []
        while self._batches and self._batches[0][0] < end:
            fds.extend(self._batches.pop(0)[1])
        try:
            spec = _reply_spec(request) if self.role is Role.FRONTEND else REQUESTS[request]
            payload = spec.parse(request, bytes(self._buf[HEADER_SIZE:total]))
            want = spec.fds(payload)
            if len(fds) != want:
                raise RemoteProtocolError(
                    f"message came with {len(fds)} fds, it must carry {want}", request
                )
        except RemoteProtocolError:
            self._close_all(fds)
            raise
        del self._buf[:total]
        self._base = end
        return Message(request=request, flags=flags, payload=payload, fds=tuple(fds))

    def _check_header(self, code: int, flags: int, size: int) -> Request:
        try:
            request = Request(code)
        except ValueError:
            raise RemoteProtocolError(f"unknown request code {code}") from None
        if flags & VERSION_MASK != HeaderFlag.VERSION_1:
            raise RemoteProtocolError(f"version {flags & VERSION_MASK}, only 1 exists", request)
        if flags & ~KNOWN_FLAGS:
            raise RemoteProtocolError(f"flags {flags:#x} set reserved bits", request)
        is_reply = bool(flags & HeaderFlag.REPLY)
        if self.role is Role.BACKEND and is_reply:
            raise RemoteProtocolError("a reply where a request was expected", request)
        if self.role is Role.FRONTEND and not is_reply:
            raise RemoteProtocolError("a request where a reply was expected", request)
        if size > MAX_PAYLOAD_SIZE:
            raise RemoteProtocolError(f"payload size {size}, at most {MAX_PAYLOAD_SIZE}", request)
        return request

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
