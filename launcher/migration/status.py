"""What `query-migrate` and the MIGRATION events report, without I/O.

mplaunch's status is QEMU's, folded into the six values of the contract,
with one difference: QEMU's "completed" only ends the ``ram`` phase; the
migration is ``completed`` once the destination said its guest runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Phase(StrEnum):
    RAM = "ram"  # QEMU copies the guest's RAM and devices
    STATE = "state"  # QEMU is done; the emulators' state goes over


FINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

_QEMU_ACTIVE = frozenset({
    "active", "pre-switchover", "device", "cancelling", "wait-unplug", "colo",
    "postcopy-active", "postcopy-paused", "postcopy-recover",
})


def from_qemu(qemu_status: str) -> Status | None:
    """QEMU's migration status as ours (None: QEMU's "completed", which is not
    ours, or a status that changes nothing, such as "none")."""
    if qemu_status == "setup":
        return Status.SETUP
    if qemu_status in _QEMU_ACTIVE:
        return Status.ACTIVE
    if qemu_status == "failed":
        return Status.FAILED
    if qemu_status == "cancelled":
        return Status.CANCELLED
    return None


@dataclass
class Progress:
    """One VM's migration status: set() says whether an event is due."""

    status: Status = Status.NONE
    phase: Phase = Phase.RAM
    uri: str | None = None
    error: str | None = None
    ram: dict[str, Any] = field(default_factory=dict)
    #: QEMU's own downtime (ms: from its stop to its completion), once known.
    qemu_downtime_ms: int | None = None
    #: From QEMU's completion to the destination's "running" (ms), once done.
    handover_ms: float | None = None

    @property
    def under_way(self) -> bool:
        return self.status in (Status.SETUP, Status.ACTIVE)

    def begin(self, uri: str) -> None:
        self.status, self.phase, self.uri, self.error, self.ram = (
            Status.SETUP, Phase.RAM, uri, None, {})
        self.qemu_downtime_ms = self.handover_ms = None

    def set(self, status: Status, error: str | None = None) -> bool:
        """Move to `status` (a final status stays: the first one wins)."""
        if self.status in FINAL or status == self.status:
            return False
        self.status = status
        if status is Status.FAILED:
            self.error = error or "unknown error"
        return True

    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = {"status": str(self.status)}
        if self.status is Status.FAILED and self.error:
            data["error-desc"] = self.error
        return data

    def answer(self) -> dict[str, Any]:
        """query-migrate's answer."""
        out = self.event()
        if self.uri is not None:
            out["uri"] = self.uri
        if self.status is Status.ACTIVE:
            out["phase"] = str(self.phase)
        if self.ram and self.status in (Status.ACTIVE, Status.COMPLETED):
            out["ram"] = dict(self.ram)
        if self.status is Status.COMPLETED and self.handover_ms is not None:
            out["handover-ms"] = self.handover_ms
            if self.qemu_downtime_ms is not None:
                out["downtime"] = round(self.qemu_downtime_ms + self.handover_ms)
        return out
