"""One emulator process and its control link, while it waits or serves a slot.

Theory of operation. An occupant is owned by exactly one task at a time:
the spare pool's while it waits, then the slot's. Its owner runs its
heartbeat (`ControlLink.beating`) for as long as it owns it, and sees its
end in one of three futures: the process exited, the link gave a verdict
(hang, protocol violation, control channel closed, heartbeat error), or
management asked for a restart. `serve` turns that into an `Ending` once
the process is reaped; `hand_over` turns a spare into a slot's occupant or
raises `HandOverFailed` with the spare killed and reaped. Neither lets
anything but CancelledError (the VM's teardown) or a bug escape, and the
slot routes even a bug into its restart policy.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emulators import faults
from emulators.config import EmulatorConfig
from launcher import emulators
from launcher.heartbeat.detector import NoReply, Stalled
from launcher.heartbeat.link import ControlLink, Judgement, LinkClosed, ProtocolBroken
from launcher.restart_policy import ExitReason, describe_status

# An emulator that closed its control channel is usually exiting: give its
# exit this long to be seen before killing it, so it is reported as what it was.
EXIT_GRACE_S = 0.5


def now_ns() -> int:
    return time.monotonic_ns()


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass
class Occupant:
    """One live emulator process and its control link."""

    proc: emulators.EmulatorProcess
    link: ControlLink
    uid: int
    #: Its vhost-user sockets on the keepers' side, by controller id, once it
    #: serves a slot (a waiting spare has none).
    backends: dict[str, socket.socket] = field(default_factory=dict)
    #: The spare pool's generation it was started in (launcher.spares).
    generation: int = 0


@dataclass(frozen=True, slots=True)
class Ending:
    """How an occupant's service ended; the process is reaped."""

    reason: ExitReason
    detail: str
    status: int
    verdict: Judgement | None = None  # the heartbeat's, when it was killed for it


def exit_event(slot_id: str, pid: int, reason: ExitReason, status: int) -> dict[str, Any]:
    """EMULATOR_EXIT's data: exactly one of 'signal' and 'status' is set."""
    return {
        "id": slot_id, "pid": pid, "reason": reason.value,
        "signal": signal_name(-status) if status < 0 else None,
        "status": status if status >= 0 else None,
    }


def hang_event(slot_id: str, pid: int, verdict: Judgement) -> dict[str, Any]:
    """EMULATOR_HANG's data for the verdict an occupant was killed for."""
    hang: dict[str, Any] = {
        "id": slot_id, "pid": pid,
        "why": "no-progress" if isinstance(verdict, Stalled) else "no-answer",
        "inflight": verdict.in_flight if isinstance(verdict, Stalled) else 0,
    }
    if isinstance(verdict, Stalled | NoReply):
        hang["silent_ms"] = int(verdict.since_ms)
    return hang


class HandOverFailed(Exception):
    """A warm spare did not become the occupant (it died, froze, refused or
    fell silent); it is killed and reaped. A cold start can help."""

    def __init__(self, pid: int, why: str, status: int) -> None:
        super().__init__(f"warm spare (pid {pid}) did not take over: {why}; "
                         f"{describe_status(status)}")
        self.pid = pid
        self.why = why
        self.status = status


async def reap(proc: emulators.EmulatorProcess) -> int:
    """The exit status, killing first if need be. Shielded: a teardown that
    cancels us still leaves the process to be reaped by `exited`."""
    if not proc.exited.done():
        proc.kill()
    return await asyncio.shield(proc.exited)


async def serve(occupant: Occupant, restart: asyncio.Event, heartbeat_ms: int,
                hang_timeout_ms: int) -> Ending:
    """Run the occupant's heartbeat until the process ends, hangs (then it is
    killed) or `restart` is set (then it is killed and `restart` cleared).

    The hang detector is armed here, when the pinging starts: armed earlier
    (at the start, before QEMU was started) it would count that wait as
    silence."""
    proc, link = occupant.proc, occupant.link
    link.watch(heartbeat_ms, hang_timeout_ms)
    async with link.beating():
        wanted = asyncio.ensure_future(restart.wait())
        waits: set[asyncio.Future[Any]] = {proc.exited, link.hung, wanted}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wanted.cancel()  # an Event.wait: it cannot fail
    if proc.exited in done:
        return Ending(ExitReason.CRASHED, "", proc.exited.result())
    if wanted in done:
        restart.clear()
        return Ending(ExitReason.REQUESTED_RESTART, "requested through management",
                      await reap(proc))
    verdict = link.hung.result()
    if isinstance(verdict, ProtocolBroken):
        await asyncio.wait({proc.exited}, timeout=EXIT_GRACE_S)
    if proc.exited.done():  # it died on its own: not our kill, whatever the link said
        return Ending(ExitReason.CRASHED, "", proc.exited.result())
    status = await reap(proc)
    if not proc.signalled:  # already exiting when we killed it (a loaded host reaps late)
        return Ending(ExitReason.CRASHED, "", status)
    return Ending(ExitReason.KILLED_HUNG, verdict.reason, status, verdict)


async def hand_over(spare: Occupant, config: EmulatorConfig,
                    after_send: Callable[[], None]) -> None:
    """Give `spare` its assignment; return once it said it took it.

    `after_send` runs as soon as the assignment is out (the keepers' replay
    goes out at once: every wake-up saved is time the guest does not wait).
    The spare's heartbeat keeps running meanwhile, and the answer is awaited
    at most one heartbeat interval past the spare's last sign of life (a
    PONG, or the assignment itself, so a spare that was alive a moment ago
    gets one full interval): a spare that dies, freezes or refuses costs at
    most that, not a fixed timeout. Raises `HandOverFailed` with the spare
    killed and reaped; its uid stays the caller's to give back."""
    async with spare.link.beating():
        why = await _assign(spare, config, after_send)
    if why is not None:
        spare.link.close()
        status = await reap(spare.proc)
        raise HandOverFailed(spare.proc.pid, why, status)


async def _assign(spare: Occupant, config: EmulatorConfig,
                  after_send: Callable[[], None]) -> str | None:
    """None once the spare answered yes; otherwise why not."""
    link, proc = spare.link, spare.proc
    try:
        answer = link.send_assign(config.to_json(), config.assigned_fds())
    except OSError as e:
        return f"the assignment could not be sent: {e.strerror or e}"
    faults.strike("handover.assign_sent", proc.pid)
    sent_ns = now_ns()
    after_send()
    faults.strike("handover.replay_sent", proc.pid)
    interval_ns = link.interval_ns
    waits: set[asyncio.Future[Any]] = {answer, proc.exited, link.hung}
    while True:
        left_ns = max(link.last_heard_ns, sent_ns) + interval_ns - now_ns()
        if left_ns <= 0:
            silent_ms = (now_ns() - link.last_heard_ns) / 1e6
            return (f"no answer and no sign of life for {silent_ms:.0f} ms "
                    f"(heartbeat every {interval_ns / 1e6:.0f} ms)")
        done, _ = await asyncio.wait(waits, timeout=left_ns / 1e9,
                                     return_when=asyncio.FIRST_COMPLETED)
        error = answer.exception() if answer in done else None
        if answer in done and not isinstance(error, LinkClosed):
            if error is not None:
                raise error
            reply = answer.result()
            if reply.ok:
                faults.strike("handover.answer_received", proc.pid)
            return None if reply.ok else f"refused: {reply.error or 'no reason given'}"
        if proc.exited in done:
            return "died"
        if link.hung in done:
            return f"hung: {link.hung.result().reason}"
        if error is not None:
            return str(error)
