"""The hang detector under a fake clock: schedule, verdicts, and the detection bound."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.heartbeat.detector import (
    HangDetector,
    NoReply,
    ProgressTotals,
    SendPing,
    Stalled,
    Verdict,
)
from launcher.heartbeat.protocol import ControlSessionError, Ping, Pong, QueueProgress

MS = 1_000_000


def pong_for(ping: SendPing, *progress: QueueProgress) -> Pong:
    return Pong(ping.seq, ping.sent_ns, progress)


def only_ping(actions: Sequence[object]) -> SendPing:
    assert len(actions) == 1 and isinstance(actions[0], SendPing), actions
    return actions[0]


# -- schedule and bookkeeping --------------------------------------------------------


def test_pings_start_at_once_and_follow_the_beat() -> None:
    d = HangDetector(100, 400, start_ns=1000 * MS)
    first = only_ping(d.tick(1000 * MS))
    assert first.message() == Ping(first.seq, 1000 * MS)
    assert d.tick(1000 * MS) == []
    assert d.next_deadline_ns() == 1100 * MS
    assert d.tick(1099 * MS) == []
    d.on_pong(pong_for(first), 1001 * MS)
    second = only_ping(d.tick(1100 * MS))
    assert second.seq == first.seq + 1


def test_missed_beats_are_skipped_not_burst() -> None:
    d = HangDetector(100, 1000, start_ns=0)
    p = only_ping(d.tick(0))
    d.on_pong(pong_for(p), 0)
    p = only_ping(d.tick(350 * MS))  # the runner slept through three beats
    d.on_pong(pong_for(p), 350 * MS)
    assert d.tick(399 * MS) == []
    assert d.next_deadline_ns() == 400 * MS
    only_ping(d.tick(400 * MS))


def test_disarmed_detector_does_nothing() -> None:
    d = HangDetector(100, 400)
    assert not d.armed
    assert d.tick(10**12) == []
    assert d.next_deadline_ns() is None
    d.reset(0)
    only_ping(d.tick(0))
    d.disarm()
    assert d.tick(10**12) == []


def test_round_trip_and_totals() -> None:
    d = HangDetector(100, 400, start_ns=0)
    assert d.round_trip_ms is None
    p = only_ping(d.tick(0))
    d.on_pong(
        pong_for(p, QueueProgress(0, 2, 10, 1), QueueProgress(1, 2, 5, 3)), 3 * MS + MS // 2
    )
    assert d.round_trip_ms == 3.5
    assert d.totals == ProgressTotals(completed=15, in_flight=4)


def test_pong_for_an_unknown_ping_is_a_session_error() -> None:
    d = HangDetector(100, 400, start_ns=0)
    p = only_ping(d.tick(0))
    with pytest.raises(ControlSessionError, match="answers no outstanding PING"):
        d.on_pong(Pong(p.seq + 5, p.sent_ns), 1)
    with pytest.raises(ControlSessionError, match="echoes sent_ns"):
        d.on_pong(Pong(p.seq, p.sent_ns + 1), 1)
    d.on_pong(pong_for(p), 1)
    with pytest.raises(ControlSessionError):  # answered twice
        d.on_pong(pong_for(p), 2)


def test_a_newer_pong_retires_older_pings() -> None:
    d = HangDetector(100, 1000, start_ns=0)
    old = only_ping(d.tick(0))
    new = only_ping(d.tick(100 * MS))
    d.on_pong(pong_for(new), 101 * MS)  # the emulator answered only the newest
    with pytest.raises(ControlSessionError):
        d.on_pong(pong_for(old), 102 * MS)


def test_sequence_numbers_survive_reset() -> None:
    d = HangDetector(100, 400, start_ns=0)
    p = only_ping(d.tick(0))
    d.reset(50 * MS)
    with pytest.raises(ControlSessionError):
        d.on_pong(pong_for(p), 51 * MS)  # meant for the previous emulator
    assert only_ping(d.tick(50 * MS)).seq > p.seq


def test_rearm_keeps_pings_in_flight_for_the_same_process() -> None:
    """A spare pinged while it waited answers those pings late, after it took
    its assignment: replies, not a protocol error, under the new limits."""
    d = HangDetector(100, 1000, start_ns=0)
    waiting = only_ping(d.tick(0))
    d.rearm(50, 400, 30 * MS)
    assert (d.heartbeat_ms, d.hang_timeout_ms) == (50, 400)
    fresh = only_ping(d.tick(30 * MS))
    assert fresh.seq > waiting.seq
    assert d.on_pong(pong_for(waiting), 40 * MS) is None
    assert d.on_pong(pong_for(fresh), 41 * MS) is None
    # Judged by the new timeout (400 ms) from the last reply.
    assert all(isinstance(a, SendPing) for a in d.tick(440 * MS))
    assert d.tick(441 * MS) == [NoReply(400)]


def test_rearm_refuses_bad_timings() -> None:
    d = HangDetector(100, 400, start_ns=0)
    with pytest.raises(ValueError):
        d.rearm(100, 100, 0)


@pytest.mark.parametrize("beat,timeout", [(0, 100), (100, 100), (100, 50)])
def test_bad_timings_are_refused(beat: int, timeout: int) -> None:
    with pytest.raises(ValueError):
        HangDetector(beat, timeout)


# -- verdicts -------------------------------------------------------------------


def test_no_reply_fires_exactly_at_the_timeout() -> None:
    d = HangDetector(100, 350, start_ns=0)
    p = only_ping(d.tick(0))
    d.on_pong(pong_for(p), 20 * MS)
    for t in (100, 200, 300):
        only_ping(d.tick(t * MS))  # unanswered
    assert d.next_deadline_ns() == 370 * MS
    assert d.tick(370 * MS - 1) == []
    assert d.tick(370 * MS) == [NoReply(350)]
    assert d.verdict == NoReply(350)
    assert NoReply(350).reason == "no heartbeat reply for 350 ms"
    # Latched: reported once, kept, and nothing more until reset.
    assert d.tick(371 * MS) == []
    assert d.next_deadline_ns() is None
    d.reset(400 * MS)
    assert d.verdict is None
    only_ping(d.tick(400 * MS))


def test_progress_keeps_a_busy_queue_alive() -> None:
    d = HangDetector(100, 300, start_ns=0)
    for completed, t in enumerate(range(0, 3000, 100), start=1):
        p = only_ping(d.tick(t * MS))
        assert d.on_pong(pong_for(p, QueueProgress(0, 2, completed, 8)), t * MS) is None
    assert d.verdict is None


def test_idle_queue_never_stalls() -> None:
    d = HangDetector(100, 300, start_ns=0)
    for t in range(0, 3000, 100):
        p = only_ping(d.tick(t * MS))
        assert d.on_pong(pong_for(p, QueueProgress(0, 2, 7, 0)), t * MS) is None


def test_stall_is_reported_with_its_queue() -> None:
    d = HangDetector(100, 300, start_ns=0)
    verdict = None
    t = 0
    while verdict is None:
        assert t <= 1000
        for action in d.tick(t * MS):
            assert isinstance(action, SendPing)
            verdict = d.on_pong(
                pong_for(action, QueueProgress(0, 2, 50, 0), QueueProgress(1, 3, 9, 4)), t * MS
            )
        t += 1
    assert verdict == Stalled(queue=(1, 3), in_flight=4, since_ms=300)
    assert verdict.reason == (
        "queue 3 of controller 1 has 4 requests in flight and completed none for 300 ms"
    )
    assert d.verdict == verdict
    assert d.tick(t * MS) == []


def test_a_probe_ping_settles_a_stall_between_beats() -> None:
    d = HangDetector(100, 250, start_ns=0)
    p = only_ping(d.tick(0))
    d.on_pong(pong_for(p, QueueProgress(0, 2, 1, 1)), 0)
    for t in (100, 200):
        p = only_ping(d.tick(t * MS))
        assert d.on_pong(pong_for(p, QueueProgress(0, 2, 1, 1)), t * MS) is None
    assert d.next_deadline_ns() == 250 * MS  # not the beat at 300 ms
    p = only_ping(d.tick(250 * MS))
    assert d.on_pong(pong_for(p, QueueProgress(0, 2, 1, 1)), 250 * MS) == Stalled((0, 2), 1, 250)


def test_requests_that_start_waiting_restart_the_stall_clock() -> None:
    d = HangDetector(100, 250, start_ns=0)
    for t, in_flight in ((0, 0), (100, 0), (200, 0), (300, 2), (400, 2)):
        p = only_ping(d.tick(t * MS))
        assert d.on_pong(pong_for(p, QueueProgress(0, 2, 5, in_flight)), t * MS) is None
    p = only_ping(d.tick(550 * MS))  # probe: 300 + 250
    assert d.on_pong(pong_for(p, QueueProgress(0, 2, 5, 2)), 550 * MS) == Stalled((0, 2), 2, 250)


def test_a_late_pong_proves_only_up_to_its_ping() -> None:
    # The counters of a PONG may have been sampled as early as its PING left:
    # a slow round trip must not be mistaken for a long stall.
    d = HangDetector(100, 300, start_ns=0)
    p = only_ping(d.tick(0))
    d.on_pong(pong_for(p, QueueProgress(0, 2, 1, 1)), 0)
    slow = only_ping(d.tick(100 * MS))
    assert d.on_pong(pong_for(slow, QueueProgress(0, 2, 1, 1)), 380 * MS) is None


# -- the detection bound, exhaustively, with a simulated emulator ------------------------


@dataclass
class FakeEmulator:
    """Answers pings after ``rtt_ns`` (sampling its counters half-way), until
    ``loop_hangs_ns``; completes a request every ``every_ns`` until
    ``io_hangs_ns``, with ``in_flight`` requests always waiting."""

    rtt_ns: int
    every_ns: int = 3 * MS
    in_flight: int = 2
    loop_hangs_ns: int | None = None
    io_hangs_ns: int | None = None
    pending: list[tuple[int, int, Pong]] = field(default_factory=list)
    order: int = 0

    def completed(self, t: int) -> int:
        if self.io_hangs_ns is not None:
            t = min(t, self.io_hangs_ns)
        return t // self.every_ns

    def on_ping(self, ping: SendPing) -> None:
        sample = ping.sent_ns + self.rtt_ns // 2
        if self.loop_hangs_ns is not None and sample >= self.loop_hangs_ns:
            return
        entry = QueueProgress(0, 2, self.completed(sample), self.in_flight)
        self.order += 1
        heapq.heappush(
            self.pending, (ping.sent_ns + self.rtt_ns, self.order, pong_for(ping, entry))
        )


Ticker = Callable[[HangDetector, int], int]


def at_deadline(d: HangDetector, now: int) -> int:
    deadline = d.next_deadline_ns()
    assert deadline is not None
    return max(deadline, now)


def run(
    d: HangDetector, emu: FakeEmulator, limit_ns: int, beat_ns: int | None
) -> tuple[int, Verdict]:
    """Drive detector and emulator; the runner wakes at the detector's deadline,
    or (``beat_ns`` given) only on a fixed timer of that period."""
    now = 0
    while now <= limit_ns:
        while emu.pending and emu.pending[0][0] <= now:
            _, _, pong = heapq.heappop(emu.pending)
            verdict = d.on_pong(pong, now)
            if verdict is not None:
                return now, verdict
        for action in d.tick(now):
            if isinstance(action, SendPing):
                emu.on_ping(action)
            else:
                return now, action
        wake = at_deadline(d, now + 1) if beat_ns is None else (now // beat_ns + 1) * beat_ns
        if emu.pending:
            wake = min(wake, emu.pending[0][0])
        now = max(wake, now + 1) if wake <= now else wake
    raise AssertionError(f"no verdict by {limit_ns / MS} ms")


TIMINGS = [(10, 11), (10, 20), (10, 37), (25, 26), (25, 50), (25, 107)]


@pytest.mark.parametrize("beat,timeout", TIMINGS)
def test_no_reply_is_detected_within_timeout_plus_one_beat(beat: int, timeout: int) -> None:
    for hang_ms in range(2 * beat, 4 * beat):
        for offset in (0, 1, MS - 1):
            hang = hang_ms * MS + offset
            for beat_ns in (None, beat * MS):
                d = HangDetector(beat, timeout, start_ns=0)
                emu = FakeEmulator(rtt_ns=0, loop_hangs_ns=hang)
                at, verdict = run(d, emu, hang + 10 * timeout * MS, beat_ns)
                assert isinstance(verdict, NoReply)
                assert at - hang <= (timeout + beat) * MS, (hang, at, beat_ns)
                assert at - hang >= (timeout - beat) * MS  # silent for the timeout, at least
                assert verdict.since_ms >= timeout


@pytest.mark.parametrize("beat,timeout", TIMINGS)
def test_stall_is_detected_within_timeout_plus_one_beat(beat: int, timeout: int) -> None:
    for hang_ms in range(2 * beat, 4 * beat):
        for offset in (0, 1, MS - 1):
            hang = hang_ms * MS + offset
            d = HangDetector(beat, timeout, start_ns=0)
            emu = FakeEmulator(rtt_ns=0, every_ns=MS // 3, io_hangs_ns=hang)
            at, verdict = run(d, emu, hang + 10 * timeout * MS, None)
            assert isinstance(verdict, Stalled), verdict
            last_completion = emu.completed(hang) * emu.every_ns
            assert at - last_completion <= (timeout + beat) * MS, (hang, at)
            assert at - last_completion >= timeout * MS  # never early
            assert verdict.queue == (0, 2) and verdict.in_flight == 2


@pytest.mark.parametrize("rtt_ms", [1, 4, 9])
def test_slow_round_trips_delay_a_stall_verdict_by_at_most_two_of_them(rtt_ms: int) -> None:
    beat, timeout = 10, 37
    for hang_ms in range(20, 40):
        d = HangDetector(beat, timeout, start_ns=0)
        emu = FakeEmulator(rtt_ns=rtt_ms * MS, every_ns=MS // 3, io_hangs_ns=hang_ms * MS)
        at, verdict = run(d, emu, 2000 * MS, None)
        assert isinstance(verdict, Stalled)
        last_completion = emu.completed(hang_ms * MS) * emu.every_ns
        assert timeout * MS <= at - last_completion <= (timeout + beat + 2 * rtt_ms) * MS


@pytest.mark.parametrize("beat,timeout", TIMINGS)
def test_a_healthy_emulator_is_never_judged(beat: int, timeout: int) -> None:
    # Round trips up to the slack the timeout leaves, progress every few ms.
    for rtt_ms in (0, 1, (timeout - beat) // 2, timeout - beat - 1):
        d = HangDetector(beat, timeout, start_ns=0)
        emu = FakeEmulator(rtt_ns=rtt_ms * MS, every_ns=3 * MS)
        with pytest.raises(AssertionError, match="no verdict"):
            run(d, emu, 40 * timeout * MS, None)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 120), min_size=1, max_size=30),
    st.integers(0, 6),
)
def test_a_stall_verdict_is_never_early(gaps_ms: list[int], rtt_ms: int) -> None:
    """Whatever the completion pattern, a Stalled verdict at time t means no
    completion happened in the hang_timeout before the last evidence."""
    beat, timeout = 10, 50
    times: list[int] = []
    t = 0
    for gap in gaps_ms:
        t += gap * MS
        times.append(t)

    @dataclass
    class Scripted(FakeEmulator):
        def completed(self, at: int) -> int:
            return sum(1 for c in times if c <= at)

    d = HangDetector(beat, timeout, start_ns=0)
    emu = Scripted(rtt_ns=rtt_ms * MS)
    try:
        at, verdict = run(d, emu, times[-1] + 10 * timeout * MS, None)
    except AssertionError:
        pytest.fail("the final stall after the last completion must be caught")
    assert isinstance(verdict, Stalled)
    # In flight since 0; each completion is progress.
    points = [0, *times]
    # The evidence is the counters sampled half a round trip before arrival:
    # a completion after that sample cannot have been seen.
    sampled = at - (rtt_ms * MS) // 2
    last = max(c for c in points if c <= sampled)
    assert sampled - last >= timeout * MS - rtt_ms * MS, (
        "declared before the queue was stuck for the timeout"
    )
    # And not late: the first gap long enough to be caught is caught in time.
    slack = (timeout + beat + 2 * rtt_ms) * MS
    ends = [*times, None]
    first = next(a for a, b in zip(points, ends, strict=True) if b is None or b - a > slack)
    assert at <= first + slack
