"""The back-end session driven through QEMU 7.2's sequences, and its refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulators.vhost_user.codec import Decoder, Message, Role, encode_request
from emulators.vhost_user.constants import (
    DEFAULT_FEATURES,
    DEFAULT_PROTOCOL_FEATURES,
    Feature,
    ProtocolFeature,
    Request,
    feature_mask,
)
from emulators.vhost_user.effects import (
    CloseFds,
    Effect,
    EnableRing,
    ForgetRing,
    MappedRegion,
    Reply,
    ResetDevice,
    SetCall,
    SetErr,
    SetKick,
    SetMemTable,
    StartRing,
    StopRing,
)
from emulators.vhost_user.errors import LocalProtocolError, SessionError
from emulators.vhost_user.messages import (
    U64,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    Payload,
    VringAddr,
    VringFd,
    VringState,
)
from emulators.vhost_user.session import SessionState
from tests.support.frontend_codec import RAM, UVA, SessionHarness, replies, ring_addr, ring_gpas


def decode_reply(data: bytes) -> Message:
    dec = Decoder(Role.FRONTEND, close_fd=lambda fd: None)
    dec.receive_data(data)
    message = dec.next_message()
    assert isinstance(message, Message)
    return message


def reply_values(effects: list[Effect]) -> list[object]:
    return [decode_reply(r).payload for r in replies(effects)]


def of(kind: type, effects: list[Effect]) -> list[Effect]:
    return [e for e in effects if isinstance(e, kind)]


def started_harness() -> SessionHarness:
    h = SessionHarness()
    h.qemu_init()
    h.qemu_start()
    return h


def test_qemu_init_sequence() -> None:
    h = SessionHarness()
    out = h.qemu_init()
    assert reply_values(out[0]) == [U64(DEFAULT_FEATURES)]
    assert reply_values(out[1]) == [U64(DEFAULT_PROTOCOL_FEATURES)]
    assert out[2] == [] and out[4] == []
    assert reply_values(out[3]) == [U64(3)]
    assert reply_values(out[5]) == [U64(DEFAULT_FEATURES)]
    call_fds = [e.fd for step in out[6:] for e in step if isinstance(e, SetCall)]
    err_fds = [e.fd for step in out[6:] for e in step if isinstance(e, SetErr)]
    assert call_fds == [1000, 1002, 1004] and err_fds == [1001, 1003, 1005]
    snap = h.session.snapshot()
    assert snap.owner and snap.protocol_features == DEFAULT_PROTOCOL_FEATURES
    assert snap.features is None and snap.memory == ()
    assert [r.call_fd for r in snap.rings] == [1000, 1002, 1004]
    assert not any(r.started or r.enabled for r in snap.rings)
    h.check_fds()


def test_qemu_start_sequence() -> None:
    h = SessionHarness()
    h.qemu_init()
    effects = h.qemu_start()
    # SET_MEM_TABLE with NEED_REPLY: the only ack, and it says success.
    assert reply_values(effects) == [U64(0)]
    (table,) = of(SetMemTable, effects)
    assert isinstance(table, SetMemTable)
    assert table.regions == (MappedRegion(MemoryRegion(0, RAM, UVA, 0), 1006),)
    starts = of(StartRing, effects)
    assert [s.ring.index for s in starts if isinstance(s, StartRing)] == [0, 1, 2]
    for start in starts:
        assert isinstance(start, StartRing)
        desc, avail, used = ring_gpas(start.ring.index)
        assert (start.ring.desc_gpa, start.ring.avail_gpa, start.ring.used_gpa) == (
            desc,
            avail,
            used,
        )
        assert start.ring.num == 128 and start.ring.base == 0
        assert start.features == DEFAULT_FEATURES and start.enabled is False
    # Each kick fd is installed before its ring starts.
    kinds = [type(e) for e in effects if isinstance(e, SetKick | StartRing)]
    assert kinds == [SetKick, StartRing] * 3
    assert of(EnableRing, effects) == [EnableRing(i, True) for i in range(3)]
    # The second SET_VRING_CALL replaces the init one, which is released after.
    calls = [e for e in effects if isinstance(e, SetCall | CloseFds)]
    assert calls == [
        SetCall(0, 1010),
        CloseFds((1000,)),
        SetCall(1, 1011),
        CloseFds((1002,)),
        SetCall(2, 1012),
        CloseFds((1004,)),
    ]
    snap = h.session.snapshot()
    assert all(r.started and r.enabled for r in snap.rings)
    assert [r.kick_fd for r in snap.rings] == [1007, 1008, 1009]
    h.check_fds()


def test_stop_and_restart() -> None:
    h = started_harness()
    h.owner.bases = {0: 5, 1: 0, 2: 77}
    effects = h.qemu_stop([0, 1, 2])
    assert of(EnableRing, effects) == [EnableRing(i, False) for i in range(3)]
    assert of(StopRing, effects) == [StopRing(0), StopRing(1), StopRing(2)]
    assert reply_values(effects) == [VringState(0, 5), VringState(1, 0), VringState(2, 77)]
    assert h.owner.asked == [0, 1, 2]
    # StopRing comes before the reply and before the fds are closed; the
    # ring's saved progress is forgotten only once the answer is out.
    ring2 = effects[effects.index(StopRing(2)) :]
    assert [type(e) for e in ring2] == [StopRing, SetKick, SetCall, Reply, ForgetRing, CloseFds]
    assert of(ForgetRing, effects) == [ForgetRing(0), ForgetRing(1), ForgetRing(2)]
    snap = h.session.snapshot()
    assert [r.base for r in snap.rings] == [5, 0, 77]
    assert all(not r.started and r.kick_fd is None and r.call_fd is None for r in snap.rings)
    h.check_fds()
    # Guest reboot: the firmware starts only the first request queue.
    effects = h.qemu_start([2])
    assert [s.ring.index for s in of(StartRing, effects) if isinstance(s, StartRing)] == [2]
    assert of(EnableRing, effects) == [EnableRing(2, True)]
    # The old memory table is released after the new one is in place.
    (table,) = of(SetMemTable, effects)
    assert effects.index(table) < effects.index(CloseFds((1006,)))
    h.check_fds()
    # A stopped ring answers GET_VRING_BASE from what it recorded.
    assert reply_values(h.send(Request.GET_VRING_BASE, VringState(0, 0))) == [VringState(0, 5)]
    assert h.owner.asked == [0, 1, 2]


def test_reset_owner_stops_rings_and_start_works_again() -> None:
    h = started_harness()
    effects = h.send(Request.RESET_OWNER)
    assert of(StopRing, effects) == [StopRing(0), StopRing(1), StopRing(2)]
    assert isinstance(effects[-5], ResetDevice) and effects[-1] == CloseFds((1007, 1008, 1009))
    assert effects[-4:-1] == [ForgetRing(0), ForgetRing(1), ForgetRing(2)]
    snap = h.session.snapshot()
    assert snap.owner and snap.features == DEFAULT_FEATURES and snap.memory
    assert all(not r.started and not r.enabled for r in snap.rings)
    h.qemu_start()
    assert all(r.started and r.enabled for r in h.session.snapshot().rings)
    h.check_fds()


def test_reset_device_needs_its_protocol_feature() -> None:
    h = started_harness()
    with pytest.raises(SessionError, match="RESET_DEVICE was not negotiated"):
        h.send(Request.RESET_DEVICE)
    offered = DEFAULT_PROTOCOL_FEATURES | feature_mask(ProtocolFeature.RESET_DEVICE)
    h = SessionHarness(protocol_features=offered)
    h.qemu_init()
    h.qemu_start()
    assert ResetDevice() in h.send(Request.RESET_DEVICE)


def test_without_protocol_features_rings_are_enabled_at_set_features() -> None:
    features = DEFAULT_FEATURES & ~feature_mask(Feature.PROTOCOL_FEATURES)
    h = SessionHarness(features=features)
    with pytest.raises(SessionError, match="PROTOCOL_FEATURES is not offered"):
        h.send(Request.GET_PROTOCOL_FEATURES)
    h = SessionHarness(features=features)
    h.send(Request.SET_OWNER)
    h.send(Request.SET_FEATURES, U64(features))
    h.send(Request.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, RAM, UVA, 0),)), fds=h.books.new())
    h.send(Request.SET_VRING_NUM, VringState(2, 64))
    h.send(Request.SET_VRING_ADDR, ring_addr(2))
    (start,) = of(StartRing, h.send(Request.SET_VRING_KICK, VringFd(2), fds=h.books.new()))
    assert isinstance(start, StartRing) and start.enabled
    with pytest.raises(SessionError, match="without VHOST_USER_F_PROTOCOL_FEATURES"):
        h.send(Request.SET_VRING_ENABLE, VringState(2, 0))


def test_need_reply_acks() -> None:
    h = SessionHarness()
    # Before REPLY_ACK is negotiated NEED_REPLY means nothing.
    assert h.send(Request.SET_OWNER, need_reply=True) == []
    h.send(Request.SET_PROTOCOL_FEATURES, U64(DEFAULT_PROTOCOL_FEATURES))
    assert reply_values(h.send(Request.SET_OWNER, need_reply=True)) == [U64(0)]
    # A request with its own reply gets exactly that one.
    assert reply_values(h.send(Request.GET_FEATURES, need_reply=True)) == [U64(DEFAULT_FEATURES)]
    # A refused request that asked for an ack gets a failure ack; the session goes on.
    fds = h.books.new()
    assert reply_values(h.send(Request.SET_VRING_CALL, VringFd(9), fds=fds, need_reply=True)) == [
        U64(1)
    ]
    assert h.books.closed_directly == list(fds)
    assert reply_values(h.send(Request.SET_FEATURES, U64(1 << 63), need_reply=True)) == [U64(1)]
    assert h.session.state is SessionState.READY
    assert h.session.snapshot().features is None
    h.check_fds()


def test_refused_get_raises_even_with_need_reply() -> None:
    h = SessionHarness()
    h.send(Request.SET_PROTOCOL_FEATURES, U64(DEFAULT_PROTOCOL_FEATURES))
    with pytest.raises(SessionError, match="ring 7 does not exist"):
        h.send(Request.GET_VRING_BASE, VringState(7, 0), need_reply=True)


def region(gpa: int, size: int, uva: int, offset: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa, size, uva, offset)


def addr(index: int, desc: int, avail: int, used: int, flags: int = 0) -> VringAddr:
    return VringAddr(index, flags, desc + UVA, used + UVA, avail + UVA, 0)


BAD_AFTER_INIT: list[tuple[str, Request, Payload, int, str]] = [
    ("unoffered feature", Request.SET_FEATURES, U64(1 << 40), 0, "never offered"),
    ("unoffered protocol", Request.SET_PROTOCOL_FEATURES, U64(1 << 9), 0, "never offered"),
    ("ring index", Request.SET_VRING_NUM, VringState(3, 64), 0, "ring 3 does not exist"),
    ("num not pow2", Request.SET_VRING_NUM, VringState(0, 100), 0, "not a power of two"),
    ("num zero", Request.SET_VRING_NUM, VringState(0, 0), 0, "not a power of two"),
    ("num too big", Request.SET_VRING_NUM, VringState(0, 65536), 0, "not a power of two"),
    ("base too big", Request.SET_VRING_BASE, VringState(0, 0x10000), 0, "16 bits"),
    ("addr no memory", Request.SET_VRING_ADDR, ring_addr(0), 0, "before any memory table"),
    ("kick no_fd", Request.SET_VRING_KICK, VringFd(0, no_fd=True), 0, "polling"),
    ("kick too early", Request.SET_VRING_KICK, VringFd(0), 1, "no size or no addresses"),
    ("call index", Request.SET_VRING_CALL, VringFd(5), 1, "ring 5 does not exist"),
    ("enable value", Request.SET_VRING_ENABLE, VringState(0, 2), 0, "must be 0 or 1"),
    ("enable unacked", Request.SET_VRING_ENABLE, VringState(0, 1), 0, "PROTOCOL_FEATURES acked"),
    ("log base empty", Request.SET_LOG_BASE, LogDescription(0, 0), 1, "allowed 1 to"),
    ("log base huge", Request.SET_LOG_BASE, LogDescription(1 << 40, 0), 1, "allowed 1 to"),
    ("log base offset", Request.SET_LOG_BASE, LogDescription(4096, 4), 1, "multiples of 8"),
    ("log base size", Request.SET_LOG_BASE, LogDescription(4100, 0), 1, "multiples of 8"),
    ("log base wraps", Request.SET_LOG_BASE, LogDescription(4096, (1 << 64) - 8), 1,
     "overflows"),
    ("backend req fd", Request.SET_BACKEND_REQ_FD, None, 1, "not supported"),
    ("empty table", Request.SET_MEM_TABLE, MemoryTable(()), 0, "no regions"),
    (
        "zero region",
        Request.SET_MEM_TABLE,
        MemoryTable((region(0, 0, UVA),)),
        1,
        "size 0",
    ),
    (
        "gpa overlap",
        Request.SET_MEM_TABLE,
        MemoryTable((region(0, 0x2000, UVA), region(0x1000, 0x1000, UVA + 0x10000))),
        2,
        "overlap at guest_phys_addr 0x1000",
    ),
    (
        "uva overlap",
        Request.SET_MEM_TABLE,
        MemoryTable((region(0, 0x1000, UVA), region(0x1000, 0x1000, UVA + 0x800))),
        2,
        "overlap at userspace_addr",
    ),
    (
        "overflow",
        Request.SET_MEM_TABLE,
        MemoryTable((region((1 << 64) - 0x1000, 0x2000, UVA),)),
        1,
        "overflows",
    ),
]


@pytest.mark.parametrize(
    ("request_code", "payload", "nfds", "match"),
    [case[1:] for case in BAD_AFTER_INIT],
    ids=[case[0] for case in BAD_AFTER_INIT],
)
def test_bad_semantics_raise_and_leave_state_alone(
    request_code: Request, payload: Payload, nfds: int, match: str
) -> None:
    h = SessionHarness()
    h.qemu_init()
    before = h.session.snapshot()
    fds = h.books.new(nfds)
    with pytest.raises(SessionError, match=match) as info:
        h.send(request_code, payload, fds=fds)
    assert info.value.request is request_code
    assert h.session.snapshot() == before
    assert h.session.state is SessionState.ERROR
    h.check_fds()
    # ERROR is permanent, and fds of later messages are closed.
    late = h.books.new()
    with pytest.raises(SessionError):
        h.send(Request.SET_VRING_CALL, VringFd(0), fds=late)
    h.check_fds()


def _with_memory() -> SessionHarness:
    h = SessionHarness()
    h.qemu_init()
    h.send(Request.SET_FEATURES, U64(DEFAULT_FEATURES))
    h.send(Request.SET_MEM_TABLE, MemoryTable((region(0, 0x10_0000, UVA),)), fds=h.books.new())
    return h


@pytest.mark.parametrize(
    ("vring_addr", "match"),
    [
        (addr(0, 0x1008, 0x2000, 0x3000), "descriptor table at .* 16-byte"),
        (addr(0, 0x1000, 0x2001, 0x3000), "avail ring at .* 2-byte"),
        (addr(0, 0x1000, 0x2000, 0x3002), "used ring at .* 4-byte"),
        (addr(0, 0x10_0000, 0x2000, 0x3000), "descriptor table .* not inside"),
        (addr(0, 0x1000, 0x2000, 0x3000, flags=2), "only the log flag"),
        (VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0), "not inside"),
    ],
)
def test_bad_ring_addresses(vring_addr: VringAddr, match: str) -> None:
    h = _with_memory()
    with pytest.raises(SessionError, match=match):
        h.send(Request.SET_VRING_ADDR, vring_addr)


def test_ring_must_fit_in_one_region_when_it_starts() -> None:
    h = _with_memory()
    h.send(Request.SET_VRING_NUM, VringState(0, 256))
    # 256 descriptors need 4 KiB: starting 1 KiB before the end does not fit.
    h.send(Request.SET_VRING_ADDR, addr(0, 0x10_0000 - 0x400, 0x2000, 0x3000))
    with pytest.raises(SessionError, match="descriptor table .* not inside one memory region"):
        h.send(Request.SET_VRING_KICK, VringFd(0), fds=h.books.new())
    h.check_fds()


@pytest.mark.parametrize(
    ("request_code", "payload"),
    [
        (Request.SET_VRING_NUM, VringState(0, 64)),
        (Request.SET_VRING_BASE, VringState(0, 1)),
        (Request.SET_VRING_ADDR, replace(ring_addr(0), used_user_addr=ring_addr(1).used_user_addr)),
    ],
)
def test_started_ring_refuses_changes(request_code: Request, payload: Payload) -> None:
    h = started_harness()
    with pytest.raises(SessionError, match="ring 0 is started"):
        h.send(request_code, payload)


def test_memory_table_that_drops_a_started_ring_is_refused() -> None:
    h = started_harness()
    fds = h.books.new()
    moved = MemoryTable((region(0, RAM, UVA + 0x1000_0000),))
    assert reply_values(h.send(Request.SET_MEM_TABLE, moved, fds=fds, need_reply=True)) == [U64(1)]
    assert h.session.snapshot().memory[0].region.userspace_addr == UVA
    h.check_fds()


def test_memory_table_while_rings_run_carries_them_over() -> None:
    """Memory hotplug: the rings keep running, translated through the new table."""
    h = started_harness()
    fds = h.books.new(2)
    # Same front-end addresses, guest RAM now at another guest physical address,
    # plus a hot-plugged region.
    table = MemoryTable((region(0x4000_0000, RAM, UVA), region(0x8000_0000, 1 << 20, UVA + RAM)))
    effects = h.send(Request.SET_MEM_TABLE, table, fds=fds, need_reply=True)
    assert reply_values(effects) == [U64(0)]
    (new,) = of(SetMemTable, effects)
    assert isinstance(new, SetMemTable)
    assert [r.index for r in new.rings] == [0, 1, 2]
    for ring in new.rings:
        desc, avail, used = ring_gpas(ring.index)
        assert (ring.desc_gpa, ring.avail_gpa, ring.used_gpa) == (
            0x4000_0000 + desc, 0x4000_0000 + avail, 0x4000_0000 + used,
        )
    assert not of(StopRing, effects)
    assert all(r.started and r.enabled for r in h.session.snapshot().rings)
    h.check_fds()


def test_get_vring_base_without_a_running_queue_answers_the_recorded_base(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = started_harness()
    h.owner.bases = {2: 40}
    h.qemu_stop([2])
    h.send(Request.SET_VRING_BASE, VringState(2, 40))
    h.send(Request.SET_VRING_KICK, VringFd(2), fds=h.books.new())
    monkeypatch.setattr(h.owner, "vring_base", lambda index: None)
    effects = h.send(Request.GET_VRING_BASE, VringState(2, 0))
    assert reply_values(effects) == [VringState(2, 40)]
    assert StopRing(2) in effects
    h.check_fds()


def test_new_kick_on_started_ring_replaces_the_old() -> None:
    h = started_harness()
    (fd,) = h.books.new()
    effects = h.send(Request.SET_VRING_KICK, VringFd(1), fds=(fd,))
    assert effects == [SetKick(1, fd), CloseFds((1008,))]
    h.check_fds()


def test_call_without_fd_and_err_replacement() -> None:
    h = SessionHarness()
    h.qemu_init()
    assert h.send(Request.SET_VRING_CALL, VringFd(0, no_fd=True)) == [
        SetCall(0, None),
        CloseFds((1000,)),
    ]
    (fd,) = h.books.new()
    assert h.send(Request.SET_VRING_ERR, VringFd(0), fds=(fd,)) == [
        SetErr(0, fd),
        CloseFds((1001,)),
    ]
    h.check_fds()


def test_get_queue_num_needs_mq() -> None:
    h = SessionHarness()
    h.send(Request.SET_PROTOCOL_FEATURES, U64(feature_mask(ProtocolFeature.REPLY_ACK)))
    with pytest.raises(SessionError, match="MQ was not negotiated"):
        h.send(Request.GET_QUEUE_NUM)


def test_close_releases_everything() -> None:
    h = started_harness()
    effects = h.session.close()
    assert of(StopRing, effects) == [StopRing(0), StopRing(1), StopRing(2)]
    assert SetMemTable(()) in effects
    assert isinstance(effects[-1], CloseFds)
    h.books.closed_by_effect.extend(effects[-1].fds)
    assert h.session.held_fds() == frozenset()
    h.check_fds()
    assert h.session.close() == []
    with pytest.raises(LocalProtocolError, match="closed"):
        h.session.handle(Message(Request.SET_OWNER, 1, None))


def test_bad_ring_owner_base_is_our_bug() -> None:
    h = started_harness()
    h.owner.bases = {0: 70000}
    with pytest.raises(LocalProtocolError, match="ring owner gave base"):
        h.send(Request.GET_VRING_BASE, VringState(0, 0))


def test_constructor_checks() -> None:
    with pytest.raises(LocalProtocolError):
        SessionHarness(num_queues=2)
    h = SessionHarness(num_queues=4)
    h.send(Request.SET_PROTOCOL_FEATURES, U64(DEFAULT_PROTOCOL_FEATURES))
    assert reply_values(h.send(Request.GET_QUEUE_NUM)) == [U64(4)]


def test_raw_bytes_through_harness_match_encoder() -> None:
    # The harness goes through the real decoder: a message built by hand works too.
    h = SessionHarness()
    data = encode_request(Request.GET_FEATURES)
    assert reply_values(h.send_raw(data)) == [U64(DEFAULT_FEATURES)]


_FUZZ_POOL: list[tuple[Request, Payload, int]] = [
    (Request.GET_FEATURES, None, 0),
    (Request.SET_FEATURES, U64(DEFAULT_FEATURES), 0),
    (Request.SET_FEATURES, U64(1 << 41), 0),
    (Request.SET_OWNER, None, 0),
    (Request.RESET_OWNER, None, 0),
    (Request.GET_PROTOCOL_FEATURES, None, 0),
    (Request.SET_PROTOCOL_FEATURES, U64(DEFAULT_PROTOCOL_FEATURES), 0),
    (Request.GET_QUEUE_NUM, None, 0),
    (Request.SET_MEM_TABLE, MemoryTable((region(0, RAM, UVA),)), 1),
    (Request.SET_MEM_TABLE, MemoryTable((region(0, 0x1000, UVA), region(0x800, 1, 0))), 2),
    (Request.SET_VRING_NUM, VringState(0, 128), 0),
    (Request.SET_VRING_NUM, VringState(1, 3), 0),
    (Request.SET_VRING_BASE, VringState(0, 9), 0),
    (Request.SET_VRING_ADDR, ring_addr(0), 0),
    (Request.SET_VRING_ADDR, ring_addr(2), 0),
    (Request.SET_VRING_KICK, VringFd(0), 1),
    (Request.SET_VRING_KICK, VringFd(2), 1),
    (Request.SET_VRING_CALL, VringFd(0), 1),
    (Request.SET_VRING_CALL, VringFd(2, no_fd=True), 0),
    (Request.SET_VRING_ERR, VringFd(1), 1),
    (Request.SET_VRING_ENABLE, VringState(0, 1), 0),
    (Request.SET_VRING_ENABLE, VringState(0, 0), 0),
    (Request.GET_VRING_BASE, VringState(0, 0), 0),
    (Request.GET_VRING_BASE, VringState(2, 0), 0),
    (Request.SET_LOG_FD, None, 1),
    (Request.RESET_DEVICE, None, 0),
]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(st.sampled_from(range(len(_FUZZ_POOL))), st.booleans()), max_size=30)
)
def test_fuzz_session_only_refuses_and_never_leaks(steps: list[tuple[int, bool]]) -> None:
    h = SessionHarness()
    for pick, need_reply in steps:
        request, payload, nfds = _FUZZ_POOL[pick]
        before = h.session.snapshot()
        try:
            effects = h.send(request, payload, fds=h.books.new(nfds), need_reply=need_reply)
        except SessionError:
            assert h.session.snapshot() == before
            break
        if reply_values(effects) == [U64(1)] and request not in (
            Request.GET_FEATURES,
            Request.GET_QUEUE_NUM,
        ):
            assert h.session.snapshot() == before  # a refusal changes nothing
        h.check_fds()
    h.check_fds()
    effects = h.session.close()
    for effect in effects:
        if isinstance(effect, CloseFds):
            h.books.closed_by_effect.extend(effect.fds)
    h.check_fds()
    assert h.session.held_fds() == frozenset()
