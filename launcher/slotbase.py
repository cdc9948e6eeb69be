"""What every kind of slot offers the supervisor and management.

A slot is one ``[[emulator]]`` of the spec across the lives of its
processes. Two kinds exist: :class:`launcher.slots.EmulatorSlot` (the Python
vhost-user-scsi emulator, kind ``scsi``) and
:class:`launcher.lsi.slot.RemoteSlot` (QEMU's x-remote LSI53C895A, kind
``lsi``). The supervisor and the management code hold them as :class:`Slot`
and never ask which kind they hold; what differs between the kinds (a
session keeper or an mpqemu relay between QEMU and the process, a control
link or a QMP monitor as heartbeat) stays inside each slot.

Errors::

    DiskChangeError     a disk could not be added, removed or resized; nothing changed
     +-- NoAnswer       sent, but no answer came: whether it applied is not known
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from launcher.occupant import now_ns
from launcher.restart_policy import GiveUp, Nothing, PolicyAction, RestartPolicy, Start
from launcher.spec import ControllerSpec, DiskSpec
from launcher.status import LOG


class DiskChangeError(Exception):
    """A disk could not be added, removed or resized; nothing changed."""


class NoAnswer(DiskChangeError):
    """The command was sent but no answer came (the emulator ended or hung):
    whether it was applied, and the guest told, is not known."""


@dataclass
class SlotStats:
    """What management and the tests want to know about a slot."""

    starts: int = 0
    restarts: int = 0
    spare_restarts: int = 0
    last_exit: str | None = None
    last_stall_ms: float | None = None
    stalls_ms: list[float] = field(default_factory=list)
    started_ns: int = 0


@dataclass(frozen=True, slots=True)
class SlotSnapshot:
    """What management may know of a slot, taken at one instant: a copy, so
    a query never holds (or reaches through) the live process and link."""

    id: str
    pid: int | None  # only while a live process serves the slot
    uid: int | None
    state: str
    uptime_s: float | None
    restarts: int
    last_exit: str | None
    last_stall_ms: float | None
    controllers: tuple[str, ...]
    disks: tuple[str, ...]
    heartbeat_rtt_ms: float | None
    inflight: int | None
    completed: int | None
    kind: str = "scsi"
    #: An ``lsi`` slot's disks by SCSI target id (None for other kinds).
    targets: tuple[tuple[str, int], ...] | None = None
    #: The package version the serving process reported (None: not known).
    version: str | None = None


class Slot(Protocol):
    """The part of a slot the supervisor and management use."""

    emit: Callable[[str, dict[str, Any]], None]
    """Where the slot's events go (the supervisor sets it)."""

    @property
    def id(self) -> str: ...

    @property
    def controllers(self) -> Sequence[ControllerSpec]: ...

    @property
    def disks(self) -> Mapping[str, list[DiskSpec]]:
        """Disks by controller id; they change at run time through management."""

    @property
    def disk_fds(self) -> Mapping[str, int]:
        """One fd per disk, for management's checks of the file behind it."""

    @property
    def qemu_ends(self) -> Mapping[str, socket.socket]:
        """QEMU's end of each controller's link, until QEMU inherited it."""

    def snapshot(self) -> SlotSnapshot: ...

    def start_keepers(self, on_qemu_closed: Callable[[str], None]) -> None: ...

    async def start(self) -> None: ...

    async def supervise(self) -> None: ...

    def request_restart(self) -> None: ...

    async def stop(self) -> int | None: ...

    def close(self) -> None: ...

    def close_qemu_ends(self) -> None: ...

    def disk(self, disk_id: str) -> DiskSpec | None: ...

    def disk_changes_refused(self, what: str) -> str | None:
        """Why `what` (disk-add, disk-remove, disk-resize) is refused on
        this slot whatever its arguments, or None."""

    async def add_disk(self, disk: DiskSpec, opened: int | None = None) -> None: ...

    async def remove_disk(self, disk: DiskSpec) -> None: ...

    async def resize_disk(self, disk: DiskSpec, size: int) -> int: ...


class PolicyDriven:
    """What both kinds do once a process has ended: carry out the restart
    policy's actions (start, give up, wait for a deadline) until a process
    serves the slot again. One loop, so that a restart that fails, a give-up
    and a backoff mean the same for every kind; each kind says how it
    starts a process (`_restart`), what a failed start adds
    (`_start_failed`) and whether a process serves (`_serving`)."""

    id: str
    policy: RestartPolicy
    stats: SlotStats
    emit: Callable[[str, dict[str, Any]], None]
    _stopping: bool
    _on_give_up: Callable[[GiveUp], Awaitable[None]]

    async def _restart(self, ended_ns: int, old_pid: int) -> None:
        raise NotImplementedError

    def _start_failed(self, error: Exception) -> None:
        """A start raised `error` (already logged); the policy counts it next."""

    def _serving(self) -> bool:
        raise NotImplementedError

    async def _carry_out(self, actions: list[PolicyAction], ended_ns: int, old_pid: int) -> bool:
        """Do what the policy said until a process serves again (True) or
        the slot is done (False)."""
        while actions:
            action = actions.pop(0)
            if isinstance(action, Start):
                try:
                    await self._restart(ended_ns, old_pid)
                except Exception as e:  # cancellation is the VM's teardown: not caught
                    if self._stopping:
                        return False
                    why = str(e) or type(e).__name__
                    LOG.warning("emulator %s: restart failed: %s", self.id, why)
                    self._start_failed(e)
                    actions = self.policy.on_start_failed(now_ns(), why)
            elif isinstance(action, GiveUp):
                self.emit("EMULATOR_GIVE_UP", {
                    "id": self.id, "restarts": self.stats.restarts,
                    "action": action.action.value, "reason": action.reason,
                })
                await self._on_give_up(action)
                return False
            elif isinstance(action, Nothing):
                deadline = self.policy.next_deadline_ns()
                if deadline is None:
                    return False
                await asyncio.sleep(max(0, deadline - now_ns()) / 1e9)
                if self._stopping:
                    return False
                actions = self.policy.tick(now_ns())
        return self._serving()
