"""Stage 2 of the sandbox, applied by the emulator to itself.

It runs after every import and the set-up that reads nothing untrusted
(the selector exists, ctypes symbols are resolved), and before the first
byte from QEMU, the guest or the state store is read: the controllers,
which load the state a previous emulator left, are built after it. From then on only the calls of
:data:`launcher.sandbox.profiles.STAGE2_ALLOW` are possible. The launcher
does not trust the emulator to have done this: it reads the emulator's
/proc status and starts QEMU only once two filters are in place.
"""

from __future__ import annotations

import enum
import os

import prctl

from emulators import faults
from launcher.sandbox import profiles, seccomp


class LockdownMode(enum.Enum):
    """The spec's ``sandbox`` setting as the emulator receives it on its command line."""

    ON = "on"
    LOG = "log"
    OFF = "off"


class LockdownError(Exception):
    """The allow list could not be applied; the emulator must exit, not serve."""


def lockdown(mode: LockdownMode, standby_thread: bool = False) -> None:
    """Confine this process for good (``OFF``: do nothing, the spec asked for it).
    `standby_thread`: a warm spare's, which may make the one thread a hot
    standby waits in (``profiles.STANDBY_THREAD``)."""
    if mode is LockdownMode.OFF:
        return
    try:
        # Not dumpable: /proc/PID files belong to root, and no process of the
        # same uid may ptrace this one, even if one existed.
        prctl.set_dumpable(False)
        prctl.set_no_new_privs(True)
        # A process a test armed with a fault point may SIGKILL itself.
        extra: tuple[profiles.Rule, ...] = (
            (profiles.fault_kill(os.getpid()),) if faults.armed() else ())
        if standby_thread:
            extra += profiles.STANDBY_THREAD
        seccomp.load(seccomp.build_allow_list(profiles.STAGE2_ALLOW + extra,
                                              log_only=mode is LockdownMode.LOG))
    except (OSError, seccomp.FilterError) as e:
        raise LockdownError(f"cannot apply the seccomp allow list: {e}") from None
