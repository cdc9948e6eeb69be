"""Fuzz harness for what arrives on an mpqemu link: the codec, and the record
the relay keeps of the proxy's messages.

An input is a role byte (bit 0: decode replies, as the relay reads a remote;
else requests, as it reads the proxy), a byte choosing which request a RET
answers (0: none, n: Command n-1), then chunks of the byte stream
(`Input.records`: u16 length, u8 tag, bytes); a chunk's tag & 15 says how
many fake fds arrive with it. Invariants: only MpqemuError leaves the
decoder; a decoded message re-encodes to a message of the same length that
decodes to itself; every fd handed in ends in exactly one place (in a
message or closed); requests fed to a `Record` give a replay plan that keeps
its rules (order, one swallowed RET per config write, the BAR-write rule),
and a closed record has closed every copy it made.
"""

from __future__ import annotations

from launcher.mpqemu.codec import (
    BarRead,
    BarWrite,
    Command,
    Decoder,
    DeviceReset,
    Message,
    MpqemuError,
    NeedData,
    PciConfigRead,
    PciConfigWrite,
    Region,
    Ret,
    Role,
    SetIrqfd,
    SyncSysmem,
    encode,
)
from launcher.mpqemu.record import Record

from .harness import Harness, Input, OneInput, record

MIB = 1 << 20


class Books:
    """Fake fds: those handed to the decoder, those the record copied, and
    where each went."""

    def __init__(self) -> None:
        self.next = 1000
        self.given: list[int] = []
        self.closed: list[int] = []
        self.copies: set[int] = set()

    def new(self, count: int) -> list[int]:
        fds = list(range(self.next, self.next + count))
        self.next += count
        self.given += fds
        return fds

    def close(self, fd: int) -> None:
        self.closed.append(fd)

    def dup(self, fd: int) -> int:
        self.next += 1
        self.copies.add(self.next)
        return self.next

    def close_copy(self, fd: int) -> None:
        self.copies.remove(fd)  # KeyError: not a live copy


# --- seeds: what QEMU 7.2's proxy and remote send -------------------------------------


def _setup() -> list[Message]:
    return [
        SyncSysmem((Region(0, 128 * MIB, 0), Region(4 << 30, 64 * MIB, 128 * MIB)), (0, 0)),
        SetIrqfd(0, 0),
        PciConfigRead(0x00, 0, 4),
        PciConfigWrite(0x10, 0xFFFFFFFF, 4),
        PciConfigRead(0x10, 0, 4),
        PciConfigWrite(0x10, 0xC000, 4),
        PciConfigWrite(0x14, 0xFEBF1000, 4),
        PciConfigWrite(0x04, 0x0007, 2),
    ]


def _io() -> list[Message]:
    return [
        BarRead(0xC014, 0, 1, False),
        BarWrite(0xC014, 0x40, 1, False),
        BarWrite(0xFEBF1010, 0x0010_0000, 4, True),
        BarWrite(0xC02C, 0x0010_0000, 4, False),
        DeviceReset(),
        SyncSysmem((Region(0, 192 * MIB, 0),), (0,)),
    ]


def _stream(messages: list[Message]) -> bytes:
    return b"".join(record(len(m.fds), encode(m)) for m in messages)


def _seeds() -> list[bytes]:
    split = encode(_setup()[0])
    replies: list[Message] = [Ret(0x0012_1000), Ret(0), Ret(0xFFFFFF01), Ret(0), Ret(0)]
    return [
        b"\0\0" + _stream(_setup()),
        b"\0\0" + _stream(_setup() + _io()),
        b"\0\0" + record(2, split[:10]) + record(0, split[10:]),
        b"\1\0" + _stream(replies),
        b"\1" + bytes((Command.DEVICE_RESET + 1,)) + _stream([Ret(None)]),
    ]


# --- the target ----------------------------------------------------------------------


def _check_message(message: Message, role: Role, length: int) -> None:
    assert (message.command is Command.RET) == (role is Role.REPLIES), message
    data = encode(message)
    assert len(data) == length, (message, len(data), length)
    again = Decoder(role, lambda fd: None)
    again.receive_data(data, list(message.fds))
    assert again.next_message(Command.DEVICE_RESET) == message


def _feed(rec: Record, message: Message, after_loss: bool) -> None:
    """One proxy message into the record, as the relay would; then the plan."""
    if isinstance(message, SyncSysmem | SetIrqfd):
        rec.note(message)
    elif not isinstance(message, Ret):
        if rec.pending is not None:
            rec.replied()
        rec.request(message)
    plan = rec.replay_plan(after_loss)
    kinds = [type(m) for m in plan.setup]
    expected = ([SyncSysmem] if rec.sysmem else []) + ([SetIrqfd] if rec.irqfd else [])
    assert kinds[: len(expected)] == expected, kinds
    assert all(k is PciConfigWrite for k in kinds[len(expected):]), kinds
    assert plan.local_replies == len(kinds) - len(expected)
    assert len({(w.addr, w.len) for w in rec.config_writes}) == len(rec.config_writes)
    if after_loss and isinstance(rec.pending, BarWrite):
        assert plan.resend is None and plan.answer == Ret(0)
    else:
        assert plan.resend == rec.pending and plan.answer is None


def _make() -> OneInput:
    def one_input(data: bytes) -> None:
        inp = Input(data)
        role = Role.REPLIES if inp.u8() & 1 else Role.REQUESTS
        pick = inp.u8() % 9
        reply_to = None if pick == 0 else Command(pick - 1)
        books = Books()
        decoder = Decoder(role, books.close)
        rec = Record(books.dup, books.close_copy)
        handed: list[int] = []
        fed = 0
        try:
            for tag, chunk in [*inp.records(), (0, b"")]:
                decoder.receive_data(chunk, books.new(tag & 15))
                fed += len(chunk)
                while True:
                    before = decoder.buffered
                    message = decoder.next_message(reply_to)
                    if isinstance(message, NeedData) or not isinstance(message, Message):
                        break
                    handed += message.fds
                    _check_message(message, role, before - decoder.buffered)
                    if role is Role.REQUESTS:
                        _feed(rec, message, after_loss=bool(tag & 16))
        except MpqemuError:
            pass
        decoder.close()
        rec.close()
        assert sorted(handed + books.closed) == sorted(books.given), "an fd went astray"
        assert not books.copies, "the closed record still holds copies"

    return one_input


MPQEMU = Harness(
    "mpqemu",
    "mpqemu framing, payload and fd checks and the relay's record (launcher.mpqemu)",
    _make,
    _seeds,
    max_len=2048,
)
