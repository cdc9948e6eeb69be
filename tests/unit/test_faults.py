"""Fault points: arming, one kill on the N-th pass, and the launcher's plan
that hands each arming to one process and moves on once it fired."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from emulators import faults
from launcher import faultplan
from tests.support.vm import REPO

POINT = faults.EMULATOR_POINTS[0]
LAUNCHER_POINT = faults.LAUNCHER_POINTS[0]


@pytest.fixture(autouse=True)
def unarmed() -> Iterator[None]:
    saved = faults.armed(), faults.after_strike
    yield
    faults.arm(saved[0])
    faults.after_strike = saved[1]


def test_parse_and_format() -> None:
    armings = faults.parse(f" {POINT}@3, {LAUNCHER_POINT} ,")
    assert armings == (faults.Arming(POINT, 3), faults.Arming(LAUNCHER_POINT, 1))
    assert faults.parse(faults.format_armings(armings)) == armings
    assert faults.parse("") == ()


@pytest.mark.parametrize("bad", ["no.such.point@1", f"{POINT}@0", f"{POINT}@x", "@1"])
def test_parse_refuses(bad: str) -> None:
    with pytest.raises(faults.FaultSpecError):
        faults.parse(bad)


def test_registry_names_are_unique_and_dotted() -> None:
    assert len(set(faults.POINTS)) == len(faults.POINTS)
    assert not set(faults.EMULATOR_POINTS) & set(faults.LAUNCHER_POINTS)
    for name in faults.POINTS:
        assert name == name.lower() and "." in name and " " not in name, name


def test_unarmed_point_is_a_no_op_even_for_a_typo() -> None:
    faults.arm(())
    faults.point(POINT)
    faults.point("not.a.point")  # unarmed: not even looked at (cost); the scan test finds typos


def test_armed_point_refuses_an_unknown_name() -> None:
    faults.arm(faults.parse(f"{POINT}@5"))
    with pytest.raises(faults.FaultSpecError):
        faults.point("not.a.point")


def _run(env_value: str | None, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if env_value is not None:
        env[faults.ENV] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=60)


PASSES = f"""
from emulators import faults
for i in range(1, 6):
    print(i, flush=True)
    faults.point({POINT!r})
print("survived", flush=True)
"""


def test_process_kills_itself_on_the_nth_pass_only() -> None:
    done = _run(f"{POINT}@3", PASSES)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["1", "2", "3"]
    assert f"mplaunch-fault: point {POINT} reached" in done.stderr


def test_unarmed_or_other_point_does_not_kill() -> None:
    for value in (None, "", f"{faults.EMULATOR_POINTS[1]}@1"):
        done = _run(value, PASSES)
        assert done.returncode == 0 and "survived" in done.stdout, (value, done.stderr)


def test_bad_arming_is_an_error_at_import() -> None:
    done = _run("queue.nonsense@1", "import emulators.faults")
    assert done.returncode == 1 and "unknown fault point" in done.stderr


def test_strike_kills_the_given_process_once_and_tells_the_plan() -> None:
    struck: list[tuple[str, int]] = []
    faults.after_strike = lambda name, pid: struck.append((name, pid))
    faults.arm(faults.parse(f"{LAUNCHER_POINT}@2"))
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not faults.strike(LAUNCHER_POINT, victim.pid)
        assert faults.strike(LAUNCHER_POINT, victim.pid)
        assert victim.wait(10) == -signal.SIGKILL
        assert not faults.strike(LAUNCHER_POINT, victim.pid)  # spent
        assert struck == [(LAUNCHER_POINT, victim.pid)]
    finally:
        victim.kill()
        victim.wait()


# -- the launcher's plan


def test_plan_gives_an_emulator_entry_to_one_process_at_a_time() -> None:
    a, b = faults.EMULATOR_POINTS[:2]
    plan = faultplan.FaultPlan(faults.parse(f"{a}@1,{b}@2"))
    env = plan.offer()
    assert env == {faults.ENV: f"{a}@1"}
    assert plan.offer() == {}  # pending: a concurrent start gets nothing
    plan.given(env, 100)
    assert plan.offer() == {}  # held
    plan.exited(999, -signal.SIGKILL, False)  # someone else: no change
    plan.exited(100, -signal.SIGKILL, True)  # the launcher killed it: not the fault
    assert plan.current == faults.Arming(a, 1) and plan.holder is None
    env = plan.offer()
    plan.given(env, 101)
    plan.exited(101, -signal.SIGKILL, False)  # fired
    assert plan.current == faults.Arming(b, 2)
    env = plan.offer()
    assert env == {faults.ENV: f"{b}@2"}
    plan.given(env, None)  # the start failed: offered again
    assert plan.offer() == env


def test_plan_arms_launcher_entries_in_the_launcher_and_moves_on_when_struck() -> None:
    emu = faults.EMULATOR_POINTS[0]
    plan = faultplan.FaultPlan(faults.parse(f"{LAUNCHER_POINT}@1,{emu}@1"))
    assert plan.offer() == {}  # a launcher entry goes to no process
    assert faults.armed() == (faults.Arming(LAUNCHER_POINT, 1),)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert faults.strike(LAUNCHER_POINT, victim.pid)
        victim.wait(10)
    finally:
        victim.kill()
        victim.wait()
    assert faults.armed() == ()
    assert plan.offer() == {faults.ENV: f"{emu}@1"}


def test_empty_plan_offers_nothing() -> None:
    plan = faultplan.FaultPlan(())
    assert plan.offer() == {} and plan.current is None and faults.armed() == ()
