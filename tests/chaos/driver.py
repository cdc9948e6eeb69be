"""The chaos driver: what to break, when, and proof that it was repaired.

Theory of operation. The driver follows two streams of a running
`mplaunch SPEC`: the guest's console (which phase of which boot the guest is
in) and mplaunch's stderr (which pid serves which emulator now, and what the
launcher did about each event). It fires one event at a time, then waits
until the launcher has visibly handled it before the next one, so every
event can be matched to the log lines it must cause, and any log line no
event explains is a finding too:

    KILL        SIGKILL of an emulator's current process
                -> "emulator X died (killed by SIGKILL)", "emulator X restarted (pid N ...)"
    HANG        SIGSTOP of an emulator's current process (heartbeat detection)
                -> "emulator X hung: ...; killing pid P", "emulator X restarted (pid N ...)"
    KILL_SPARE  SIGKILL of the waiting warm spare (or hot standby)
                -> "warm spare (pid P) died while waiting", then a new spare process
    HANG_SPARE  SIGSTOP of the waiting warm spare (spares get heartbeats too)
                -> the spare is killed and replaced within its hang timeout
    KILL_HANDOVER  SIGKILL of an emulator, then of the spare a few ms later,
                while it is being handed the dead emulator's place
                -> "emulator X restarted (pid N ...)" by a cold start or a new spare
    FREEZE_HANDOVER  SIGSTOP of the spare, then SIGKILL of an emulator: the
                hand-over meets a frozen spare
                -> a restart all the same, and the frozen spare killed
    SPARE_DEATH the sequence that once ended supervision: freeze the spare,
                SIGKILL the emulator, SIGKILL the spare a second later
                -> a restart all the same

The hand-over kinds check outcomes (a restart, no old process left), not
exact log lines: how a failed hand-over is logged is the launcher's choice.

The delay before the next event is random (seeded), sometimes zero, so a
kill may land on an emulator that restarted a moment ago and is still
resuming its rings, or back off under the restart policy. Which kinds run
depends on what the launcher can do (`Capabilities`); the report says which
ran and why others did not.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import random
import re
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.support.processes import alive
from tests.support.vm import Mplaunch

HANDLED_TIMEOUT = 20.0


class Kind(enum.Enum):
    KILL = "kill"
    HANG = "hang"
    KILL_SPARE = "kill-spare"
    HANG_SPARE = "hang-spare"
    KILL_HANDOVER = "kill-handover"
    FREEZE_HANDOVER = "freeze-handover"
    SPARE_DEATH = "spare-death"


#: Kinds that end the serving emulator and involve the spare.
HANDOVER_KINDS = (Kind.KILL_HANDOVER, Kind.FREEZE_HANDOVER, Kind.SPARE_DEATH)
#: Kinds that need a warm spare.
SPARE_KINDS = (Kind.KILL_SPARE, Kind.HANG_SPARE, *HANDOVER_KINDS)


class Phase(enum.Enum):
    """Where the guest is, as its console shows it."""

    FIRMWARE = "firmware"  # before the boot's "MPL BOOT": SeaBIOS and the kernel
    PROBE = "probe"  # the guest's drivers load and probe the LUNs
    IO = "io"  # the workload runs
    REBOOT = "reboot"  # after "MPL DONE", until the next "MPL BOOT"


_MPL = re.compile(r"^MPL (BOOT|DISK|DONE)\b", re.M)


def phase_of(console: str) -> tuple[int, Phase]:
    """(boot number counting from 1, phase) from the console text so far."""
    boots = 0
    last = ""
    for m in _MPL.finditer(console):
        if m.group(1) == "BOOT":
            boots += 1
            last = "BOOT"
        elif boots and (m.group(1) == "DONE" or last != "DONE"):
            last = m.group(1)
    if boots == 0:
        return 1, Phase.FIRMWARE
    if last == "DONE":
        return boots, Phase.REBOOT
    if last == "DISK":
        return boots, Phase.IO
    return boots, Phase.PROBE


@dataclass(frozen=True)
class Capabilities:
    """Event kinds the launcher under test can handle, and why."""

    hang: bool
    spare: bool
    why: str
    #: The spare kinds beyond KILL_SPARE (MPL_CHAOS_HANDOVER=0 turns them off).
    handover: bool = True

    @classmethod
    def detect(cls) -> Capabilities:
        """MPL_CHAOS_HANG / MPL_CHAOS_SPARE = 1 or 0 force a kind on or off;
        otherwise hangs need the heartbeat link module and spare kills need
        `launcher.spares.WARM_SPARE`."""
        notes = []
        hang_env, spare_env = os.environ.get("MPL_CHAOS_HANG"), os.environ.get("MPL_CHAOS_SPARE")
        if hang_env is not None:
            hang = hang_env == "1"
            notes.append(f"hang events {'on' if hang else 'off'} by MPL_CHAOS_HANG")
        else:
            hang = importlib.util.find_spec("launcher.heartbeat.link") is not None
            notes.append("hang events " + ("on: heartbeat link present" if hang
                                           else "off: no launcher.heartbeat.link"))
        if spare_env is not None:
            spare = spare_env == "1"
            notes.append(f"spare kills {'on' if spare else 'off'} by MPL_CHAOS_SPARE")
        else:
            from launcher import spares

            spare = bool(getattr(spares, "WARM_SPARE", False))
            notes.append("spare kills " + ("on: launcher.spares.WARM_SPARE" if spare
                                           else "off: launcher.spares.WARM_SPARE not set"))
        handover = spare and os.environ.get("MPL_CHAOS_HANDOVER", "1") == "1"
        if spare and not handover:
            notes.append("hand-over kinds off by MPL_CHAOS_HANDOVER")
        return cls(hang, spare, "; ".join(notes), handover)

    def kinds(self) -> list[Kind]:
        kinds = [Kind.KILL] + ([Kind.HANG] if self.hang else []) + (
            [Kind.KILL_SPARE] if self.spare else [])
        if self.spare and self.handover:
            kinds += [*HANDOVER_KINDS] + ([Kind.HANG_SPARE] if self.hang else [])
        return kinds


@dataclass
class Event:
    number: int
    kind: Kind
    boot: int
    phase: Phase
    target: str  # emulator id, or "spare"
    pid: int
    fired: float  # time.monotonic()
    handled: float | None = None
    detected: float | None = None  # HANG: when the launcher said "hung"
    new_pid: int | None = None
    via: str = ""
    problem: str = ""
    spare_pid: int | None = None  # the spare a hand-over kind froze or killed
    extra_deaths: int = 0  # the killed spare had taken over: one more restart

    def line(self) -> str:
        took = f"{(self.handled - self.fired) * 1e3:.0f} ms" if self.handled else "NOT HANDLED"
        extra = f" detected after {(self.detected - self.fired) * 1e3:.0f} ms" \
            if self.detected else ""
        return (f"#{self.number} {self.kind.value} {self.target} pid {self.pid} "
                f"(boot {self.boot}, {self.phase.value}) -> pid {self.new_pid} {self.via}, "
                f"{took}{extra} {self.problem}")


_STARTED = re.compile(r"emulator (\S+) (?:started|restarted) \(pid (\d+)")
_RESTARTED = re.compile(r"emulator (\S+) restarted \(pid (\d+)(?:, ([^)]+))?\) ([\d.]+) ms")
_HUNG = re.compile(r"emulator (\S+) hung: ")
_DIED = re.compile(r"emulator (\S+) died \(")
# A spare the test killed while it waits, or while it stands by for an
# emulator as its hot standby (its closed control channel may be seen first).
_SPARE_DIED = re.compile(r"warm spare \(pid (\d+)\) died while waiting"
                         r"|its standby \(pid (\d+)\) (?:died|broke the control protocol)")
_SPARE_READY = re.compile(r"warm spare ready \(pid (\d+)")


class Fleet:
    """Which process is what, read from mplaunch's stderr and its process tree."""

    def __init__(self, m: Mplaunch, emulator_ids: list[str]) -> None:
        self.m = m
        self.ids = emulator_ids

    def lines(self) -> list[str]:
        return list(self.m.stderr_lines)

    def current_pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        for line in self.lines():
            if (mm := _STARTED.search(line)) and mm.group(1) in self.ids:
                pids[mm.group(1)] = int(mm.group(2))
        return pids

    def count(self, rx: re.Pattern[str], emulator: str | None = None) -> int:
        return sum(1 for line in self.lines()
                   if (mm := rx.search(line)) and (emulator is None or mm.group(1) == emulator))

    def spare_pid(self) -> int | None:
        """The waiting spare, once the launcher said it is ready (needs -v):
        one still starting up is not a spare yet."""
        busy = set(self.current_pids().values())
        ready = [int(mm.group(1)) for line in self.lines() if (mm := _SPARE_READY.search(line))]
        for pid in reversed(ready):
            if pid not in busy and alive(pid):
                return pid
        return None


def _gone(pid: int, deadline: float) -> bool:
    """Whether `pid` ends by `deadline` (the launcher may reap a frozen spare
    a little after the restart)."""
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _kill(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Driver:
    """Fires events one at a time and checks that each was handled."""

    m: Mplaunch
    fleet: Fleet
    rng: random.Random
    caps: Capabilities
    events: list[Event] = field(default_factory=list)

    def pick_kind(self, remaining: int) -> Kind:
        kinds = self.caps.kinds()
        unused = [k for k in kinds if k not in {e.kind for e in self.events}]
        if unused and remaining <= len(unused):
            return unused[0]
        weights = {Kind.KILL: 6, Kind.HANG: 2, Kind.KILL_SPARE: 2, Kind.HANG_SPARE: 1,
                   Kind.KILL_HANDOVER: 1, Kind.FREEZE_HANDOVER: 1, Kind.SPARE_DEATH: 1}
        return self.rng.choices(kinds, [weights[k] for k in kinds])[0]

    def fire(self, kind: Kind, boot: int, phase: Phase) -> Event:
        number = len(self.events) + 1
        if kind is Kind.KILL_SPARE:
            event = self._fire_spare(number, boot, phase)
        elif kind is Kind.HANG_SPARE:
            event = self._hang_spare(number, boot, phase)
        else:
            event = self._fire_emulator(number, kind, boot, phase)
        self.events.append(event)
        return event

    def _wait_spare(self) -> int | None:
        deadline = time.monotonic() + HANDLED_TIMEOUT
        pid = self.fleet.spare_pid()
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.02)
            pid = self.fleet.spare_pid()
        return pid

    def _fire_emulator(self, number: int, kind: Kind, boot: int, phase: Phase) -> Event:
        spare = self._wait_spare() if kind in HANDOVER_KINDS else None
        target = self.rng.choice(self.fleet.ids)
        pid = self.fleet.current_pids()[target]
        restarts = self.fleet.count(_RESTARTED, target)
        hung = self.fleet.count(_HUNG, target)
        sig = signal.SIGSTOP if kind is Kind.HANG else signal.SIGKILL
        event = Event(number, kind, boot, phase, target, pid, time.monotonic())
        if kind in HANDOVER_KINDS:
            if spare is None:
                event.problem = "no warm spare for a hand-over event"
                return event
            event.spare_pid = spare
            if kind is not Kind.KILL_HANDOVER:
                os.kill(spare, signal.SIGSTOP)
            event.fired = time.monotonic()
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            event.problem = f"{target} pid {pid} was already gone"
            if spare is not None:
                os.kill(spare, signal.SIGCONT)
            return event
        if kind is Kind.KILL_HANDOVER:
            # Into the hand-over: the assignment goes out within milliseconds.
            time.sleep(self.rng.uniform(0, 0.03))
            _kill(spare)
        elif kind is Kind.SPARE_DEATH:
            time.sleep(1.0)
            _kill(spare)
        deadline = event.fired + HANDLED_TIMEOUT
        while time.monotonic() < deadline:
            now = time.monotonic()
            if kind is Kind.HANG and event.detected is None and \
                    self.fleet.count(_HUNG, target) > hung:
                event.detected = now
            if self.fleet.count(_RESTARTED, target) > restarts:
                line = [ln for ln in self.fleet.lines() if (mm := _RESTARTED.search(ln))
                        and mm.group(1) == target][-1]
                mm = _RESTARTED.search(line)
                assert mm is not None
                event.new_pid = int(mm.group(2))
                event.via = mm.group(3) or ""
                if event.new_pid == event.spare_pid and kind in (Kind.KILL_HANDOVER,
                                                                  Kind.SPARE_DEATH):
                    # The spare took over just before our kill reached it: that
                    # is one more death, and the next restart is the answer.
                    restarts = self.fleet.count(_RESTARTED, target)
                    event.extra_deaths += 1
                    continue
                event.handled = now
                if alive(pid):
                    event.problem = f"old pid {pid} still alive"
                elif event.new_pid == pid or event.new_pid == event.spare_pid:
                    event.problem = f"pid {event.new_pid} took over"
                elif event.spare_pid is not None and not _gone(event.spare_pid, deadline):
                    event.problem = f"spare pid {event.spare_pid} still alive"
                return event
            self.m.descendants()
            time.sleep(0.01)
        event.problem = f"no restart of {target} within {HANDLED_TIMEOUT} s"
        if event.spare_pid is not None and alive(event.spare_pid):
            _kill(event.spare_pid)  # leave no frozen process behind a failed event
        return event

    def _hang_spare(self, number: int, boot: int, phase: Phase) -> Event:
        pid = self._wait_spare()
        if pid is None:
            event = Event(number, Kind.HANG_SPARE, boot, phase, "spare", -1, time.monotonic())
            event.problem = "no warm spare to freeze"
            return event
        event = Event(number, Kind.HANG_SPARE, boot, phase, "spare", pid, time.monotonic())
        os.kill(pid, signal.SIGSTOP)
        deadline = event.fired + HANDLED_TIMEOUT
        while time.monotonic() < deadline:
            new = self.fleet.spare_pid()
            if not alive(pid) and new is not None and new != pid:
                event.new_pid, event.handled = new, time.monotonic()
                return event
            time.sleep(0.01)
        event.problem = f"frozen spare not replaced within {HANDLED_TIMEOUT} s"
        _kill(pid)
        return event

    def _fire_spare(self, number: int, boot: int, phase: Phase) -> Event:
        pid = self._wait_spare()
        if pid is None:
            event = Event(number, Kind.KILL_SPARE, boot, phase, "spare", -1, time.monotonic())
            event.problem = "no warm spare to kill"
            return event
        event = Event(number, Kind.KILL_SPARE, boot, phase, "spare", pid, time.monotonic())
        os.kill(pid, signal.SIGKILL)
        deadline = event.fired + HANDLED_TIMEOUT
        while time.monotonic() < deadline:
            new = self.fleet.spare_pid()
            if new is not None and new != pid:
                event.new_pid, event.handled = new, time.monotonic()
                return event
            time.sleep(0.01)
        event.problem = f"no new warm spare within {HANDLED_TIMEOUT} s"
        return event

    # -- the accounting

    def unexplained(self) -> list[str]:
        """Launcher lines no event of ours explains (and events they lack)."""
        kinds = Counter((e.kind, e.target) for e in self.events)
        out = []
        for emulator in self.fleet.ids:
            extra = sum(e.extra_deaths for e in self.events if e.target == emulator)
            kills = kinds[(Kind.KILL, emulator)] + extra + sum(
                kinds[(k, emulator)] for k in HANDOVER_KINDS)
            hangs = kinds[(Kind.HANG, emulator)]
            checks = (("died", _DIED, kills), ("hung", _HUNG, hangs),
                      ("restarted", _RESTARTED, kills + hangs))
            for what, rx, want in checks:
                got = self.fleet.count(rx, emulator)
                if got != want:
                    out.append(f"{emulator}: {got} '{what}' lines for {want} events")
        # A waiting spare's death is logged as such; a frozen spare the launcher
        # replaced, or one that died while being handed over, may be too.
        spare_kills = sum(1 for e in self.events if e.kind is Kind.KILL_SPARE)
        spare_any = spare_kills + sum(1 for e in self.events
                                      if e.kind in (Kind.HANG_SPARE, *HANDOVER_KINDS))
        got = sum(1 for line in self.fleet.lines() if _SPARE_DIED.search(line))
        if not spare_kills <= got <= spare_any:
            out.append(f"{got} 'warm spare died' lines for {spare_kills} spare kills "
                       f"and {spare_any - spare_kills} other spare events")
        if any("give up" in line for line in self.fleet.lines()):
            out.append("the restart policy gave up")
        return out

    def summary(self) -> str:
        by_kind = Counter(e.kind.value for e in self.events)
        by_phase = Counter(f"boot{e.boot}/{e.phase.value}" for e in self.events)
        via = Counter(e.via for e in self.events if e.target != "spare")
        stalls = [float(mm.group(4)) for line in self.fleet.lines()
                  if (mm := _RESTARTED.search(line))]
        detect = [(e.detected - e.fired) * 1e3 for e in self.events if e.detected]
        parts = [
            f"events {len(self.events)}: " + ", ".join(f"{k} {n}" for k, n in by_kind.items()),
            "by phase: " + ", ".join(f"{k} {n}" for k, n in sorted(by_phase.items())),
            "restarts via: " + ", ".join(f"{k or '?'} {n}" for k, n in via.items()),
        ]
        if stalls:
            parts.append(f"launcher restart times ms: median {statistics.median(stalls):.1f}, "
                         f"max {max(stalls):.1f}")
        if detect:
            parts.append(f"hang detected after ms: median {statistics.median(detect):.0f}, "
                         f"max {max(detect):.0f}")
        return "\n".join(parts)
