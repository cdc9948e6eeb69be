"""Check before trust: the launcher's own proof that an emulator is confined.

The emulator confines itself in two stages, but the launcher does not take
its word for it (nor QEMU's: the same check runs on QEMU, whose second
filter is its own ``-sandbox on``). It reads /proc/PID/status and the namespace links of the
emulator, as the kernel sees them, and lets QEMU start (and so lets the
first vhost-user message reach the emulator) only when all of these hold:

- Seccomp 2 (filter mode) with at least two filters (stage 1 from the jail,
  stage 2 from the emulator's lockdown): waited for, with a deadline;
- NoNewPrivs 1; CapInh, CapPrm, CapEff, CapBnd, CapAmb all 0;
- every uid and gid the expected ones, no supplementary groups;
- network, IPC, UTS and mount namespaces that are not the launcher's.

A failed check is :class:`ConfinementFailed`; the caller kills the
emulator and stops the VM. The parsing and judging are pure functions.

Errors::

    SandboxError                 the sandbox does not hold; no restart can help
     +-- SandboxUnavailable      this host cannot apply it (preflight)
     +-- ConfinementFailed       an emulator is not confined as it must be
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from launcher.spec import SandboxMode
from launcher.status import LOG

STAGES = 2
QEMU_STAGES = 2
"""QEMU's filters: the jail's stage 1 and QEMU's own ``-sandbox on``."""
CONFINE_TIMEOUT = 15.0
POLL_INTERVAL = 0.005
CONFINE_FAST_POLL = 0.001
"""The poll interval for the first :data:`CONFINE_FAST_WINDOW` seconds: a
start forked from the holder's template is confined within ~10 ms, and the
restart it serves waits on this check."""
CONFINE_FAST_WINDOW = 0.1
NAMESPACES = ("net", "ipc", "uts", "mnt")
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
OFF_HINT = 'set sandbox = "off" in [vm] to run the emulators unconfined (debugging only)'


class SandboxError(Exception):
    """The sandbox does not hold; restarting the emulator cannot help."""


class SandboxUnavailable(SandboxError):
    """This host (or this user) cannot apply the sandbox; mplaunch fails closed."""


class ConfinementFailed(SandboxError):
    """An emulator's /proc status shows it is not confined as required."""

    def __init__(self, emulator_id: str, pid: int, problems: list[str],
                 what: str | None = None) -> None:
        super().__init__(emulator_id, pid, problems)
        self.emulator_id = emulator_id
        self.pid = pid
        self.problems = problems
        #: How the process is named in the message ("emulator ID" by default).
        self.what = what or f"emulator {emulator_id}"

    def __str__(self) -> str:
        return f"{self.what} (pid {self.pid}) is not confined: " + "; ".join(self.problems)


@dataclass(frozen=True, slots=True)
class Expected:
    """What the kernel must report for one emulator."""

    uid: int
    gid: int
    stages: int = STAGES


def parse_status(text: str) -> dict[str, str]:
    """/proc/PID/status as a mapping of field to its (stripped) value."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def lockdown_done(status: Mapping[str, str], expected: Expected) -> bool:
    """Whether the emulator has loaded every stage (it may still be starting)."""
    try:
        return int(status.get("Seccomp_filters", "0")) >= expected.stages
    except ValueError:
        return False


def judge(status: Mapping[str, str], expected: Expected) -> list[str]:
    """Every way the status falls short; empty means confined."""
    problems = []
    if status.get("Seccomp") != "2":
        problems.append(f"Seccomp is {status.get('Seccomp')!r}, not 2 (filter)")
    if not lockdown_done(status, expected):
        problems.append(f"Seccomp_filters is {status.get('Seccomp_filters')!r}, "
                        f"not at least {expected.stages}")
    if status.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs is {status.get('NoNewPrivs')!r}, not 1")
    for name in CAP_FIELDS:
        value = status.get(name)
        try:
            if value is None or int(value, 16) != 0:
                problems.append(f"{name} is {value!r}, not 0")
        except ValueError:
            problems.append(f"{name} is {value!r}, not 0")
    for name, want in (("Uid", expected.uid), ("Gid", expected.gid)):
        ids = status.get(name, "").split()
        if len(ids) != 4 or any(x != str(want) for x in ids):
            problems.append(f"{name} is {ids}, not {want} everywhere")
    if status.get("Groups", ""):
        problems.append(f"supplementary groups {status.get('Groups')!r} remain")
    return problems


def namespace_problems(pid: int, proc: Path = Path("/proc")) -> list[str]:
    problems = []
    for ns in NAMESPACES:
        try:
            theirs = os.readlink(proc / str(pid) / "ns" / ns)
        except OSError as e:
            problems.append(f"cannot read its {ns} namespace: {e.strerror}")
            continue
        if theirs == os.readlink(proc / "self" / "ns" / ns):
            problems.append(f"it shares the launcher's {ns} namespace ({theirs})")
    return problems


async def wait_confined(emulator_id: str, pid: int, expected: Expected,
                        exited: asyncio.Future[int] | asyncio.Task[int],
                        timeout: float | None = None, what: str | None = None) -> None:
    """Wait until the emulator (or QEMU: `what`) has locked itself down, then
    check everything.

    Raises :class:`ConfinementFailed` if it exits first, takes longer than
    `timeout`, or is locked down but not as required.
    """
    timeout = CONFINE_TIMEOUT if timeout is None else timeout
    began = time.monotonic()
    deadline = began + timeout
    status: dict[str, str] = {}
    while True:
        if exited.done():
            raise ConfinementFailed(emulator_id, pid, [
                f"it exited before locking itself down ({_describe(exited)}); see its "
                "messages above"], what)
        try:
            status = parse_status(Path(f"/proc/{pid}/status").read_text())
        except OSError:
            status = {}
        if status.get("State", "").startswith("Z"):
            await asyncio.sleep(POLL_INTERVAL)
            continue
        if lockdown_done(status, expected):
            break
        now = time.monotonic()
        if now > deadline:
            raise ConfinementFailed(emulator_id, pid, [
                f"no lockdown within {timeout:g} s"] + judge(status, expected), what)
        await asyncio.sleep(CONFINE_FAST_POLL if now - began < CONFINE_FAST_WINDOW
                            else POLL_INTERVAL)
    problems = judge(status, expected) + namespace_problems(pid)
    if problems:
        raise ConfinementFailed(emulator_id, pid, problems, what)


def _describe(exited: asyncio.Future[int] | asyncio.Task[int]) -> str:
    if exited.cancelled() or exited.exception() is not None:
        return "status unknown"
    status = exited.result()
    return f"killed by signal {-status}" if status < 0 else f"status {status}"


def preflight(mode: SandboxMode) -> None:
    """Refuse to go on if the sandbox cannot be applied; warn when it is weakened."""
    if mode is SandboxMode.OFF:
        LOG.warning("WARNING: sandbox = \"off\": the emulators run UNCONFINED, as the launcher's "
                    "user with all its privileges; a guest that takes over an emulator owns "
                    "this host. Use for debugging only.")
        return
    problems = []
    if os.geteuid() != 0:
        problems.append("mplaunch is not running as root (it needs to change uids and "
                        "make namespaces)")
    for ns in NAMESPACES:
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            problems.append(f"this kernel has no {ns} namespaces")
    try:
        actions = Path("/proc/sys/kernel/seccomp/actions_avail").read_text().split()
    except OSError:
        actions = []
    for action in ("kill_process", "errno", "log"):
        if action not in actions:
            problems.append(f"this kernel's seccomp lacks the {action} action")
    if problems:
        raise SandboxUnavailable("the emulator sandbox cannot be applied: "
                                 + "; ".join(problems) + f"; {OFF_HINT}")
    if mode is SandboxMode.LOG:
        LOG.warning("WARNING: sandbox = \"log\": seccomp violations of the emulators are "
                    "only LOGGED, not stopped. Use for debugging a profile only.")
