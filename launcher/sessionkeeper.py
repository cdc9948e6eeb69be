"""The session keeper: QEMU's vhost-user peer that outlives emulators.

Theory of operation. QEMU's end of each controller's vhost-user socket is
connected to the launcher, not to the emulator. The keeper relays every
control message to the current emulator over a socketpair of its own, one
message at a time, and forwards the emulator's reply when one is due. It
records the session as it goes with the same state machine the emulator runs
(`BackendSession`), fed every message once its exchange is complete, so the
record always equals what a surviving emulator would hold.

When the emulator dies, QEMU sees nothing: its socket stays open. A new
emulator is attached; the keeper replays the record (messages that need no
reply), then re-sends the message whose exchange the death interrupted, and
QEMU gets exactly one reply, later than usual. The rings' positions and
in-flight requests come from the state store, which the new emulator maps
itself. The data plane (kick and call eventfds, guest RAM) never passes
through here.

Fds: the keeper keeps its own copy of every fd QEMU sent (memory, kick,
call, err) for as long as the record holds it, because a replay needs them;
the record says when one is superseded (CloseFds) and it is closed then.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from emulators.vhost_user.codec import (
    CONNECTION_CLOSED,
    Decoder,
    Message,
    Role,
    encode_reply,
    encode_request,
)
from emulators.vhost_user.constants import ProtocolFeature
from emulators.vhost_user.effects import CloseFds
from emulators.vhost_user.errors import VhostUserError
from emulators.vhost_user.replay import replay_messages
from emulators.vhost_user.session import HAS_OWN_REPLY, BackendSession
from launcher.statestore.layout import MAX_QUEUE_SIZE
from launcher.status import LOG

RECV_BYTES = 65536
RECV_MAX_FDS = 16


@dataclass
class KeeperStats:
    relayed: int = 0
    replays: int = 0
    resent: int = 0


class SessionKeeper:
    """Relays and records one controller's vhost-user session."""

    def __init__(
        self,
        controller_id: str,
        qemu_side: socket.socket | None,
        num_queues: int,
        on_qemu_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.controller_id = controller_id
        self.qemu: socket.socket | None = None
        self._qemu_decoder = Decoder(Role.BACKEND, close_fd=os.close)
        self.record = BackendSession(
            num_queues=num_queues,
            ring_owner=self,
            close_fd=os.close,
            max_queue_size=MAX_QUEUE_SIZE,
        )
        self._inbox: collections.deque[Message] = collections.deque()
        self._pending: Message | None = None
        self._backend: socket.socket | None = None
        self._backend_decoder: Decoder | None = None
        self._on_qemu_closed = on_qemu_closed
        self.closed = False
        self.stats = KeeperStats()
        self._loop = asyncio.get_running_loop()
        if qemu_side is not None:
            self.set_frontend(qemu_side)

    def set_frontend(self, qemu_side: socket.socket) -> None:
        """QEMU's connection (later than the keeper when QEMU connects to a
        listening socket in backend-only mode)."""
        if self.qemu is not None:
            raise RuntimeError(f"{self.controller_id}: QEMU is already connected")
        self.qemu = qemu_side
        self.qemu.setblocking(False)
        self._loop.add_reader(self.qemu.fileno(), self._on_qemu_readable)

    # The record's GET_VRING_BASE answer is never sent anywhere (the
    # emulator's is); it only needs a value.
    def vring_base(self, index: int) -> int:
        return 0

    @property
    def attached(self) -> bool:
        return self._backend is not None

    @property
    def waiting_for_reply(self) -> bool:
        return self._pending is not None

    # -- emulator side

    def attach(self, backend: socket.socket, replay: bool) -> None:
        """Start relaying to a (new) emulator; with `replay`, first bring it to
        the recorded state and re-send the interrupted message."""
        self.detach()
        backend.setblocking(True)
        self._backend = backend
        self._backend_decoder = Decoder(Role.FRONTEND, close_fd=os.close)
        if replay:
            steps = replay_messages(self.record.snapshot(), {})
            for data, fds in steps:
                if fds:
                    socket.send_fds(backend, [data], list(fds))
                else:
                    backend.sendall(data)
            self.stats.replays += 1
            LOG.debug("%s: replayed %d messages", self.controller_id, len(steps))
            if self._pending is not None:
                self.stats.resent += 1
                self._send(self._pending)
        backend.setblocking(False)
        self._loop.add_reader(backend.fileno(), self._on_backend_readable)
        self._pump()

    def detach(self) -> None:
        """The emulator is gone (or being replaced): stop relaying to it."""
        if self._backend is None:
            return
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._backend.fileno())
        if self._backend_decoder is not None:
            self._backend_decoder.close()
        self._backend.close()
        self._backend = None
        self._backend_decoder = None

    # -- QEMU side

    def _on_qemu_readable(self) -> None:
        try:
            assert self.qemu is not None
            data, fds, _, _ = socket.recv_fds(self.qemu, RECV_BYTES, RECV_MAX_FDS)
        except BlockingIOError:
            return
        except OSError as e:
            self._close(f"QEMU's socket failed: {e}")
            return
        try:
            self._qemu_decoder.receive_data(data, fds)
            while True:
                message = self._qemu_decoder.next_message()
                if message is CONNECTION_CLOSED:
                    self._close("QEMU closed the connection")
                    return
                if not isinstance(message, Message):
                    break
                self._inbox.append(message)
        except VhostUserError as e:
            self._close(f"QEMU broke the protocol: {e}")
            return
        self._pump()

    def _expects_reply(self, message: Message) -> bool:
        if message.request in HAS_OWN_REPLY:
            return True
        acked = self.record.acked_protocol_features
        return message.need_reply and bool(acked & (1 << ProtocolFeature.REPLY_ACK))

    def _pump(self) -> None:
        """Forward queued messages while no reply is awaited."""
        while self._backend is not None and self._pending is None and self._inbox:
            message = self._inbox.popleft()
            if self._expects_reply(message):
                self._pending = message
                self._send(message)
            else:
                self._send(message)
                self._commit(message)

    def _send(self, message: Message) -> None:
        assert self._backend is not None
        data = encode_request(
            message.request, message.payload, need_reply=message.need_reply, fds=message.fds
        )
        self._backend.setblocking(True)
        try:
            if message.fds:
                socket.send_fds(self._backend, [data], list(message.fds))
            else:
                self._backend.sendall(data)
            self.stats.relayed += 1
        except OSError:
            pass  # the emulator died; its exit is seen elsewhere, and a replay re-sends
        finally:
            if self._backend is not None:
                self._backend.setblocking(False)

    def _commit(self, message: Message) -> None:
        """The exchange is complete: the record takes the message (and its fds)."""
        try:
            effects = self.record.handle(message)
        except VhostUserError as e:
            self._close(f"session refused {message.request.name}: {e}")
            return
        for effect in effects:
            if isinstance(effect, CloseFds):
                for fd in effect.fds:
                    os.close(fd)

    def _on_backend_readable(self) -> None:
        backend, decoder = self._backend, self._backend_decoder
        if backend is None or decoder is None:
            return
        try:
            data, fds, _, _ = socket.recv_fds(backend, RECV_BYTES, RECV_MAX_FDS)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        try:
            decoder.receive_data(data, fds)
            while True:
                reply = decoder.next_message()
                if reply is CONNECTION_CLOSED:
                    self.detach()  # the supervisor sees the exit and attaches a new one
                    return
                if not isinstance(reply, Message):
                    return
                self._forward_reply(reply)
        except VhostUserError as e:
            LOG.error("%s: the emulator broke the protocol: %s", self.controller_id, e)
            self.detach()

    def _forward_reply(self, reply: Message) -> None:
        pending = self._pending
        if pending is None or reply.request != pending.request:
            LOG.error("%s: unexpected reply %s from the emulator", self.controller_id,
                      reply.request.name)
            for fd in reply.fds:
                os.close(fd)
            return
        data = encode_reply(reply.request, reply.payload)
        assert self.qemu is not None  # a reply answers something QEMU sent
        self.qemu.setblocking(True)
        try:
            self.qemu.sendall(data)
        except OSError as e:
            self._close(f"cannot reply to QEMU: {e}")
            return
        finally:
            if not self.closed and self.qemu is not None:
                self.qemu.setblocking(False)
        self._pending = None
        self._commit(pending)
        self._pump()

    # -- teardown

    def _close(self, why: str) -> None:
        if self.closed:
            return
        LOG.debug("%s: %s", self.controller_id, why)
        self.close()
        if self._on_qemu_closed is not None:
            self._on_qemu_closed(why)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.detach()
        if self.qemu is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.qemu.fileno())
        for message in self._inbox:
            for fd in message.fds:
                os.close(fd)
        self._inbox.clear()
        if self._pending is not None:
            for fd in self._pending.fds:
                os.close(fd)
            self._pending = None
        for effect in self.record.close():
            if isinstance(effect, CloseFds):
                for fd in effect.fds:
                    os.close(fd)
        self._qemu_decoder.close()
        if self.qemu is not None:
            self.qemu.close()
