"""Which process carries which fault-point arming (a test-only switch).

Theory of operation. A test arms fault points (:mod:`emulators.faults`) by
starting mplaunch with ``MPLAUNCH_FAULT="a@1,b@2,..."`` in its environment;
production never sets it and no VM spec can. The launcher reads the list
once and works through it in order, one entry at a time, so one VM boot can
sweep many points. Each entry kills once:

* An emulator point is handed, in the environment of its exec (the jail
  passes that one variable on and nothing else), to exactly one process:
  the next emulator or warm spare the launcher starts while no live process
  holds the entry. It is spent when that process dies by a SIGKILL the
  launcher did not send (the fault fired). If the holder ends any other way
  (stopped by the launcher, refused an assignment, exited), the entry goes
  to the next process started. So a replacement never inherits a spent
  arming, and no two processes race for one.
* A launcher point (a step of the hand-over or of a cold start) is armed in
  the launcher's own copy of :mod:`emulators.faults`; there
  :func:`emulators.faults.strike` kills the emulator or spare involved in
  that step, and the entry is spent.

Every move is logged on stderr (``fault plan: ...``), so a test sees which
pid holds which entry and when it fired.
"""

from __future__ import annotations

import os
import signal

from emulators import faults
from launcher.status import LOG

#: What asyncio reports for a child whose status it could not collect.
UNKNOWN_STATUS = 255


class FaultPlan:
    """The armings still to fire, and who holds the current one."""

    def __init__(self, entries: tuple[faults.Arming, ...]) -> None:
        self.entries = entries
        self.index = 0
        self.holder: int | None = None
        self._pending = False
        self._arm_launcher()

    @classmethod
    def from_environ(cls) -> FaultPlan:
        return cls(faults.parse(os.environ.get(faults.ENV, "")))

    @property
    def current(self) -> faults.Arming | None:
        return self.entries[self.index] if self.index < len(self.entries) else None

    def _label(self) -> str:
        return f"{self.index + 1}/{len(self.entries)} {self.current}"

    def _arm_launcher(self) -> None:
        """Arm the launcher's own points with the current entry, if it is one."""
        cur = self.current
        if cur is not None and cur.name in faults.LAUNCHER_POINTS:
            faults.arm((cur,))
            LOG.warning("fault plan: entry %s armed in the launcher", self._label())
        else:
            faults.arm(())
        faults.after_strike = self._struck if self.entries else None

    def _advance(self, why: str) -> None:
        LOG.warning("fault plan: entry %s spent (%s)", self._label(), why)
        self.index += 1
        self.holder = None
        self._pending = False
        self._arm_launcher()
        if self.current is None and self.entries:
            LOG.warning("fault plan: all %d entries spent", len(self.entries))

    def _struck(self, name: str, pid: int) -> None:
        self._advance(f"launcher killed pid {pid} at {name}")

    # -- the process side, called by launcher.emulators.start

    def offer(self) -> dict[str, str]:
        """The environment of a process about to start: the current emulator
        entry if nobody holds it yet, else nothing."""
        cur = self.current
        if cur is None or cur.name not in faults.EMULATOR_POINTS:
            return {}
        if self.holder is not None or self._pending:
            return {}
        self._pending = True
        return {faults.ENV: str(cur)}

    def given(self, env: dict[str, str], pid: int | None) -> None:
        """The process offered ``env`` started as ``pid`` (None: it did not start)."""
        if faults.ENV not in env:
            return
        self._pending = False
        if pid is not None:
            self.holder = pid
            LOG.warning("fault plan: entry %s given to pid %d", self._label(), pid)

    def exited(self, pid: int, status: int, killed_by_launcher: bool) -> None:
        """A process the launcher started ended with wait status ``status``."""
        if pid != self.holder:
            return
        if status == -signal.SIGKILL and not killed_by_launcher:
            self._advance(f"pid {pid} died by SIGKILL")
        elif status == UNKNOWN_STATUS and not killed_by_launcher:
            # asyncio lost the status (the pid was reaped elsewhere): no
            # emulator exits 255 of its own, so the fault most likely fired.
            self._advance(f"pid {pid} died, status unknown (taken for the SIGKILL)")
        else:
            self.holder = None
            LOG.warning("fault plan: pid %d ended (status %d) before entry %s fired; "
                        "the next process gets it", pid, status, self._label())


PLAN = FaultPlan.from_environ()
