"""The restart policy of one emulator: a pure state machine, clock injected.

Theory of operation
-------------------
The runner owns the process; this object owns the decisions.  The runner
tells it what happened (`start`, `on_started`, `on_exit`, `on_start_failed`,
`on_stop_requested`) and lets time pass (`tick(now_ns)`, when
`next_deadline_ns()` comes due); it answers with actions: `Start` (start an
emulator now), `GiveUp` (pause or power off the VM through QEMU's QMP), or
`Nothing` (a decision not to act, with its reason).  Every action carries one
line saying what was decided and why, and the policy logs that line.

States, in the spirit of supervisord's process states::

    STOPPED --start--> STARTING --on_started--> RUNNING
                          |                        |
                          +-- on_exit -------------+--> decide:
                          +-- on_start_failed         restart now   -> STARTING
                                                      restart later -> BACKOFF --tick--> STARTING
                                                      no restart    -> EXITED
                                                      burst spent   -> GAVE_UP
    any live state --on_stop_requested--> STOPPING --on_exit--> STOPPED
    BACKOFF --on_stop_requested--> STOPPED

The rules, as systemd's Restart=, RestartSec= and StartLimitBurst= would have
them:

- ``restart = "on-failure"`` restarts after a crash or a kill for a hang, not
  after a clean exit 0 (an emulator exits 0 when QEMU closed its connection:
  the VM is going away).
- ``restart = "always"`` restarts after a clean exit too, unless a stop was
  requested.
- ``restart = "never"`` never restarts.  A crash or a hang then means the
  device is gone for good, so the VM-level ``on_give_up`` action applies at
  once; a clean exit just leaves the emulator EXITED.
- A restart that management asked for (``requested_restart``) always
  happens, at once, and does not count against the burst: the operator must
  not be able to pause the VM by mistake.
- An emulator that exited on a front-end message it was right to refuse
  (``frontend_fault``: the session keeper discarded that message, so it is
  never sent again) is restarted at once and not counted either: a
  misbehaving front-end must not make the VM give up on a healthy device.
  ``restart = "never"`` still gives up.
- A start that failed (``on_start_failed``: the process did not start, was
  not confined, or a warm spare died, froze or refused its hand-over) is
  counted like a crash: the next start is cold, and a start that keeps
  failing ends in the give-up action like a crash loop.
- At most ``burst`` restarts within a sliding window of ``window_s``; the
  one after that gives up.
- The first restart in the window is immediate (the guest is waiting on its
  I/O); the next ones back off: 100 ms, 200 ms, 400 ms, ... up to 5 s.

An event the current state does not allow raises `PolicyError`: it is a bug
in the runner, and no restart can help it.
"""

from __future__ import annotations

import enum
import logging
import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from launcher.spec import EmulatorSpec, GiveUpAction, RestartMode

NS_PER_MS: Final = 1_000_000
NS_PER_S: Final = 1_000_000_000
DEFAULT_BACKOFF_MS: Final = (0, 100, 200, 400, 800, 1600, 3200, 5000)

_log = logging.getLogger(__name__)


class RunState(enum.Enum):
    STOPPED = "stopped"  # not started yet, or stopped on request
    STARTING = "starting"  # a Start was issued; waiting for the emulator's READY
    RUNNING = "running"
    BACKOFF = "backoff"  # exited; a restart is scheduled
    STOPPING = "stopping"  # a stop was requested; waiting for the exit
    EXITED = "exited"  # exited and, by the rules, not restarted
    GAVE_UP = "gave-up"  # restarts exhausted (or restart = never): the VM-level action ran


class ExitReason(enum.StrEnum):
    """Why an emulator process ended, as the runner saw it."""

    CRASHED = "crashed"  # died on its own with a non-zero status or a signal
    KILLED_HUNG = "killed_hung"  # the runner killed it after a hang verdict
    EXITED_CLEAN = "exited_clean"  # exit status 0
    REQUESTED_RESTART = "requested_restart"  # the runner killed it because management asked
    FRONTEND_FAULT = "frontend_fault"  # exited on a front-end message it had to refuse
    START_FAILED = "start_failed"  # never became the occupant (see on_start_failed)


class PolicyError(Exception):
    """The runner reported an event the policy's current state does not allow."""


@dataclass(frozen=True, slots=True)
class Start:
    """Start an emulator (take the warm spare) now."""

    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop restarting; apply ``action`` to the VM."""

    action: GiveUpAction
    reason: str


@dataclass(frozen=True, slots=True)
class Nothing:
    """A decision not to act (yet), with its reason."""

    reason: str


PolicyAction = Start | GiveUp | Nothing


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    """A snapshot for management: what the policy is doing and why."""

    emulator: str
    state: RunState
    mode: RestartMode
    restarts_in_window: int
    burst: int
    window_s: int
    last_exit_reason: ExitReason | None
    last_exit_status: str | None
    last_decision: str | None
    restart_in_ms: int | None  # in BACKOFF: how long until the restart

    def to_dict(self) -> dict[str, object]:
        return {
            "emulator": self.emulator,
            "state": self.state.value,
            "restart": self.mode.value,
            "restarts-in-window": self.restarts_in_window,
            "restart-burst": self.burst,
            "restart-window-s": self.window_s,
            "last-exit-reason": (
                None if self.last_exit_reason is None else self.last_exit_reason.value
            ),
            "last-exit-status": self.last_exit_status,
            "last-decision": self.last_decision,
            "restart-in-ms": self.restart_in_ms,
        }


def describe_status(status: int) -> str:
    """``subprocess`` convention: negative is "killed by signal -status"."""
    if status >= 0:
        return f"exit status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    return f"killed by {name}"


_ALLOWED: Final[dict[str, frozenset[RunState]]] = {
    "start": frozenset({RunState.STOPPED, RunState.EXITED, RunState.GAVE_UP, RunState.BACKOFF}),
    "on_started": frozenset({RunState.STARTING}),
    "on_exit": frozenset({RunState.STARTING, RunState.RUNNING, RunState.STOPPING}),
    "on_start_failed": frozenset({RunState.STARTING, RunState.STOPPING}),
    "on_stop_requested": frozenset(RunState),
    "tick": frozenset(RunState),
}

_GIVE_UP_WORDS: Final = {
    GiveUpAction.PAUSE: "pausing the VM",
    GiveUpAction.POWEROFF: "powering off the VM",
}


class RestartPolicy:
    """Decides, for one emulator, whether and when to restart it."""

    def __init__(
        self,
        emulator: str,
        mode: RestartMode,
        burst: int,
        window_s: int,
        on_give_up: GiveUpAction,
        backoff_ms: Sequence[int] = DEFAULT_BACKOFF_MS,
        log: Callable[[str], None] | None = None,
        log_give_up: Callable[[str], None] | None = None,
    ) -> None:
        if burst < 0:
            raise ValueError(f"burst must be >= 0, not {burst}")
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        if not backoff_ms or any(ms < 0 for ms in backoff_ms):
            raise ValueError(f"backoff_ms must be non-empty and non-negative: {backoff_ms!r}")
        self.emulator = emulator
        self.mode = RestartMode(mode)
        self.burst = burst
        self.window_s = window_s
        self.on_give_up = GiveUpAction(on_give_up)
        self.backoff_ms = tuple(backoff_ms)
        self._log = log if log is not None else _log.info
        # A give-up is the one decision that is an error; said once, here.
        self._log_give_up = log_give_up if log_give_up is not None else self._log
        self._state = RunState.STOPPED
        self._restarts: deque[int] = deque()  # decision times of counted restarts
        self._restart_at_ns: int | None = None
        self._pending_start: str | None = None  # the Start reason once BACKOFF ends
        self._last_exit_reason: ExitReason | None = None
        self._last_exit_status: str | None = None
        self._last_decision: str | None = None
        self._last_now_ns = 0

    @classmethod
    def from_spec(
        cls, spec: EmulatorSpec, log: Callable[[str], None] | None = None,
        log_give_up: Callable[[str], None] | None = None,
    ) -> RestartPolicy:
        return cls(
            spec.id, spec.restart, spec.restart_burst, spec.restart_window_s, spec.on_give_up,
            log=log, log_give_up=log_give_up,
        )

    @property
    def state(self) -> RunState:
        return self._state

    def snapshot(self) -> dict[str, Any]:
        """What decides the next restart or give-up, as JSON (vm-state.json):
        the state, the restarts counted in the window, the backoff's end and
        the Start it will give, and what `describe` reports.

        Times are as `now_ns` gave them: time.monotonic_ns(), CLOCK_MONOTONIC,
        one clock for every process of one boot. So a launcher that takes
        over from one that died can `restore` them as they are: the window
        and the backoff go on where they were (the VM does not outlive a
        reboot, and neither does the run folder this is kept in)."""
        return {
            "state": self._state.value, "restarts": list(self._restarts),
            "restart_at_ns": self._restart_at_ns, "pending_start": self._pending_start,
            "last_exit_reason": (self._last_exit_reason.value
                                 if self._last_exit_reason is not None else None),
            "last_exit_status": self._last_exit_status, "last_decision": self._last_decision,
            "last_now_ns": self._last_now_ns,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Take over a `snapshot` (the limits stay this policy's: the spec's);
        ValueError naming the field if it is not one, and nothing changed."""
        (self._state, self._restarts, self._restart_at_ns, self._pending_start,
         self._last_exit_reason, self._last_exit_status, self._last_decision,
         self._last_now_ns) = _parse_snapshot(saved)

    def next_deadline_ns(self) -> int | None:
        """When `tick` has something to do: the end of the backoff, if any."""
        return self._restart_at_ns if self._state is RunState.BACKOFF else None

    def restarts_in_window(self, now_ns: int) -> int:
        self._expire(now_ns)
        return len(self._restarts)

    def describe(self, now_ns: int | None = None) -> PolicyStatus:
        """State for management; ``now_ns`` defaults to the latest event's time."""
        now = self._last_now_ns if now_ns is None else now_ns
        restart_in: int | None = None
        if self._state is RunState.BACKOFF and self._restart_at_ns is not None:
            restart_in = max(0, self._restart_at_ns - now) // NS_PER_MS
        return PolicyStatus(
            self.emulator, self._state, self.mode, self.restarts_in_window(now), self.burst,
            self.window_s, self._last_exit_reason, self._last_exit_status, self._last_decision,
            restart_in,
        )

    # -- events -----------------------------------------------------------------

    def start(self, now_ns: int, reason: str = "first start") -> list[PolicyAction]:
        """Start on request: the first start, after a stop, or to resume after a give-up.

        Resuming after a give-up is the operator's call, so the burst count
        starts afresh.
        """
        self._enter("start", now_ns)
        if self._state is RunState.GAVE_UP:
            self._restarts.clear()
        self._state = RunState.STARTING
        self._restart_at_ns = None
        self._pending_start = None
        return [self._decide(Start(f"start emulator {self.emulator} ({reason})"))]

    def on_started(self, now_ns: int) -> list[PolicyAction]:
        """The emulator reported READY and took its assignment."""
        self._enter("on_started", now_ns)
        self._state = RunState.RUNNING
        return []

    def on_exit(
        self, now_ns: int, status: int, reason: ExitReason, detail: str = ""
    ) -> list[PolicyAction]:
        """The process ended (``status`` as in ``subprocess``: -N for signal N).

        ``detail`` says more, e.g. the hang verdict that made the runner kill it.
        """
        self._enter("on_exit", now_ns)
        reason = ExitReason(reason)
        if reason is ExitReason.EXITED_CLEAN and status != 0:
            raise PolicyError(f"a clean exit has status 0, not {status}")
        status_text = describe_status(status)
        cause = f"{reason.value}: {detail}; {status_text}" if detail else (
            f"{reason.value}: {status_text}"
        )
        self._last_exit_reason = reason
        self._last_exit_status = status_text
        if self._state is RunState.STOPPING:
            self._state = RunState.STOPPED
            return [self._decide(Nothing(
                f"emulator {self.emulator} stopped as requested ({cause})"
            ))]
        if reason is ExitReason.REQUESTED_RESTART or (
            reason is ExitReason.FRONTEND_FAULT and self.mode is not RestartMode.NEVER
        ):
            self._state = RunState.STARTING
            return [self._decide(Start(
                f"restart emulator {self.emulator} ({cause}); not counted against restart_burst"
            ))]
        if reason is ExitReason.EXITED_CLEAN and self.mode is not RestartMode.ALWAYS:
            self._state = RunState.EXITED
            return [self._decide(Nothing(
                f"emulator {self.emulator} exited cleanly ({status_text}); "
                f"restart = {self.mode.value} does not restart it"
            ))]
        if self.mode is RestartMode.NEVER:
            return [self._give_up(
                f"give up on emulator {self.emulator} ({cause}): restart = never"
            )]
        return [self._restart(now_ns, cause)]

    def on_start_failed(self, now_ns: int, detail: str) -> list[PolicyAction]:
        """A Start did not give a running emulator (``detail`` says why).

        Counted against the burst like a crash: without that, a start that
        always fails (a sandbox that no longer holds, a spare that freezes)
        would loop for ever instead of reaching the give-up action.
        """
        self._enter("on_start_failed", now_ns)
        cause = f"{ExitReason.START_FAILED.value}: {detail}"
        self._last_exit_reason = ExitReason.START_FAILED
        self._last_exit_status = None
        if self._state is RunState.STOPPING:
            self._state = RunState.STOPPED
            return [self._decide(Nothing(
                f"emulator {self.emulator} stopped as requested ({cause})"
            ))]
        if self.mode is RestartMode.NEVER:
            return [self._give_up(
                f"give up on emulator {self.emulator} ({cause}): restart = never"
            )]
        return [self._restart(now_ns, cause)]

    def on_stop_requested(self, now_ns: int) -> list[PolicyAction]:
        """A stop was asked for (VM shutdown, device removal): no more restarts.

        From STARTING or RUNNING the runner then stops the process and reports
        its exit.  A scheduled restart is cancelled.
        """
        self._enter("on_stop_requested", now_ns)
        if self._state in (RunState.STARTING, RunState.RUNNING):
            self._state = RunState.STOPPING
            return []
        if self._state is RunState.BACKOFF:
            self._state = RunState.STOPPED
            self._restart_at_ns = None
            self._pending_start = None
            return [self._decide(Nothing(
                f"cancel the restart of emulator {self.emulator}: stop requested"
            ))]
        return []

    def tick(self, now_ns: int) -> list[PolicyAction]:
        """Let time pass: a backoff that ended becomes a Start."""
        self._enter("tick", now_ns)
        if self._state is not RunState.BACKOFF or self._restart_at_ns is None:
            return []
        if now_ns < self._restart_at_ns:
            return []
        reason = self._pending_start or f"restart emulator {self.emulator}"
        self._state = RunState.STARTING
        self._restart_at_ns = None
        self._pending_start = None
        return [self._decide(Start(reason))]

    # -- internals --------------------------------------------------------------

    def _enter(self, event: str, now_ns: int) -> None:
        if self._state not in _ALLOWED[event]:
            raise PolicyError(
                f"emulator {self.emulator}: {event} is not allowed in state {self._state.value}"
            )
        self._last_now_ns = max(self._last_now_ns, now_ns)

    def _expire(self, now_ns: int) -> None:
        horizon = now_ns - self.window_s * NS_PER_S
        while self._restarts and self._restarts[0] <= horizon:
            self._restarts.popleft()

    def _restart(self, now_ns: int, cause: str) -> PolicyAction:
        self._expire(now_ns)
        earlier = len(self._restarts)
        count = earlier + 1
        if count > self.burst:
            return self._give_up(
                f"give up on emulator {self.emulator} ({cause}): {count} restarts in "
                f"{self.window_s} s exceed restart_burst = {self.burst}"
            )
        self._restarts.append(now_ns)
        tally = f"{count} of {self.burst} restarts in {self.window_s} s"
        delay_ms = self.backoff_ms[min(earlier, len(self.backoff_ms) - 1)]
        if delay_ms == 0:
            self._state = RunState.STARTING
            return self._decide(Start(f"restart emulator {self.emulator} ({cause}); {tally}"))
        self._state = RunState.BACKOFF
        self._restart_at_ns = now_ns + delay_ms * NS_PER_MS
        self._pending_start = (
            f"restart emulator {self.emulator} after {delay_ms} ms backoff ({cause}); {tally}"
        )
        return self._decide(Nothing(
            f"restart emulator {self.emulator} in {delay_ms} ms ({cause}); {tally}"
        ))

    def _give_up(self, why: str) -> PolicyAction:
        self._state = RunState.GAVE_UP
        self._restart_at_ns = None
        return self._decide(GiveUp(self.on_give_up, f"{why}; {_GIVE_UP_WORDS[self.on_give_up]}"))

    def _decide(self, action: PolicyAction) -> PolicyAction:
        self._last_decision = action.reason
        (self._log_give_up if isinstance(action, GiveUp) else self._log)(action.reason)
        return action


_SavedPolicy = tuple[RunState, deque[int], int | None, str | None, ExitReason | None,
                     str | None, str | None, int]
_MAX_SAVED_RESTARTS: Final = 1 << 16
_MAX_TIME_NS: Final = (1 << 63) - 1


def check_snapshot(saved: object) -> None:
    """Raise ValueError, naming the field, unless `saved` is a valid
    `RestartPolicy.snapshot` (so a reader of vm-state.json refuses a bad
    one before anything is restored from it)."""
    _parse_snapshot(saved)


def _parse_snapshot(saved: object) -> _SavedPolicy:
    if not isinstance(saved, dict):
        raise ValueError(f"restart policy: {saved!r:.60} is not an object")

    def field(key: str, kinds: tuple[type, ...]) -> Any:
        if key not in saved:
            raise ValueError(f"restart policy: no field {key!r}")
        value = saved[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(f"restart policy {key} = {value!r:.60}: not valid")
        if isinstance(value, int) and not 0 <= value <= _MAX_TIME_NS:
            raise ValueError(f"restart policy {key} = {value}: not a time")
        return value

    none = type(None)
    state_text = field("state", (str,))
    reason_text = field("last_exit_reason", (str, none))
    try:
        state = RunState(state_text)
        reason = ExitReason(reason_text) if reason_text is not None else None
    except ValueError as e:
        raise ValueError(f"restart policy: {e}") from None
    restarts = field("restarts", (list,))
    if len(restarts) > _MAX_SAVED_RESTARTS or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _MAX_TIME_NS
        for t in restarts
    ) or restarts != sorted(restarts):
        raise ValueError(f"restart policy restarts = {restarts!r:.60}: not times in order")
    restart_at = field("restart_at_ns", (int, none))
    if state is RunState.BACKOFF and restart_at is None:
        raise ValueError("restart policy: in backoff with no restart_at_ns")
    return (state, deque(restarts), restart_at, field("pending_start", (str, none)), reason,
            field("last_exit_status", (str, none)), field("last_decision", (str, none)),
            field("last_now_ns", (int,)))
