"""vhost-user framing: split reads, batched reads, fd attribution, syntax errors."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulators.vhost_user.codec import (
    CONNECTION_CLOSED,
    NEED_DATA,
    REQUESTS,
    Decoder,
    DecoderState,
    Message,
    Role,
    encode_ack,
    encode_reply,
    encode_request,
)
from emulators.vhost_user.constants import HEADER, Request
from emulators.vhost_user.errors import LocalProtocolError, RemoteProtocolError
from emulators.vhost_user.messages import (
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


class Closer:
    def __init__(self) -> None:
        self.closed: list[int] = []

    def __call__(self, fd: int) -> None:
        self.closed.append(fd)


def decoder(role: Role = Role.BACKEND) -> tuple[Decoder, Closer]:
    closer = Closer()
    return Decoder(role, close_fd=closer), closer


REGION = MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0)

SAMPLES: dict[Request, tuple[Payload, int]] = {
    Request.GET_FEATURES: (None, 0),
    Request.SET_FEATURES: (U64(1 << 32), 0),
    Request.SET_OWNER: (None, 0),
    Request.RESET_OWNER: (None, 0),
    Request.SET_MEM_TABLE: (MemoryTable((REGION, REGION)), 2),
    Request.SET_LOG_BASE: (LogDescription(4096, 0), 1),
    Request.SET_LOG_FD: (None, 1),
    Request.SET_VRING_NUM: (VringState(1, 256), 0),
    Request.SET_VRING_ADDR: (VringAddr(2, 0, 1, 2, 3, 4), 0),
    Request.SET_VRING_BASE: (VringState(0, 7), 0),
    Request.GET_VRING_BASE: (VringState(0, 0), 0),
    Request.SET_VRING_KICK: (VringFd(3), 1),
    Request.SET_VRING_CALL: (VringFd(3, no_fd=True), 0),
    Request.SET_VRING_ERR: (VringFd(0), 1),
    Request.GET_PROTOCOL_FEATURES: (None, 0),
    Request.SET_PROTOCOL_FEATURES: (U64(9), 0),
    Request.GET_QUEUE_NUM: (None, 0),
    Request.SET_VRING_ENABLE: (VringState(0, 1), 0),
    Request.SEND_RARP: (U64(0), 0),
    Request.NET_SET_MTU: (U64(1500), 0),
    Request.SET_BACKEND_REQ_FD: (None, 1),
    Request.IOTLB_MSG: (RawPayload(bytes(32)), 0),
    Request.SET_VRING_ENDIAN: (VringState(0, 1), 0),
    Request.GET_CONFIG: (Config(0, 0, bytes(36)), 0),
    Request.SET_CONFIG: (Config(4, 0, b"\x01\x02"), 0),
    Request.CREATE_CRYPTO_SESSION: (RawPayload(b"x"), 0),
    Request.CLOSE_CRYPTO_SESSION: (U64(1), 0),
    Request.POSTCOPY_ADVISE: (None, 0),
    Request.POSTCOPY_LISTEN: (None, 0),
    Request.POSTCOPY_END: (None, 0),
    Request.GET_INFLIGHT_FD: (RawPayload(bytes(24)), 0),
    Request.SET_INFLIGHT_FD: (RawPayload(bytes(24)), 1),
    Request.GPU_SET_SOCKET: (None, 1),
    Request.RESET_DEVICE: (None, 0),
    Request.VRING_KICK: (VringState(0, 0), 0),
    Request.GET_MAX_MEM_SLOTS: (None, 0),
    Request.ADD_MEM_REG: (SingleMemoryRegion(REGION), 1),
    Request.REM_MEM_REG: (SingleMemoryRegion(REGION), 0),
    Request.SET_STATUS: (U64(0xF), 0),
    Request.GET_STATUS: (None, 0),
}


def test_samples_cover_every_request() -> None:
    assert set(SAMPLES) == set(Request) == set(REQUESTS)


@pytest.mark.parametrize("request_code", list(Request), ids=lambda r: r.name)
def test_every_request_round_trips(request_code: Request) -> None:
    payload, nfds = SAMPLES[request_code]
    fds = list(range(10, 10 + nfds))
    data = encode_request(request_code, payload, need_reply=True, fds=fds)
    dec, closer = decoder()
    dec.receive_data(data, fds)
    message = dec.next_message()
    assert message == Message(request_code, 0x9, payload, tuple(fds))
    assert message.need_reply and not message.is_reply
    assert dec.next_message() is NEED_DATA
    assert closer.closed == []


def _wrong_sizes() -> list[tuple[Request, int]]:
    out = []
    for request, (payload, _) in SAMPLES.items():
        if isinstance(payload, RawPayload | MemoryTable | Config):
            continue
        size = 0 if payload is None else len(payload.pack())
        out += [(request, size + delta) for delta in (-1, 1, 8) if size + delta >= 0]
    return out


@pytest.mark.parametrize(("request_code", "size"), _wrong_sizes(), ids=str)
def test_wrong_payload_size_is_refused(request_code: Request, size: int) -> None:
    dec, _ = decoder()
    dec.receive_data(HEADER.pack(request_code, 1, size) + bytes(size))
    with pytest.raises(RemoteProtocolError, match="bytes") as info:
        dec.next_message()
    assert info.value.request is request_code
    assert dec.state is DecoderState.ERROR


@pytest.mark.parametrize(
    ("header", "payload", "match"),
    [
        (HEADER.pack(0, 1, 0), b"", "unknown request code 0"),
        (HEADER.pack(41, 1, 0), b"", "unknown request code 41"),
        (HEADER.pack(1, 0, 0), b"", "version 0"),
        (HEADER.pack(1, 2, 0), b"", "version 2"),
        (HEADER.pack(1, 0x11, 0), b"", "reserved"),
        (HEADER.pack(1, 0x5, 0), b"", "a reply where a request"),
        (HEADER.pack(24, 1, 4097), b"", "at most 4096"),
        (HEADER.pack(5, 1, 8), struct.pack("<II", 9, 0), "9 regions"),
        (HEADER.pack(5, 1, 8), struct.pack("<II", 1, 0), "1 regions need 40"),
        (HEADER.pack(5, 1, 4), bytes(4), "too short"),
        (HEADER.pack(24, 1, 12), struct.pack("<III", 0, 257, 0), "at most 256"),
        (HEADER.pack(24, 1, 14), struct.pack("<III", 0, 1, 0) + b"ab", "config header says 13"),
        (HEADER.pack(13, 1, 8), struct.pack("<Q", 0x200), "reserved bits"),
    ],
)
def test_syntax_errors(header: bytes, payload: bytes, match: str) -> None:
    dec, _ = decoder()
    dec.receive_data(header + payload)
    with pytest.raises(RemoteProtocolError, match=match):
        dec.next_message()


def test_bad_header_fails_before_payload_arrives() -> None:
    dec, _ = decoder()
    dec.receive_data(HEADER.pack(99, 1, 100))
    with pytest.raises(RemoteProtocolError, match="unknown"):
        dec.next_message()


def test_split_reads_byte_by_byte() -> None:
    payload = MemoryTable((REGION,))
    data = encode_request(Request.SET_MEM_TABLE, payload, fds=[5])
    dec, closer = decoder()
    for i, byte in enumerate(data):
        # Linux hands the fds out with the read that reaches the sendmsg's bytes.
        dec.receive_data(bytes([byte]), [5] if i == 0 else [])
        if i < len(data) - 1:
            assert dec.next_message() is NEED_DATA
    message = dec.next_message()
    assert isinstance(message, Message)
    assert message.payload == payload and message.fds == (5,)
    assert closer.closed == []


def test_several_messages_in_one_read_with_fds_on_the_right_one() -> None:
    a = encode_request(Request.GET_FEATURES)
    b = encode_request(Request.SET_VRING_NUM, VringState(0, 8))
    c = encode_request(Request.SET_VRING_KICK, VringFd(0), fds=[7])
    dec, closer = decoder()
    # One read glues fd-less sends before the one with fds, and ends there.
    dec.receive_data(a + b + c, [7])
    d = encode_request(Request.SET_VRING_CALL, VringFd(1), fds=[8])
    dec.receive_data(d, [8])
    got = [dec.next_message() for _ in range(4)]
    assert [m.request for m in got if isinstance(m, Message)] == [
        Request.GET_FEATURES,
        Request.SET_VRING_NUM,
        Request.SET_VRING_KICK,
        Request.SET_VRING_CALL,
    ]
    assert [m.fds for m in got if isinstance(m, Message)] == [(), (), (7,), (8,)]
    assert dec.next_message() is NEED_DATA
    assert closer.closed == []


def test_fds_read_with_the_header_belong_to_that_message() -> None:
    data = encode_request(Request.SET_MEM_TABLE, MemoryTable((REGION, REGION)), fds=[3, 4])
    dec, _ = decoder()
    dec.receive_data(data[:12], [3, 4])
    assert dec.next_message() is NEED_DATA
    dec.receive_data(data[12:])
    message = dec.next_message()
    assert isinstance(message, Message) and message.fds == (3, 4)


@pytest.mark.parametrize(
    ("data", "fds", "match"),
    [
        (encode_request(Request.GET_FEATURES), [9], "1 fds, it must carry 0"),
        (encode_request(Request.SET_VRING_KICK, VringFd(0), fds=[1]), [], "0 fds, it must carry 1"),
        (encode_request(Request.SET_VRING_CALL, VringFd(0, no_fd=True)), [9], "must carry 0"),
        (
            encode_request(Request.SET_MEM_TABLE, MemoryTable((REGION, REGION)), fds=[1, 2]),
            [9],
            "1 fds, it must carry 2",
        ),
        (encode_request(Request.SET_VRING_ERR, VringFd(0), fds=[1]), [9, 10], "must carry 1"),
    ],
)
def test_wrong_fd_count_is_refused_and_fds_closed(data: bytes, fds: list[int], match: str) -> None:
    dec, closer = decoder()
    dec.receive_data(data, fds)
    with pytest.raises(RemoteProtocolError, match=match):
        dec.next_message()
    assert sorted(closer.closed) == sorted(fds)


def test_error_state_is_permanent_and_closes_late_fds() -> None:
    dec, closer = decoder()
    dec.receive_data(HEADER.pack(77, 1, 0))
    with pytest.raises(RemoteProtocolError) as first:
        dec.next_message()
    with pytest.raises(RemoteProtocolError) as again:
        dec.next_message()
    assert again.value is first.value
    with pytest.raises(RemoteProtocolError):
        dec.receive_data(encode_request(Request.SET_VRING_KICK, VringFd(0), fds=[1]), [42])
    assert closer.closed == [42]
    assert dec.state is DecoderState.ERROR


def test_pending_fds_are_closed_on_error_and_on_close() -> None:
    dec, closer = decoder()
    kick = encode_request(Request.SET_VRING_KICK, VringFd(0), fds=[1])
    dec.receive_data(kick[:5], [11])
    assert dec.pending_fds == 1
    dec.close()
    assert closer.closed == [11] and dec.state is DecoderState.CLOSED
    with pytest.raises(LocalProtocolError):
        dec.receive_data(b"x", [12])
    assert closer.closed == [11, 12]

    dec, closer = decoder()
    dec.receive_data(kick[:5], [21])
    dec.receive_data(kick[5:] + HEADER.pack(200, 1, 0), [22])
    # 22 came with a read that ended inside the next (bad) message: it is that one's.
    first = dec.next_message()
    assert isinstance(first, Message) and first.fds == (21,)
    with pytest.raises(RemoteProtocolError, match="unknown"):
        dec.next_message()
    assert closer.closed == [22]


def test_end_of_stream() -> None:
    dec, _ = decoder()
    dec.receive_data(encode_request(Request.SET_OWNER))
    dec.receive_data(b"")
    assert isinstance(dec.next_message(), Message)
    assert dec.next_message() is CONNECTION_CLOSED

    dec, _ = decoder()
    dec.receive_data(encode_request(Request.SET_FEATURES, U64(1))[:15])
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="ended inside"):
        dec.next_message()


def test_frontend_role_decodes_replies() -> None:
    dec, _ = decoder(Role.FRONTEND)
    dec.receive_data(
        encode_reply(Request.GET_VRING_BASE, VringState(2, 17))
        + encode_reply(Request.GET_FEATURES, U64(1 << 32))
        + encode_ack(Request.SET_MEM_TABLE, ok=False)
    )
    got = [dec.next_message() for _ in range(3)]
    assert [m.payload for m in got if isinstance(m, Message)] == [
        VringState(2, 17),
        U64(1 << 32),
        U64(1),
    ]
    assert all(isinstance(m, Message) and m.is_reply for m in got)
    dec.receive_data(encode_request(Request.GET_FEATURES))
    with pytest.raises(RemoteProtocolError, match="a request where a reply"):
        dec.next_message()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: encode_request(Request.SET_FEATURES), "must be U64"),
        (lambda: encode_request(Request.GET_FEATURES, U64(1)), "carries no payload"),
        (lambda: encode_request(Request.SET_VRING_KICK, VringFd(0)), "0 fds given"),
        (lambda: encode_request(Request.SET_OWNER, fds=[3]), "1 fds given"),
        (lambda: U64(1 << 64), "does not fit"),
        (lambda: VringState(-1, 0), "does not fit"),
        (lambda: VringFd(256), "does not fit"),
        (lambda: MemoryTable((REGION,) * 9), "at most 8"),
        (lambda: Config(0, 0, bytes(257)), "at most 256"),
    ],
)
def test_local_errors(call: Callable[[], object], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        call()


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(st.binary(max_size=64), st.integers(min_value=0, max_value=3)), max_size=12
    ),
    role=st.sampled_from(Role),
)
def test_fuzz_decoder_raises_only_protocol_errors_and_never_leaks(
    chunks: list[tuple[bytes, int]], role: Role
) -> None:
    dec, closer = decoder(role)
    given_fds: list[int] = []
    delivered: list[int] = []
    next_fd = 100
    try:
        for data, nfds in chunks:
            fds = list(range(next_fd, next_fd + nfds))
            next_fd += nfds
            given_fds += fds
            dec.receive_data(data, fds)
            if not data and not fds:
                break  # end of stream: nothing may follow
            while isinstance(message := dec.next_message(), Message):
                delivered += message.fds
    except RemoteProtocolError:
        assert dec.state is DecoderState.ERROR
    dec.close()
    assert sorted(delivered + closer.closed) == given_fds


@settings(max_examples=100, deadline=None)
@given(
    picks=st.lists(st.sampled_from(sorted(SAMPLES)), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=20),
)
def test_fuzz_any_split_of_valid_messages_decodes_the_same(
    picks: list[Request], cuts: list[int]
) -> None:
    stream = b""
    want: list[Message] = []
    fd = 500
    for request in picks:
        payload, nfds = SAMPLES[request]
        fds = tuple(range(fd, fd + nfds))
        fd += nfds
        stream += encode_request(request, payload, fds=fds)
        want.append(Message(request, 1, payload, fds))
    # Cut the stream where the test says; each message's fds go with the read
    # holding its last byte, as Linux delivers them to a reader that stops at
    # each fd-carrying send.
    ends = []
    pos = 0
    for message in want:
        pos += len(encode_request(message.request, message.payload, fds=message.fds))
        ends.append((pos, message.fds))
    bounds = sorted({min(sum(cuts[: i + 1]), len(stream)) for i in range(len(cuts))})
    bounds = sorted(set(bounds) | {end for end, fds in ends if fds} | {len(stream)})
    dec, closer = decoder()
    got: list[Message] = []
    start = 0
    for bound in bounds:
        chunk_fds = [f for end, mfds in ends if start < end <= bound for f in mfds]
        dec.receive_data(stream[start:bound], chunk_fds)
        start = bound
        while isinstance(decoded := dec.next_message(), Message):
            got.append(decoded)
    assert got == want
    assert closer.closed == []


@settings(max_examples=300, deadline=None)
@given(
    request=st.sampled_from(sorted(SAMPLES)),
    position=st.integers(min_value=0, max_value=200),
    value=st.integers(min_value=0, max_value=255),
    extra_fds=st.integers(min_value=-1, max_value=1),
)
def test_fuzz_mutated_messages(request: Request, position: int, value: int, extra_fds: int) -> None:
    payload, nfds = SAMPLES[request]
    data = bytearray(encode_request(request, payload, fds=range(nfds)))
    data[position % len(data)] = value
    fds = list(range(100, 100 + max(0, nfds + extra_fds)))
    dec, closer = decoder()
    dec.receive_data(bytes(data), fds)
    dec.receive_data(b"")
    delivered: list[int] = []
    try:
        while isinstance(message := dec.next_message(), Message):
            delivered += message.fds
            # Whatever decodes can be encoded again and decodes to the same message.
            again, _ = decoder()
            again.receive_data(
                encode_request(
                    message.request,
                    message.payload,
                    need_reply=message.need_reply,
                    fds=message.fds,
                ),
                message.fds,
            )
            assert again.next_message() == message
    except RemoteProtocolError:
        assert dec.state is DecoderState.ERROR
    dec.close()
    assert sorted(delivered + closer.closed) == fds
