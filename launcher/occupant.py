"""One emulator process and its control link, as a slot or the spare pool holds it."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from launcher import emulators
from launcher.heartbeat.link import ControlLink


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
