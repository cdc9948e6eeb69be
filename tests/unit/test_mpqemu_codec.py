"""The mpqemu codec: every rule refuses its own bad input, fds never leak.

Fds here are bare numbers; `Books` records which ones the decoder closed, so
a test can prove each fd handed in ended in exactly one place.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from launcher.mpqemu.codec import (
    CONNECTION_CLOSED,
    HEADER,
    MAX_MESSAGE_FDS,
    NEED_DATA,
    BarRead,
    BarWrite,
    Command,
    ConnectionClosed,
    Decoder,
    DecoderState,
    DeviceReset,
    LocalProtocolError,
    Message,
    MpqemuError,
    NeedData,
    PciConfigRead,
    PciConfigWrite,
    Region,
    RemoteProtocolError,
    Ret,
    Role,
    SetIrqfd,
    SyncSysmem,
    encode,
)

GIB = 1 << 30
SYSMEM = struct.Struct("=8Q8Q8q")
CONFIG = struct.Struct("=IIi")
BAR = struct.Struct("=QQIB3x")


class Books:
    """Fake fds and the record of which the decoder closed."""

    def __init__(self) -> None:
        self.next = 100
        self.closed: list[int] = []

    def fds(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out

    def close(self, fd: int) -> None:
        assert fd not in self.closed, f"fd {fd} closed twice"
        self.closed.append(fd)


def raw(cmd: int, body: bytes, size: int | None = None) -> bytes:
    return HEADER.pack(cmd, len(body) if size is None else size) + body


def sysmem_body(regions: list[tuple[int, int, int]]) -> bytes:
    slots = regions + [(0, 0, 0)] * (8 - len(regions))
    return SYSMEM.pack(*(r[0] for r in slots), *(r[1] for r in slots), *(r[2] for r in slots))


def drain(decoder: Decoder) -> list[Message]:
    """Every complete message buffered."""
    out: list[Message] = []
    while True:
        message = decoder.next_message()
        if message is NEED_DATA:
            return out
        assert message is not CONNECTION_CLOSED
        assert isinstance(message, SyncSysmem | Ret | PciConfigWrite | PciConfigRead | BarWrite
                          | BarRead | SetIrqfd | DeviceReset)
        out.append(message)


def decode_one(data: bytes, nfds: int = 0, role: Role = Role.REQUESTS,
               reply_to: Command | None = None) -> tuple[Message, Books]:
    books = Books()
    decoder = Decoder(role, books.close)
    decoder.receive_data(data, books.fds(nfds))
    message = decoder.next_message(reply_to)
    assert not isinstance(message, NeedData | ConnectionClosed), message
    return message, books


def refused(data: bytes, nfds: int = 0, role: Role = Role.REQUESTS,
            reply_to: Command | None = None) -> str:
    """Decode `data` expecting a refusal: every fd closed, error sticky."""
    books = Books()
    decoder = Decoder(role, books.close)
    fds = books.fds(nfds)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.receive_data(data, fds)
        decoder.next_message(reply_to)
    assert sorted(books.closed) == fds, "every fd of a refused message is closed"
    assert decoder.state is DecoderState.ERROR
    late = books.fds(2)
    with pytest.raises(RemoteProtocolError):
        decoder.receive_data(encode(DeviceReset()), late)
    assert books.closed[-2:] == late, "fds arriving after an error are closed"
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()
    return str(info.value)


# --- good messages ------------------------------------------------------------

GOOD: list[Message] = [
    SyncSysmem((Region(0, 2 * GIB, 0), Region(4 * GIB, GIB, 2 * GIB)), (3, 4)),
    PciConfigWrite(0x04, 0x0107, 2),
    PciConfigRead(0x00, 0, 4),
    PciConfigWrite(0xFF, 0xAB, 1),
    BarWrite(0xFEBF1000, 0x12345678, 4, True),
    BarRead(0xC000, 0, 1, False),
    BarRead(2**64 - 8, 0, 8, True),
    SetIrqfd(5, 6),
    DeviceReset(),
]


@pytest.mark.parametrize("message", GOOD, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    data = encode(message)
    decoded, books = decode_one(data, len(message.fds))
    assert type(decoded) is type(message)
    assert encode(decoded) == data
    if not message.fds:
        assert decoded == message
    assert books.closed == []


def test_wire_sizes_are_qemu_72s() -> None:
    assert len(encode(DeviceReset())) == 16
    assert len(encode(PciConfigWrite(0, 0, 4))) == 16 + 12
    assert len(encode(BarRead(0, 0, 4, True))) == 16 + 24
    assert len(encode(GOOD[0])) == 16 + 192
    assert len(encode(Ret(0))) == 16 + 8 and len(encode(Ret(None))) == 16
    assert encode(BarWrite(1, 2, 4, True))[:16] == struct.pack("=i4xQ", 4, 24)


@pytest.mark.parametrize("value,reply_to", [
    (7, Command.BAR_READ), (0, Command.PCI_CFGWRITE), (2**64 - 1, None),
    (None, Command.DEVICE_RESET), (0, Command.DEVICE_RESET),
])
def test_replies(value: int | None, reply_to: Command | None) -> None:
    message, _ = decode_one(encode(Ret(value)), role=Role.REPLIES, reply_to=reply_to)
    assert message == Ret(value)


def test_fds_go_to_the_message_whose_bytes_carried_them() -> None:
    """Reads as recvmsg gives them: a message's fds come with the first read
    that reaches its bytes, and that read ends inside the message; a read
    may start with the previous message's tail. Cuts at random places."""
    rng = random.Random(7)
    messages: list[Message] = [SetIrqfd(0, 0), PciConfigWrite(4, 6, 2), GOOD[0], DeviceReset()]
    for _ in range(300):
        books = Books()
        decoder = Decoder(Role.REQUESTS, books.close)
        fds = [books.fds(len(m.fds)) for m in messages]
        tail = b""
        out: list[Message] = []
        for message, batch in zip(messages, fds, strict=True):
            data = encode(message)
            cut = rng.randint(1, len(data))
            for chunk, chunk_fds in ((tail + data[:cut], batch), (b"", [])):
                if chunk:
                    decoder.receive_data(chunk, chunk_fds)
                out += drain(decoder)
            tail = data[cut:]
        if tail:
            decoder.receive_data(tail)
        out += drain(decoder)
        assert [type(m) for m in out] == [type(m) for m in messages]
        assert [list(m.fds) for m in out] == fds
        assert books.closed == [] and decoder.pending_fds == 0


def test_end_of_stream_between_messages() -> None:
    decoder = Decoder(Role.REQUESTS, Books().close)
    decoder.receive_data(encode(DeviceReset()))
    decoder.receive_data(b"")
    assert decoder.next_message() == DeviceReset()
    assert decoder.next_message() is CONNECTION_CLOSED


def test_close_closes_fds_not_handed_out() -> None:
    books = Books()
    decoder = Decoder(Role.REQUESTS, books.close)
    data = encode(SetIrqfd(0, 0))
    fds = books.fds(2)
    decoder.receive_data(data[:10], fds)  # the fds came, the message has not
    assert decoder.next_message() is NEED_DATA
    decoder.close()
    assert books.closed == fds
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x", books.fds(1))
    assert len(books.closed) == 3


def test_real_fds_do_not_leak() -> None:
    """With real fds and os.close: a refused SYNC_SYSMEM leaves nothing open."""
    r, w = os.pipe()
    fds = [os.dup(r) for _ in range(3)]
    os.close(r)
    os.close(w)
    decoder = Decoder(Role.REQUESTS, os.close)
    data = raw(0, sysmem_body([(0, GIB, 0), (GIB, GIB, GIB)]))  # 2 regions, 3 fds
    with pytest.raises(RemoteProtocolError):
        decoder.receive_data(data, fds)
        decoder.next_message()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


# --- every rule, its own bad input --------------------------------------------------


def test_unknown_command() -> None:
    assert "unknown command 8" in refused(raw(8, b""))
    assert "unknown command -1" in refused(raw(-1, b""))


def test_payload_larger_than_the_union() -> None:
    assert "at most 192" in refused(raw(0, b"", size=193))
    assert "at most 192" in refused(raw(0, b"", size=2**63))


@pytest.mark.parametrize("cmd,size", [
    (0, 184), (2, 8), (2, 16), (3, 11), (4, 16), (5, 32), (6, 8), (7, 8),
])
def test_payload_size_per_command(cmd: int, size: int) -> None:
    nfds = {0: 1, 6: 2}.get(cmd, 0)
    assert f"payload is {size} bytes" in refused(raw(cmd, bytes(size)), nfds)


def test_ret_from_the_proxy_and_requests_from_the_remote() -> None:
    assert "a reply where a request" in refused(encode(Ret(0)))
    assert "a request where a reply" in refused(encode(BarRead(0, 0, 4, True)), role=Role.REPLIES)


def test_ret_sizes() -> None:
    assert "carries 8" in refused(raw(1, b""), role=Role.REPLIES, reply_to=Command.BAR_READ)
    assert "carries 8" in refused(raw(1, b""), role=Role.REPLIES)
    assert "carries 0 or 8" in refused(raw(1, bytes(4)), role=Role.REPLIES,
                                       reply_to=Command.DEVICE_RESET)
    assert "payload is 16" in refused(raw(1, bytes(16)), role=Role.REPLIES)


def test_ret_with_fds() -> None:
    assert "must carry 0" in refused(encode(Ret(0)), 1, role=Role.REPLIES)


@pytest.mark.parametrize("message,nfds", [
    (PciConfigWrite(0, 0, 4), 1), (PciConfigRead(0, 0, 4), 1), (BarWrite(0, 0, 4, True), 1),
    (BarRead(0, 0, 4, True), 2), (DeviceReset(), 1), (SetIrqfd(0, 0), 1),
    (SetIrqfd(0, 0), 3), (SetIrqfd(0, 0), 0),
])
def test_fd_count_per_command(message: Message, nfds: int) -> None:
    assert f"came with {nfds} fds" in refused(encode(message), nfds)


def test_sync_sysmem_fds() -> None:
    two = raw(0, sysmem_body([(0, GIB, 0), (GIB, GIB, GIB)]))
    assert "came with 0 fds" in refused(two, 0)
    assert "came with 1 fds" in refused(two, 1)
    assert "came with 3 fds" in refused(two, 3)
    eight = raw(0, sysmem_body([(i * GIB, GIB, i * GIB) for i in range(8)]))
    assert "8 fds, at most 7" in refused(eight, 8)
    assert MAX_MESSAGE_FDS == 7


def test_sync_sysmem_regions() -> None:
    assert "no region has a size" in refused(raw(0, sysmem_body([])), 1)
    gap = sysmem_body([(0, 0, 0), (GIB, GIB, 0)])
    assert "from 0 on" in refused(raw(0, gap), 1)
    junk = sysmem_body([(0, GIB, 0), (0x1000, 0, 0)])  # unused slot, not zero
    assert "from 0 on" in refused(raw(0, junk), 1)
    assert "wraps" in refused(raw(0, sysmem_body([(2**64 - GIB, 2 * GIB, 0)])), 1)
    assert "offset -4096" in refused(raw(0, sysmem_body([(0, GIB, -4096)])), 1)
    assert "offset" in refused(raw(0, sysmem_body([(0, GIB, 2**63 - 4096)])), 1)


@pytest.mark.parametrize("cmd", [2, 3])
def test_config_access(cmd: int) -> None:
    for length in (0, 3, 8, -1):
        assert f"of {length} bytes" in refused(raw(cmd, CONFIG.pack(0, 0, length)))
    assert "outside" in refused(raw(cmd, CONFIG.pack(254, 0, 4)))
    assert "outside" in refused(raw(cmd, CONFIG.pack(256, 0, 1)))
    assert "outside" in refused(raw(cmd, CONFIG.pack(2**32 - 1, 0, 2)))


@pytest.mark.parametrize("cmd", [4, 5])
def test_bar_access(cmd: int) -> None:
    for size in (0, 3, 16, 2**32 - 1):
        assert f"of {size} bytes" in refused(raw(cmd, BAR.pack(0, 0, size, 1)))
    assert "memory flag is 2" in refused(raw(cmd, BAR.pack(0, 0, 4, 2)))


def test_stream_ends_inside_a_message() -> None:
    for data in (encode(DeviceReset())[:7], encode(PciConfigRead(0, 0, 4))[:20]):
        books = Books()
        decoder = Decoder(Role.REQUESTS, books.close)
        decoder.receive_data(data, books.fds(1))
        decoder.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="stream ended inside"):
            decoder.next_message()
        assert books.closed == [100]


def test_fds_without_bytes() -> None:
    books = Books()
    decoder = Decoder(Role.REQUESTS, books.close)
    with pytest.raises(RemoteProtocolError, match="without bytes"):
        decoder.receive_data(b"", books.fds(1))
    assert books.closed == [100]


def test_data_after_end_of_stream() -> None:
    books = Books()
    decoder = Decoder(Role.REQUESTS, books.close)
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x", books.fds(1))
    assert books.closed == [100]


def test_errors_say_what_was_wrong() -> None:
    error = refused(raw(2, CONFIG.pack(0, 0, 3)))
    assert error.startswith("PCI_CFGWRITE: ") and "3 bytes" in error
    assert isinstance(RemoteProtocolError("x"), MpqemuError)


# --- messages check themselves ----------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: PciConfigWrite(0, 0, 3),
    lambda: PciConfigRead(255, 0, 2),
    lambda: PciConfigWrite(0, 2**32, 4),
    lambda: BarWrite(0, 0, 5, True),
    lambda: BarRead(-1, 0, 4, True),
    lambda: BarWrite(0, 2**64, 8, False),
    lambda: Region(0, 0, 0),
    lambda: Region(2**64 - 1, 2, 0),
    lambda: Region(0, 1, -1),
    lambda: SyncSysmem((), ()),
    lambda: SyncSysmem((Region(0, 1, 0),), (1, 2)),
    lambda: SyncSysmem(tuple(Region(i, 1, 0) for i in range(8)), tuple(range(8))),
    lambda: Ret(-1),
])
def test_invalid_messages_cannot_be_built(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


# --- fd books under random splits and corruption ------------------------------------------


def test_every_fd_ends_in_one_place_under_corruption() -> None:
    rng = random.Random(11)
    messages: list[Message] = [*GOOD, Ret(0)]
    for _ in range(400):
        books = Books()
        decoder = Decoder(Role.REQUESTS, books.close)
        handed: list[int] = []
        given: list[int] = []
        try:
            for _ in range(rng.randint(1, 5)):
                message = rng.choice(messages)
                data = bytearray(encode(message))
                if rng.random() < 0.3:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                fds = books.fds(rng.choice([len(message.fds), len(message.fds), 1, 3]))
                given += fds
                cut = rng.randrange(1, len(data) + 1)
                decoder.receive_data(bytes(data[:cut]), fds)
                if cut < len(data):
                    decoder.receive_data(bytes(data[cut:]))
                for m in drain(decoder):
                    handed += m.fds
        except MpqemuError:
            pass
        decoder.close()
        assert sorted(handed + books.closed) == sorted(given)
