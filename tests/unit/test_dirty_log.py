"""Dirty logging for live migration, without processes: the log's page and
word arithmetic and its bounds (emulators.virtio.dirtylog), what the session
accepts and refuses (SET_LOG_BASE, SET_LOG_FD, LOG_ALL, a running ring's log
flag), the replay of a logging session and the keeper record that carries
the log's fd."""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emulators.vhost_user.admission import FdFacts, FdKind, check_message
from emulators.vhost_user.codec import Decoder, Message, Role, encode_request
from emulators.vhost_user.constants import (
    DEFAULT_FEATURES,
    DEFAULT_PROTOCOL_FEATURES,
    LOG_MAX_BYTES,
    Feature,
    ProtocolFeature,
    Request,
)
from emulators.vhost_user.effects import (
    CloseFds,
    MappedLog,
    Reply,
    SetLog,
    SetLogging,
    SetRingLog,
    StartRing,
)
from emulators.vhost_user.errors import SessionError
from emulators.vhost_user.messages import U64, LogDescription, VringAddr
from emulators.vhost_user.replay import (
    ANSWERED_IN_REPLAY,
    expected_snapshot,
    replay_answers,
    replay_messages,
)
from emulators.virtio.dirtylog import LOG_PAGE_SIZE, DirtyLog, DirtyLogError, add_range
from emulators.virtio.memory import GuestMemory, MemoryRegion
from launcher import keeperrecord
from tests.support.frontend_codec import FakeRingOwner, FdBooks, SessionHarness, ring_addr

PAGE = LOG_PAGE_SIZE
LOG_ALL = 1 << Feature.LOG_ALL


def bits(log: DirtyLog) -> set[int]:
    """The pages marked in `log`."""
    return {64 * w + b for w in range(log.words) for b in range(64) if log.word(w) >> b & 1}


# --- the arithmetic


def test_page_is_bit_of_its_little_endian_word() -> None:
    buf = bytearray(32)
    log = DirtyLog(buf, 32)
    assert log.mark(0, 1) and log.mark(63 * PAGE + PAGE - 1, 1) and log.mark(64 * PAGE, 1)
    assert log.mark(130 * PAGE + 5, 1)
    assert int.from_bytes(buf[0:8], "little") == 1 | 1 << 63
    assert int.from_bytes(buf[8:16], "little") == 1
    assert int.from_bytes(buf[16:24], "little") == 1 << 2
    assert bits(log) == {0, 63, 64, 130}


@pytest.mark.parametrize(
    ("gpa", "length", "pages"),
    [
        (0, PAGE, {0}),
        (PAGE - 1, 2, {0, 1}),  # two bytes across a page edge
        (PAGE, PAGE, {1}),  # ends exactly at the next page: not marked
        (62 * PAGE, 3 * PAGE, {62, 63, 64}),  # across a word edge
        (63 * PAGE + 100, 1, {63}),  # the last bit of a word
        (10 * PAGE, 200 * PAGE, set(range(10, 210))),  # whole words in the middle
        (5, 0, set()),  # nothing written, nothing marked
    ],
)
def test_ranges_mark_the_pages_they_touch(gpa: int, length: int, pages: set[int]) -> None:
    log = DirtyLog(bytearray(64), 64)
    assert log.mark(gpa, length)
    assert bits(log) == pages


def test_a_range_beyond_the_log_marks_nothing() -> None:
    buf = bytearray(16)  # 128 pages
    log = DirtyLog(buf, 16)
    assert log.mark(127 * PAGE, PAGE)  # the last page is inside
    assert not log.mark(127 * PAGE, PAGE + 1)  # one byte on the next page
    assert not log.mark(1 << 62, 8)
    assert not log.mark(-PAGE, 8)
    assert bits(log) == {127}
    assert not log.mark_all([(0, 1), (128 * PAGE, 1)])  # the good one is still marked
    assert bits(log) == {0, 127}
    assert bytes(buf) == (1).to_bytes(8, "little") + (1 << 63).to_bytes(8, "little")


@given(
    st.integers(0, 300 * PAGE),
    st.integers(0, 40 * PAGE),
    st.integers(1, 8),
)
def test_add_range_is_the_set_of_touched_pages(gpa: int, length: int, words: int) -> None:
    masks: dict[int, int] = {}
    ok = add_range(masks, gpa, length, words)
    touched = set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)) if length else set()
    if touched and max(touched) >= 64 * words:
        assert not ok and masks == {}
        return
    assert ok
    got = {64 * w + b for w, m in masks.items() for b in range(64) if m >> b & 1}
    assert got == touched
    assert all(0 <= w < words and 0 < m < 1 << 64 for w, m in masks.items())


def test_marks_keep_the_bits_others_set() -> None:
    """An OR, not a store: what QEMU or a neighbour set in the word stays."""
    buf = bytearray((0x8000_0000_0000_0001).to_bytes(8, "little"))
    log = DirtyLog(buf, 8)
    log.mark(5 * PAGE, 1)
    assert int.from_bytes(buf, "little") == 0x8000_0000_0000_0021


def test_concurrent_marks_of_one_word_lose_no_bit() -> None:
    """Two logs over the same memory (two emulators of one VM), each setting
    its own bits of the same words from its own thread: an atomic OR loses
    none. ctypes releases the GIL around the call, so the ORs really race."""
    buf = bytearray(8 * 16)
    logs = [DirtyLog(buf, len(buf)), DirtyLog(memoryview(buf), len(buf))]

    def work(n: int) -> None:
        for _ in range(300):
            for word in range(16):
                for bit in range(n, 64, 2):
                    logs[n].mark((64 * word + bit) * PAGE, 1)

    threads = [threading.Thread(target=work, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bytes(buf) == b"\xff" * len(buf)


def test_a_closed_log_marks_nothing() -> None:
    buf = bytearray(8)
    log = DirtyLog(buf, 8)
    log.close()
    log.mark(0, 1)
    assert bytes(buf) == bytes(8) and log.closed


@pytest.mark.parametrize(("size", "offset", "fits"), [
    (4096, 0, True), (4088, 8, True), (8, 4088, True), (4096, 4, False), (4100, 0, False),
    (0, 0, False), (8192, 0, False),  # larger than the file
])
def test_from_fd_maps_the_range_or_refuses(size: int, offset: int, fits: bool) -> None:
    fd = os.memfd_create("log")
    try:
        os.ftruncate(fd, 4096)
        if not fits:
            with pytest.raises(DirtyLogError):
                DirtyLog.from_fd(fd, size, offset)
            return
        log = DirtyLog.from_fd(fd, size, offset)
        log.mark(3 * PAGE, 1)
        log.close()
        assert os.pread(fd, 8, offset) == (8).to_bytes(8, "little")
    finally:
        os.close(fd)


def test_from_fd_of_a_bad_fd_is_refused() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(DirtyLogError):
            DirtyLog.from_fd(r, 4096, 0)
    finally:
        os.close(r)
    with pytest.raises(DirtyLogError):
        DirtyLog.from_fd(r, 4096, 0)  # closed now


def test_gpa_of_a_view_finds_its_region() -> None:
    regions = [MemoryRegion(0, 0x4000, 0x10_0000, 0), MemoryRegion(0x10_0000, 0x2000, 0x20_0000, 0)]
    memory = GuestMemory.from_buffers(regions, [bytearray(0x4000), bytearray(0x2000)])
    assert memory.gpa_of(memory.view(0x1234, 10)) == 0x1234
    assert memory.gpa_of(memory.view(0x10_1000, 0x1000)) == 0x10_1000
    with pytest.raises(ValueError, match="not a view"):
        memory.gpa_of(memoryview(bytearray(10)))


# --- the session


def logging_session() -> SessionHarness:
    h = SessionHarness()
    h.qemu_init()
    h.qemu_start()
    return h


def set_log(h: SessionHarness, size: int = 4096, offset: int = 0) -> list[object]:
    return list(h.send(Request.SET_LOG_BASE, LogDescription(size, offset), fds=h.books.new()))


def test_both_features_are_offered() -> None:
    assert DEFAULT_FEATURES & LOG_ALL
    assert DEFAULT_PROTOCOL_FEATURES & (1 << ProtocolFeature.LOG_SHMFD)


def test_log_base_maps_and_answers_and_replaces_the_old_one() -> None:
    h = logging_session()
    first = set_log(h)
    (fd,) = [e.log.fd for e in first if isinstance(e, SetLog) and e.log]
    assert [type(e) for e in first] == [SetLog, Reply]
    reply = first[1]
    assert isinstance(reply, Reply)
    dec = Decoder(Role.FRONTEND, close_fd=lambda fd: None)
    dec.receive_data(reply.data)
    answer = dec.next_message()
    assert isinstance(answer, Message) and answer.request is Request.SET_LOG_BASE
    assert answer.is_reply and isinstance(answer.payload, U64)
    second = set_log(h, 8192, 64)
    assert second[0] == SetLog(MappedLog(8192, 64, h.books.given[-1]))
    assert second[-1] == CloseFds((fd,))
    assert h.session.snapshot().log == MappedLog(8192, 64, h.books.given[-1])
    h.check_fds()
    # NEED_REPLY adds no second answer: the log's reply is the answer.
    effects = h.send(Request.SET_LOG_BASE, LogDescription(4096, 0), fds=h.books.new(),
                     need_reply=True)
    assert len([e for e in effects if isinstance(e, Reply)]) == 1


def test_log_base_needs_log_shmfd() -> None:
    h = SessionHarness(protocol_features=DEFAULT_PROTOCOL_FEATURES
                       & ~(1 << ProtocolFeature.LOG_SHMFD))
    h.qemu_init()
    with pytest.raises(SessionError, match="LOG_SHMFD was not negotiated"):
        set_log(h)
    h.check_fds()


def test_log_fd_is_taken_and_closed() -> None:
    h = logging_session()
    (fd,) = h.books.new()
    assert h.send(Request.SET_LOG_FD, fds=(fd,)) == [CloseFds((fd,))]
    h.check_fds()


def test_features_say_whether_to_log() -> None:
    h = logging_session()
    features = h.session.acked_features
    assert SetLogging(True) in h.send(Request.SET_FEATURES, U64(features | LOG_ALL))
    assert SetLogging(False) in h.send(Request.SET_FEATURES, U64(features & ~LOG_ALL))


def test_a_running_ring_takes_its_log_flag_and_keeps_running() -> None:
    h = logging_session()
    on = replace(ring_addr(2), flags=1, log_guest_addr=0x10_2000)
    (effect,) = h.send(Request.SET_VRING_ADDR, on, need_reply=True)[:1]
    assert isinstance(effect, SetRingLog)
    assert effect.ring.addr == on and effect.ring.used_gpa == 0x12_1000
    assert h.session.snapshot().rings[2].started
    off = replace(on, flags=0)
    assert h.send(Request.SET_VRING_ADDR, off)[0] == SetRingLog(replace(effect.ring, addr=off))


@pytest.mark.parametrize("addr", [
    replace(ring_addr(2), flags=3),  # an unknown flag
    replace(ring_addr(2), flags=1, log_guest_addr=(1 << 64) - 16),  # the used ring wraps
    replace(ring_addr(2), flags=1, desc_user_addr=ring_addr(1).desc_user_addr),  # it moves
])
def test_bad_log_flags_or_moves_are_refused(addr: VringAddr) -> None:
    h = logging_session()
    before = h.session.snapshot()
    effects = h.send(Request.SET_VRING_ADDR, addr, need_reply=True)
    assert [e for e in effects if isinstance(e, Reply)] and not [
        e for e in effects if isinstance(e, SetRingLog)
    ]
    assert h.session.snapshot() == before


def test_close_releases_the_log() -> None:
    h = logging_session()
    set_log(h)
    effects = h.session.close()
    assert SetLog(None) in effects
    fds = [fd for e in effects if isinstance(e, CloseFds) for fd in e.fds]
    assert h.books.given[-1] in fds


# --- admission (the keeper's look at the fd)


@pytest.mark.parametrize(("facts", "reason"), [
    (FdFacts(FdKind.EVENTFD), "not a file"),
    (FdFacts(FdKind.FILE, 1 << 20, writable=False), "not open read-write"),
    (FdFacts(FdKind.FILE, 4096 + 8 - 1, writable=True), "holds only"),
    (FdFacts(FdKind.FILE, 4096 + 8, writable=True), None),
])
def test_admission_wants_a_writable_file_that_holds_the_log(
    facts: FdFacts, reason: str | None
) -> None:
    h = logging_session()
    message = Message(Request.SET_LOG_BASE, 1, LogDescription(4096, 8), (77,))
    got = check_message(h.session, message, {77: facts})
    assert got is None if reason is None else reason in (got or "")


def test_admission_refuses_a_log_larger_than_any_guest() -> None:
    h = logging_session()
    message = Message(Request.SET_LOG_BASE, 1, LogDescription(LOG_MAX_BYTES + 8, 0), (77,))
    got = check_message(h.session, message, {77: FdFacts(FdKind.FILE, 1 << 40, True)})
    assert got is not None and "allowed 1 to" in got


# --- replay and the keeper's record


def migrating(h: SessionHarness) -> None:
    """QEMU as a migration starts: the log, LOG_ALL, then the rings' log flag."""
    h.qemu_init()
    h.qemu_start()
    set_log(h, 8192, 8)
    h.send(Request.SET_FEATURES, U64(h.session.acked_features | LOG_ALL))
    for index in range(3):
        h.send(Request.SET_VRING_ADDR, replace(ring_addr(index), flags=1,
                                               log_guest_addr=0x10_1000 + index * 0x1_0000))


def test_replay_sends_the_log_once_and_counts_its_answer() -> None:
    h = SessionHarness()
    migrating(h)
    snapshot = h.session.snapshot()
    steps = replay_messages(snapshot, {})
    assert replay_answers(steps) == 1
    fresh = SessionHarness(books=FdBooks())
    answers = 0
    for data, fds in steps:
        dec = Decoder(Role.BACKEND, close_fd=fresh.books.close)
        dec.receive_data(data, fds)
        message = dec.next_message()
        assert isinstance(message, Message) and not message.need_reply
        effects = fresh.session.handle(message)
        replies = [e for e in effects if isinstance(e, Reply)]
        assert len(replies) == (message.request in ANSWERED_IN_REPLAY)
        answers += len(replies)
        if effects and isinstance(effects[-1], StartRing):
            assert effects[-1].ring.addr.flags == 1
    assert answers == 1
    assert fresh.session.snapshot() == expected_snapshot(snapshot, {})
    assert fresh.session.acked_features & LOG_ALL


def test_keeper_record_carries_the_log_and_its_fd() -> None:
    h = SessionHarness()
    migrating(h)
    record = keeperrecord.from_session(h.session)
    data, fds = keeperrecord.encode(record)
    log = h.session.snapshot().log
    assert log is not None and log.fd in fds
    back = keeperrecord.decode(data, fds)
    rebuilt = keeperrecord.rebuild(back, FakeRingOwner(), os.close)
    assert rebuilt.snapshot() == h.session.snapshot()
    assert rebuilt.snapshot().log == log
    [entry] = [m for m in back.session if m.request is Request.SET_LOG_BASE]
    assert entry.payload == LogDescription(8192, 8) and entry.fds == (log.fd,)


def test_keeper_record_with_a_log_answered_twice_is_refused() -> None:
    """A record whose session holds the log twice is not a replay."""
    h = SessionHarness()
    migrating(h)
    record = keeperrecord.from_session(h.session)
    extra = Message(Request.SET_LOG_BASE, 1, LogDescription(4096, 0), (9999,))
    twice = replace(record, session=(*record.session, extra))
    data, fds = keeperrecord.encode(twice)
    with pytest.raises(keeperrecord.KeeperRecordError, match="not one a replay sends"):
        keeperrecord.decode(data, fds)


def test_encoded_log_base_round_trips() -> None:
    data = encode_request(Request.SET_LOG_BASE, LogDescription(0x3000, 0x40), fds=(5,))
    dec = Decoder(Role.BACKEND, close_fd=lambda fd: None)
    dec.receive_data(data, [5])
    message = dec.next_message()
    assert isinstance(message, Message)
    assert message.payload == LogDescription(0x3000, 0x40) and message.fds == (5,)


def test_ring_log_flag_is_refused_on_a_ring_without_flags_known() -> None:
    h = SessionHarness()
    h.qemu_init()
    h.send(Request.SET_FEATURES, U64(h.session.offered_features))
    with pytest.raises(SessionError, match="before any memory table"):
        h.send(Request.SET_VRING_ADDR, replace(ring_addr(0), flags=1))
    assert h.session.snapshot().rings[0].addr is None
