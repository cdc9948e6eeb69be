"""A keeper's record (launcher.keeperrecord): round trips, and nothing else gets in.

Sessions are driven in-process as QEMU 7.2 drives them (tests.support.
frontend_codec, fake fd numbers); the keeper itself, with real fds, is in
tests/integration/test_keeper_restore.py.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulators.vhost_user.codec import Message
from emulators.vhost_user.constants import DEFAULT_FEATURES, Feature, Request, feature_mask
from emulators.vhost_user.messages import U64, MemoryRegion, MemoryTable, VringFd, VringState
from emulators.vhost_user.replay import replay_messages
from launcher import keeperrecord
from launcher.keeperrecord import KeeperRecord, KeeperRecordError, decode, encode
from tests.support.frontend_codec import (
    RAM,
    UVA,
    FakeRingOwner,
    SessionHarness,
    firmware_then_reset,
    only_init,
    ring_addr,
    started,
    stopped,
)


def no_protocol_features(h: SessionHarness) -> None:
    h.send(Request.SET_OWNER)
    h.send(Request.SET_FEATURES, U64(DEFAULT_FEATURES & ~feature_mask(Feature.PROTOCOL_FEATURES)))
    h.send(Request.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, RAM, UVA, 0),)), fds=h.books.new())
    h.send(Request.SET_VRING_NUM, VringState(0, 128))
    h.send(Request.SET_VRING_ADDR, ring_addr(0))
    h.send(Request.SET_VRING_KICK, VringFd(0), fds=h.books.new())


SCENARIOS: list[Callable[[SessionHarness], None]] = [
    lambda h: None, only_init, started, stopped, firmware_then_reset, no_protocol_features,
]
IDS = ["nothing", "init", "started", "stopped", "reset", "no-protocol-features"]


def message(h: SessionHarness, request: Request, payload: object = None, *,
            nfds: int = 0, need_reply: bool = False) -> Message:
    flags = 1 | (8 if need_reply else 0)
    return Message(request, flags, payload, h.books.new(nfds))  # type: ignore[arg-type]


def a_record(scenario: Callable[[SessionHarness], None] = started, **kw: object) -> KeeperRecord:
    h = SessionHarness()
    scenario(h)
    pending = message(h, Request.SET_VRING_CALL, VringFd(1), nfds=1, need_reply=True)
    queued = (message(h, Request.GET_FEATURES), message(h, Request.SET_VRING_ENABLE,
                                                        VringState(0, 0)))
    args: dict[str, object] = {"pending": pending, "delivered": True, "queued": queued}
    args.update(kw)
    return keeperrecord.from_session(h.session, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "in-flight"])
def test_round_trip_rebuilds_the_same_session(
    scenario: Callable[[SessionHarness], None], in_flight: bool
) -> None:
    h = SessionHarness()
    scenario(h)
    extra: dict[str, object] = {}
    if in_flight:
        extra = {"pending": message(h, Request.GET_VRING_BASE, VringState(0, 0)),
                 "queued": (message(h, Request.SET_VRING_KICK, VringFd(0), nfds=1),)}
    record = keeperrecord.from_session(h.session, **extra)  # type: ignore[arg-type]
    data, fds = encode(record)
    assert data[:8] == b"mpkeeper" and struct.unpack_from("<H", data, 8) == (1,)
    # Every fd the session holds, and the ones in flight, each once.
    assert sorted(fds) == sorted(
        h.session.held_fds() | set(record.pending.fds if record.pending else ())
        | {fd for m in record.queued for fd in m.fds}
    )
    back = decode(data, fds)
    assert back == record
    rebuilt = keeperrecord.rebuild(back, FakeRingOwner(), os.close)
    assert rebuilt.snapshot() == h.session.snapshot()
    assert replay_messages(rebuilt.snapshot(), {}) == replay_messages(h.session.snapshot(), {})
    # And the same fds in another process's numbering: the record only counts them.
    renumbered = [fd + 5000 for fd in fds]
    again = decode(data, renumbered)
    assert again.fds() == renumbered


def test_closed_record_holds_nothing() -> None:
    h = SessionHarness()
    started(h)
    data, fds = encode(keeperrecord.from_session(h.session, closed=True))
    assert fds == []
    back = decode(data, [])
    assert back.closed and back.session == () and back.pending is None


# --- refusals


def reseal(data: bytes) -> bytes:
    """`data` with its checksum made right again, to reach the checks behind it."""
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def refused(data: bytes, fds: list[int], match: str) -> None:
    with pytest.raises(KeeperRecordError, match=match):
        decode(data, fds)


def test_damage_is_named() -> None:
    data, fds = encode(a_record())
    refused(b"", [], "shorter than a record")
    refused(b"x" * 8 + data[8:], fds, "not a keeper record")
    refused(reseal(data[:8] + struct.pack("<H", 2) + data[10:]), fds, "version 2")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    refused(bytes(flipped), fds, "checksum")
    refused(reseal(data[:10] + struct.pack("<H", 0x80) + data[12:]), fds, "unknown bits")
    refused(data + b"\0", fds, "checksum")
    refused(b"\0" * (keeperrecord.MAX_RECORD_BYTES + 1), [], "more than any record")


def test_every_truncation_is_refused() -> None:
    data, fds = encode(a_record())
    for n in range(len(data)):
        with pytest.raises(KeeperRecordError):
            decode(data[:n], fds)
        with pytest.raises(KeeperRecordError):
            decode(reseal(data[:n]) if n >= 4 else data[:n], fds)


def test_fd_count_must_match() -> None:
    data, fds = encode(a_record())
    refused(data, fds[:-1], f"references {len(fds)} fds, {len(fds) - 1} were given")
    refused(data, [*fds, 999], f"references {len(fds)} fds, {len(fds) + 1} were given")
    refused(data, [fds[0], *fds[1:-1], fds[0]], "not distinct")
    refused(data, [-1, *fds[1:]], "not distinct")


def _header_fds(data: bytes, count: int) -> bytes:
    return reseal(data[:40] + struct.pack("<I", count) + data[44:])


def test_fds_must_match_the_messages() -> None:
    h = SessionHarness()
    started(h)
    data, fds = encode(keeperrecord.from_session(h.session))
    # The header says one fd fewer than the messages carry, and is given that many.
    refused(_header_fds(data, len(fds) - 1), fds[:-1], "more than the record has left")
    refused(_header_fds(data, len(fds) + 1), [*fds, 4242], "carry")


def test_meaning_is_checked() -> None:
    h = SessionHarness()
    started(h)
    good = keeperrecord.from_session(h.session)
    # Messages a replay would not send, or not in its order.
    swapped = replace(good, session=(good.session[1], good.session[0], *good.session[2:]))
    refused(*encode(swapped), "not the replay")
    asked = replace(good, session=(replace(good.session[0], flags=1 | 8), *good.session[1:]))
    refused(*encode(asked), "asks for a reply")
    kick = next(m for m in good.session if m.request is Request.SET_VRING_KICK)
    refused(*encode(replace(good, session=(*good.session, replace(kick, fds=(77,))))),
            "not one a replay sends|not the replay")
    refused(*encode(replace(good, num_queues=2)), "session parameters")
    refused(*encode(replace(good, offered_features=0)), "refused")
    # A closed record with messages; delivered with nothing in flight.
    data, fds = encode(good)
    refused(reseal(data[:10] + struct.pack("<H", 1) + data[12:]), fds, "closed")
    data, fds = encode(keeperrecord.from_session(h.session, queued=(good.session[0],)))
    refused(reseal(data[:10] + struct.pack("<H", 2) + data[12:]), fds, "none is in flight")


def test_entries_in_kind_order_and_one_in_flight() -> None:
    record = a_record()
    data, fds = encode(record)
    assert record.pending is not None and len(record.queued) == 2
    # The last queued message (kind 2, no fds) marked as in flight: two in flight.
    tail = len(encode(replace(record, queued=record.queued[:1]))[0]) - 4
    entry = bytearray(data)
    assert entry[tail] == 2
    entry[tail] = 1
    refused(reseal(bytes(entry)), fds, "more than one in flight")
    entry[tail] = 0
    refused(reseal(bytes(entry)), fds, "out of order")
    entry[tail] = 7
    refused(reseal(bytes(entry)), fds, "kind 7")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.lists(st.integers(0, 1 << 20), max_size=8, unique=True))
def test_garbage_is_refused_never_a_crash(data: bytes, fds: list[int]) -> None:
    with pytest.raises(KeeperRecordError):
        decode(data, fds)


_GOOD = encode(a_record())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_GOOD[0]) - 5), st.integers(0, 255)),
                min_size=1, max_size=6),
       st.integers(-2, 2))
def test_damaged_records_with_a_right_checksum(edits: list[tuple[int, int]], extra: int) -> None:
    """Damage behind a right checksum reaches every check: refused, or (when the
    bytes still make sense) a record that encodes back to the same bytes."""
    data = bytearray(_GOOD[0])
    for where, value in edits:
        data[where] = value
    fds = list(range(100, 100 + max(0, len(_GOOD[1]) + extra)))
    sealed = reseal(bytes(data))
    try:
        record = decode(sealed, fds)
    except KeeperRecordError:
        return
    assert encode(record) == (sealed, fds)


# --- files


def test_write_atomically_and_read(tmp_path: Path) -> None:
    target = tmp_path / "rec"
    keeperrecord.write_atomically(target, b"one")
    assert keeperrecord.read(target) == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        keeperrecord.write_atomically(dir_fd, "rec", b"two")
    finally:
        os.close(dir_fd)
    keeperrecord.write_atomically(str(tmp_path), "rec", b"three")
    assert target.read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec"]  # no temporary left
    with pytest.raises(FileNotFoundError):
        keeperrecord.read(tmp_path / "none")
    big = tmp_path / "big"
    big.write_bytes(b"\0" * (keeperrecord.MAX_RECORD_BYTES + 10))
    with pytest.raises(KeeperRecordError, match="more than any record"):
        decode(keeperrecord.read(big), [])
