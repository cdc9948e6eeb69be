"""The test front-end against the real codec and session over a socketpair.

A minimal back-end loop runs in a thread (the emulator's real loop is
emulators/process.py): it reads whatever the socket gives, so Linux's own
fd delivery exercises the decoder, applies the session's effects with real
eventfds and mmap, and answers each kick with a call.
"""

from __future__ import annotations

import mmap
import os
import selectors
import socket
import threading

import pytest

from emulators.vhost_user.codec import CONNECTION_CLOSED, Decoder, Message, Role, encode_request
from emulators.vhost_user.constants import DEFAULT_PROTOCOL_FEATURES, Request
from emulators.vhost_user.effects import (
    CloseFds,
    Effect,
    EnableRing,
    Reply,
    SetCall,
    SetErr,
    SetKick,
    SetMemTable,
    StartRing,
    StopRing,
)
from emulators.vhost_user.errors import RemoteProtocolError
from emulators.vhost_user.messages import VringFd
from emulators.vhost_user.session import BackendSession
from tests.support.vhost_frontend import UVA_BASE, FrontendError, RingLayout, VhostFrontend

MEMORY = 1 << 20


class MiniBackend(threading.Thread):
    """decode -> session -> apply effects; a kick on an enabled ring gets a call."""

    def __init__(self, sock: socket.socket, num_queues: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.decoder = Decoder(Role.BACKEND, close_fd=os.close)
        self.session = BackendSession(num_queues=num_queues, ring_owner=self, close_fd=os.close)
        self.selector = selectors.DefaultSelector()
        self.maps: list[mmap.mmap] = []
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.started: dict[int, int] = {}  # index -> consumed ("avail index")
        self.enabled: set[int] = set()
        self.pending: set[int] = set()
        self.error: Exception | None = None
        self.lock = threading.Lock()

    def vring_base(self, index: int) -> int:
        return self.started[index]

    def run(self) -> None:
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        try:
            while self._step():
                pass
        except RemoteProtocolError as error:
            self.error = error
        finally:
            self._apply(self.session.close())
            self.decoder.close()
            self.selector.close()
            for m in self.maps:
                m.close()
            self.sock.close()

    def _step(self) -> bool:
        for key, _ in self.selector.select(5.0):
            if key.data is None:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 32)
                self.decoder.receive_data(data, fds)
                while True:
                    message = self.decoder.next_message()
                    if message is CONNECTION_CLOSED:
                        return False
                    if not isinstance(message, Message):
                        break
                    with self.lock:
                        self._apply(self.session.handle(message))
            else:
                index = key.data
                os.eventfd_read(self.kick_fds[index])
                self.pending.add(index)
        self._service()
        return True

    def _service(self) -> None:
        for index in sorted(self.pending):
            if index in self.started and index in self.enabled:
                self.pending.discard(index)
                self.started[index] += 1
                if index in self.call_fds:
                    os.eventfd_write(self.call_fds[index], 1)

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case Reply(data):
                    self.sock.sendall(data)
                case SetMemTable(regions):
                    for m in self.maps:
                        m.close()
                    self.maps = [
                        mmap.mmap(r.fd, r.region.memory_size, offset=r.region.mmap_offset)
                        for r in regions
                    ]
                case SetKick(index, fd):
                    if index in self.kick_fds:
                        self.selector.unregister(self.kick_fds.pop(index))
                    if fd is not None:
                        self.kick_fds[index] = fd
                        self.selector.register(fd, selectors.EVENT_READ, index)
                case SetCall(index, fd):
                    self.call_fds.pop(index, None)
                    if fd is not None:
                        self.call_fds[index] = fd
                        os.eventfd_write(fd, 1)  # DESIGN.md: once on every new call fd
                case SetErr():
                    pass
                case StartRing(ring, _, enabled):
                    self.started[ring.index] = ring.base
                    if enabled:
                        self.enabled.add(ring.index)
                case EnableRing(index, enabled):
                    (self.enabled.add if enabled else self.enabled.discard)(index)
                case StopRing(index):
                    del self.started[index]
                    self.enabled.discard(index)
                case CloseFds(fds):
                    for fd in fds:
                        os.close(fd)
                case _:
                    pass


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def layout(index: int, size: int = 64) -> RingLayout:
    base = 0x1_0000 + index * 0x4000
    return RingLayout(index, size, base, base + 0x1000, base + 0x2000)


def sync(frontend: VhostFrontend) -> None:
    """A round trip: every message sent before it has been handled."""
    frontend.request(Request.GET_FEATURES)


@pytest.mark.timeout(30)
def test_full_life_over_a_socketpair() -> None:
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = MiniBackend(b, num_queues=3)
    backend.start()
    frontend = VhostFrontend(a, memory_size=MEMORY, num_queues=3)

    frontend.init()
    assert frontend.protocol_features == DEFAULT_PROTOCOL_FEATURES
    assert frontend.queue_num == 3
    sync(frontend)
    snap = backend.session.snapshot()
    assert snap.owner and all(r.call_fd is not None and r.err_fd is not None for r in snap.rings)

    frontend.memory[0x8000:0x8010] = b"guest ram shared"
    frontend.start([layout(0), layout(1), layout(2)])
    sync(frontend)
    # The memfd came through and the back-end maps the same pages.
    assert backend.maps[0][0x8000:0x8010] == b"guest ram shared"
    backend.maps[0][0x9000:0x9004] = b"back"
    assert frontend.memory[0x9000:0x9004] == b"back"
    snap = backend.session.snapshot()
    assert snap.memory[0].region.userspace_addr == UVA_BASE
    assert all(r.started and r.enabled and r.num == 64 for r in snap.rings)

    for index in range(3):
        # The kick sent right after SET_VRING_KICK is served once the ring is
        # enabled, and every new call fd got one signal: drain both.
        assert frontend.wait_call(index, 2.0)
        assert not frontend.wait_call(index, 0.05)
        frontend.kick(index)
        assert frontend.wait_call(index, 2.0)
    bases = frontend.stop()
    assert bases == {0: 2, 1: 2, 2: 2}
    sync(frontend)
    assert not any(r.started for r in backend.session.snapshot().rings)

    # Reboot: the firmware uses only the first request queue, resuming its base.
    frontend.start([layout(2)], bases={2: bases[2]})
    sync(frontend)
    assert backend.started == {2: 3}  # base 2 plus the start-up kick
    assert frontend.wait_call(2, 2.0)
    frontend.kick(2)
    assert frontend.wait_call(2, 2.0)
    assert frontend.stop() == {2: 4}

    frontend.close()
    backend.join(5.0)
    assert not backend.is_alive() and backend.error is None
    assert open_fds() == before


@pytest.mark.timeout(30)
def test_bad_message_tears_down_and_closes_its_fds() -> None:
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = MiniBackend(b, num_queues=3)
    backend.start()
    frontend = VhostFrontend(a, memory_size=MEMORY, num_queues=3)
    frontend.init()
    # A SET_VRING_KICK that says "no fd" but brings one: a syntax error.
    stray = os.eventfd(0)
    frontend.send_raw(encode_request(Request.SET_VRING_KICK, VringFd(0, no_fd=True)), [stray])
    os.close(stray)
    with pytest.raises(FrontendError, match="closed"):
        frontend.request(Request.GET_FEATURES)
    backend.join(5.0)
    assert isinstance(backend.error, RemoteProtocolError)
    assert "must carry 0" in str(backend.error)
    frontend.close()
    assert open_fds() == before


@pytest.mark.timeout(30)
def test_refused_request_with_need_reply_is_a_failure_ack() -> None:
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = MiniBackend(b, num_queues=3)
    backend.start()
    frontend = VhostFrontend(a, memory_size=MEMORY, num_queues=3)
    frontend.init()
    # Ring 7 does not exist: the kick is refused; with NEED_REPLY the session goes on.
    kick = os.eventfd(0)
    with pytest.raises(FrontendError, match="failed: ack 1"):
        frontend.request(Request.SET_VRING_KICK, VringFd(7), fds=(kick,), need_reply=True)
    os.close(kick)
    sync(frontend)
    assert backend.error is None
    frontend.close()
    backend.join(5.0)
    assert open_fds() == before
