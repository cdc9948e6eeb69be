"""The control protocol codec: wire layout, round trips, and hostile datagrams."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.heartbeat.protocol import (
    HEADER,
    MAGIC,
    MAX_CONTROLLERS,
    MAX_DATAGRAM,
    MAX_FDS,
    MAX_PROGRESS_ENTRIES,
    MAX_RINGS,
    U32_MAX,
    U64_MAX,
    VERSION,
    Assign,
    Assigned,
    Command,
    CommandOp,
    ControlProtocolError,
    ControlSessionError,
    LocalControlError,
    LunAdd,
    LunRemove,
    LunResize,
    LunResizeCheck,
    Message,
    MessageType,
    Ping,
    Pong,
    QueueProgress,
    Ready,
    RemoteControlError,
    Result,
    Sender,
    Shutdown,
    decode,
    encode,
    message_type,
)

# -- wire layout ----------------------------------------------------------------


def test_ping_wire_layout_is_pinned() -> None:
    datagram, fds = encode(Ping(seq=7, sent_ns=0x0102030405060708))
    assert fds == []
    assert datagram == (
        b"MH" + bytes([VERSION, MessageType.PING]) + (7).to_bytes(4, "little")
        + (0x0102030405060708).to_bytes(8, "little")
    )


def test_pong_wire_layout_is_pinned() -> None:
    pong = Pong(9, 5, (QueueProgress(1, 2, 3, 4),))
    datagram, _ = encode(pong)
    assert datagram[:8] == HEADER.pack(MAGIC, VERSION, MessageType.PONG, 9)
    assert datagram[8:] == struct.pack("<QH", 5, 1) + struct.pack("<BHQI", 1, 2, 3, 4)


def test_ready_flags_on_the_wire() -> None:
    assert encode(Ready(1234, True))[0][8:] == struct.pack("<IB", 1234, 1)
    assert encode(Ready(1234, False))[0][8:] == struct.pack("<IB", 1234, 0)


# -- round trips ------------------------------------------------------------------

EXAMPLES: list[Message] = [
    Ready(pid=4242, locked_down=True, seq=1),
    Ready(pid=U32_MAX, locked_down=False),
    Assign('{"id":"e0","controllers":[]}', fds=(5, 6, 7), seq=2),
    Assign("{}"),
    Assigned(ok=True, seq=3),
    Assigned(ok=False, error="controller scsi0: bad fd \u00e9", seq=3),
    Ping(seq=U32_MAX, sent_ns=U64_MAX),
    Pong(seq=1, sent_ns=0),
    Pong(
        seq=2, sent_ns=99,
        progress=(QueueProgress(0, 2, U64_MAX, U32_MAX), QueueProgress(15, 17, 0, 0)),
    ),
    Shutdown(seq=8),
    LunAdd("scsi0", 3, "d3", fd=9, readonly=True, block_size=4096, seq=10),
    LunAdd("c\u00e9", 0, "x", fd=0, readonly=False, block_size=512),
    LunRemove("scsi0", 255, seq=11),
    LunResizeCheck("scsi0", 7, U64_MAX, seq=12),
    LunResize("scsi0", 7, 1 << 30, seq=U32_MAX),
    Result(ok=True, seq=12),
    Result(ok=False, error="no LUN 7 on scsi0", seq=13),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_examples_round_trip(message: Message) -> None:
    datagram, fds = encode(message)
    assert len(datagram) <= MAX_DATAGRAM
    assert decode(datagram, fds) == message


def test_lun_add_wire_layout_is_pinned() -> None:
    datagram, fds = encode(LunAdd("c0", 0x0102, "disk", fd=42, readonly=True, block_size=4096,
                                  seq=5))
    assert fds == [42]
    assert datagram == (
        b"MH" + bytes([VERSION, MessageType.COMMAND]) + (5).to_bytes(4, "little")
        + bytes([1, CommandOp.LUN_ADD]) + b"\x02\x01" + b"\x02c0"
        + b"\x01" + (4096).to_bytes(4, "little") + b"\x04disk"
    )
    # The fd travels beside the bytes: the receiver's number is the one decoded.
    assert decode(datagram, [7]) == LunAdd("c0", 0x0102, "disk", 7, True, 4096, 5)


def test_resize_wire_layout_is_pinned() -> None:
    datagram, fds = encode(LunResize("c0", 1, 1 << 33, seq=6))
    assert fds == []
    assert datagram[8:] == bytes([0, CommandOp.LUN_RESIZE, 1, 0, 2]) + b"c0" + (
        (1 << 33).to_bytes(8, "little"))


@pytest.mark.parametrize("command", [m for m in EXAMPLES if isinstance(m, Command)],
                         ids=lambda m: type(m).__name__)
def test_commands_are_commands_and_only_the_launcher_sends_them(command: Message) -> None:
    assert message_type(command) is MessageType.COMMAND
    datagram, fds = encode(command)
    assert decode(datagram, fds, sender=Sender.LAUNCHER) == command
    with pytest.raises(RemoteControlError, match="the emulator does not send COMMAND"):
        decode(datagram, fds, sender=Sender.EMULATOR)


def test_assign_fds_travel_beside_the_bytes() -> None:
    datagram, fds = encode(Assign("[1]", fds=(10, 11)))
    assert fds == [10, 11]
    assert decode(datagram, [20, 21]) == Assign("[1]", fds=(20, 21))


def _utf8_ok(message: Message) -> bool:
    texts = {Assign: ("config",), Assigned: ("error",), Result: ("error",),
             LunAdd: ("controller", "disk_id"), LunRemove: ("controller",),
             LunResizeCheck: ("controller",), LunResize: ("controller",)}
    try:
        for name in texts.get(type(message), ()):
            getattr(message, name).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


progress_entries = st.builds(
    QueueProgress,
    st.integers(0, MAX_CONTROLLERS - 1),
    st.integers(0, MAX_RINGS - 1),
    st.integers(0, U64_MAX),
    st.integers(0, U32_MAX),
)
seqs = st.integers(0, U32_MAX)
names = st.text(min_size=1, max_size=30)
luns = st.integers(0, 2**16 - 1)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ready, st.integers(1, U32_MAX), st.booleans(), seqs),
    st.builds(
        Assign, st.text(max_size=200), st.lists(st.integers(0, 2**31 - 1), max_size=8).map(tuple),
        seqs,
    ),
    st.builds(Assigned, st.just(True), st.just(""), seqs),
    st.builds(Assigned, st.just(False), st.text(min_size=1, max_size=200), seqs),
    st.builds(Ping, seqs, st.integers(0, U64_MAX)),
    st.builds(
        Pong, seqs, st.integers(0, U64_MAX),
        st.lists(progress_entries, max_size=40, unique_by=lambda p: p.key).map(tuple),
    ),
    st.builds(Shutdown, seqs),
    st.builds(LunAdd, names, luns, names, st.integers(0, 2**31 - 1), st.booleans(),
              st.integers(0, U32_MAX), seqs),
    st.builds(LunRemove, names, luns, seqs),
    st.builds(LunResizeCheck, names, luns, st.integers(0, U64_MAX), seqs),
    st.builds(LunResize, names, luns, st.integers(0, U64_MAX), seqs),
    st.builds(Result, st.just(True), st.just(""), seqs),
    st.builds(Result, st.just(False), st.text(min_size=1, max_size=200), seqs),
).filter(_utf8_ok)




@settings(max_examples=150, deadline=None)
@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    datagram, fds = encode(message)
    assert decode(datagram, fds) == message
    assert message_type(decode(datagram, fds)) is message_type(message)


# Random bytes behind a valid header too, so the payload parsers see them.
random_datagrams = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda kind, seq, payload: HEADER.pack(MAGIC, VERSION, kind, seq) + payload,
        st.integers(0, 8), seqs, st.binary(max_size=300),
    ),
)


@settings(max_examples=250, deadline=None)
@given(random_datagrams, st.lists(st.integers(0, 100), max_size=3))
def test_random_bytes_raise_only_remote_errors(data: bytes, fds: list[int]) -> None:
    with contextlib.suppress(RemoteControlError):
        decode(data, fds)


@settings(max_examples=150, deadline=None)
@given(messages, st.data())
def test_corrupted_datagrams_raise_only_remote_errors(
    message: Message, data: st.DataObject
) -> None:
    datagram, fds = encode(message)
    raw = bytearray(datagram)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decoded = decode(bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw), fds)
    except RemoteControlError:
        return
    # Whatever survived decodes to a message that encodes back to itself.
    again, again_fds = encode(decoded)
    assert decode(again, again_fds) == decoded


# -- hostile and broken datagrams --------------------------------------------------


def _good(message: Message | None = None) -> bytes:
    return encode(message if message is not None else Ping(1, 2))[0]


@pytest.mark.parametrize(
    "datagram,fds,match",
    [
        (b"", [], "shorter than the 8-byte header"),
        (b"MH\x01", [], "shorter than the 8-byte header"),
        (b"XX" + _good()[2:], [], "bad magic"),
        (_good()[:2] + b"\x02" + _good()[3:], [], "unsupported protocol version 2"),
        (_good()[:3] + b"\x00" + _good()[4:], [], "unknown message type 0"),
        (_good()[:3] + b"\x63" + _good()[4:], [], "unknown message type 99"),
        (_good() + b"\x00", [], "payload is 9 bytes, expected 8"),
        (_good()[:-1], [], "payload is 7 bytes, expected 8"),
        (_good(), [3], "1 fds arrived with a message that carries none"),
        (_good(Shutdown()) + b"x", [], "expected 0"),
        (_good(Ready(5, True))[:-1] + b"\x03", [], "unknown READY flags 0x03"),
        (_good(Ready(5, True))[:8] + struct.pack("<IB", 0, 0), [], "pid 0"),
        (_good(Assign("{}", (1, 2))), [1], "declares 2 fds but 1 arrived"),
        (_good(Assign("{}")), [4], "declares 0 fds but 1 arrived"),
        (_good(Assign("{}"))[:8], [], "expected at least 1"),
        (_good(Assign("{}")) + b"\xff", [], "config is not valid UTF-8"),
        (_good(Assigned(True))[:8] + b"\x02", [], "ok flag is 2"),
        (_good(Assigned(True)) + b"oops", [], "an ok ASSIGNED carries no error text"),
        (_good(Assigned(True))[:8] + b"\x00", [], "a failed ASSIGNED must say why"),
        (_good(Assigned(False, "x")) + b"\xc3", [], "error is not valid UTF-8"),
        (_good(Pong(1, 2))[:-1], [], "expected at least 10"),
        (_good(Pong(1, 2))[:8] + struct.pack("<QH", 2, 1), [], "payload is 10 bytes, expected 25"),
        (
            _good(Pong(1, 2))[:8] + struct.pack("<QH", 2, MAX_PROGRESS_ENTRIES + 1),
            [],
            "289 progress entries",
        ),
        (
            _good(Pong(1, 2))[:8] + struct.pack("<QH", 2, 1) + struct.pack("<BHQI", 16, 0, 0, 0),
            [],
            "controller = 16 is out of range",
        ),
        (
            _good(Pong(1, 2))[:8] + struct.pack("<QH", 2, 1) + struct.pack("<BHQI", 0, 18, 0, 0),
            [],
            "queue = 18 is out of range",
        ),
        (
            _good(Pong(1, 2))[:8] + struct.pack("<QH", 2, 2) + struct.pack("<BHQI", 0, 3, 0, 0) * 2,
            [],
            "queue 0.3 is reported twice",
        ),
        (_good() + bytes(MAX_DATAGRAM), [], "exceeds 65536"),
        (_good(LunRemove("c0", 1)), [3], "declares 0 fds but 1 arrived"),
        (_good(LunAdd("c0", 1, "d", 3, False, 512)), [], "declares 1 fds but 0 arrived"),
        (_good(LunRemove("c0", 1))[:8] + bytes([1, 2, 1, 0, 2]) + b"c0", [3],
         "LUN_REMOVE carries 0 fds, not 1"),
        (_good(LunAdd("c0", 1, "d", 3, False, 512))[:8] + bytes([0, 1, 1, 0, 2]) + b"c0"
         + struct.pack("<BIB", 0, 512, 1) + b"d", [], "LUN_ADD carries 1 fds, not 0"),
        (_good(LunRemove("c0", 1))[:8] + bytes([0, 9, 1, 0, 2]) + b"c0", [],
         "unknown command op 9"),
        (_good(LunRemove("c0", 1))[:12], [], "payload ends inside the header"),
        (_good(LunRemove("c0", 1))[:-1], [], "payload ends inside the controller id"),
        (_good(LunRemove("c0", 1))[:8] + bytes([0, 2, 1, 0, 0]), [], "controller must not be"),
        (_good(LunRemove("c0", 1)) + b"!", [], "1 bytes after the end of LUN_REMOVE"),
        (_good(LunResize("c0", 1, 5))[:-1], [], "payload ends inside the size"),
        (_good(LunResizeCheck("c0", 1, 5))[:-8] + b"\xff" * 9, [], "1 bytes after the end"),
        (_good(LunAdd("c0", 1, "d", 3, False, 512))[:-7] + struct.pack("<BIB", 2, 512, 1) + b"d",
         [3],
         "unknown LUN_ADD flags 0x02"),
        (_good(LunAdd("c0", 1, "d", 3, False, 512))[:-1], [3], "ends inside the disk id"),
        (_good(LunRemove("c0", 1))[:-2] + b"\xff\xfe", [], "controller id is not valid UTF-8"),
        (_good(Result(True))[:8] + b"\x00", [], "RESULT .*must say why"),
    ],
)
def test_bad_datagrams_are_remote_errors(datagram: bytes, fds: list[int], match: str) -> None:
    with pytest.raises(RemoteControlError, match=match) as info:
        decode(datagram, fds)
    assert not isinstance(info.value, ControlSessionError)  # syntax, not session


def test_errors_name_the_message_and_keep_the_bytes() -> None:
    datagram = _good(Ping(77, 1)) + b"!"
    with pytest.raises(RemoteControlError) as info:
        decode(datagram, [])
    assert info.value.message_type is MessageType.PING
    assert info.value.seq == 77
    assert info.value.datagram == datagram
    assert str(info.value).startswith("PING (seq 77): ")


@pytest.mark.parametrize(
    "message,sender,ok",
    [
        (Ping(1, 1), Sender.LAUNCHER, True),
        (Ping(1, 1), Sender.EMULATOR, False),
        (Ready(3, True), Sender.EMULATOR, True),
        (Ready(3, True), Sender.LAUNCHER, False),
        (Shutdown(), Sender.EMULATOR, False),
        (Pong(1, 1), Sender.LAUNCHER, False),
    ],
)
def test_sender_check(message: Message, sender: Sender, ok: bool) -> None:
    datagram, fds = encode(message)
    if ok:
        assert decode(datagram, fds, sender=sender) == message
    else:
        with pytest.raises(RemoteControlError, match=f"the {sender.value} does not send"):
            decode(datagram, fds, sender=sender)


# -- local errors: building what the protocol forbids --------------------------------


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: Ping(-1, 0), "seq = -1 is out of range"),
        (lambda: Ping(U32_MAX + 1, 0), "out of range"),
        (lambda: Ping(1, U64_MAX + 1), "sent_ns"),
        (lambda: Ping(True, 0), "seq must be an int"),
        (lambda: Ready(0, True), "pid 0"),
        (lambda: Ready(1, 1),  # type: ignore[arg-type]
         "locked_down must be a bool"),
        (lambda: Assign("{}", (1,) * (MAX_FDS + 1)), "254 fds"),
        (lambda: Assign("{}", (-1,)), "fd = -1"),
        (lambda: Assign("{}", [1]),  # type: ignore[arg-type]
         "fds must be a tuple"),
        (lambda: Assign("\ud800"), "not encodable as UTF-8"),
        (lambda: Assign("x" * MAX_DATAGRAM), "more than"),
        (lambda: Assigned(True, "no"), "carries no error text"),
        (lambda: Assigned(False), "must say why"),
        (lambda: QueueProgress(MAX_CONTROLLERS, 0, 0, 0), "controller"),
        (lambda: QueueProgress(0, 0, -1, 0), "completed"),
        (lambda: Pong(1, 1, (QueueProgress(0, 0, 0, 0),) * 2), "reported twice"),
        (lambda: Pong(1, 1, [QueueProgress(0, 0, 0, 0)]),  # type: ignore[arg-type]
         "progress must be a tuple"),
        (lambda: Shutdown(seq=-5), "seq"),
        (lambda: LunAdd("", 0, "d", 3, False, 512), "controller must not be empty"),
        (lambda: LunAdd("c", 0, "", 3, False, 512), "disk_id must not be empty"),
        (lambda: LunAdd("c", 0, "d" * 256, 3, False, 512), "disk_id is 256 bytes"),
        (lambda: LunAdd("c", 1 << 16, "d", 3, False, 512), "lun = 65536"),
        (lambda: LunAdd("c", 0, "d", -1, False, 512), "fd = -1"),
        (lambda: LunAdd("c", 0, "d", 3, 1, 512),  # type: ignore[arg-type]
         "readonly must be a bool"),
        (lambda: LunAdd("c", 0, "d", 3, False, -512), "block_size"),
        (lambda: LunRemove("c", -1), "lun = -1"),
        (lambda: LunResizeCheck("c", 0, -1), "size = -1"),
        (lambda: LunResize("c", 0, U64_MAX + 1), "size"),
        (lambda: LunResize("c", 0, 1, seq=-1), "seq"),
    ],
)
def test_building_a_bad_message_is_a_local_error(build: object, match: str) -> None:
    assert callable(build)
    with pytest.raises(LocalControlError, match=match):
        build()


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(LocalControlError, match="not a control message: str"):
        encode("PING")  # type: ignore[arg-type]


def test_largest_messages_fit_one_datagram() -> None:
    config = "[" + "0" * (MAX_DATAGRAM - 8 - 1 - 2) + "]"
    datagram, _ = encode(Assign(config))
    assert len(datagram) == MAX_DATAGRAM
    assert decode(datagram, []) == Assign(config)
    with pytest.raises(LocalControlError):
        Assign(config + " ")
    every_queue = tuple(
        QueueProgress(c, q, c * 100 + q, q)
        for c in range(MAX_CONTROLLERS)
        for q in range(MAX_RINGS)
    )
    pong = Pong(1, 2, every_queue)
    datagram, _ = encode(pong)
    assert len(datagram) < MAX_DATAGRAM
    assert decode(datagram, []) == pong


def test_error_tree() -> None:
    assert issubclass(LocalControlError, ControlProtocolError)
    assert issubclass(RemoteControlError, ControlProtocolError)
    assert issubclass(ControlSessionError, RemoteControlError)
    assert not issubclass(LocalControlError, RemoteControlError)
