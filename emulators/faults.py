"""Named fault points: a test-only way to SIGKILL a process at a chosen step.

Theory of operation
-------------------
Recovery is only as good as the worst instant a crash can hit. Each step
where a crash matters (a state-store store on the request path, a control
message handler before or after its reply, a ring start or stop, a step of
the launcher's hand-over) calls ``point("area.step")``. Unless a test armed
that point the call is one module-level bool check and returns.

A test arms points through one environment variable, read once at import::

    MPLAUNCH_FAULT="queue.publish_used@3"           # one point
    MPLAUNCH_FAULT="ring.stop.before_reply@1,queue.mark_inflight@40"

``NAME@N`` means: on the N-th pass of point NAME in this process, kill the
process with SIGKILL (nothing is flushed, no handler runs: the crash a
recovery path must survive). A line naming the point is written to stderr
first so a test can tell a fault kill from any other SIGKILL.

Points that live in the launcher (hand-over and cold-start steps) must not
kill the launcher: the launcher calls ``strike(name, pid)``, which on the
N-th pass SIGKILLs the emulator or spare process involved in that step
instead. Which process receives which arming, and how one arming kills once
and not in every replacement, is the launcher's business
(``launcher/faultplan.py``).

The variable is never part of a VM spec; production never sets it. Every
name must be in ``POINTS`` (a typo in an arming is an error at import, a
typo at a call site fails the registry test that scans the source tree).
This module is a leaf: stdlib only, importable from the emulator before
lockdown and from the launcher.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

ENV = "MPLAUNCH_FAULT"

#: Points passed inside an emulator process (it kills itself).
EMULATOR_POINTS: tuple[str, ...] = (
    # The request path: after each store into the state store, in the order
    # of emulators/virtio/state.py (taking a head; P1..P5 of a batch).
    "queue.mark_inflight",
    "queue.consumed",
    "queue.batch_recorded",
    "queue.used_written",
    "queue.publish_used",
    "queue.clear_inflight",
    "queue.batch_settle",
    # A restarted ring settled its predecessor's last batch (before re-running
    # what was in flight): a second crash in the middle of a recovery.
    "queue.resumed",
    # A LUN's unit state (unit attentions, ...) saved around each change.
    "lun.save.before",
    "lun.save.after",
    # The event queue's undelivered events (a disk added, removed, resized)
    # saved around each change, so a successor still delivers them.
    "events.save.before",
    "events.save.after",
    # vhost-user ring lifecycle: start (fresh: slot cleared, base set), stop
    # (GET_VRING_BASE before and after its answer), device reset.
    "ring.start.before",
    "ring.fresh.slot_cleared",
    "ring.fresh.based",
    "ring.start.after",
    "ring.stop.before_reply",
    "ring.stop.after_reply",
    "device.reset",
    # SET_MEM_TABLE: new table mapped; running rings moved onto it.
    "memtable.mapped",
    "memtable.moved",
    # Any vhost-user answer, before and after it is sent (N picks which).
    "vhost.reply.before",
    "vhost.reply.after",
    # The launcher's control channel: each command, before and after its answer.
    "control.heartbeat.before_reply",
    "control.heartbeat.after_reply",
    "control.assign.before_reply",
    "control.assign.after_reply",
    "control.lun_add.before_reply",
    "control.lun_add.after_reply",
    "control.lun_remove.before_reply",
    "control.lun_remove.after_reply",
    "control.lun_resize_check.before_reply",
    "control.lun_resize_check.after_reply",
    "control.lun_resize.before_reply",
    "control.lun_resize.after_reply",
)

#: Points passed in the launcher; they kill the process involved in the step.
LAUNCHER_POINTS: tuple[str, ...] = (
    # Hand-over to a warm spare: the spare is killed.
    "handover.assign_sent",
    "handover.replay_sent",
    "handover.answer_received",
    "handover.occupant_installed",
    # Cold start: the new emulator is killed.
    "cold.process_started",
    "cold.occupant_installed",
    # disk-resize: the image grew, the emulator not yet told; it is killed.
    "disk.resize.after_grow",
)

POINTS: tuple[str, ...] = EMULATOR_POINTS + LAUNCHER_POINTS


class FaultSpecError(ValueError):
    """An arming string that names no known point or has no valid pass count."""


@dataclass(frozen=True, slots=True)
class Arming:
    """Kill at the ``nth`` pass (1-based) of point ``name``."""

    name: str
    nth: int

    def __post_init__(self) -> None:
        if self.name not in POINTS:
            raise FaultSpecError(f"unknown fault point {self.name!r}")
        if self.nth < 1:
            raise FaultSpecError(f"fault point {self.name!r}: pass count must be >= 1")

    def __str__(self) -> str:
        return f"{self.name}@{self.nth}"


def parse(value: str) -> tuple[Arming, ...]:
    """Parse ``"name@N,name@N"`` (``@N`` defaults to 1); empty means unarmed."""
    armings: list[Arming] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, count = item.partition("@")
        try:
            nth = int(count) if sep else 1
        except ValueError:
            raise FaultSpecError(f"bad pass count in {item!r}") from None
        armings.append(Arming(name.strip(), nth))
    return tuple(armings)


def format_armings(armings: tuple[Arming, ...]) -> str:
    """The environment value that arms ``armings``."""
    return ",".join(str(a) for a in armings)


# name -> remaining passes before the kill; only armed names are present.
_remaining: dict[str, int] = {}
_ARMED = False
#: Called with (name, pid) after strike() killed; the launcher's plan moves on.
after_strike: Callable[[str, int], None] | None = None


def arm(armings: tuple[Arming, ...]) -> None:
    """Replace the current armings (used at import, and by unit tests)."""
    global _ARMED
    _remaining.clear()
    for a in armings:
        _remaining[a.name] = a.nth
    _ARMED = bool(_remaining)


def armed() -> tuple[Arming, ...]:
    """Armings that have not fired yet in this process."""
    return tuple(Arming(n, c) for n, c in _remaining.items())


def _due(name: str) -> bool:
    if name not in POINTS:
        raise FaultSpecError(f"unknown fault point {name!r}")
    left = _remaining.get(name)
    if left is None:
        return False
    if left > 1:
        _remaining[name] = left - 1
        return False
    del _remaining[name]
    return True


def _say(text: str) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.write(sys.stderr.fileno(), f"mplaunch-fault: {text}\n".encode())


def point(name: str) -> None:
    """Pass point ``name``: SIGKILL this process if this is its armed pass."""
    if not _ARMED:
        return
    if _due(name):
        _say(f"point {name} reached, pid {os.getpid()} kills itself")
        os.kill(os.getpid(), signal.SIGKILL)


def strike(name: str, pid: int | None) -> bool:
    """Pass launcher point ``name``: SIGKILL ``pid`` if this is its armed pass.

    Returns True when it killed (the caller carries on: finding out that the
    process died is the machinery under test).
    """
    if not _ARMED:
        return False
    if not _due(name) or pid is None:
        return False
    _say(f"point {name} reached, launcher kills pid {pid}")
    killed = True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        killed = False
    if after_strike is not None:
        after_strike(name, pid)
    return killed


arm(parse(os.environ.get(ENV, "")))
