"""The launcher's end of one emulator's control socket, on asyncio.

The protocol is in `protocol`, the hang verdicts in `detector`; this is the
thin I/O around them: read datagrams as they come, hand PONGs to the
detector, send PINGs when the detector says, and report a verdict once.

The link starts no task of its own: its heartbeat is the coroutine
`heartbeat()`, run by whoever owns the process at the time (the spare pool
while a spare waits, the slot during a hand-over and while it serves), in
that owner's task group. Every way the link can fail ends in the `hung`
future, never in an exception nobody awaits: a hang verdict, a protocol
violation, the emulator closing its end, or an error in the heartbeat
itself. A future the link can no longer complete (`ready`, `assigned`) gets
`LinkClosed`, not a cancellation: CancelledError means only "we cancelled".

Taking over a link (re-attach). A launcher that died leaves its emulators'
control sockets to the next one, with whatever the emulator sent and nobody
read: PONGs to pings the new launcher never sent, RESULTs to its commands,
an ASSIGNED. Judged, they would kill a healthy emulator (an answer to
nothing is a protocol violation), or worse, a late RESULT could answer a
new command that reuses its seq. So an adopted link first sends a barrier:
a PING with `BARRIER_SEQ`, which no detector uses, carrying the clock at
adoption. The emulator answers messages in the order they came, on a
socket that keeps order, so everything before the barrier's PONG answers
the launcher before and everything after it answers this one: the first
is dropped (logged at debug), the second judged as on any link, from seq 1
again. No seq needs to outlive a launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from launcher.heartbeat import protocol as proto
from launcher.heartbeat.detector import HangDetector, SendPing, Verdict
from launcher.status import LOG


@dataclass(frozen=True, slots=True)
class ProtocolBroken:
    """Not hung but as bad: the emulator sent what the protocol forbids."""

    detail: str

    @property
    def reason(self) -> str:
        return f"broke the control protocol: {self.detail}"


Judgement = Verdict | ProtocolBroken


class LinkClosed(Exception):
    """The control link closed before the answer came (the emulator died or
    closed its end, or the launcher closed the link)."""


def control_pair() -> tuple[socket.socket, socket.socket]:
    """(launcher end, emulator end); the emulator end is inheritable."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return ours, theirs


BARRIER_SEQ = 0
"""The seq of an adopted link's barrier PING; a HangDetector's run 1..U32_MAX."""


class ControlLink:
    def __init__(self, name: str, sock: socket.socket, adopted: bool = False) -> None:
        """`adopted`: `sock` is the control channel of a running emulator that
        an earlier launcher talked to (re-attach). Until `settled` is done,
        what the emulator sends is dropped unseen (see the module's
        docstring); what this link sends meanwhile is answered after it."""
        self.name = name
        self.sock = sock
        self.sock.setblocking(False)
        self.detector: HangDetector | None = None
        self.ready: asyncio.Future[proto.Ready] = asyncio.get_running_loop().create_future()
        self.assigned: asyncio.Future[proto.Assigned] | None = None
        # Commands waiting for their RESULT, by seq; answers are matched by it.
        self._results: dict[int, asyncio.Future[proto.Result]] = {}
        self._command_seq = 0
        self.hung: asyncio.Future[Judgement] = asyncio.get_running_loop().create_future()
        self.closed = False
        # The last sign of life: a PONG or an answer; the hand-over's deadline.
        self.last_heard_ns = time.monotonic_ns()
        # An adopted link's barrier: until its PONG comes, what arrives was
        # meant for the launcher before (see `settled`).
        self._barrier = proto.Ping(BARRIER_SEQ, time.monotonic_ns()) if adopted else None
        self._barrier_sent = not adopted
        #: Done once every message meant for an earlier launcher is gone (at
        #: once for a link that was never anyone else's); LinkClosed if the
        #: link closes first.
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if adopted:
            with contextlib.suppress(OSError):  # sent again before our first message
                self._send_barrier()
        else:
            self.settled.set_result(None)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def send(self, message: proto.Message) -> None:
        if not self._barrier_sent:
            self._send_barrier()
        self._send(message)

    def _send(self, message: proto.Message) -> None:
        data, fds = proto.encode(message)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def _send_barrier(self) -> None:
        assert self._barrier is not None
        self._send(self._barrier)
        self._barrier_sent = True

    def send_assign(self, config_json: str, fds: list[int]) -> asyncio.Future[proto.Assigned]:
        """Send the assignment now; the future gets the answer, or `LinkClosed`."""
        self.assigned = asyncio.get_running_loop().create_future()
        if self.closed:
            _fail(self.assigned, "the control link is closed")
        else:
            self.send(proto.Assign(config_json, tuple(fds)))
        return self.assigned

    async def command(self, command: proto.Command, timeout: float) -> proto.Result:
        """Send one change to the running emulator under a seq of its own, and
        return its answer: the RESULT with that seq and no other, so an answer
        that comes after its command timed out completes nothing. Raises
        TimeoutError, OSError when the command cannot be sent, or LinkClosed
        when the link closes (or is closed) before the answer."""
        return await self._exchange(lambda seq: dataclasses.replace(command, seq=seq), timeout)

    async def promote(self, timeout: float) -> proto.Result:
        """Tell a hot standby it serves its slot now; its answer (a RESULT with
        the PROMOTE's seq). Raises as `command` does."""
        return await self._exchange(proto.Promote, timeout)

    async def _exchange(self, message: Callable[[int], proto.Message],
                        timeout: float) -> proto.Result:
        """Send `message(seq)` under a new seq; the RESULT with that seq."""
        if self.closed:
            raise LinkClosed(f"control link to {self.name} closed")
        self._command_seq = self._command_seq % proto.U32_MAX + 1
        seq = self._command_seq
        answer: asyncio.Future[proto.Result] = asyncio.get_running_loop().create_future()
        self._results[seq] = answer
        try:
            self.send(message(seq))
            return await asyncio.wait_for(answer, timeout)
        finally:
            del self._results[seq]

    def watch(self, heartbeat_ms: int, hang_timeout_ms: int) -> None:
        """Judge this process by these limits from now on (a spare, once
        assigned, by its emulator's); `heartbeat()` does the pinging. The
        same detector is kept for the same process, so a late PONG to a ping
        sent while it waited is still an answer."""
        if self.detector is None:
            self.detector = HangDetector(heartbeat_ms, hang_timeout_ms)
            self.detector.reset(time.monotonic_ns())
        else:
            self.detector.rearm(heartbeat_ms, hang_timeout_ms, time.monotonic_ns())

    @property
    def interval_ns(self) -> int:
        """The heartbeat interval (0 before `watch`)."""
        return self.detector.heartbeat_ms * 1_000_000 if self.detector else 0

    @property
    def round_trip_ms(self) -> float | None:
        return self.detector.round_trip_ms if self.detector else None

    @contextlib.asynccontextmanager
    async def beating(self) -> AsyncIterator[None]:
        """Run `heartbeat()` while the block runs, as a child of the caller:
        started here, cancelled and awaited on the way out, its failure (there
        should be none: see `heartbeat`) raised in the caller. Our own
        cancellation is never swallowed: the child is awaited with
        `asyncio.wait`, which does not raise for it."""
        ticker = asyncio.create_task(self.heartbeat(), name=f"heartbeat {self.name}")
        try:
            yield
        finally:
            ticker.cancel()
            await asyncio.wait({ticker})
            if not ticker.cancelled() and ticker.exception() is not None:
                raise ticker.exception()  # type: ignore[misc]

    async def heartbeat(self) -> None:
        """Ping and judge until a verdict, the link closes, or the owner cancels.

        Never raises anything but CancelledError: an error here is a verdict
        like a hang (the process is then killed and the policy decides),
        because a heartbeat that stopped unseen would leave a hung emulator
        running for ever."""
        try:
            while not self.closed and not self.hung.done():
                detector = self.detector
                if detector is None:
                    raise RuntimeError("heartbeat() before watch()")
                for action in detector.tick(time.monotonic_ns()):
                    if isinstance(action, SendPing):
                        with contextlib.suppress(OSError):
                            self.send(action.message())
                    else:
                        self._verdict(action)
                        return
                deadline = detector.next_deadline_ns()
                delay = 0.05 if deadline is None else max(
                    0.0, (deadline - time.monotonic_ns()) / 1e9)
                await asyncio.sleep(delay)
        except Exception as e:
            LOG.error("heartbeat of %s failed: %r", self.name, e)
            self._verdict(ProtocolBroken(f"heartbeat failed: {e!r}"))

    def _verdict(self, verdict: Judgement) -> None:
        if not self.hung.done():
            self.hung.set_result(verdict)

    def _readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, proto.MAX_DATAGRAM + 1, proto.MAX_FDS)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        for fd in fds:  # an emulator never sends fds
            os.close(fd)
        if not data:
            # Said before closing, so an owner waiting on `hung` sees it.
            self._verdict(ProtocolBroken("closed its control channel"))
            self.close()
            return
        try:
            message = proto.decode(data, [], sender=proto.Sender.EMULATOR)
            self._on_message(message)
        except proto.ControlProtocolError as e:
            LOG.error("emulator %s broke the control protocol: %s", self.name, e)
            self._verdict(ProtocolBroken(str(e)))

    def _on_message(self, message: proto.Message) -> None:
        barrier = self._barrier
        if barrier is not None:
            if not (isinstance(message, proto.Pong) and message.seq == barrier.seq
                    and message.sent_ns == barrier.sent_ns):
                LOG.debug("emulator %s: dropped %s (seq %d) meant for the previous launcher",
                          self.name, type(message).__name__, getattr(message, "seq", 0))
                return
            LOG.debug("emulator %s: control link taken over", self.name)
            self._barrier = None
            self.last_heard_ns = time.monotonic_ns()
            if not self.settled.done():
                self.settled.set_result(None)
            return
        self.last_heard_ns = time.monotonic_ns()
        if isinstance(message, proto.Pong):
            if self.detector is not None:
                verdict = self.detector.on_pong(message, time.monotonic_ns())
                if verdict is not None:
                    self._verdict(verdict)
        elif isinstance(message, proto.Ready):
            if not self.ready.done():
                self.ready.set_result(message)
        elif isinstance(message, proto.Result):  # before Assigned: it is one
            self._on_result(message)
        elif (
            isinstance(message, proto.Assigned)
            and self.assigned is not None
            and not self.assigned.done()
        ):
            self.assigned.set_result(message)

    def _on_result(self, result: proto.Result) -> None:
        answer = self._results.get(result.seq)
        if answer is not None:
            if not answer.done():
                answer.set_result(result)
        elif 0 < result.seq <= self._command_seq:
            LOG.warning("emulator %s answered command %d after it was given up on; ignored",
                        self.name, result.seq)
        else:
            raise proto.ControlSessionError(
                "an answer to a command never sent",
                message_type=proto.MessageType.RESULT, seq=result.seq,
            )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        for fut in (self.ready, self.settled, self.assigned, *self._results.values()):
            if fut is not None and not fut.done():
                _fail(fut, f"control link to {self.name} closed")


def _fail(fut: asyncio.Future[Any], why: str) -> None:
    """Complete `fut` with LinkClosed, marked as seen: whoever waits gets it,
    and nobody waiting is not an error worth a log line."""
    fut.set_exception(LinkClosed(why))
    fut.exception()
