"""Drive a `BackendSession` in-process, as a front-end would, without sockets.

`SessionHarness` encodes each request with the real codec, feeds the bytes
and (fake) fds through a real back-end `Decoder`, hands the message to the
session and returns its effects.  It hands out fresh fake fd numbers and
keeps the books: every fd given to the back-end must end up held by the
session, closed by an effect, or closed through `close_fd`, exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from emulators.vhost_user.codec import Decoder, Message, Role, encode_request
from emulators.vhost_user.constants import (
    DEFAULT_FEATURES,
    DEFAULT_PROTOCOL_FEATURES,
    Request,
)
from emulators.vhost_user.effects import CloseFds, Effect, Reply
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

UVA = 0x7F00_0000_0000
RAM = 16 << 20


@dataclass
class FakeRingOwner:
    """Answers GET_VRING_BASE with whatever the test put in `bases`."""

    bases: dict[int, int] = field(default_factory=dict)
    asked: list[int] = field(default_factory=list)

    def vring_base(self, index: int) -> int:
        self.asked.append(index)
        return self.bases.get(index, 0)


@dataclass
class FdBooks:
    """Fake fd numbers and where each one went."""

    next_fd: int = 1000
    given: list[int] = field(default_factory=list)
    closed_directly: list[int] = field(default_factory=list)
    closed_by_effect: list[int] = field(default_factory=list)

    def new(self, count: int = 1) -> tuple[int, ...]:
        fds = tuple(range(self.next_fd, self.next_fd + count))
        self.next_fd += count
        self.given.extend(fds)
        return fds

    def close(self, fd: int) -> None:
        self.closed_directly.append(fd)

    def check(self, held: frozenset[int]) -> None:
        """Every fd given is in exactly one place."""
        places = list(held) + self.closed_directly + self.closed_by_effect
        assert sorted(places) == sorted(self.given), (places, self.given)


class SessionHarness:
    """A session plus the codec in front of it; see the module docstring."""

    def __init__(
        self,
        *,
        num_queues: int = 3,
        features: int = DEFAULT_FEATURES,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        books: FdBooks | None = None,
    ) -> None:
        self.books = books or FdBooks()
        self.owner = FakeRingOwner()
        self.decoder = Decoder(Role.BACKEND, close_fd=self.books.close)
        self.session = BackendSession(
            num_queues=num_queues,
            ring_owner=self.owner,
            close_fd=self.books.close,
            features=features,
            protocol_features=protocol_features,
        )

    def send(
        self,
        request: Request,
        payload: Payload = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> list[Effect]:
        data = encode_request(request, payload, need_reply=need_reply, fds=fds)
        return self.send_raw(data, fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> list[Effect]:
        self.decoder.receive_data(data, fds)
        message = self.decoder.next_message()
        assert isinstance(message, Message)
        effects = self.session.handle(message)
        for effect in effects:
            if isinstance(effect, CloseFds):
                self.books.closed_by_effect.extend(effect.fds)
        return effects

    def check_fds(self) -> None:
        self.books.check(self.session.held_fds())

    # --- QEMU 7.2's sequences (DESIGN.md), for tests that need a session in a state

    def qemu_init(self) -> list[list[Effect]]:
        out = [
            self.send(Request.GET_FEATURES),
            self.send(Request.GET_PROTOCOL_FEATURES),
            self.send(Request.SET_PROTOCOL_FEATURES, U64(self.session.offered_protocol_features)),
            self.send(Request.GET_QUEUE_NUM),
            self.send(Request.SET_OWNER),
            self.send(Request.GET_FEATURES),
        ]
        for index in range(self.session.num_queues):
            out.append(self.send(Request.SET_VRING_CALL, VringFd(index), fds=self.books.new()))
            out.append(self.send(Request.SET_VRING_ERR, VringFd(index), fds=self.books.new()))
        return out

    def qemu_start(
        self, rings: Sequence[int] | None = None, *, features: int | None = None
    ) -> list[Effect]:
        rings = list(range(self.session.num_queues)) if rings is None else list(rings)
        effects: list[Effect] = []
        acked = self.session.offered_features if features is None else features
        effects += self.send(Request.SET_FEATURES, U64(acked))
        effects += self.send(
            Request.SET_MEM_TABLE,
            MemoryTable((MemoryRegion(0, RAM, UVA, 0),)),
            fds=self.books.new(),
            need_reply=True,
        )
        for index in rings:
            effects += self.send(Request.SET_VRING_NUM, VringState(index, 128))
            effects += self.send(Request.SET_VRING_BASE, VringState(index, 0))
            effects += self.send(Request.SET_VRING_ADDR, ring_addr(index))
            effects += self.send(Request.SET_VRING_KICK, VringFd(index), fds=self.books.new())
        for index in range(self.session.num_queues):
            effects += self.send(Request.SET_VRING_ENABLE, VringState(index, 1))
        for index in range(self.session.num_queues):
            effects += self.send(Request.SET_VRING_CALL, VringFd(index), fds=self.books.new())
        return effects

    def qemu_stop(self, rings: Sequence[int]) -> list[Effect]:
        effects: list[Effect] = []
        for index in range(self.session.num_queues):
            effects += self.send(Request.SET_VRING_ENABLE, VringState(index, 0))
        for index in rings:
            effects += self.send(Request.GET_VRING_BASE, VringState(index, 0))
        return effects


# -- session shapes QEMU leaves behind, for tests of what is recorded and replayed

def only_init(h: SessionHarness) -> None:
    h.qemu_init()


def started(h: SessionHarness) -> None:
    h.qemu_init()
    h.qemu_start()


def stopped(h: SessionHarness) -> None:
    started(h)
    h.owner.bases = {0: 3, 2: 9}
    h.qemu_stop([0, 1, 2])


def firmware_then_reset(h: SessionHarness) -> None:
    h.qemu_init()
    h.qemu_start([2])
    h.send(Request.RESET_OWNER)


def ring_gpas(index: int) -> tuple[int, int, int]:
    """desc, avail, used guest physical addresses of ring `index` (size 128)."""
    base = 0x10_0000 + index * 0x1_0000
    return base, base + 0x800, base + 0x1000


def ring_addr(index: int) -> VringAddr:
    desc, avail, used = ring_gpas(index)
    return VringAddr(index, 0, desc + UVA, used + UVA, avail + UVA, 0)


def replies(effects: Sequence[Effect]) -> list[bytes]:
    return [e.data for e in effects if isinstance(e, Reply)]
