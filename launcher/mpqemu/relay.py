"""The mpqemu relay: keeps the proxy's link whole while remotes come and go.

Theory of operation. The VMM's x-pci-proxy-dev has no reconnect and waits
for every BAR and config access's reply. Its link ends in mplaunch, not in
the remote process: the relay decodes every message from the proxy
(:mod:`launcher.mpqemu.codec`), records what a new remote would need
(:mod:`launcher.mpqemu.record`) and forwards it to the attached remote; it
forwards the remote's RET back. One request waits for its reply at a time
(the proxy holds a mutex around each exchange); SYNC_SYSMEM may arrive while
it waits, and is forwarded at once (the remote reads its link in order).

When the remote is gone (`detach`, called by the slot when the process
exits or hangs, or by the relay itself on a remote fault), the proxy's
messages go on being recorded and its pending request is held: its vCPU
stays blocked, nothing else happens. `attach` of a new remote sends the
replay plan: the record's SYNC_SYSMEM, SET_IRQFD and condensed config
writes (their RETs are the relay's own and are swallowed), then the pending
request again, except a BAR write, which is answered to the proxy as done
(see the record's docstring for why). The proxy sees one reply, late.

Faults. A reply from the remote that is malformed, comes when no request
waits, or has the wrong shape, and the end of the remote's link, call
`on_remote_fault(reason)` once, after the relay detached the remote (kill
it and attach a new one). A malformed message from the proxy, or a second
request before the first's reply, closes the relay and calls
`on_proxy_closed(reason)`; so does the end of the proxy's link.

Sends are non-blocking: messages are at most 208 bytes and at most one
request is outstanding, so a link whose buffer is full is a peer that
stopped reading for good; it is treated as a fault of that peer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from launcher.status import LOG

from .codec import (
    CONNECTION_CLOSED,
    MAX_MESSAGE_FDS,
    REQUEST_TYPES,
    Command,
    Decoder,
    Message,
    MpqemuError,
    NeedData,
    Request,
    Ret,
    Role,
    SetIrqfd,
    SyncSysmem,
    encode,
)
from .record import Record

RELAY_RECV_BYTES = 4096
RECV_MAX_FDS = MAX_MESSAGE_FDS + 1
"""One more than a message may carry, so that too many is seen, not truncated."""


@dataclass
class RelayStats:
    """Counters for status and tests."""

    forwarded: int = 0
    """Messages passed from the proxy to a remote, or replies back."""
    replayed: int = 0
    """Messages of the record sent to a new remote."""
    resent: int = 0
    """Pending requests sent again to a new remote."""
    answered_locally: int = 0
    """Pending BAR writes answered to the proxy as done, without a remote."""
    faults: int = 0
    """Remote faults reported (on_remote_fault calls)."""


class _Owner(enum.Enum):
    """Who a RET the remote owes goes to."""

    RELAY = "relay"  # a replayed config write's
    PROXY = "proxy"  # the pending request's


class MpqemuRelay:
    """Relays one controller's mpqemu link between the VMM's proxy and the
    current remote process."""

    def __init__(
        self,
        name: str,
        proxy: socket.socket,
        on_proxy_closed: Callable[[str], None],
        on_remote_fault: Callable[[str], None],
    ) -> None:
        """`proxy`: mplaunch's end of the proxy's socketpair (the relay owns it
        from now on). `on_proxy_closed(reason)`: the proxy closed the link or
        broke the protocol; the relay is closed. `on_remote_fault(reason)`: the
        attached remote sent something malformed or unexpected, or its link
        ended; the relay has detached it (kill it and attach a new one).
        Must be built inside a running asyncio loop."""
        self.name = name
        self.stats = RelayStats()
        self.record = Record(os.dup, os.close)
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._on_proxy_closed = on_proxy_closed
        self._on_remote_fault = on_remote_fault
        self._proxy = proxy
        self._proxy_decoder = Decoder(Role.REQUESTS, os.close)
        self._remote: socket.socket | None = None
        self._remote_decoder: Decoder | None = None
        self._owed: collections.deque[tuple[_Owner, Command]] = collections.deque()
        self._held_state = False  # a remote has held the proxy's state since the start
        proxy.setblocking(False)
        self._loop.add_reader(proxy.fileno(), self._on_proxy_readable)

    @property
    def attached(self) -> bool:
        """Whether a remote is attached."""
        return self._remote is not None

    @property
    def waiting_for_reply(self) -> bool:
        """Whether the proxy waits for a reply (its vCPU is blocked on it)."""
        return self.record.pending is not None

    @property
    def pending(self) -> Request | None:
        """The request the proxy waits on, if any (for logs)."""
        return self.record.pending

    def attach(self, remote: socket.socket) -> None:
        """Relay to `remote` (the relay owns the socket from now on): replay the
        record, re-send or answer the pending request, then forward both ways.

        Attach a remote only once its QMP monitor has answered a command (the
        qmp_capabilities of a QMP client's connect will do), not at its
        greeting: QEMU's x-remote serves the link as soon as its object
        exists, before the machine's first reset, and that reset would undo
        the replayed config writes (seen: BAR and command register back to
        their reset values). The greeting is written before that reset too.

        A remote whose link refuses the replay is reported through
        `on_remote_fault` before this returns, and is detached."""
        if self.closed:
            remote.close()
            return
        self.detach()
        after_loss = self._held_state
        plan = self.record.replay_plan(after_loss)
        remote.setblocking(False)
        self._remote = remote
        self._remote_decoder = Decoder(Role.REPLIES, os.close)
        self._held_state = True
        self._loop.add_reader(remote.fileno(), self._on_remote_readable)
        for message in plan.setup:
            if not self._send_remote(message):
                return
            self.stats.replayed += 1
            if message.command is Command.PCI_CFGWRITE:
                self._owed.append((_Owner.RELAY, Command.PCI_CFGWRITE))
        if plan.setup:
            LOG.debug("%s: replayed %d messages to the remote", self.name, len(plan.setup))
        if plan.answer is not None:
            done = self.record.answered_locally()
            self.stats.answered_locally += 1
            LOG.info("%s: %s in flight when the remote was lost: answered as done, "
                     "not sent again", self.name, done.command.name)
            self._reply_proxy(plan.answer)
        elif plan.resend is not None:
            if not self._send_remote(plan.resend):
                return
            self._owed.append((_Owner.PROXY, plan.resend.command))
            if after_loss:
                self.stats.resent += 1
                LOG.info("%s: sent %s again to the new remote", self.name,
                         plan.resend.command.name)
            else:
                self.stats.forwarded += 1

    def detach(self) -> None:
        """The remote is gone or being replaced: stop relaying to it and close
        its socket. The proxy's messages are recorded and held until the next
        attach; the proxy keeps waiting for its reply. No-op when detached."""
        remote, decoder = self._remote, self._remote_decoder
        if remote is None:
            return
        self._remote = self._remote_decoder = None
        self._owed.clear()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(remote.fileno())
        if decoder is not None:
            decoder.close()
        remote.close()

    def close(self) -> None:
        """Close both links and every fd the record holds. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.detach()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._proxy.fileno())
        self._proxy_decoder.close()
        self._proxy.close()
        self.record.close()

    # -- the proxy's side

    def _on_proxy_readable(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self._proxy, RELAY_RECV_BYTES, RECV_MAX_FDS)
        except BlockingIOError:
            return
        except OSError as e:
            self._close_proxy(f"the proxy's link failed: {e}")
            return
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            self._close_proxy(f"the proxy sent more than {RECV_MAX_FDS} fds at once")
            return
        try:
            self._proxy_decoder.receive_data(data, fds)
            while not self.closed:
                message = self._proxy_decoder.next_message()
                if message is CONNECTION_CLOSED:
                    self._close_proxy("the proxy closed the link")
                    return
                if isinstance(message, NeedData):
                    return
                self._from_proxy(message)
        except MpqemuError as e:
            self._close_proxy(f"the proxy broke the protocol: {e}")
        except OSError as e:  # no copy of its fds for the record: a replay would lie
            self._close_proxy(f"cannot record the proxy's message: {e}")

    def _from_proxy(self, message: Message) -> None:
        """Record `message` and forward it when a remote is attached. Raises
        MpqemuError for what the proxy may not send now."""
        if isinstance(message, SyncSysmem | SetIrqfd):
            try:
                self.record.note(message)
                if self._remote is not None and self._send_remote(message):
                    self.stats.forwarded += 1
            finally:
                for fd in message.fds:  # sent (the remote has its own) and recorded
                    os.close(fd)
            return
        if not isinstance(message, REQUEST_TYPES):
            raise MpqemuError(f"{message.command.name} is not a request")  # decoder's role
        self.record.request(message)
        if self._remote is not None and self._send_remote(message):
            self._owed.append((_Owner.PROXY, message.command))
            self.stats.forwarded += 1

    def _reply_proxy(self, reply: Ret) -> None:
        data = encode(reply)
        try:
            sent = self._proxy.send(data)
        except OSError as e:
            self._close_proxy(f"cannot reply to the proxy: {e}")
            return
        if sent != len(data):
            self._close_proxy("the proxy's link is full")

    def _close_proxy(self, reason: str) -> None:
        if self.closed:
            return
        LOG.debug("%s: %s", self.name, reason)
        self.close()
        self._on_proxy_closed(reason)

    # -- the remote's side

    def _send_remote(self, message: Message) -> bool:
        """Send to the attached remote; False (and the remote detached, its
        fault reported) when the link does not take it."""
        remote = self._remote
        assert remote is not None
        data = encode(message)
        try:
            if message.fds:
                sent = socket.send_fds(remote, [data], list(message.fds))
            else:
                sent = remote.send(data)
        except OSError as e:
            self._remote_fault(f"cannot send {message.command.name} to the remote: {e}")
            return False
        if sent != len(data):
            self._remote_fault(f"the remote's link is full (sending {message.command.name})")
            return False
        return True

    def _on_remote_readable(self) -> None:
        remote, decoder = self._remote, self._remote_decoder
        if remote is None or decoder is None:
            return
        try:
            data, fds, flags, _ = socket.recv_fds(remote, RELAY_RECV_BYTES, RECV_MAX_FDS)
        except BlockingIOError:
            return
        except OSError:
            data, fds, flags = b"", [], 0
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            self._remote_fault("the remote sent fds it may not send")
            return
        try:
            decoder.receive_data(data, fds)
            while self._remote is remote:
                owed = self._owed[0] if self._owed else None
                reply = decoder.next_message(reply_to=owed[1] if owed else None)
                if reply is CONNECTION_CLOSED:
                    self._remote_fault("the remote closed its link")
                    return
                if isinstance(reply, NeedData):
                    return
                if not isinstance(reply, Ret):  # the decoder's role admits RET only
                    raise MpqemuError(f"{reply.command.name} is not a reply")
                if owed is None:
                    self._remote_fault("the remote sent a reply when none was due")
                    return
                self._owed.popleft()
                if owed[0] is _Owner.RELAY:
                    if reply.value:
                        LOG.warning("%s: the new remote failed a replayed config write "
                                    "(%#x)", self.name, reply.value)
                    continue
                self.record.replied()
                self.stats.forwarded += 1
                self._reply_proxy(reply)
        except MpqemuError as e:
            self._remote_fault(f"the remote broke the protocol: {e}")

    def _remote_fault(self, reason: str) -> None:
        if self._remote is None:
            return
        self.stats.faults += 1
        LOG.warning("%s: %s", self.name, reason)
        self.detach()
        self._on_remote_fault(reason)
