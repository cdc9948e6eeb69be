"""The outcome of one SCSI command, as the transport needs it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from .iov import scatter
from .lun import LogicalUnit
from .sense import Sense, Status


class CommandResult(NamedTuple):
    """Status, sense (with CHECK CONDITION) and how much data moved.

    ``data_in`` counts bytes placed in the device-written buffers;
    ``data_out`` counts bytes of the driver-written buffers consumed. The
    transport turns them into residuals. A NamedTuple rather than a frozen
    dataclass: it is just as immutable and five times cheaper to build, and
    one is built per guest request.
    """

    status: Status
    sense: Sense | None = None
    data_in: int = 0
    data_out: int = 0


GOOD = CommandResult(Status.GOOD)

Handler = Callable[[LogicalUnit, bytes, Sequence[memoryview], Sequence[memoryview]], CommandResult]
"""A command handler: (logical unit, CDB, data-out views, data-in views)."""


def reply(data: bytes, allocation_length: int, data_in: Sequence[memoryview]) -> CommandResult:
    """Return generated parameter data, cut to the allocation length and the buffer."""
    if allocation_length < len(data):
        data = data[:allocation_length]
    return CommandResult(Status.GOOD, None, scatter(data, data_in))
