"""Whether a process still runs, as the tests ask it of pids they did not spawn."""

from __future__ import annotations

import psutil


def alive(pid: int) -> bool:
    """A zombie counts as gone: it runs nothing, only its parent has not
    reaped it yet. A process reaped while we look is gone too (psutil reads
    /proc in steps, any of which may find the pid already vanished)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
