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
reply, but for the dirty log's SET_LOG_BASE, whose answer the keeper reads
and drops), then re-sends the message whose exchange the death interrupted,
and QEMU gets exactly one reply, later than usual. The rings' positions and
in-flight requests come from the state store, which the new emulator maps
itself. The data plane (kick and call eventfds, guest RAM) never passes
through here.

Fds: the keeper keeps its own copy of every fd QEMU sent (memory, dirty
log, kick, call, err) for as long as the record holds it, because a replay needs them;
the record says when one is superseded (CloseFds) and it is closed then.

Front-end faults. Before a message goes to the emulator, the keeper checks it
(emulators.vhost_user.admission): the session's rules run on a trial copy of
the record, and the fds are looked at (fstat, fcntl, /proc) for what the
emulator will do with them. A message no correct front-end sends is refused
the way the vhost-user spec allows: a failure status where QEMU asked for a
REPLY_ACK, else the keeper hangs up on QEMU (the spec lets a back-end close
the connection on an error); either way a FRONTEND_REFUSED event goes out
(`on_refused`), the message's fds are closed, and it is neither recorded nor
replayed. Once REPLY_ACK is negotiated the keeper asks the emulator for a
status on every message (NEED_REPLY), and answers QEMU only where QEMU asked;
so a message counts as done, and is recorded, only when the emulator has
accepted it. The keepers of one emulator share a `OneInFlight`: one message
at a time goes to that emulator, so the one in flight when it ends with a
protocol error is the one it ended on: `blame_pending` refuses it instead of
re-sending it, and the supervisor does not count that end as a crash.
(Without REPLY_ACK, messages that need no reply are recorded as they are
sent, as before: only admission stands between them and the emulator.)

A hot standby (`follow`). A standby emulator gets a socketpair of its own
to the keeper: `follow` sends it the replay of the record, and from then on
every message the record takes (`_commit`: its exchange with the serving
emulator is complete), without NEED_REPLY. The standby applies them and
answers nothing (emulators.controller), so it holds what the serving
emulator holds, and nothing is replayed when it takes over. A message in
flight when the serving emulator dies was never committed, so the standby
never had it: once the launcher promoted the standby, `attach` with
`resend` makes that socket the backend and sends the message again, and
QEMU gets exactly one reply, as with a replay. A follower whose socket
cannot take a message at once (a frozen standby with a full buffer) is
dropped (`on_lost`): the keeper never blocks on a standby.

Outliving the launcher. Everything above lives in the launcher's memory, so
the keeper also writes it down (launcher.keeperrecord): `on_record` gets the
encoded record, and the fds it references, each time it changes: the
session, the message in flight (and whether it reached the emulator) and
QEMU's messages not yet forwarded. A message from QEMU is in the record
before it goes anywhere, and leaves it (committed or refused) only after
the emulator and QEMU have had what they are owed: so a launcher killed at
any point loses none, and at worst a successor sends one again (a message
that needs no reply re-applies the same state). A later launcher builds a
fresh keeper, `restore`s the record with the fds, connects it to QEMU's
socket and `attach`es the emulator still running with `replay=False`
(nothing is sent to it but a message it never got), or a new one with
`replay=True`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emulators.vhost_user.admission import (
    Admission,
    Answer,
    FdFacts,
    FdKind,
    can_ack,
    refusal_answer,
    wants_ack,
)
from emulators.vhost_user.codec import (
    CONNECTION_CLOSED,
    Decoder,
    Message,
    Role,
    encode_ack,
    encode_reply,
    encode_request,
)
from emulators.vhost_user.constants import Request
from emulators.vhost_user.effects import CloseFds
from emulators.vhost_user.errors import VhostUserError
from emulators.vhost_user.messages import U64, VringState
from emulators.vhost_user.replay import ANSWERED_IN_REPLAY, replay_answers, replay_messages
from emulators.vhost_user.session import HAS_OWN_REPLY, BackendSession
from launcher import keeperrecord
from launcher.statestore.layout import MAX_QUEUE_SIZE
from launcher.status import LOG

RECV_BYTES = 65536
RECV_MAX_FDS = 16
_F_SEAL_WRITE = 0x0008
_F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not named by Python's fcntl module


@dataclass
class KeeperStats:
    relayed: int = 0
    replays: int = 0
    resent: int = 0
    refused: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A front-end message the keeper refused, for the FRONTEND_REFUSED event."""

    controller: str
    request: str
    reason: str
    answer: Answer

    def event_data(self) -> dict[str, Any]:
        """The event's members but the emulator's id, which the slot adds."""
        return {"controller": self.controller, "request": self.request,
                "reason": self.reason, "action": self.answer.value}


def fd_facts(fd: int) -> FdFacts:
    """What a back-end would find `fd` to be when it maps or signals it."""
    try:
        st = os.fstat(fd)
    except OSError:
        return FdFacts(FdKind.OTHER)
    if stat.S_ISREG(st.st_mode):
        writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0  # not a memfd: no seals
        if seals & (_F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE):
            writable = False
        return FdFacts(FdKind.FILE, st.st_size, writable)
    if stat.S_ISSOCK(st.st_mode):
        return FdFacts(FdKind.SOCKET)
    if stat.S_ISFIFO(st.st_mode):
        return FdFacts(FdKind.PIPE)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    return FdFacts(FdKind.EVENTFD if target == "anon_inode:[eventfd]" else FdKind.OTHER)


class OneInFlight:
    """At most one front-end message in flight to an emulator, across all the
    controllers it serves. An emulator that ends with a protocol error ended on
    the message it was handling; with one in flight, that is the one a keeper
    still waits on, never a neighbour's that the emulator had not read yet.
    Control messages are rare (set-up, reset), so the wait costs little."""

    def __init__(self) -> None:
        self.holder: SessionKeeper | None = None
        self._waiting: list[Callable[[], None]] = []

    def take(self, keeper: SessionKeeper, wake: Callable[[], None]) -> bool:
        """Whether `keeper` may send now; if not, `wake` is called once the
        message in flight is done (it must not send from inside the call)."""
        if self.holder is None or self.holder is keeper:
            self.holder = keeper
            return True
        if wake not in self._waiting:
            self._waiting.append(wake)
        return False

    def give_back(self, keeper: SessionKeeper) -> None:
        if self.holder is not keeper:
            return
        self.holder = None
        waiting, self._waiting = self._waiting, []
        for wake in waiting:  # the first to pump takes it; the others wait again
            wake()


class SessionKeeper:
    """Relays and records one controller's vhost-user session."""

    def __init__(
        self,
        controller_id: str,
        qemu_side: socket.socket | None,
        num_queues: int,
        on_qemu_closed: Callable[[str], None] | None = None,
        on_refused: Callable[[Refusal], None] | None = None,
        guest_memory: int | None = None,
        in_flight: OneInFlight | None = None,
        on_record: Callable[[bytes, list[int]], None] | None = None,
    ) -> None:
        """`on_refused` hears of every front-end message refused; `guest_memory`
        bounds what one memory table may map (the emulator's address space is
        sized from it); `in_flight` is shared by the keepers of one emulator;
        `on_record` is called, synchronously, with the encoded record and the
        fds it references whenever it changes (see the module docstring). The
        fds stay the keeper's: the callee dups or sends them, never closes them."""
        self.controller_id = controller_id
        self.qemu: socket.socket | None = None
        self._qemu_decoder = Decoder(Role.BACKEND, close_fd=os.close)
        self.record = BackendSession(
            num_queues=num_queues,
            ring_owner=self,
            close_fd=os.close,
            max_queue_size=MAX_QUEUE_SIZE,
        )
        self._admission = Admission(self.record, guest_memory)
        self._inbox: collections.deque[Message] = collections.deque()
        self._pending: Message | None = None
        self._delivered = False  # the pending message reached the current emulator
        self._replay_answers = 0  # answers to the replay still to drop
        self._draining = False
        self._gate = in_flight if in_flight is not None else OneInFlight()
        self._backend: socket.socket | None = None
        self._backend_decoder: Decoder | None = None
        self._follower: socket.socket | None = None
        self._on_follower_lost: Callable[[str], None] = lambda why: None
        self._on_qemu_closed = on_qemu_closed
        self._on_refused = on_refused
        self._on_record = on_record
        self._last_record: tuple[bytes, tuple[int, ...]] | None = None
        self._fresh = True  # nothing received, attached or restored yet
        self._stopped_base: int | None = None
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
        self._fresh = False
        if self.closed:  # a restored record says QEMU had hung up
            qemu_side.close()
            return
        self.qemu = qemu_side
        self.qemu.setblocking(False)
        self._loop.add_reader(self.qemu.fileno(), self._on_qemu_readable)

    # The record's GET_VRING_BASE answer is never sent anywhere (the
    # emulator's is); it records the base the emulator answered with.
    def vring_base(self, index: int) -> int:
        return self._stopped_base if self._stopped_base is not None else 0

    @property
    def attached(self) -> bool:
        return self._backend is not None

    @property
    def following(self) -> socket.socket | None:
        """The hot standby's socket, while one follows the session."""
        return self._follower

    # -- the hot standby

    def follow(self, sock: socket.socket, on_lost: Callable[[str], None]) -> bool:
        """A hot standby follows the session from now on: it gets the record's
        replay now and every committed message later. False (the socket
        closed, `on_lost` not called) if even the replay did not go out."""
        self.unfollow()
        if self.closed:
            sock.close()
            return False
        sock.setblocking(False)
        self._follower = sock
        self._on_follower_lost = on_lost
        for data, fds in replay_messages(self.record.snapshot(), {}):
            if not self._to_follower(data, fds, report=False):
                return False
        return True

    def unfollow(self) -> None:
        """The standby is gone (or dropped): close its socket."""
        sock, self._follower = self._follower, None
        if sock is not None:
            sock.close()

    def _forward(self, message: Message) -> None:
        if self._follower is not None:
            data = encode_request(message.request, message.payload, need_reply=False,
                                  fds=message.fds)
            self._to_follower(data, message.fds, report=True)

    def _to_follower(self, data: bytes, fds: tuple[int, ...] | list[int], report: bool) -> bool:
        assert self._follower is not None
        try:
            if fds:
                sent = socket.send_fds(self._follower, [data], list(fds))
            else:
                sent = self._follower.send(data)
            if sent != len(data):
                raise BlockingIOError("the standby's socket is full")
        except OSError as e:
            self.unfollow()
            LOG.warning("%s: the standby stopped following the session: %s",
                        self.controller_id, e)
            if report:
                self._on_follower_lost(str(e))
            return False
        return True

    @property
    def waiting_for_reply(self) -> bool:
        return self._pending is not None

    # -- the record that outlives the launcher

    def encode_record(self) -> tuple[bytes, list[int]]:
        """The keeper's record now (launcher.keeperrecord) and the fds it
        references, which stay the keeper's."""
        if self.closed:
            return keeperrecord.encode(keeperrecord.from_session(self.record, closed=True))
        return keeperrecord.encode(keeperrecord.from_session(
            self.record, pending=self._pending, delivered=self._delivered,
            queued=tuple(self._inbox),
        ))

    def _changed(self) -> None:
        """Tell `on_record` of the record, if it differs from the last it heard."""
        if self._on_record is None:
            return
        data, fds = self.encode_record()
        if self._last_record == (data, tuple(fds)):
            return
        try:
            self._on_record(data, fds)
        except Exception as e:  # the session goes on; the next change tries again
            LOG.error("%s: the keeper's record could not be kept: %s", self.controller_id, e)
            self._last_record = None
            return
        self._last_record = (data, tuple(fds))

    def restore(self, data: bytes, fds: list[int]) -> None:
        """Take on the record an earlier keeper of this controller wrote (its
        `on_record`'s bytes and fds): on a fresh keeper (built with no QEMU
        socket), before `set_frontend` and `attach`. The keeper owns `fds`
        from the call on, whatever its outcome; KeeperRecordError (the fds
        closed, the keeper still fresh) if the record is damaged or was made
        for another kind of keeper. `on_record` is not called: the record is
        the one given."""
        try:
            if not self._fresh or self.qemu is not None or self.attached or self.closed:
                raise RuntimeError(f"{self.controller_id}: restore on a keeper already in use")
            record = keeperrecord.decode(data, fds)
            mine = (self.record.num_queues, self.record.max_queue_size)
            theirs = (record.num_queues, record.max_queue_size)
            # A record from an older launcher offered less (an upgrade under a
            # running VM): what was negotiated from it is within this offer too.
            fewer = (record.offered_features & ~self.record.offered_features
                     or record.offered_protocol_features
                     & ~self.record.offered_protocol_features)
            if mine != theirs or fewer:
                raise keeperrecord.KeeperRecordError(
                    "made by a keeper with other queues, ring size or features "
                    f"(queues and ring size {theirs}, this one has {mine}; features "
                    f"{record.offered_features:#x}/{record.offered_protocol_features:#x}, "
                    f"this one offers {self.record.offered_features:#x}/"
                    f"{self.record.offered_protocol_features:#x})")
        except BaseException:
            for fd in set(fds):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        self._last_record = (data, tuple(fds))  # a record re-encodes to its own bytes
        # decode has fed the same messages to a session built the same way.
        for message in record.session:
            self.record.handle(message)
        self._fresh = False
        if record.closed:
            self.close()
        else:
            self._inbox.extend(record.queued)
            if record.pending is not None:
                self._pending = record.pending
                self._delivered = record.delivered
                if not self._gate.take(self, self._pump_soon):
                    LOG.error("%s: restored a message in flight while another keeper of "
                              "the emulator has one", self.controller_id)

    # -- emulator side

    def attach(self, backend: socket.socket, replay: bool, resend: bool = False) -> None:
        """Start relaying to a (new) emulator; with `replay`, first bring it to
        the recorded state and re-send the interrupted message. Without
        `replay` nothing is sent but a message in flight that never reached
        the emulator (after a `restore`): an emulator that is already serving
        keeps all it holds. With `resend` (a promoted standby, on its
        following socket) the message in flight is sent again whether or not
        it reached the dead predecessor."""
        if backend is self._follower:
            self._follower = None
        self.detach()
        self._fresh = False
        if self.closed:
            # The front-end is gone: the emulator sees this controller's
            # connection end, as it would have seen QEMU's.
            backend.close()
            return
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
            self._replay_answers = replay_answers(steps)
            LOG.debug("%s: replayed %d messages", self.controller_id, len(steps))
            if self._pending is not None:
                self.stats.resent += 1
                self._send(self._pending, self._confirmed(self._pending))
        elif self._pending is not None and (resend or not self._delivered):
            self.stats.resent += 1
            self._send(self._pending, self._confirmed(self._pending))
        backend.setblocking(False)
        self._loop.add_reader(backend.fileno(), self._on_backend_readable)
        self._changed()
        self._pump()

    def detach(self) -> None:
        """The emulator is gone (or being replaced): stop relaying to it."""
        self._replay_answers = 0
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
                self._fresh = False
                self._inbox.append(message)
                self._changed()
        except VhostUserError as e:
            request = e.request.name if e.request is not None else "unknown"
            self._report(Refusal(self.controller_id, request, e.message, Answer.DISCONNECT))
            self._close(f"QEMU broke the protocol: {e}")
            return
        self._pump()

    def _qemu_wants_reply(self, message: Message) -> bool:
        return message.request in HAS_OWN_REPLY or wants_ack(
            message, self.record.acked_protocol_features
        )

    def _confirmed(self, message: Message) -> bool:
        """Whether the emulator is asked for a status on `message` (see the
        module docstring); the record's protocol features say whether it gives one."""
        return can_ack(message.request, self.record.acked_protocol_features)

    def _pump(self) -> None:
        """Check and forward queued messages while no reply is awaited."""
        while (
            not self.closed and not self._draining and self._backend is not None
            and self._pending is None and self._inbox
        ):
            if not self._gate.take(self, self._pump_soon):
                return  # another controller's message is in flight to the emulator
            message = self._inbox.popleft()
            reason = self._admission.check(message, {fd: fd_facts(fd) for fd in message.fds})
            if reason is not None:
                self._gate.give_back(self)
                self._refuse(message, reason)
                self._changed()
            elif self._qemu_wants_reply(message) or self._confirmed(message):
                self._pending = message
                self._send(message, self._confirmed(message))
                self._changed()
            else:
                self._send(message, False)
                self._commit(message)
                self._gate.give_back(self)

    def _pump_soon(self) -> None:
        if not self.closed and not self._loop.is_closed():
            self._loop.call_soon(self._pump)

    def _send(self, message: Message, confirm: bool) -> None:
        assert self._backend is not None
        data = encode_request(
            message.request, message.payload, need_reply=message.need_reply or confirm,
            fds=message.fds,
        )
        self._backend.setblocking(True)
        try:
            if message.fds:
                socket.send_fds(self._backend, [data], list(message.fds))
            else:
                self._backend.sendall(data)
            self.stats.relayed += 1
            self._delivered = True
        except OSError:
            # The emulator died; its exit is seen elsewhere, and a replay re-sends.
            self._delivered = False
        finally:
            if self._backend is not None:
                self._backend.setblocking(False)

    def _commit(self, message: Message) -> None:
        """The exchange is complete: the record takes the message (and its fds),
        and a standby gets it (before the record may close any of its fds)."""
        self._forward(message)
        try:
            effects = self.record.handle(message)
        except VhostUserError as e:  # admission ran the same rules: a bug, not QEMU's
            LOG.error("%s: the record refused %s after the emulator took it: %s",
                      self.controller_id, message.request.name, e)
            self._close(f"session refused {message.request.name}: {e}")
            return
        self._admission.taken(message)
        for effect in effects:
            if isinstance(effect, CloseFds):
                for fd in effect.fds:
                    os.close(fd)
        self._changed()

    def _on_backend_readable(self) -> bool:
        """Read and act on what the emulator sent; False when there was nothing."""
        backend, decoder = self._backend, self._backend_decoder
        if backend is None or decoder is None:
            return False
        try:
            data, fds, _, _ = socket.recv_fds(backend, RECV_BYTES, RECV_MAX_FDS)
        except BlockingIOError:
            return False
        except OSError:
            data, fds = b"", []
        try:
            decoder.receive_data(data, fds)
            while True:
                reply = decoder.next_message()
                if reply is CONNECTION_CLOSED:
                    self.detach()  # the supervisor sees the exit and attaches a new one
                    return False
                if not isinstance(reply, Message):
                    return True
                self._forward_reply(reply)
        except VhostUserError as e:
            LOG.error("%s: the emulator broke the protocol: %s", self.controller_id, e)
            self.detach()
        return False

    def _forward_reply(self, reply: Message) -> None:
        if self._replay_answers and reply.request in ANSWERED_IN_REPLAY:
            # The emulator answers a replayed SET_LOG_BASE too; QEMU had its answer.
            self._replay_answers -= 1
            for fd in reply.fds:
                os.close(fd)
            return
        pending = self._pending
        if pending is None or reply.request != pending.request:
            LOG.error("%s: unexpected reply %s from the emulator", self.controller_id,
                      reply.request.name)
            for fd in reply.fds:
                os.close(fd)
            return
        self._pending = None
        self._gate.give_back(self)
        failed = (
            pending.request not in HAS_OWN_REPLY
            and isinstance(reply.payload, U64) and reply.payload.value != 0
        )
        if failed:
            # The emulator refused what admission let through: still QEMU's fault.
            self._refuse(pending, "the emulator refused it")
            self._changed()
        else:
            answer = encode_reply(reply.request, reply.payload)
            if self._qemu_wants_reply(pending) and not self._reply_to_qemu(answer):
                return
            if pending.request is Request.GET_VRING_BASE:
                assert isinstance(reply.payload, VringState)
                self._stopped_base = reply.payload.num
            self._commit(pending)
            self._stopped_base = None
        self._pump()

    def _reply_to_qemu(self, data: bytes) -> bool:
        assert self.qemu is not None  # a reply answers something QEMU sent
        self.qemu.setblocking(True)
        try:
            self.qemu.sendall(data)
        except OSError as e:
            self._close(f"cannot reply to QEMU: {e}")
            return False
        finally:
            if not self.closed and self.qemu is not None:
                self.qemu.setblocking(False)
        return True

    # -- refusals

    def blame_pending(self) -> str | None:
        """The emulator ended with a protocol error: if a front-end message was in
        flight to it, that message is why. It is refused (QEMU gets a failure
        status, or the connection is dropped) and never re-sent; returns a
        one-line description, or None when nothing was in flight."""
        self._draining = True
        try:  # replies the emulator wrote before it ended settle their messages
            while self._pending is not None and self._on_backend_readable():
                pass
        finally:
            self._draining = False
        message = self._pending
        if message is None or self.closed or not self._delivered:
            return None  # not delivered: it never reached the emulator, and is re-sent
        self._pending = None
        self._gate.give_back(self)
        self._refuse(message, "an emulator ended with a protocol error on it")
        self._changed()
        return (f"controller {self.controller_id}: the front-end's {message.request.name} "
                "ended the emulator with a protocol error; refused, not re-sent")

    def _refuse(self, message: Message, reason: str) -> None:
        """Refuse `message` as the vhost-user spec allows; it is never recorded."""
        for fd in message.fds:
            os.close(fd)
        answer = refusal_answer(message, self.record.acked_protocol_features)
        self._report(Refusal(self.controller_id, message.request.name, reason, answer))
        if answer is Answer.FAILURE_ACK:
            self._reply_to_qemu(encode_ack(message.request, ok=False))
        else:
            self._close(f"refused {message.request.name}: {reason}")

    def _report(self, refusal: Refusal) -> None:
        self.stats.refused += 1
        LOG.warning("%s: refused the front-end's %s (%s): %s", refusal.controller,
                    refusal.request, refusal.answer.value, refusal.reason)
        if self._on_refused is not None:
            self._on_refused(refusal)

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
        self.unfollow()
        if self.qemu is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.qemu.fileno())
        for message in self._inbox:
            for fd in message.fds:
                os.close(fd)
        self._inbox.clear()
        self._gate.give_back(self)
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
        self._changed()
