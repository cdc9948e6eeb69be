"""Bring a fresh back-end to a recorded session's state.

When an emulator dies, the launcher's session keeper starts a new one and
sends it the messages that rebuild what the old one had negotiated with QEMU
(DESIGN.md, "The session keeper").  QEMU is not involved, so the replay uses
no NEED_REPLY flags, and requests that need no reply but one: SET_LOG_BASE,
which a back-end always answers (`ANSWERED_IN_REPLAY`); whoever replays reads
and drops that answer (`replay_answers` counts them).  The fds are the
recorded ones: the keeper still holds them.

Order: owner, protocol features, features, memory table, dirty log, then per ring the
call and err fds, size, base (from the state store: what the dead emulator
had consumed up to), addresses, kick (which starts the ring), and last the
enables.  Every message is one the session accepts in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .codec import encode_request
from .constants import HEADER, Feature, Request
from .messages import U64, LogDescription, MemoryTable, Payload, VringFd, VringState
from .session import SessionSnapshot

ReplayStep = tuple[bytes, tuple[int, ...]]
"""One message's bytes and the fds to send with them in the same sendmsg."""

ANSWERED_IN_REPLAY = frozenset({Request.SET_LOG_BASE})
"""Requests a replay may send that the back-end answers all the same (the
front-end waits for that answer: it is how QEMU knows the log is in use)."""


def replay_answers(steps: list[ReplayStep]) -> int:
    """How many answers the back-end sends back for `steps`: the replayer reads
    and drops that many (each a reply to a request of `ANSWERED_IN_REPLAY`)."""
    return sum(1 for data, _ in steps if HEADER.unpack_from(data)[0] in ANSWERED_IN_REPLAY)


def replay_messages(snapshot: SessionSnapshot, vring_bases: Mapping[int, int]) -> list[ReplayStep]:
    """The messages that bring a fresh back-end to `expected_snapshot(snapshot, vring_bases)`.

    `vring_bases` gives the avail index to resume each ring at; a ring it
    does not name resumes at the base the snapshot recorded.
    """
    steps: list[ReplayStep] = []

    def add(request: Request, payload: Payload = None, fds: tuple[int, ...] = ()) -> None:
        steps.append((encode_request(request, payload, fds=fds), fds))

    if snapshot.owner:
        add(Request.SET_OWNER)
    if snapshot.protocol_features is not None:
        add(Request.SET_PROTOCOL_FEATURES, U64(snapshot.protocol_features))
    if snapshot.features is not None:
        add(Request.SET_FEATURES, U64(snapshot.features))
    if snapshot.memory:
        add(
            Request.SET_MEM_TABLE,
            MemoryTable(tuple(m.region for m in snapshot.memory)),
            tuple(m.fd for m in snapshot.memory),
        )
    if snapshot.log is not None:
        log = snapshot.log
        add(Request.SET_LOG_BASE, LogDescription(log.size, log.offset), (log.fd,))
    for ring in snapshot.rings:
        for request, fd in (
            (Request.SET_VRING_CALL, ring.call_fd),
            (Request.SET_VRING_ERR, ring.err_fd),
        ):
            if fd is not None:
                add(request, VringFd(ring.index), (fd,))
        if ring.num is not None:
            add(Request.SET_VRING_NUM, VringState(ring.index, ring.num))
        base = vring_bases.get(ring.index, ring.base)
        if base:
            add(Request.SET_VRING_BASE, VringState(ring.index, base))
        if ring.addr is not None:
            add(Request.SET_VRING_ADDR, ring.addr)
        if ring.started and ring.kick_fd is not None:
            add(Request.SET_VRING_KICK, VringFd(ring.index), (ring.kick_fd,))
    protocol_rings = snapshot.features is not None and bool(
        snapshot.features & (1 << Feature.PROTOCOL_FEATURES)
    )
    if protocol_rings:
        for ring in snapshot.rings:
            if ring.enabled:
                add(Request.SET_VRING_ENABLE, VringState(ring.index, 1))
    return steps


def expected_snapshot(snapshot: SessionSnapshot, vring_bases: Mapping[int, int]) -> SessionSnapshot:
    """The snapshot a fresh back-end reaches after `replay_messages(snapshot, vring_bases)`."""
    rings = tuple(replace(r, base=vring_bases.get(r.index, r.base)) for r in snapshot.rings)
    return replace(snapshot, rings=rings)
