"""The state channel, sans-I/O: two endpoints joined by a fake link, and
hostile input (bad magic, another version, oversized and truncated frames,
messages out of order), each ending in a clear error."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.migration.channel import (
    CHANNEL_VERSION,
    MAGIC,
    MAX_JSON_BODY,
    MAX_STATE_BODY,
    NEED_DATA,
    Abort,
    Accept,
    Channel,
    ChannelClosed,
    DiskInfo,
    Done,
    EmulatorInfo,
    Failed,
    FrameType,
    Hello,
    Kind,
    LocalProtocolError,
    Refuse,
    RemoteProtocolError,
    Role,
    Running,
    State,
    StateBlob,
    classify,
)

HELLO = Hello("src", (DiskInfo("d0", "scsi0", 0, 8 << 20, 512, False),),
              (EmulatorInfo("disk-proc", "scsi", ("scsi0",), 4096),), 3, "mplaunch 1")
PREAMBLE = MAGIC + struct.pack(">I", CHANNEL_VERSION)


def pair() -> tuple[Channel, Channel]:
    source, dest = Channel(Role.SOURCE), Channel(Role.DESTINATION)
    dest.receive_data(source.initiate())
    source.receive_data(dest.initiate())
    return source, dest


def deliver(to: Channel, data: bytes) -> list[object]:
    to.receive_data(data)
    out = []
    while (event := to.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body), kind) + body


def test_a_whole_migration_conversation() -> None:
    source, dest = pair()
    assert deliver(dest, source.send(HELLO)) == [HELLO]
    assert deliver(source, dest.send(Accept("dst"))) == [Accept("dst")]
    blob = StateBlob("disk-proc", 3, bytes(range(256)) * 16)
    got = deliver(dest, source.send(blob) + source.send(Done(1)))
    assert got == [blob, Done(1)]
    assert deliver(source, dest.send(Running())) == [Running()]
    assert source.state is dest.state is State.CLOSED
    source.receive_data(b"")
    assert source.next_event() == ChannelClosed(clean=True)


def test_byte_by_byte_delivery_gives_the_same_messages() -> None:
    source, dest = Channel(Role.SOURCE), Channel(Role.DESTINATION)
    data = source.initiate() + source.send(HELLO)
    events = []
    for i in range(len(data)):
        dest.receive_data(data[i:i + 1])
        while (event := dest.next_event()) is not NEED_DATA:
            events.append(event)
    assert events == [HELLO]


def test_refusal_ends_the_conversation() -> None:
    source, dest = pair()
    deliver(dest, source.send(HELLO))
    assert deliver(source, dest.send(Refuse("disk d0: 1 bytes here, 2 at the source"))) == [
        Refuse("disk d0: 1 bytes here, 2 at the source")]
    with pytest.raises(LocalProtocolError, match="may not send STATE"):
        source.send(StateBlob("disk-proc", 3, b""))


def test_abort_after_done_still_takes_the_destinations_last_word() -> None:
    source, dest = pair()
    deliver(dest, source.send(HELLO))
    deliver(source, dest.send(Accept("dst")))
    deliver(dest, source.send(Done(0)))
    source.send(Abort("no answer"))
    assert source.state is State.ABORTING
    assert deliver(source, dest.send(Running())) == [Running()]


def test_destination_may_fail_during_transfer() -> None:
    source, dest = pair()
    deliver(dest, source.send(HELLO))
    deliver(source, dest.send(Accept("dst")))
    assert deliver(source, dest.send(Failed("QEMU exited"))) == [Failed("QEMU exited")]


@pytest.mark.parametrize("bad", [b"XXXXXXXX", b"QEVM\0\0\0\3", b"MPLMIGR!"])
def test_bad_magic_is_named(bad: bytes) -> None:
    dest = Channel(Role.DESTINATION)
    dest.receive_data(bad + struct.pack(">I", CHANNEL_VERSION))
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        dest.next_event()
    assert dest.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="broken"):
        dest.next_event()


def test_a_bad_magic_is_seen_before_the_preamble_is_whole() -> None:
    dest = Channel(Role.DESTINATION)
    dest.receive_data(b"GET ")
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        dest.next_event()


def test_another_version_is_refused_with_both_numbers() -> None:
    dest = Channel(Role.DESTINATION)
    dest.receive_data(MAGIC + struct.pack(">I", 99))
    with pytest.raises(RemoteProtocolError, match=f"version 99.*speaks {CHANNEL_VERSION}"):
        dest.next_event()


def test_oversized_frames_are_refused_from_their_header() -> None:
    dest = Channel(Role.DESTINATION)
    dest.receive_data(PREAMBLE + struct.pack(">IB", MAX_JSON_BODY + 1, FrameType.HELLO))
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        dest.next_event()
    source, dest = pair()
    deliver(dest, source.send(HELLO))
    deliver(source, dest.send(Accept("dst")))
    dest.receive_data(struct.pack(">IB", MAX_STATE_BODY + 1, FrameType.STATE))
    with pytest.raises(RemoteProtocolError, match="STATE frame of .* over the limit"):
        dest.next_event()


def test_a_blob_too_large_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="at most"):
        StateBlob("e", 3, bytes(MAX_STATE_BODY))


def test_truncated_frame_at_end_of_stream() -> None:
    source, dest = Channel(Role.SOURCE), Channel(Role.DESTINATION)
    data = source.initiate() + source.send(HELLO)
    dest.receive_data(data[:-5])
    assert dest.next_event() is NEED_DATA
    dest.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        dest.next_event()


def test_end_of_stream_mid_conversation_is_not_clean() -> None:
    source, dest = pair()
    deliver(dest, source.send(HELLO))
    dest.receive_data(b"")
    assert dest.next_event() == ChannelClosed(clean=False)


@pytest.mark.parametrize("kind,body,match", [
    (FrameType.STATE, b"\0\1e\0\0\0\3", "out of order"),  # state before hello
    (FrameType.RUNNING, b"{}", "out of order"),  # the source's side cannot be sent it
    (99, b"{}", "unknown frame type 99"),
    (FrameType.HELLO, b"not json", "bad HELLO frame: not a JSON object"),
    (FrameType.HELLO, b"[]", "must be a JSON object"),
    (FrameType.HELLO, json.dumps({"vm": "x"}).encode(), "missing"),
])
def test_hostile_frames_get_clear_errors(kind: int, body: bytes, match: str) -> None:
    dest = Channel(Role.DESTINATION)
    dest.receive_data(PREAMBLE + frame(kind, body))
    with pytest.raises(RemoteProtocolError, match=match):
        dest.next_event()


def _hello_body(**changes: object) -> bytes:
    body: dict[str, object] = {"vm": "src", "package": "", "store_version": 3,
            "disks": [{"id": "d0", "controller": "c", "lun": 0, "size": 1, "block_size": 512,
                       "readonly": False}],
            "emulators": [{"id": "e", "kind": "scsi", "controllers": ["c"], "store_size": 1}]}
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize("changes,match", [
    ({"vm": ""}, "vm must be"),
    ({"store_version": -1}, "store_version"),
    ({"store_version": True}, "store_version"),
    ({"disks": [{"id": "d0"}]}, "hello disk: missing"),
    ({"disks": [{"id": "d0", "controller": "c", "lun": 0, "size": -5, "block_size": 512,
                 "readonly": False}]}, "disk size"),
    ({"disks": [{"id": "d0", "controller": "c", "lun": 0, "size": 1, "block_size": 512,
                 "readonly": "no"}]}, "readonly"),
    ({"emulators": "x"}, "emulators must be a list"),
    ({"emulators": [{"id": "e", "kind": "scsi", "controllers": [1], "store_size": 1}]},
     "controller id"),
    ({"extra": 1}, "unexpected"),
])
def test_hostile_hello_members(changes: dict[str, object], match: str) -> None:
    dest = Channel(Role.DESTINATION)
    dest.receive_data(PREAMBLE + frame(FrameType.HELLO, _hello_body(**changes)))
    with pytest.raises(RemoteProtocolError, match=match):
        dest.next_event()


@pytest.mark.parametrize("body,match", [
    (b"\0", "truncated state frame"),
    (b"\0\x09e\0\0\0", "truncated state frame"),
    (b"\0\2\xff\xfe\0\0\0\3", "not UTF-8"),
    (b"\0\0\0\0\0\3", "emulator id must be"),
])
def test_hostile_state_frames(body: bytes, match: str) -> None:
    source, dest = pair()
    deliver(dest, source.send(HELLO))
    deliver(source, dest.send(Accept("dst")))
    dest.receive_data(frame(FrameType.STATE, body))
    with pytest.raises(RemoteProtocolError, match=match):
        dest.next_event()


def test_done_must_follow_hello_and_accept() -> None:
    source = Channel(Role.SOURCE)
    source.initiate()
    with pytest.raises(LocalProtocolError, match="may not send DONE in state hello"):
        source.send(Done(0))
    assert Channel(Role.SOURCE).state is State.HELLO
    with pytest.raises(LocalProtocolError, match="preamble"):
        Channel(Role.SOURCE).send(HELLO)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    dest = Channel(Role.DESTINATION)
    dest.receive_data(PREAMBLE + data)
    dest.receive_data(b"")
    try:
        while not isinstance(dest.next_event(), ChannelClosed):
            pass
    except RemoteProtocolError:
        assert dest.state is State.ERROR


@pytest.mark.parametrize("first,kind", [
    (b"QEVM\0\0\0\3", Kind.QEMU), (b"QEVM", Kind.QEMU), (MAGIC, Kind.STATE),
    (b"QE", None), (b"MPLM", None), (b"", None), (b"GET / HTTP", Kind.UNKNOWN),
    (b"Q\0", Kind.UNKNOWN), (b"MPLMIGRX", Kind.UNKNOWN),
])
def test_connections_are_told_apart_by_their_first_bytes(first: bytes,
                                                         kind: Kind | None) -> None:
    assert classify(first) == kind
