"""The restart policy under a fake clock: modes, burst window, backoff, give-up."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.restart_policy import (
    DEFAULT_BACKOFF_MS,
    ExitReason,
    GiveUp,
    Nothing,
    PolicyAction,
    PolicyError,
    RestartPolicy,
    RunState,
    Start,
    describe_status,
)
from launcher.spec import EmulatorKind, EmulatorSpec, GiveUpAction, RestartMode

MS = 1_000_000
S = 1_000_000_000
SIGKILL = -int(signal.SIGKILL)
SIGSEGV = -int(signal.SIGSEGV)


def make(
    mode: RestartMode = RestartMode.ON_FAILURE,
    burst: int = 5,
    window_s: int = 60,
    on_give_up: GiveUpAction = GiveUpAction.PAUSE,
) -> tuple[RestartPolicy, list[str]]:
    lines: list[str] = []
    policy = RestartPolicy("e0", mode, burst, window_s, on_give_up, log=lines.append)
    return policy, lines


def state_of(policy: RestartPolicy) -> RunState:
    """Read the state afresh (mypy would keep a narrowed property across calls)."""
    return policy.state


def running(policy: RestartPolicy, now: int = 0) -> None:
    [start] = policy.start(now)
    assert isinstance(start, Start)
    policy.on_started(now)
    assert state_of(policy) is RunState.RUNNING


def crash(policy: RestartPolicy, now: int, status: int = SIGKILL) -> PolicyAction:
    [action] = policy.on_exit(now, status, ExitReason.CRASHED)
    return action


def test_first_start() -> None:
    policy, lines = make()
    assert state_of(policy) is RunState.STOPPED
    assert policy.start(5) == [Start("start emulator e0 (first start)")]
    assert state_of(policy) is RunState.STARTING
    assert policy.on_started(6) == []
    assert state_of(policy) is RunState.RUNNING
    assert lines == ["start emulator e0 (first start)"]


def test_first_restart_is_immediate_and_logged() -> None:
    policy, lines = make()
    running(policy)
    action = crash(policy, 10 * S)
    assert action == Start(
        "restart emulator e0 (crashed: killed by SIGKILL); 1 of 5 restarts in 60 s"
    )
    assert state_of(policy) is RunState.STARTING
    assert lines[-1] == action.reason
    assert policy.next_deadline_ns() is None


def test_later_restarts_back_off() -> None:
    policy, lines = make()
    running(policy)
    crash(policy, 0)
    policy.on_started(1)
    action = crash(policy, 2 * S, SIGSEGV)
    assert action == Nothing(
        "restart emulator e0 in 100 ms (crashed: killed by SIGSEGV); 2 of 5 restarts in 60 s"
    )
    assert state_of(policy) is RunState.BACKOFF
    assert policy.next_deadline_ns() == 2 * S + 100 * MS
    assert policy.describe(2 * S + 40 * MS).restart_in_ms == 60
    assert policy.tick(2 * S + 100 * MS - 1) == []
    assert policy.tick(2 * S + 100 * MS) == [
        Start(
            "restart emulator e0 after 100 ms backoff (crashed: killed by SIGSEGV);"
            " 2 of 5 restarts in 60 s"
        )
    ]
    assert state_of(policy) is RunState.STARTING
    assert lines[-2:] == [action.reason, policy.describe().last_decision]


def test_backoff_doubles_up_to_the_cap() -> None:
    policy, _ = make(burst=100, window_s=3600)
    running(policy)
    now = 0
    delays = []
    for _ in range(10):
        action = crash(policy, now)
        if isinstance(action, Start):
            delays.append(0)
        else:
            deadline = policy.next_deadline_ns()
            assert deadline is not None
            delays.append((deadline - now) // MS)
            now = deadline
            [start] = policy.tick(now)
            assert isinstance(start, Start)
        policy.on_started(now)
        now += S
    assert delays == [0, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
    assert DEFAULT_BACKOFF_MS[0] == 0 and DEFAULT_BACKOFF_MS[-1] == 5000


def restart_once(policy: RestartPolicy, now: int) -> int:
    """Crash, let the backoff pass, report started; return the new now."""
    action = crash(policy, now)
    if isinstance(action, Nothing):
        deadline = policy.next_deadline_ns()
        assert deadline is not None
        now = deadline
        [start] = policy.tick(now)
        assert isinstance(start, Start)
    else:
        assert isinstance(action, Start)
    policy.on_started(now)
    return now


def test_burst_limit_gives_up() -> None:
    policy, lines = make(burst=5, window_s=60)
    running(policy)
    now = 0
    for _ in range(5):
        now = restart_once(policy, now) + S
    action = crash(policy, now)
    assert action == GiveUp(
        GiveUpAction.PAUSE,
        "give up on emulator e0 (crashed: killed by SIGKILL): 6 restarts in 60 s exceed"
        " restart_burst = 5; pausing the VM",
    )
    assert state_of(policy) is RunState.GAVE_UP
    assert lines[-1] == action.reason
    assert policy.tick(now + 3600 * S) == []  # stays given up


def test_poweroff_on_give_up() -> None:
    policy, _ = make(burst=0, on_give_up=GiveUpAction.POWEROFF)
    running(policy)
    action = crash(policy, 0)
    assert isinstance(action, GiveUp)
    assert action.action is GiveUpAction.POWEROFF
    assert action.reason.endswith(
        "1 restarts in 60 s exceed restart_burst = 0; powering off the VM"
    )


def test_the_window_slides() -> None:
    policy, _ = make(burst=2, window_s=10)
    running(policy)
    restart_once(policy, 0)  # counted at 0 s
    restart_once(policy, 5 * S)  # counted at 5 s
    assert policy.restarts_in_window(9 * S) == 2
    assert policy.restarts_in_window(10 * S) == 1  # the one at 0 s left the window
    # At 10 s one restart remains in the window: one more is allowed, with backoff.
    action = crash(policy, 10 * S)
    assert isinstance(action, Nothing) and "2 of 2 restarts in 10 s" in action.reason
    assert "in 100 ms" in action.reason
    # Much later the window is empty: immediate again.
    [start] = policy.tick(10 * S + 100 * MS)
    policy.on_started(11 * S)
    assert crash(policy, 100 * S) == Start(
        "restart emulator e0 (crashed: killed by SIGKILL); 1 of 2 restarts in 10 s"
    )


def test_hang_kill_carries_the_verdict() -> None:
    policy, _ = make()
    running(policy)
    [action] = policy.on_exit(
        0, SIGKILL, ExitReason.KILLED_HUNG, detail="no heartbeat reply for 2000 ms"
    )
    assert action == Start(
        "restart emulator e0 (killed_hung: no heartbeat reply for 2000 ms; killed by SIGKILL);"
        " 1 of 5 restarts in 60 s"
    )


def test_on_failure_leaves_a_clean_exit_alone() -> None:
    policy, lines = make(RestartMode.ON_FAILURE)
    running(policy)
    assert policy.on_exit(0, 0, ExitReason.EXITED_CLEAN) == [
        Nothing(
            "emulator e0 exited cleanly (exit status 0);"
            " restart = on-failure does not restart it"
        )
    ]
    assert state_of(policy) is RunState.EXITED
    assert policy.tick(10 * S) == []
    assert len(lines) == 2


def test_always_restarts_a_clean_exit() -> None:
    policy, _ = make(RestartMode.ALWAYS)
    running(policy)
    assert policy.on_exit(0, 0, ExitReason.EXITED_CLEAN) == [
        Start("restart emulator e0 (exited_clean: exit status 0); 1 of 5 restarts in 60 s")
    ]


def test_never_gives_up_on_a_failure_at_once() -> None:
    policy, _ = make(RestartMode.NEVER)
    running(policy)
    assert policy.on_exit(0, 3, ExitReason.CRASHED) == [
        GiveUp(
            GiveUpAction.PAUSE,
            "give up on emulator e0 (crashed: exit status 3): restart = never; pausing the VM",
        )
    ]
    assert state_of(policy) is RunState.GAVE_UP


def test_never_leaves_a_clean_exit_alone() -> None:
    policy, _ = make(RestartMode.NEVER)
    running(policy)
    [action] = policy.on_exit(0, 0, ExitReason.EXITED_CLEAN)
    assert isinstance(action, Nothing)
    assert state_of(policy) is RunState.EXITED


@pytest.mark.parametrize("mode", list(RestartMode))
def test_requested_restart_is_immediate_and_not_counted(mode: RestartMode) -> None:
    policy, _ = make(mode, burst=1)
    running(policy)
    for now in range(5):
        assert policy.on_exit(now * S, SIGKILL, ExitReason.REQUESTED_RESTART) == [
            Start(
                "restart emulator e0 (requested_restart: killed by SIGKILL);"
                " not counted against restart_burst"
            )
        ]
        policy.on_started(now * S)
    assert policy.restarts_in_window(5 * S) == 0


@pytest.mark.parametrize("mode", list(RestartMode))
def test_a_requested_stop_is_never_restarted(mode: RestartMode) -> None:
    policy, _ = make(mode)
    running(policy)
    assert policy.on_stop_requested(0) == []
    assert state_of(policy) is RunState.STOPPING
    assert policy.on_exit(1, SIGKILL, ExitReason.CRASHED) == [
        Nothing("emulator e0 stopped as requested (crashed: killed by SIGKILL)")
    ]
    assert state_of(policy) is RunState.STOPPED
    assert policy.on_stop_requested(2) == []  # idempotent
    assert policy.tick(100 * S) == []


def test_stop_cancels_a_scheduled_restart() -> None:
    policy, _ = make()
    running(policy)
    restart_once(policy, 0)
    crash(policy, S)
    assert state_of(policy) is RunState.BACKOFF
    assert policy.on_stop_requested(S) == [
        Nothing("cancel the restart of emulator e0: stop requested")
    ]
    assert state_of(policy) is RunState.STOPPED
    assert policy.next_deadline_ns() is None
    assert policy.tick(100 * S) == []


def test_start_after_give_up_clears_the_window() -> None:
    policy, _ = make(burst=1)
    running(policy)
    restart_once(policy, 0)
    assert isinstance(crash(policy, S), GiveUp)
    assert policy.start(2 * S, "resumed by management") == [
        Start("start emulator e0 (resumed by management)")
    ]
    policy.on_started(2 * S)
    assert policy.restarts_in_window(2 * S) == 0
    assert isinstance(crash(policy, 3 * S), Start)


def test_start_during_backoff_starts_now() -> None:
    policy, _ = make()
    running(policy)
    restart_once(policy, 0)
    crash(policy, S)
    assert policy.start(S + MS, "restart requested") == [
        Start("start emulator e0 (restart requested)")
    ]
    assert state_of(policy) is RunState.STARTING
    assert policy.tick(10 * S) == []  # the cancelled backoff does not start a second one


def test_crash_before_ready_counts() -> None:
    policy, _ = make()
    policy.start(0)
    assert isinstance(crash(policy, 0, 1), Start)
    assert policy.restarts_in_window(0) == 1


@pytest.mark.parametrize(
    "setup,event",
    [
        ("stopped", lambda p: p.on_started(0)),
        ("stopped", lambda p: p.on_exit(0, 1, ExitReason.CRASHED)),
        ("running", lambda p: p.start(0)),
        ("running", lambda p: p.on_started(0)),
        ("gave_up", lambda p: p.on_exit(0, 1, ExitReason.CRASHED)),
        ("gave_up", lambda p: p.on_started(0)),
    ],
)
def test_events_the_state_forbids_are_errors(setup: str, event: object) -> None:
    policy, _ = make(burst=0)
    if setup != "stopped":
        running(policy)
    if setup == "gave_up":
        crash(policy, 0)
    assert callable(event)
    with pytest.raises(PolicyError, match="is not allowed in state"):
        event(policy)


def test_a_clean_exit_has_status_zero() -> None:
    policy, _ = make()
    running(policy)
    with pytest.raises(PolicyError, match="status 0"):
        policy.on_exit(0, 1, ExitReason.EXITED_CLEAN)


@pytest.mark.parametrize(
    "kwargs",
    [{"burst": -1}, {"window_s": 0}, {"backoff_ms": ()}, {"backoff_ms": (0, -1)}],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "emulator": "e0", "mode": RestartMode.ALWAYS, "burst": 1, "window_s": 1,
        "on_give_up": GiveUpAction.PAUSE,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        RestartPolicy(**args)  # type: ignore[arg-type]


def test_from_spec_and_describe() -> None:
    spec = EmulatorSpec(
        id="disk-proc", kind=EmulatorKind.SCSI, restart=RestartMode.ALWAYS, heartbeat_ms=500,
        hang_timeout_ms=2000, restart_burst=3, restart_window_s=30,
        on_give_up=GiveUpAction.POWEROFF,
    )
    policy = RestartPolicy.from_spec(spec, log=lambda line: None)
    running(policy)
    crash(policy, 7 * S, SIGSEGV)
    status = policy.describe(8 * S)
    assert status.state is RunState.STARTING
    assert status.restarts_in_window == 1
    assert status.last_exit_reason is ExitReason.CRASHED
    assert status.to_dict() == {
        "emulator": "disk-proc",
        "state": "starting",
        "restart": "always",
        "restarts-in-window": 1,
        "restart-burst": 3,
        "restart-window-s": 30,
        "last-exit-reason": "crashed",
        "last-exit-status": "killed by SIGSEGV",
        "last-decision": "restart emulator disk-proc (crashed: killed by SIGSEGV);"
        " 1 of 3 restarts in 30 s",
        "restart-in-ms": None,
    }
    assert policy.describe(38 * S).restarts_in_window == 0


def test_describe_status() -> None:
    assert describe_status(0) == "exit status 0"
    assert describe_status(70) == "exit status 70"
    assert describe_status(-9) == "killed by SIGKILL"
    assert describe_status(-200) == "killed by signal 200"


def test_default_logging_goes_to_the_module_logger(caplog: pytest.LogCaptureFixture) -> None:
    policy = RestartPolicy("e7", RestartMode.ON_FAILURE, 5, 60, GiveUpAction.PAUSE)
    with caplog.at_level("INFO", logger="launcher.restart_policy"):
        policy.start(0)
    assert caplog.messages == ["start emulator e7 (first start)"]


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(list(RestartMode)),
    st.integers(0, 6),
    st.integers(1, 20),
    st.lists(st.tuples(st.integers(0, 8000), st.sampled_from(list(ExitReason))), max_size=40),
)
def test_no_window_ever_holds_more_than_burst_restarts(
    mode: RestartMode, burst: int, window_s: int, exits: list[tuple[int, ExitReason]]
) -> None:
    """Run random exits through the policy as a runner would and check the
    invariants: counted restarts per window <= burst, one give-up at most,
    and a give-up only once the window is full (or restart = never)."""
    policy, lines = make(mode, burst, window_s)
    running(policy)
    now = 0
    counted: list[int] = []
    gave_up = 0
    for gap_ms, reason in exits:
        now += gap_ms * MS
        for action in policy.tick(now):
            assert isinstance(action, Start)
            policy.on_started(now)
        if state_of(policy) is not RunState.RUNNING:
            if state_of(policy) is RunState.BACKOFF:
                continue
            break
        status = 0 if reason is ExitReason.EXITED_CLEAN else SIGKILL
        [action] = policy.on_exit(now, status, reason)
        assert lines[-1] == action.reason
        if isinstance(action, GiveUp):
            gave_up += 1
            recent = [t for t in counted if t > now - window_s * S]
            assert mode is RestartMode.NEVER or len(recent) == burst
            break
        restart = isinstance(action, Start) or state_of(policy) is RunState.BACKOFF
        uncounted = (ExitReason.REQUESTED_RESTART, ExitReason.FRONTEND_FAULT)
        if restart and reason not in uncounted:
            counted.append(now)
            assert mode is not RestartMode.NEVER
            assert sum(1 for t in counted if t > now - window_s * S) <= burst
        if reason is ExitReason.EXITED_CLEAN and mode is not RestartMode.ALWAYS:
            assert state_of(policy) is RunState.EXITED
            break
        if isinstance(action, Start):
            policy.on_started(now)
    assert gave_up <= 1


# -- front-end faults and failed starts


@pytest.mark.parametrize("mode", [RestartMode.ON_FAILURE, RestartMode.ALWAYS])
def test_frontend_fault_restarts_at_once_and_is_not_counted(mode: RestartMode) -> None:
    policy, lines = make(mode, burst=1)
    running(policy)
    for now in range(5):
        [action] = policy.on_exit(now * S, 3, ExitReason.FRONTEND_FAULT, "ring index 9")
        assert action == Start(
            "restart emulator e0 (frontend_fault: ring index 9; exit status 3);"
            " not counted against restart_burst"
        )
        policy.on_started(now * S)
    assert policy.restarts_in_window(5 * S) == 0
    # A crash after them is still the first one counted: immediate.
    assert isinstance(crash(policy, 5 * S), Start)
    assert policy.restarts_in_window(5 * S) == 1


def test_frontend_fault_with_restart_never_gives_up() -> None:
    policy, _ = make(RestartMode.NEVER)
    running(policy)
    [action] = policy.on_exit(0, 3, ExitReason.FRONTEND_FAULT, "bad region")
    assert isinstance(action, GiveUp)
    assert state_of(policy) is RunState.GAVE_UP


def test_a_failed_start_counts_and_backs_off() -> None:
    policy, lines = make(burst=5)
    running(policy)
    assert isinstance(crash(policy, 0), Start)
    [action] = policy.on_start_failed(0, "warm spare (pid 7) froze during its hand-over")
    assert action == Nothing(
        "restart emulator e0 in 100 ms (start_failed: warm spare (pid 7) froze during"
        " its hand-over); 2 of 5 restarts in 60 s"
    )
    assert state_of(policy) is RunState.BACKOFF
    assert policy.describe().last_exit_reason is ExitReason.START_FAILED
    assert policy.describe().last_exit_status is None
    [start] = policy.tick(100 * MS)
    assert isinstance(start, Start)


def test_failed_starts_end_in_give_up() -> None:
    policy, _ = make(burst=2, on_give_up=GiveUpAction.POWEROFF)
    policy.start(0)
    now = 0
    actions = policy.on_start_failed(now, "not confined")
    while not isinstance(actions[0], GiveUp):
        if isinstance(actions[0], Nothing):
            deadline = policy.next_deadline_ns()
            assert deadline is not None
            now = deadline
            actions = policy.tick(now)
        assert isinstance(actions[0], Start)
        actions = policy.on_start_failed(now, "not confined")
    assert actions[0].action is GiveUpAction.POWEROFF
    assert "3 restarts in 60 s exceed restart_burst = 2" in actions[0].reason
    assert state_of(policy) is RunState.GAVE_UP


def test_a_failed_start_with_restart_never_gives_up() -> None:
    policy, _ = make(RestartMode.NEVER)
    policy.start(0)
    [action] = policy.on_start_failed(0, "not confined")
    assert isinstance(action, GiveUp)


def test_a_failed_start_while_stopping_is_the_stop() -> None:
    policy, _ = make()
    policy.start(0)
    policy.on_stop_requested(0)
    [action] = policy.on_start_failed(0, "cancelled")
    assert isinstance(action, Nothing)
    assert state_of(policy) is RunState.STOPPED


def test_a_failed_start_needs_a_start() -> None:
    policy, _ = make()
    running(policy)
    with pytest.raises(PolicyError, match="on_start_failed is not allowed in state running"):
        policy.on_start_failed(0, "x")


def test_a_give_up_is_logged_once_by_its_own_logger() -> None:
    lines: list[str] = []
    errors: list[str] = []
    policy = RestartPolicy("e0", RestartMode.ON_FAILURE, 0, 60, GiveUpAction.PAUSE,
                           log=lines.append, log_give_up=errors.append)
    running(policy)
    [action] = policy.on_exit(0, SIGKILL, ExitReason.CRASHED)
    assert isinstance(action, GiveUp)
    assert errors == [action.reason]
    assert action.reason not in lines
