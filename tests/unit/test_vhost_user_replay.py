"""Replaying a recorded session brings a fresh back-end to the same state."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from emulators.vhost_user.codec import Decoder, Message, Role
from emulators.vhost_user.constants import DEFAULT_FEATURES, Feature, Request, feature_mask
from emulators.vhost_user.effects import Reply, StartRing
from emulators.vhost_user.messages import U64, MemoryRegion, MemoryTable, VringFd, VringState
from emulators.vhost_user.replay import expected_snapshot, replay_messages
from emulators.vhost_user.session import SessionSnapshot
from tests.support.frontend_codec import (
    RAM,
    UVA,
    FdBooks,
    SessionHarness,
    firmware_then_reset,
    only_init,
    ring_addr,
    started,
    stopped,
)


def half_enabled(h: SessionHarness) -> None:
    h.qemu_init()
    h.qemu_start()
    h.send(Request.SET_VRING_ENABLE, VringState(1, 0))


def no_protocol_features(h: SessionHarness) -> None:
    h.send(Request.SET_OWNER)
    features = DEFAULT_FEATURES & ~feature_mask(Feature.PROTOCOL_FEATURES)
    h.send(Request.SET_FEATURES, U64(features))
    h.send(Request.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, RAM, UVA, 0),)), fds=h.books.new())
    h.send(Request.SET_VRING_NUM, VringState(0, 128))
    h.send(Request.SET_VRING_ADDR, ring_addr(0))
    h.send(Request.SET_VRING_KICK, VringFd(0), fds=h.books.new())


SCENARIOS: list[Callable[[SessionHarness], None]] = [
    only_init,
    started,
    stopped,
    firmware_then_reset,
    half_enabled,
    no_protocol_features,
]


def replay(snapshot: SessionSnapshot, bases: dict[int, int]) -> tuple[SessionHarness, list[object]]:
    fresh = SessionHarness(books=FdBooks())
    effects: list[object] = []
    for data, fds in replay_messages(snapshot, bases):
        dec = Decoder(Role.BACKEND, close_fd=fresh.books.close)
        dec.receive_data(data, fds)
        message = dec.next_message()
        assert isinstance(message, Message)
        assert not message.need_reply
        assert message.request not in (Request.GET_FEATURES, Request.GET_VRING_BASE)
        effects += fresh.session.handle(message)
    return fresh, effects


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bases", [{}, {0: 40, 1: 41, 2: 65535}])
def test_replay_reaches_the_recorded_state(
    scenario: Callable[[SessionHarness], None], bases: dict[int, int]
) -> None:
    h = SessionHarness()
    scenario(h)
    snapshot = h.session.snapshot()
    fresh, effects = replay(snapshot, bases)
    assert fresh.session.snapshot() == expected_snapshot(snapshot, bases)
    assert not [e for e in effects if isinstance(e, Reply)]
    assert fresh.books.closed_directly == []
    for effect in effects:
        if isinstance(effect, StartRing):
            want = bases.get(effect.ring.index, snapshot.rings[effect.ring.index].base)
            assert effect.ring.base == want


def test_replay_of_started_session_starts_every_started_ring() -> None:
    h = SessionHarness()
    started(h)
    _, effects = replay(h.session.snapshot(), {0: 1, 1: 2, 2: 3})
    starts = [e for e in effects if isinstance(e, StartRing)]
    assert [(s.ring.index, s.ring.base) for s in starts] == [(0, 1), (1, 2), (2, 3)]


def test_expected_snapshot_changes_only_bases() -> None:
    h = SessionHarness()
    started(h)
    snapshot = h.session.snapshot()
    moved = expected_snapshot(snapshot, {1: 12})
    assert moved.rings[1].base == 12
    assert moved.rings[0] == snapshot.rings[0] and moved.memory == snapshot.memory
