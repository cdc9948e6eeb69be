"""The admission rules: which front-end messages a back-end must refuse.

A record (`BackendSession`) is brought to QEMU 7.2's running state with plain
`Message`s; fds are bare numbers (nothing is opened) and their facts are given
as the launcher's I/O layer would find them.  Each bad message must be refused
with a reason, each good one accepted, and checking must change nothing: not
the record, not the message's fds.
"""

from __future__ import annotations

import pytest

from emulators.vhost_user.admission import (
    Admission,
    Answer,
    FdFacts,
    FdKind,
    check_message,
    refusal_answer,
)
from emulators.vhost_user.codec import Message
from emulators.vhost_user.constants import (
    DEFAULT_PROTOCOL_FEATURES,
    Feature,
    HeaderFlag,
    ProtocolFeature,
    Request,
    feature_mask,
)
from emulators.vhost_user.messages import (
    U64,
    MemoryRegion,
    MemoryTable,
    Payload,
    VringAddr,
    VringFd,
    VringState,
)
from emulators.vhost_user.session import BackendSession

MIB = 1 << 20
UVA = 0x7F00_0000_0000
RAM_FD = 50
NEW_RAM_FD = 60
EVENT_FD = 70
FEATURES = feature_mask(Feature.VERSION_1, Feature.PROTOCOL_FEATURES)
ACKED = DEFAULT_PROTOCOL_FEATURES  # MQ and REPLY_ACK

GOOD_FACTS = {
    RAM_FD: FdFacts(FdKind.FILE, size=MIB, writable=True),
    NEW_RAM_FD: FdFacts(FdKind.FILE, size=2 * MIB, writable=True),
    EVENT_FD: FdFacts(FdKind.EVENTFD),
}


class Owner:
    def vring_base(self, index: int) -> int:
        return 7


def msg(
    request: Request, payload: Payload = None, fds: tuple[int, ...] = (), need_reply: bool = False
) -> Message:
    flags = HeaderFlag.VERSION_1 | (HeaderFlag.NEED_REPLY if need_reply else 0)
    return Message(request, int(flags), payload, fds)


def addr(index: int, base: int = UVA) -> VringAddr:
    at = base + 0x1_0000 * (index + 1)
    return VringAddr(index, 0, at, at + 0x2000, at + 0x1000, 0)


def region(size: int = MIB, gpa: int = 0, uva: int = UVA, offset: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa, size, uva, offset)


@pytest.fixture()
def closed() -> list[int]:
    return []


@pytest.fixture()
def record(closed: list[int]) -> BackendSession:
    """A session as QEMU 7.2 leaves it after start-up: rings 0 and 2 started."""
    session = BackendSession(
        num_queues=3, ring_owner=Owner(), close_fd=closed.append, max_queue_size=1024
    )
    fd = 100
    steps = [
        msg(Request.SET_PROTOCOL_FEATURES, U64(ACKED)),
        msg(Request.SET_OWNER),
        msg(Request.SET_FEATURES, U64(FEATURES)),
        msg(Request.SET_MEM_TABLE, MemoryTable((region(),)), (RAM_FD,), need_reply=True),
    ]
    for index in (0, 2):
        fd += 1
        steps += [
            msg(Request.SET_VRING_CALL, VringFd(index), (fd + 10,)),
            msg(Request.SET_VRING_NUM, VringState(index, 64)),
            msg(Request.SET_VRING_ADDR, addr(index)),
            msg(Request.SET_VRING_KICK, VringFd(index), (fd,)),
            msg(Request.SET_VRING_ENABLE, VringState(index, 1)),
        ]
    for step in steps:
        session.handle(step)
    assert [r.started for r in session.snapshot().rings] == [True, False, True]
    return session


def refused(
    record: BackendSession,
    message: Message,
    facts: dict[int, FdFacts] | None = None,
    guest_memory: int | None = None,
) -> str:
    before = record.snapshot()
    reason = check_message(
        record, message, {**GOOD_FACTS, **(facts or {})}, guest_memory=guest_memory
    )
    assert record.snapshot() == before, "checking changed the record"
    assert reason is not None, f"{message.request.name} was accepted"
    return reason


def accepted(record: BackendSession, message: Message, guest_memory: int | None = None) -> None:
    before = record.snapshot()
    assert check_message(record, message, GOOD_FACTS, guest_memory=guest_memory) is None
    assert record.snapshot() == before


# --- memory tables: what the fds are


def test_region_beyond_its_fd_is_refused(record: BackendSession, closed: list[int]) -> None:
    table = MemoryTable((region(size=2 * MIB),))
    reason = refused(record, msg(Request.SET_MEM_TABLE, table, (RAM_FD,), need_reply=True))
    assert "ends at offset 0x200000" in reason and "holds only 0x100000" in reason
    assert closed == []  # the fds stay the caller's to close


def test_region_offset_beyond_its_fd_is_refused(record: BackendSession) -> None:
    table = MemoryTable((region(size=MIB, offset=0x1000),))
    assert "holds only" in refused(record, msg(Request.SET_MEM_TABLE, table, (RAM_FD,)))


@pytest.mark.parametrize("kind", [FdKind.SOCKET, FdKind.PIPE, FdKind.EVENTFD, FdKind.OTHER])
def test_region_fd_that_cannot_be_mapped_is_refused(record: BackendSession, kind: FdKind) -> None:
    message = msg(Request.SET_MEM_TABLE, MemoryTable((region(),)), (NEW_RAM_FD,))
    reason = refused(record, message, facts={NEW_RAM_FD: FdFacts(kind)})
    assert f"its fd is a{'n' if kind.value[0] in 'aeiou' else ''} {kind.value}" in reason


def test_read_only_or_sealed_region_fd_is_refused(record: BackendSession) -> None:
    message = msg(Request.SET_MEM_TABLE, MemoryTable((region(),)), (NEW_RAM_FD,))
    facts = {NEW_RAM_FD: FdFacts(FdKind.FILE, size=MIB, writable=False)}
    assert "read-write" in refused(record, message, facts=facts)


def test_fd_without_facts_is_refused(record: BackendSession) -> None:
    message = msg(Request.SET_MEM_TABLE, MemoryTable((region(),)), (99,))
    assert "not a file" in refused(record, message)


def test_regions_larger_than_guest_memory_are_refused(record: BackendSession) -> None:
    table = MemoryTable((region(), region(gpa=MIB, uva=UVA + MIB, offset=MIB)))
    message = msg(Request.SET_MEM_TABLE, table, (NEW_RAM_FD, NEW_RAM_FD))
    accepted(record, message)
    assert "more than the guest" in refused(record, message, guest_memory=MIB)
    accepted(record, message, guest_memory=2 * MIB)


def test_good_memory_table_is_accepted(record: BackendSession) -> None:
    table = MemoryTable((region(size=2 * MIB),))
    accepted(record, msg(Request.SET_MEM_TABLE, table, (NEW_RAM_FD,), need_reply=True))


def test_memory_table_that_drops_a_started_ring_is_refused(record: BackendSession) -> None:
    table = MemoryTable((region(size=MIB, uva=UVA + 0x100_0000),))
    reason = refused(record, msg(Request.SET_MEM_TABLE, table, (NEW_RAM_FD,)))
    assert "started ring" in reason


def test_overlapping_regions_are_refused(record: BackendSession) -> None:
    table = MemoryTable((region(), region(gpa=0x8_0000, uva=UVA + MIB)))
    reason = refused(record, msg(Request.SET_MEM_TABLE, table, (NEW_RAM_FD, NEW_RAM_FD)))
    assert "overlap" in reason


# --- rings


@pytest.mark.parametrize(
    "request_, payload",
    [
        (Request.SET_VRING_NUM, VringState(3, 64)),
        (Request.SET_VRING_BASE, VringState(200, 0)),
        (Request.SET_VRING_ADDR, addr(5)),
        (Request.SET_VRING_ENABLE, VringState(3, 1)),
        (Request.GET_VRING_BASE, VringState(9, 0)),
    ],
)
def test_ring_index_out_of_range_is_refused(
    record: BackendSession, request_: Request, payload: Payload
) -> None:
    assert "does not exist" in refused(record, msg(request_, payload))


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL])
def test_ring_fd_index_out_of_range_is_refused(record: BackendSession, request_: Request) -> None:
    assert "does not exist" in refused(record, msg(request_, VringFd(3), (EVENT_FD,)))


@pytest.mark.parametrize("num", [0, 3, 100, 2048, 32768])
def test_ring_size_not_a_power_of_two_or_too_big_is_refused(
    record: BackendSession, num: int
) -> None:
    reason = refused(record, msg(Request.SET_VRING_NUM, VringState(1, num)))
    assert "power of two <= 1024" in reason


def test_ring_size_of_a_started_ring_is_refused(record: BackendSession) -> None:
    assert "started" in refused(record, msg(Request.SET_VRING_NUM, VringState(0, 128)))


@pytest.mark.parametrize(
    "ring_addr",
    [
        addr(1, base=UVA + MIB),  # past the end of the only region
        addr(1, base=0x1000),  # nowhere near it
        VringAddr(1, 0, UVA + 0x1008, UVA + 0x2000, UVA + 0x3000, 0),  # table misaligned
    ],
)
def test_ring_addresses_outside_memory_or_misaligned_are_refused(
    record: BackendSession, ring_addr: VringAddr
) -> None:
    reason = refused(record, msg(Request.SET_VRING_ADDR, ring_addr))
    assert "not inside one memory region" in reason or "aligned" in reason


def test_ring_running_off_the_memory_table_is_refused_when_it_starts(
    record: BackendSession,
) -> None:
    """Each part starts inside guest RAM, but a 1024-entry table does not end there."""
    record.handle(msg(Request.SET_VRING_NUM, VringState(1, 1024)))
    ring_addr = VringAddr(1, 0, UVA + MIB - 0x1000, UVA + 0x2000, UVA + 0x1000, 0)
    message = msg(Request.SET_VRING_ADDR, ring_addr)
    accepted(record, message)
    record.handle(message)
    reason = refused(record, msg(Request.SET_VRING_KICK, VringFd(1), (EVENT_FD,)))
    assert "descriptor table" in reason and "not inside one memory region" in reason


def test_ring_misaligned_in_guest_physical_addresses_is_refused(closed: list[int]) -> None:
    """Aligned as QEMU's addresses, misaligned as the guest's: the queue would refuse it."""
    session = BackendSession(
        num_queues=3, ring_owner=Owner(), close_fd=closed.append, max_queue_size=1024
    )
    for step in (
        msg(Request.SET_FEATURES, U64(FEATURES)),
        msg(Request.SET_MEM_TABLE, MemoryTable((region(gpa=0x8),)), (RAM_FD,)),
        msg(Request.SET_VRING_NUM, VringState(0, 64)),
        msg(Request.SET_VRING_ADDR, addr(0)),
    ):
        session.handle(step)
    reason = refused(session, msg(Request.SET_VRING_KICK, VringFd(0), (EVENT_FD,)))
    assert "descriptor table at guest address 0x10008 is not 16-byte aligned" in reason


@pytest.mark.parametrize("kind", [FdKind.FILE, FdKind.SOCKET, FdKind.PIPE, FdKind.OTHER])
@pytest.mark.parametrize(
    "request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]
)
def test_ring_fd_that_is_not_an_eventfd_is_refused(
    record: BackendSession, request_: Request, kind: FdKind
) -> None:
    message = msg(request_, VringFd(0), (EVENT_FD,))
    reason = refused(record, message, facts={EVENT_FD: FdFacts(kind)})
    assert "not an eventfd" in reason


def test_good_ring_messages_are_accepted(record: BackendSession) -> None:
    accepted(record, msg(Request.SET_VRING_NUM, VringState(1, 1024)))
    accepted(record, msg(Request.SET_VRING_ADDR, addr(1)))
    accepted(record, msg(Request.SET_VRING_CALL, VringFd(0), (EVENT_FD,)))
    accepted(record, msg(Request.SET_VRING_CALL, VringFd(1, no_fd=True)))
    accepted(record, msg(Request.SET_VRING_ENABLE, VringState(0, 0)))
    accepted(record, msg(Request.GET_VRING_BASE, VringState(0, 0)))
    accepted(record, msg(Request.GET_FEATURES))
    accepted(record, msg(Request.RESET_OWNER))


def test_kick_of_a_ring_with_no_addresses_is_refused(record: BackendSession) -> None:
    reason = refused(record, msg(Request.SET_VRING_KICK, VringFd(1), (EVENT_FD,)))
    assert "no size or no addresses" in reason


# --- requests and features


def test_unsupported_requests_are_refused(record: BackendSession) -> None:
    backend_channel = msg(Request.SET_BACKEND_REQ_FD, None, (RAM_FD,))
    assert "not supported" in refused(record, backend_channel)
    assert "not supported" in refused(record, msg(Request.POSTCOPY_ADVISE))


def test_features_never_offered_are_refused(record: BackendSession) -> None:
    reason = refused(record, msg(Request.SET_FEATURES, U64(1 << 63)))
    assert "never offered" in reason
    reason = refused(record, msg(Request.SET_PROTOCOL_FEATURES, U64(1 << 40)))
    assert "never offered" in reason


def test_need_reply_does_not_hide_the_reason(record: BackendSession) -> None:
    reason = refused(record, msg(Request.SET_VRING_NUM, VringState(7, 64), need_reply=True))
    assert "ring 7 does not exist" in reason


def test_checking_leaves_the_record_usable(record: BackendSession, closed: list[int]) -> None:
    """A trial that refused (and so failed) leaves the record READY, holding its fds."""
    refused(record, msg(Request.SET_VRING_NUM, VringState(7, 64)))
    held = record.held_fds()
    record.handle(msg(Request.SET_VRING_NUM, VringState(1, 32)))
    assert record.snapshot().rings[1].num == 32
    assert record.held_fds() == held and closed == []


def test_trial_copy_shares_the_ring_owner_and_nothing_else(record: BackendSession) -> None:
    trial = record.trial_copy()
    effects = trial.handle(msg(Request.GET_VRING_BASE, VringState(0, 0)))
    assert any(getattr(e, "data", b"").endswith(VringState(0, 7).pack()) for e in effects)
    assert record.snapshot().rings[0].started and not trial.snapshot().rings[0].started


# --- how a refusal is answered


def test_refusal_answer_follows_the_spec() -> None:
    asked = msg(Request.SET_MEM_TABLE, MemoryTable((region(),)), (RAM_FD,), need_reply=True)
    silent = msg(Request.SET_VRING_NUM, VringState(1, 3))
    own = msg(Request.GET_VRING_BASE, VringState(9, 0), need_reply=True)
    reply_ack = 1 << ProtocolFeature.REPLY_ACK
    assert refusal_answer(asked, reply_ack) is Answer.FAILURE_ACK
    assert refusal_answer(asked, 0) is Answer.DISCONNECT  # REPLY_ACK not negotiated
    assert refusal_answer(silent, reply_ack) is Answer.DISCONNECT
    assert refusal_answer(own, reply_ack) is Answer.DISCONNECT  # its reply has no error form


# --- Admission: one trial kept from message to message


def test_admission_decides_like_a_fresh_check_and_copies_rarely(
    record: BackendSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop and a restart of every ring, with bad messages mixed in: each
    decision equals a check on a fresh copy of the record, and the record is
    copied only after a refusal or a GET_VRING_BASE."""
    admission = Admission(record)
    copies = 0
    real = BackendSession.trial_copy

    def counting(self: BackendSession) -> BackendSession:
        nonlocal copies
        copies += 1
        return real(self)

    steps = [msg(Request.SET_VRING_ENABLE, VringState(i, 0)) for i in range(3)]
    steps += [msg(Request.GET_VRING_BASE, VringState(i, 0)) for i in (0, 2)]
    steps += [msg(Request.SET_VRING_NUM, VringState(1, 100))]  # refused
    for index in range(3):
        steps += [
            msg(Request.SET_VRING_NUM, VringState(index, 128)),
            msg(Request.SET_VRING_BASE, VringState(index, 3)),
            msg(Request.SET_VRING_ADDR, addr(index)),
            msg(Request.SET_VRING_KICK, VringFd(index), (EVENT_FD,)),
            msg(Request.SET_VRING_NUM, VringState(index, 64)),  # refused: started
        ]
    steps += [msg(Request.SET_VRING_ENABLE, VringState(i, 1)) for i in range(3)]
    refusals = 0
    for step in steps:
        expected = check_message(record, step, GOOD_FACTS)
        monkeypatch.setattr(BackendSession, "trial_copy", counting)
        got = admission.check(step, GOOD_FACTS)
        monkeypatch.setattr(BackendSession, "trial_copy", real)
        assert got == expected, step
        if got is None:
            record.handle(step)
            admission.taken(step)
        else:
            refusals += 1
    assert refusals == 4
    assert [r.started for r in record.snapshot().rings] == [True, True, True]
    assert copies == 1 + 2 + refusals  # the first, after each GET_VRING_BASE, each refusal


def test_admission_copies_afresh_when_the_record_did_not_take_the_message(
    record: BackendSession,
) -> None:
    admission = Admission(record)
    message = msg(Request.SET_VRING_NUM, VringState(1, 128))
    assert admission.check(message, GOOD_FACTS) is None
    admission.taken(msg(Request.SET_VRING_NUM, VringState(1, 128)))  # not the one checked
    # Had the trial been kept, it would think ring 1 had 128 entries: no harm
    # here, but a kick would then start with a size the record never had.
    assert record.snapshot().rings[1].num is None
    assert admission.check(msg(Request.SET_VRING_ADDR, addr(1)), GOOD_FACTS) is None
    assert admission.check(msg(Request.SET_VRING_KICK, VringFd(1), (EVENT_FD,)),
                           GOOD_FACTS) is not None  # no size: the fresh copy knows
