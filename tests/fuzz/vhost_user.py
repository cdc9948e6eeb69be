"""Fuzz harnesses for what a vhost-user front-end sends: the codec, the session,
the launcher's admission checks.

Inputs are chunks of a byte stream (`Input.records`: u16 length, u8 tag,
bytes); a chunk's tag says how many fake fds arrive with it (tag & 3) and,
for the admission harness, what those fds are. Fds are bare numbers from
`FdBooks`, whose books prove that every fd handed in is, at the end, in
exactly one place: held by the session, handed out in a message, or closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from emulators.vhost_user.admission import Admission, FdFacts, FdKind
from emulators.vhost_user.codec import Decoder, Message, Role, encode_reply, encode_request
from emulators.vhost_user.constants import (
    DEFAULT_FEATURES,
    DEFAULT_PROTOCOL_FEATURES,
    HeaderFlag,
    Request,
)
from emulators.vhost_user.effects import CloseFds, Effect, RingConfig, SetMemTable, StartRing
from emulators.vhost_user.errors import VhostUserError
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
from emulators.vhost_user.session import BackendSession
from tests.support.frontend_codec import RAM, UVA, FdBooks, SessionHarness, ring_addr

from .harness import Harness, Input, OneInput, record

# --- seeds: QEMU 7.2's sequences, encoded by the real codec ---------------------

Step = tuple[Request, Payload, int, bool]  # request, payload, fd count, need_reply


def _init_steps(queues: int = 3) -> list[Step]:
    steps: list[Step] = [
        (Request.GET_FEATURES, None, 0, False),
        (Request.GET_PROTOCOL_FEATURES, None, 0, False),
        (Request.SET_PROTOCOL_FEATURES, U64(DEFAULT_PROTOCOL_FEATURES), 0, False),
        (Request.GET_QUEUE_NUM, None, 0, False),
        (Request.SET_OWNER, None, 0, False),
        (Request.GET_FEATURES, None, 0, False),
    ]
    for index in range(queues):
        steps.append((Request.SET_VRING_CALL, VringFd(index), 1, False))
        steps.append((Request.SET_VRING_ERR, VringFd(index), 1, False))
    return steps


def _start_steps(features: int, rings: range) -> list[Step]:
    steps: list[Step] = [
        (Request.SET_FEATURES, U64(features), 0, False),
        (Request.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, RAM, UVA, 0),)), 1, True),
    ]
    for index in rings:
        steps += [
            (Request.SET_VRING_NUM, VringState(index, 128), 0, False),
            (Request.SET_VRING_BASE, VringState(index, 0), 0, False),
            (Request.SET_VRING_ADDR, ring_addr(index), 0, False),
            (Request.SET_VRING_KICK, VringFd(index), 1, False),
        ]
    steps += [(Request.SET_VRING_ENABLE, VringState(i, 1), 0, False) for i in rings]
    return steps


def _stop_steps(rings: range) -> list[Step]:
    steps: list[Step] = [(Request.SET_VRING_ENABLE, VringState(i, 0), 0, False) for i in rings]
    steps += [(Request.GET_VRING_BASE, VringState(i, 0), 0, False) for i in rings]
    return steps


def _hotplug_steps() -> list[Step]:
    table = MemoryTable((MemoryRegion(0, RAM, UVA, 0), MemoryRegion(RAM, RAM, UVA + RAM, 0)))
    return [
        (Request.SET_MEM_TABLE, table, 2, True),
        (Request.SET_VRING_ADDR, VringAddr(0, 0, UVA + RAM, UVA + RAM + 0x1000,
                                           UVA + RAM + 0x800, 0), 0, True),
        (Request.SET_VRING_NUM, VringState(9, 128), 0, True),  # no such ring: refused
    ]


def _log_steps(rings: range) -> list[Step]:
    """A migration as QEMU runs it on started rings: the dirty log (whose answer
    QEMU waits for), SET_LOG_FD, each ring's log flag with a status asked, a
    new log replacing the first, and logging turned off again."""
    log = LogDescription(RAM // 4096 // 8, 0)
    steps: list[Step] = [
        (Request.SET_LOG_BASE, log, 1, False),
        (Request.SET_LOG_FD, None, 1, False),
    ]
    steps += [(Request.SET_VRING_ADDR, replace(ring_addr(i), flags=1,
                                               log_guest_addr=ring_addr(i).used_user_addr - UVA),
               0, True) for i in rings]
    steps += [(Request.SET_LOG_BASE, replace(log, mmap_offset=4096), 1, False)]
    steps += [(Request.SET_VRING_ADDR, ring_addr(i), 0, True) for i in rings]
    return steps


def _encode_steps(steps: list[Step], tag: Callable[[int], int] = lambda n: n) -> bytes:
    out = b""
    for request, payload, nfds, need_reply in steps:
        data = encode_request(request, payload, need_reply=need_reply, fds=range(nfds))
        out += record(tag(nfds), data)
    return out


_FEATURES = DEFAULT_FEATURES


def _stream_seeds(first: bytes) -> list[bytes]:
    rings = range(3)
    whole = _encode_steps(_init_steps() + _start_steps(_FEATURES, rings) + _stop_steps(rings))
    return [
        first + _encode_steps(_init_steps()),
        first + whole,
        first + _encode_steps(_init_steps() + _start_steps(_FEATURES, range(1))
                              + _hotplug_steps()),
        first + _encode_steps([(Request.RESET_OWNER, None, 0, False)] + _init_steps(1)),
        first + _encode_steps(_init_steps() + _start_steps(_FEATURES, rings) + _log_steps(rings)
                              + _stop_steps(rings)),
    ]


# --- the codec --------------------------------------------------------------------


def _codec_seeds() -> list[bytes]:
    answers: list[tuple[Request, Payload]] = [
        (Request.GET_FEATURES, U64(_FEATURES)),
        (Request.GET_PROTOCOL_FEATURES, U64(DEFAULT_PROTOCOL_FEATURES)),
        (Request.GET_QUEUE_NUM, U64(3)),
        (Request.GET_VRING_BASE, VringState(0, 7)),
    ]
    replies = b"".join(record(0, encode_reply(r, p)) for r, p in answers)
    # A message split in two reads, its fd on the second.
    data = encode_request(Request.SET_VRING_KICK, VringFd(0), fds=[0])
    split = record(0, data[:5]) + record(1, data[5:])
    return [*_stream_seeds(b"\0"), b"\1" + replies, b"\0" + split]


def _make_codec() -> OneInput:
    def one_input(data: bytes) -> None:
        inp = Input(data)
        role = Role.FRONTEND if inp.u8() & 1 else Role.BACKEND
        books = FdBooks()
        decoder = Decoder(role, close_fd=books.close)
        handed: list[int] = []
        try:
            for tag, chunk in [*inp.records(), (0, b"")]:
                decoder.receive_data(chunk, books.new(tag & 3))
                while isinstance(message := decoder.next_message(), Message):
                    handed.extend(message.fds)
                    assert message.is_reply == (role is Role.FRONTEND)
        except VhostUserError:
            pass
        decoder.close()
        books.check(frozenset(handed))
        assert len(handed) == len(set(handed)), "an fd was handed out twice"

    return one_input


CODEC = Harness(
    "vhost_codec",
    "vhost-user framing and payload syntax (emulators.vhost_user.codec), both roles",
    _make_codec,
    _codec_seeds,
)


# --- the session ------------------------------------------------------------------


def _collect(books: FdBooks, effects: list[Effect]) -> None:
    for effect in effects:
        if isinstance(effect, CloseFds):
            books.closed_by_effect.extend(effect.fds)


class RingChecker:
    """The session's promise: a ring it starts (or moves to a new table) lies,
    part by part, inside one region of the memory table in force."""

    def __init__(self) -> None:
        self.regions: tuple[MemoryRegion, ...] = ()

    def check(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, SetMemTable):
                self.regions = tuple(m.region for m in effect.regions)
                for ring in effect.rings:
                    self._inside(ring)
            elif isinstance(effect, StartRing):
                self._inside(effect.ring)

    def _inside(self, ring: RingConfig) -> None:
        num = ring.num
        for what, gpa, length in (("desc", ring.desc_gpa, 16 * num),
                                  ("avail", ring.avail_gpa, 4 + 2 * num),
                                  ("used", ring.used_gpa, 4 + 8 * num)):
            assert any(r.guest_phys_addr <= gpa and gpa + length <= r.guest_phys_addr
                       + r.memory_size for r in self.regions), (what, ring, self.regions)


def _make_session() -> OneInput:
    def one_input(data: bytes) -> None:
        inp = Input(data)
        queues = 3 + inp.u8() % 4
        h = SessionHarness(num_queues=queues)
        rings = RingChecker()
        try:
            for tag, chunk in inp.records():
                h.decoder.receive_data(chunk, h.books.new(tag & 3))
                while isinstance(message := h.decoder.next_message(), Message):
                    effects = h.session.handle(message)
                    _collect(h.books, effects)
                    rings.check(effects)
        except VhostUserError:
            pass
        _collect(h.books, h.session.close())
        h.decoder.close()
        assert not h.session.held_fds(), "a closed session still holds fds"
        h.check_fds()

    return one_input


SESSION = Harness(
    "vhost_session",
    "the back-end session's semantic checks and effects (emulators.vhost_user.session)",
    _make_session,
    lambda: _stream_seeds(b"\0"),
)


# --- the admission checks ---------------------------------------------------------

_KINDS = list(FdKind)


def _facts(inp: Input, fds: tuple[int, ...]) -> dict[int, FdFacts]:
    """Facts for each fd: kind u8, size u32 (in 4 KiB pages), writable u8."""
    out = {}
    for fd in fds:
        kind = _KINDS[inp.u8() % len(_KINDS)]
        out[fd] = FdFacts(kind, size=inp.u32() << 12, writable=bool(inp.u8() & 1))
    return out


def _admission_seeds() -> list[bytes]:
    # Every fd of the seeds is what QEMU sends: memory is a 16 MiB file, the rest eventfds.
    def facts(request: Request, nfds: int) -> bytes:
        if request in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.SET_LOG_BASE):
            return (bytes((0,)) + (RAM >> 12).to_bytes(4, "little") + b"\1") * nfds
        return bytes((1, 0, 0, 0, 0, 0)) * nfds

    def encode(steps: list[Step]) -> bytes:
        out = b""
        for request, payload, nfds, need_reply in steps:
            data = encode_request(request, payload, need_reply=need_reply, fds=range(nfds))
            out += record(nfds, facts(request, nfds) + data)
        return out

    rings = range(3)
    return [
        b"\0" + encode(_init_steps()),
        b"\0" + encode(_init_steps() + _start_steps(_FEATURES, rings) + _stop_steps(rings)),
        b"\0" + encode(_init_steps() + _start_steps(_FEATURES, range(1)) + _hotplug_steps()),
        b"\0" + encode(_init_steps() + _start_steps(_FEATURES, rings) + _log_steps(rings)),
    ]


def _make_admission() -> OneInput:
    def one_input(data: bytes) -> None:
        inp = Input(data)
        h = SessionHarness(num_queues=3 + inp.u8() % 4)
        record_ = h.session
        admission = Admission(record_, guest_memory=64 << 20)
        for tag, chunk in inp.records():
            nfds = tag & 3
            fds = h.books.new(nfds)
            decoder = Decoder(Role.BACKEND, close_fd=h.books.close)
            facts_in = Input(chunk)
            facts = _facts(facts_in, fds)
            try:
                decoder.receive_data(facts_in.rest(), fds)
                decoder.receive_data(b"")
                message = decoder.next_message()
            except VhostUserError:
                decoder.close()
                continue
            decoder.close()
            if not isinstance(message, Message):
                continue
            _admit(h, admission, record_, message, facts)
        _collect(h.books, record_.close())
        h.check_fds()

    return one_input


def _admit(
    h: SessionHarness,
    admission: Admission,
    record_: BackendSession,
    message: Message,
    facts: dict[int, FdFacts],
) -> None:
    """One message through the keeper's steps: check; if accepted the record
    must take it without complaint, else its fds are closed."""
    before = record_.snapshot()
    closed = len(h.books.closed_directly)
    reason = admission.check(message, facts)
    assert reason is None or (isinstance(reason, str) and reason), reason
    assert record_.snapshot() == before, "checking a message changed the record"
    assert len(h.books.closed_directly) == closed, "checking a message closed an fd"
    if reason is not None:
        for fd in message.fds:
            h.books.close(fd)
        return
    bare = replace(message, flags=message.flags & ~HeaderFlag.NEED_REPLY)
    try:
        _collect(h.books, record_.handle(bare))
    except VhostUserError as e:
        raise AssertionError(f"admitted, then refused by the session: {e}") from e
    admission.taken(message)


ADMISSION = Harness(
    "admission",
    "the launcher's admission of front-end messages (emulators.vhost_user.admission)",
    _make_admission,
    _admission_seeds,
)
