"""Supervision that never silently stops, with real emulator processes.

The supervisor runs in this process in backend-only mode (no QEMU: the
emulators wait for a front-end that never comes, which is all supervision
needs), so a test can kill and freeze emulators and spares, break a
restart on purpose, and read events and `query-emulators` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launcher import occupant as occupant_module
from launcher import slots as slots_module
from launcher import supervisor as supervisor_module
from launcher.management.protocol import QmpEvent
from launcher.occupant import Ending
from launcher.sandbox import check
from launcher.sessionkeeper import SessionKeeper
from launcher.spec import load_spec
from launcher.supervisor import EXIT_FAILED, EXIT_OK, Supervisor
from launcher.vmcontrol import SupervisorControl
from tests.support.processes import alive
from tests.support.vm import DiskDef, VmDef

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")


@dataclass
class Vm:
    sv: Supervisor
    events: list[QmpEvent]
    task: asyncio.Task[int]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [dict(e.data) for e in self.events if e.name == name]

    async def until(self, what: Callable[[], Any], timeout: float, why: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = what()
            if value:
                return value
            if self.task.done():
                raise AssertionError(f"the VM ended ({self.task.result()}) before {why}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{why}: not within {timeout} s; events {self.events}")
            await asyncio.sleep(0.02)

    async def emulators(self) -> list[dict[str, Any]]:
        return await SupervisorControl(self.sv).query_emulators()

    def spare_pid(self) -> int | None:
        return self.sv.spares.spare_pid if self.sv.spares is not None else None

    async def serving_pid(self) -> int:
        async def live() -> int | None:
            [e0] = await self.emulators()
            return e0["pid"] if e0["pid"] and alive(e0["pid"]) else None
        deadline = time.monotonic() + 20
        while (pid := await live()) is None:
            assert time.monotonic() < deadline, "no live emulator"
            await asyncio.sleep(0.02)
        return pid


@contextlib.asynccontextmanager
async def vm_running(tmp_path: Path, **emulator: object) -> AsyncIterator[Vm]:
    vm = VmDef(tmp_path, "supervision")
    vm.emulators = {"e0": emulator}
    vm.controllers = {"scsi0": ("e0", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0, size=1024 * 1024)]
    sv = Supervisor(load_spec(vm.write()), backends_only=True)
    events: list[QmpEvent] = []
    sv.bus.subscribe(events.append)
    task = asyncio.create_task(sv.run())
    handle = Vm(sv, events, task)
    try:
        await handle.until(lambda: sv.slots and sv.slots[0].occupant, 30, "first start")
        yield handle
    finally:
        sv.request_stop("end of test")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(task), 30)
        if not task.done():
            task.cancel()


def test_spare_frozen_then_killed_during_hand_over(tmp_path: Path) -> None:
    """Freeze the spare, SIGKILL the serving emulator, SIGKILL the spare a
    second later: the slot falls back to a cold start and goes on."""

    async def scenario() -> None:
        async with vm_running(tmp_path, heartbeat_ms=2000, hang_timeout_ms=8000) as vm:
            spare = await vm.until(vm.spare_pid, 30, "a warm spare")
            # Freeze it just after it answered a PING, so the hand-over is still
            # waiting for it (one interval) when it is killed a second later.
            link = vm.sv.spares._spare.link  # type: ignore[union-attr]
            heard = getattr(link, "last_heard_ns", None)
            if heard is not None:
                await vm.until(lambda: link.last_heard_ns != heard, 10, "a PONG from the spare")
            os.kill(spare, signal.SIGSTOP)
            old = await vm.serving_pid()
            os.kill(old, signal.SIGKILL)
            await asyncio.sleep(1.0)
            os.kill(spare, signal.SIGKILL)
            restart = await vm.until(lambda: vm.named("EMULATOR_RESTART"), 20, "a restart")
            assert restart[0]["reason"] == "cold start" and restart[0]["old_pid"] == old
            [e0] = await vm.emulators()
            assert e0["pid"] == restart[0]["pid"] and alive(e0["pid"]), e0
            assert e0["state"] == "running", e0
            assert any(e["pid"] == old and e["signal"] == "SIGKILL"
                       for e in vm.named("EMULATOR_EXIT"))
            assert any(e["pid"] == spare and e["reason"] == "start_failed"
                       for e in vm.named("EMULATOR_EXIT")), vm.named("EMULATOR_EXIT")
            assert not alive(spare)
            # Supervision goes on: the next kill is recovered too, by a new spare.
            await vm.until(lambda: vm.spare_pid() not in (None, spare), 30, "a new spare")
            os.kill(e0["pid"], signal.SIGKILL)
            await vm.until(lambda: len(vm.named("EMULATOR_RESTART")) == 2, 20, "a 2nd restart")
            assert vm.named("EMULATOR_RESTART")[1]["reason"] == "warm spare"
            assert alive(await vm.serving_pid())
            assert not vm.named("EMULATOR_GIVE_UP")

    asyncio.run(scenario())


def test_hand_over_to_a_frozen_spare_waits_one_heartbeat_not_seconds(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with vm_running(tmp_path, heartbeat_ms=200, hang_timeout_ms=8000) as vm:
            spare = await vm.until(vm.spare_pid, 30, "a warm spare")
            os.kill(spare, signal.SIGSTOP)
            old = await vm.serving_pid()
            cold = time.monotonic()
            os.kill(old, signal.SIGKILL)
            [restart] = await vm.until(lambda: vm.named("EMULATOR_RESTART"), 20, "a restart")
            took = time.monotonic() - cold
            assert restart["reason"] == "cold start"
            assert not alive(spare)
            # Two intervals at most for the hand-over (0.4 s), 0.1 s of
            # backoff, then a cold start; the old fixed timeouts cost 8 s.
            assert took < 4.0, took
            assert alive(await vm.serving_pid())

    asyncio.run(scenario())


def test_a_frozen_waiting_spare_is_replaced_within_its_hang_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with vm_running(tmp_path, heartbeat_ms=200, hang_timeout_ms=1000) as vm:
            spare = await vm.until(vm.spare_pid, 30, "a warm spare")
            os.kill(spare, signal.SIGSTOP)
            frozen = time.monotonic()
            await vm.until(lambda: not alive(spare), 5, "the frozen spare killed")
            assert time.monotonic() - frozen < 1.0 + 0.5  # its hang timeout, and a tick
            await vm.until(lambda: vm.spare_pid() not in (None, spare), 30, "a new spare")
            new = vm.spare_pid()
            assert new is not None and alive(new)
            assert not vm.named("EMULATOR_RESTART")  # the guest's emulator was not touched

    asyncio.run(scenario())


def test_a_failing_restart_goes_through_the_policy_to_give_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restarts whose confinement check fails: counted, backed off, then the
    give-up action and its event; the VM ends with a clear error."""
    monkeypatch.setattr(supervisor_module, "WARM_SPARE", False)  # every restart is cold
    real = check.wait_confined
    broken = {"on": False}

    async def wait_confined(emulator_id: str, *args: Any, **kwargs: Any) -> None:
        await real(emulator_id, *args, **kwargs)
        if broken["on"]:
            raise check.SandboxError(f"{emulator_id}: not confined (test)")

    monkeypatch.setattr(check, "wait_confined", wait_confined)

    async def scenario() -> None:
        async with vm_running(tmp_path, restart_burst=2, on_give_up="poweroff") as vm:
            broken["on"] = True
            os.kill(await vm.serving_pid(), signal.SIGKILL)
            [give_up] = await vm.until(lambda: vm.named("EMULATOR_GIVE_UP"), 30, "give-up")
            assert give_up["action"] == "poweroff"
            assert "start_failed" in give_up["reason"]
            assert "not confined (test)" in give_up["reason"]
            assert "3 restarts in 60 s exceed restart_burst = 2" in give_up["reason"]
            assert await asyncio.wait_for(asyncio.shield(vm.task), 30) == EXIT_FAILED
            [e0] = await vm.emulators()
            assert e0["pid"] is None and e0["state"] == "gave-up", e0

    asyncio.run(scenario())


def test_a_restart_that_fails_once_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "WARM_SPARE", False)
    real = check.wait_confined
    failures = {"left": 0}

    async def wait_confined(emulator_id: str, *args: Any, **kwargs: Any) -> None:
        await real(emulator_id, *args, **kwargs)
        if failures["left"]:
            failures["left"] -= 1
            raise check.SandboxError(f"{emulator_id}: not confined (test)")

    monkeypatch.setattr(check, "wait_confined", wait_confined)

    async def scenario() -> None:
        async with vm_running(tmp_path) as vm:
            failures["left"] = 1
            old = await vm.serving_pid()
            os.kill(old, signal.SIGKILL)
            [restart] = await vm.until(lambda: vm.named("EMULATOR_RESTART"), 20, "a restart")
            assert restart["old_pid"] == old and alive(restart["pid"])
            assert vm.sv.slots[0].policy.restarts_in_window(time.monotonic_ns()) == 2
            [e0] = await vm.emulators()
            assert e0["state"] == "running" and e0["pid"] == restart["pid"]

    asyncio.run(scenario())


def test_an_exit_on_a_refused_front_end_message_is_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit status 3 with a keeper blaming its pending message: restarted,
    not counted, even with restart_burst = 0."""
    blamed: list[str] = []

    def blame_pending(self: SessionKeeper) -> str | None:
        if blamed:
            return None
        blamed.append(self.controller_id if hasattr(self, "controller_id") else "x")
        return "SET_MEM_TABLE region beyond its fd"

    monkeypatch.setattr(SessionKeeper, "blame_pending", blame_pending, raising=False)
    real_serve = occupant_module.serve

    async def serve(occ: Any, restart: asyncio.Event, *limits: int) -> Ending:
        ending = await real_serve(occ, restart, *limits)
        return Ending(ending.reason, ending.detail, 3, ending.verdict)  # as if exit 3

    monkeypatch.setattr(slots_module, "serve", serve)

    async def scenario() -> None:
        async with vm_running(tmp_path, restart_burst=0) as vm:
            os.kill(await vm.serving_pid(), signal.SIGKILL)
            [restart] = await vm.until(lambda: vm.named("EMULATOR_RESTART"), 20, "a restart")
            [exit_] = vm.named("EMULATOR_EXIT")
            assert exit_["reason"] == "frontend_fault" and exit_["status"] == 3
            assert not vm.named("EMULATOR_GIVE_UP")
            assert vm.sv.slots[0].policy.restarts_in_window(time.monotonic_ns()) == 0
            assert alive(restart["pid"])
        assert vm.task.result() == EXIT_OK

    asyncio.run(scenario())


def test_a_failing_heartbeat_is_a_verdict_not_a_lost_task() -> None:
    from launcher.heartbeat.link import ControlLink, ProtocolBroken, control_pair

    async def scenario() -> None:
        ours, theirs = control_pair()
        link = ControlLink("e0", ours)
        link.watch(10, 100)

        def broken(now_ns: int) -> list[object]:
            raise ValueError("clock went backwards")

        link.detector.tick = broken  # type: ignore[union-attr, method-assign, assignment]
        async with link.beating():
            verdict = await asyncio.wait_for(asyncio.shield(link.hung), 5)
        assert isinstance(verdict, ProtocolBroken) and "clock went backwards" in verdict.reason
        link.close()
        theirs.close()

    asyncio.run(scenario())


def test_cancelling_the_owner_of_a_heartbeat_is_not_swallowed() -> None:
    from launcher.heartbeat.link import ControlLink, LinkClosed, control_pair

    async def scenario() -> None:
        ours, theirs = control_pair()
        link = ControlLink("e0", ours)
        link.watch(10, 10_000)

        async def owner() -> None:
            async with link.beating():
                await asyncio.sleep(3600)

        task = asyncio.create_task(owner())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A closed link fails what it can no longer answer; it cancels nothing.
        answer = link.send_assign("{}", [])
        link.close()
        with pytest.raises(LinkClosed):
            await answer
        with pytest.raises(LinkClosed):
            await link.ready
        theirs.close()

    asyncio.run(scenario())


def test_a_killed_emulator_is_reported_as_crashed_not_hung(tmp_path: Path) -> None:
    """Its control channel closes as it dies: that is not a hang."""

    async def scenario() -> None:
        async with vm_running(tmp_path) as vm:
            for n in range(1, 5):
                await vm.until(vm.spare_pid, 30, "a warm spare")
                os.kill(await vm.serving_pid(), signal.SIGKILL)
                await vm.until(lambda n=n: len(vm.named("EMULATOR_RESTART")) == n, 20, "a restart")
            assert [e["reason"] for e in vm.named("EMULATOR_EXIT")] == ["crashed"] * 4
            assert not vm.named("EMULATOR_HANG")

    asyncio.run(scenario())


def test_a_child_that_fails_ends_the_vm_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug that escapes a slot's supervisor is not dropped: the VM ends,
    exit status 1, the error logged, every process reaped."""

    async def broken(self: Any) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("bug in a supervisor")

    monkeypatch.setattr(slots_module.EmulatorSlot, "supervise", broken)

    async def scenario() -> None:
        async with vm_running(tmp_path) as vm:
            pid = await vm.serving_pid()
            assert await asyncio.wait_for(asyncio.shield(vm.task), 30) == EXIT_FAILED
            assert not alive(pid)
            assert vm.spare_pid() is None

    asyncio.run(scenario())
    assert any("supervision failed: bug in a supervisor" in r.getMessage()
               for r in caplog.records)
