"""What the back-end session asks its I/O layer to do, and what it records.

`BackendSession.handle()` returns a list of effects; the I/O layer applies
them in order.  Order matters: an effect that replaces a resource (a new
memory table, a new kick fd) comes before the `CloseFds` that releases the
old one, so the I/O layer has stopped using an fd before it is closed.

Fd ownership: an fd inside a `SetMemTable`, `SetLog`, `SetKick`, `SetCall` or
`SetErr` stays owned by the session (the I/O layer uses it but never closes it) until
a later `CloseFds` names it; then the I/O layer closes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import MemoryRegion, VringAddr


@dataclass(frozen=True, slots=True)
class MappedRegion:
    """A memory region together with the fd that backs it."""

    region: MemoryRegion
    fd: int


@dataclass(frozen=True, slots=True)
class MappedLog:
    """The dirty log SET_LOG_BASE gave: `size` bytes at `offset` of `fd`."""

    size: int
    offset: int
    fd: int


@dataclass(frozen=True, slots=True)
class RingConfig:
    """Everything a split virtqueue needs to start: its size, where its parts
    are in guest physical memory, and the avail index to start from."""

    index: int
    num: int
    base: int
    addr: VringAddr
    desc_gpa: int
    avail_gpa: int
    used_gpa: int


@dataclass(frozen=True, slots=True)
class Reply:
    """Send these bytes to the front-end (no fds)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SetMemTable:
    """Replace the whole guest memory map with these regions (empty: unmap all).

    `rings` are the started rings, with their parts translated through the new
    map: they keep running at their current position over it (QEMU sends a
    new table while rings run when guest memory is hot-plugged; libvhost-user
    re-maps each ring the same way).
    """

    regions: tuple[MappedRegion, ...]
    rings: tuple[RingConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class SetLog:
    """Map this dirty log, replacing any earlier one (a `CloseFds` after it
    releases the old fd); None: unmap it.  The front-end's reply follows, so
    QEMU knows the log is in use before it counts on it."""

    log: MappedLog | None


@dataclass(frozen=True, slots=True)
class SetLogging:
    """VHOST_F_LOG_ALL is acked (or no longer): mark every guest page written
    in the dirty log (vhost-user spec, "Migration")."""

    enabled: bool


@dataclass(frozen=True, slots=True)
class SetRingLog:
    """A started ring's log flag or log address changed (SET_VRING_ADDR while
    it runs, as QEMU sends when a migration starts or stops logging); its
    parts did not move.  `ring.addr` holds the new flags and log address."""

    ring: RingConfig


@dataclass(frozen=True, slots=True)
class SetKick:
    """Watch this eventfd for the ring's kicks (None: stop watching)."""

    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class SetCall:
    """Signal completions of the ring on this eventfd (None: none).  DESIGN.md:
    the I/O layer writes once to every call fd newly given, in case a
    completion was signalled on the one it replaces."""

    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class SetErr:
    """Report ring errors on this eventfd (None: none)."""

    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class StartRing:
    """Create the ring's queue from `ring`.  It is processed only while
    enabled: QEMU kicks right after SET_VRING_KICK, before it enables the ring,
    so a kick that comes while disabled must wait, not be dropped."""

    ring: RingConfig
    features: int
    enabled: bool


@dataclass(frozen=True, slots=True)
class EnableRing:
    """Start or pause processing a started ring, keeping its position."""

    index: int
    enabled: bool


@dataclass(frozen=True, slots=True)
class StopRing:
    """Drop the ring's queue: it is stopped (GET_VRING_BASE, reset, close).

    The ring's saved progress is kept: until the front-end has the ring's
    position (see `ForgetRing`), a successor process may need it to answer
    a GET_VRING_BASE sent again after a crash.
    """

    index: int


@dataclass(frozen=True, slots=True)
class ForgetRing:
    """The front-end no longer needs the stopped ring's progress: its
    GET_VRING_BASE answer was sent, or it reset the device.  Comes after the
    `Reply` it waits for, so a crash before it leaves the progress in place
    and a successor answers the same index."""

    index: int


@dataclass(frozen=True, slots=True)
class ResetDevice:
    """The front-end reset the device (RESET_OWNER or RESET_DEVICE); every ring
    was stopped by the effects before this one."""


@dataclass(frozen=True, slots=True)
class CloseFds:
    """Close these fds: the session no longer holds them."""

    fds: tuple[int, ...]


Effect = (
    Reply
    | SetMemTable
    | SetLog
    | SetLogging
    | SetRingLog
    | SetKick
    | SetCall
    | SetErr
    | StartRing
    | EnableRing
    | StopRing
    | ForgetRing
    | ResetDevice
    | CloseFds
)
