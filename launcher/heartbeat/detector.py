"""Hang detection for one emulator, driven by an injected monotonic clock.

Theory of operation
-------------------
The runner arms the detector with `reset(now_ns)` once an emulator is ready,
then calls `tick(now_ns)` whenever `next_deadline_ns()` comes due (or on its
own timer) and feeds every PONG to `on_pong(pong, now_ns)`.  `tick` answers
with `SendPing` when a ping is due, or with a verdict once the emulator is
hung.  There are two ways to be hung:

`NoReply`
    No PONG arrived for ``hang_timeout_ms`` (counted from the last PONG, or
    from `reset`).  The event loop is stuck, or the process is stopped.

`Stalled`
    A queue has requests in flight and its completed counter has not moved
    for ``hang_timeout_ms``.  The event loop still answers but the work does
    not get done (a stuck I/O thread, a request that never finishes).

A stall is only declared on evidence, never on a guess: the counters of a
PONG were sampled somewhere between the moment its PING left (``sent_ns``,
echoed back) and the moment the PONG arrived.  So when a PONG arriving at R
first shows a queue's new counter (or its first request in flight), the
progress happened before R; when a later PONG whose PING left at S shows the
same counter, nothing moved in between.  The detector declares a stall when
S - R >= hang_timeout_ms, which can never accuse a queue that made progress
within the timeout.

Detection bound: with pongs answered promptly, a hang is declared within
hang_timeout_ms + one heartbeat interval of its start.  NoReply: the last
PONG came at most one interval before the hang, and the verdict comes
hang_timeout_ms after that PONG.  Stalled: the first PONG showing the final
counter arrives at most one interval after the last completion, and the
detector sends an extra probe PING exactly hang_timeout_ms after that PONG
rather than waiting for the next regular beat.

Once a verdict is given the detector stays hung (it reports the verdict
once, and `verdict` keeps it) until the next `reset`.

Ping seqs run 1..U32_MAX and wrap to 1, never 0: seq 0 is the barrier of a
link taken over from an earlier launcher (`link.BARRIER_SEQ`), answered
before any ping of this detector and never shown to it. What that earlier
launcher's pings get back is dropped by the link too, so a detector judges
only answers to its own pings: a stale PONG is neither progress nor an error.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from .protocol import U32_MAX, ControlSessionError, MessageType, Ping, Pong

NS_PER_MS: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send PING ``seq`` now; ``sent_ns`` is the clock it carries."""

    seq: int
    sent_ns: int

    def message(self) -> Ping:
        return Ping(self.seq, self.sent_ns)


@dataclass(frozen=True, slots=True)
class NoReply:
    """Hung: no PONG for ``since_ms`` milliseconds."""

    since_ms: int

    @property
    def reason(self) -> str:
        return f"no heartbeat reply for {self.since_ms} ms"


@dataclass(frozen=True, slots=True)
class Stalled:
    """Hung: ``queue`` (controller, queue) has ``in_flight`` requests and no
    completion for at least ``since_ms`` milliseconds."""

    queue: tuple[int, int]
    in_flight: int
    since_ms: int

    @property
    def reason(self) -> str:
        controller, queue = self.queue
        return (
            f"queue {queue} of controller {controller} has {self.in_flight} requests in"
            f" flight and completed none for {self.since_ms} ms"
        )


Verdict = NoReply | Stalled
Action = SendPing | NoReply | Stalled


@dataclass(frozen=True, slots=True)
class ProgressTotals:
    """Sums over every queue of the last PONG (for management)."""

    completed: int
    in_flight: int


class _QueueWatch:
    """What the detector knows of one queue: counters and when they last moved."""

    __slots__ = ("completed", "in_flight", "moved_ns")

    def __init__(self, completed: int, in_flight: int, moved_ns: int) -> None:
        self.completed = completed
        self.in_flight = in_flight
        self.moved_ns = moved_ns


class HangDetector:
    """Pings one emulator every ``heartbeat_ms`` and judges whether it hangs."""

    def __init__(
        self, heartbeat_ms: int, hang_timeout_ms: int, start_ns: int | None = None
    ) -> None:
        self._set_limits(heartbeat_ms, hang_timeout_ms)
        self._next_seq = 1
        self._armed = False
        self._last_reply_ns = 0
        self._next_ping_ns = 0
        self._outstanding: OrderedDict[int, int] = OrderedDict()
        self._queues: dict[tuple[int, int], _QueueWatch] = {}
        self._probed_for_ns: int | None = None
        self._verdict: Verdict | None = None
        self._rtt_ns: int | None = None
        self._totals = ProgressTotals(0, 0)
        if start_ns is not None:
            self.reset(start_ns)

    # -- arming ---------------------------------------------------------------

    def reset(self, now_ns: int) -> None:
        """Start watching a (new) emulator from ``now_ns``: first ping at once.

        Sequence numbers keep counting across resets so a reply meant for an
        earlier emulator can never be taken for one of ours.
        """
        self._armed = True
        self._last_reply_ns = now_ns
        self._next_ping_ns = now_ns
        self._outstanding.clear()
        self._queues.clear()
        self._probed_for_ns = None
        self._verdict = None
        self._rtt_ns = None
        self._totals = ProgressTotals(0, 0)

    def rearm(self, heartbeat_ms: int, hang_timeout_ms: int, now_ns: int) -> None:
        """New limits for the same process (a warm spare that now serves an
        emulator), watched afresh from ``now_ns``.

        Unlike `reset`, pings already sent stay outstanding: the process
        answers them late (it was busy taking its assignment), and those
        answers are replies, not a protocol violation.
        """
        self._set_limits(heartbeat_ms, hang_timeout_ms)
        outstanding = self._outstanding.copy()
        self.reset(now_ns)
        self._outstanding = outstanding

    def _set_limits(self, heartbeat_ms: int, hang_timeout_ms: int) -> None:
        if heartbeat_ms <= 0:
            raise ValueError(f"heartbeat_ms must be positive, not {heartbeat_ms}")
        if hang_timeout_ms <= heartbeat_ms:
            # Otherwise a healthy emulator answering each beat would still be
            # judged silent before the next beat.
            raise ValueError(
                f"hang_timeout_ms ({hang_timeout_ms}) must exceed heartbeat_ms ({heartbeat_ms})"
            )
        self.heartbeat_ms = heartbeat_ms
        self.hang_timeout_ms = hang_timeout_ms
        self._interval_ns = heartbeat_ms * NS_PER_MS
        self._timeout_ns = hang_timeout_ms * NS_PER_MS
        # Pings go out until NoReply fires, so this many can be unanswered at
        # most (regular beats within the timeout, plus a probe or two).
        self._max_outstanding = hang_timeout_ms // heartbeat_ms + 4

    def disarm(self) -> None:
        """Stop watching (the emulator exited); `tick` does nothing until `reset`."""
        self._armed = False
        self._outstanding.clear()

    @property
    def armed(self) -> bool:
        return self._armed

    # -- observations -----------------------------------------------------------

    @property
    def verdict(self) -> Verdict | None:
        """The verdict given since the last `reset`, if any."""
        return self._verdict

    @property
    def round_trip_ms(self) -> float | None:
        """Round-trip time of the last PONG, in milliseconds (None before one)."""
        return None if self._rtt_ns is None else self._rtt_ns / NS_PER_MS

    @property
    def totals(self) -> ProgressTotals:
        """Completed and in-flight requests summed over the queues of the last PONG."""
        return self._totals

    def next_deadline_ns(self) -> int | None:
        """When `tick` next has something to do (None while disarmed or hung)."""
        if not self._armed or self._verdict is not None:
            return None
        deadline = min(self._next_ping_ns, self._last_reply_ns + self._timeout_ns)
        probe = self._probe_due_ns()
        if probe is not None:
            deadline = min(deadline, probe)
        return deadline

    # -- events ---------------------------------------------------------------

    def tick(self, now_ns: int) -> list[Action]:
        """Advance the clock: maybe a ping to send, maybe a NoReply verdict."""
        if not self._armed or self._verdict is not None:
            return []
        silent_ns = now_ns - self._last_reply_ns
        if silent_ns >= self._timeout_ns:
            self._verdict = NoReply(silent_ns // NS_PER_MS)
            return [self._verdict]
        probe = self._probe_due_ns()
        regular = now_ns >= self._next_ping_ns
        if not regular and (probe is None or now_ns < probe):
            return []
        if regular:
            # Skip beats the runner missed instead of sending a burst.
            missed = (now_ns - self._next_ping_ns) // self._interval_ns
            self._next_ping_ns += (missed + 1) * self._interval_ns
        if probe is not None and now_ns >= probe:
            self._probed_for_ns = probe
        return [self._send_ping(now_ns)]

    def on_pong(self, pong: Pong, now_ns: int) -> Verdict | None:
        """Take one PONG; return a `Stalled` verdict if it proves a stall.

        Raises `ControlSessionError` for a PONG that answers no ping we sent
        (or echoes a clock we did not send): the emulator is not speaking the
        protocol and is killed like a hung one.
        """
        if not self._armed or self._verdict is not None:
            return None
        sent_ns = self._outstanding.get(pong.seq)
        if sent_ns is None or sent_ns != pong.sent_ns:
            raise ControlSessionError(
                "PONG answers no outstanding PING" if sent_ns is None
                else f"PONG echoes sent_ns {pong.sent_ns}, the PING carried {sent_ns}",
                message_type=MessageType.PONG,
                seq=pong.seq,
            )
        # Replies come in order: pings older than this one will not be answered
        # (an emulator may answer only the newest of several queued pings).
        while True:
            seq, _ = self._outstanding.popitem(last=False)
            if seq == pong.seq:
                break
        self._last_reply_ns = now_ns
        self._rtt_ns = now_ns - sent_ns
        return self._observe(pong, sent_ns, now_ns)

    # -- internals --------------------------------------------------------------

    def _send_ping(self, now_ns: int) -> SendPing:
        seq = self._next_seq
        self._next_seq = 1 if seq == U32_MAX else seq + 1
        self._outstanding[seq] = now_ns
        while len(self._outstanding) > self._max_outstanding:
            self._outstanding.popitem(last=False)
        return SendPing(seq, now_ns)

    def _probe_due_ns(self) -> int | None:
        """When a probe ping would settle the oldest possible stall, if not yet sent."""
        oldest: int | None = None
        for watch in self._queues.values():
            if watch.in_flight and (oldest is None or watch.moved_ns < oldest):
                oldest = watch.moved_ns
        if oldest is None:
            return None
        due = oldest + self._timeout_ns
        if self._probed_for_ns is not None and self._probed_for_ns >= due:
            return None
        return due

    def _observe(self, pong: Pong, sent_ns: int, now_ns: int) -> Verdict | None:
        seen: dict[tuple[int, int], _QueueWatch] = {}
        worst: tuple[int, tuple[int, int], int] | None = None  # (stalled ns, queue, in flight)
        completed = in_flight = 0
        for entry in pong.progress:
            completed += entry.completed
            in_flight += entry.in_flight
            watch = self._queues.get(entry.key)
            if (
                watch is None
                or watch.completed != entry.completed
                or (watch.in_flight == 0 and entry.in_flight > 0)
            ):
                # It moved, or started waiting, before this PONG arrived.
                watch = _QueueWatch(entry.completed, entry.in_flight, now_ns)
            else:
                watch.in_flight = entry.in_flight
                stalled_ns = sent_ns - watch.moved_ns
                if entry.in_flight and stalled_ns >= self._timeout_ns and (
                    worst is None or stalled_ns > worst[0]
                ):
                    worst = (stalled_ns, entry.key, entry.in_flight)
            seen[entry.key] = watch
        self._queues = seen  # a queue missing from the PONG is gone
        self._totals = ProgressTotals(completed, in_flight)
        if worst is None:
            return None
        self._verdict = Stalled(worst[1], worst[2], worst[0] // NS_PER_MS)
        return self._verdict
