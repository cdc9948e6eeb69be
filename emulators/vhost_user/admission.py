"""Which front-end messages may reach a back-end, decided before they do (sans-I/O).

Theory of operation
-------------------
The launcher's session keeper stands between QEMU and the emulator and
records the session so that a restarted emulator can be brought back to it.
A message that the emulator must refuse is the front-end's fault: forwarded
blindly it would end the emulator with a protocol error, and, once recorded,
end every emulator the record is replayed to.  So the keeper asks
`check_message` first, and a refused message is answered or the connection
dropped (`refusal_answer`); it never reaches an emulator or the record.

The rules come from two places, and none is written here twice:

1. The session's semantic checks (session.py: features offered, ring index
   in range, ring size, ring state, addresses inside the memory table...).
   They run on a trial copy of the keeper's record (`BackendSession.trial_copy`),
   which holds what the emulator's session holds, so the answer is the one the
   emulator would give (`Admission` keeps the trial from one message to the
   next instead of copying the record each time).  The trial copy sees the
   message without NEED_REPLY, so a refusal raises with its reason instead of
   becoming a failure ack.
2. What the emulator's I/O layer needs from an fd when it applies a message,
   which no payload says: guest RAM is mapped shared and writable, so each
   memory region's fd must be a file (a memfd, a tmpfs or hugetlbfs file; not a
   socket, pipe or eventfd), open read-write and not sealed against writes, and
   hold the region (mmap_offset + size within the file); the dirty log's fd
   (SET_LOG_BASE) the same, for the log's range; kick, call and err fds are
   read and written as eventfds.  The I/O layer gathers these facts
   (`FdFacts`, from fstat, fcntl and /proc) and passes them in; this module only
   compares.  Optionally, the regions together may not exceed the guest's
   memory size: the emulator's address-space limit is sized from it.

A message that passes may still make an emulator fail in a way no rule
foresaw; the keeper then blames the message in flight (see sessionkeeper.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .codec import Message
from .constants import HeaderFlag, ProtocolFeature, Request
from .errors import VhostUserError
from .messages import LogDescription, MemoryRegion, MemoryTable, SingleMemoryRegion, VringFd
from .session import HAS_OWN_REPLY, BackendSession


class FdKind(enum.Enum):
    """What an fd is, as far as a back-end's use of it goes."""

    FILE = "file"  # a regular file (memfd, tmpfs, hugetlbfs): can be mapped
    EVENTFD = "eventfd"
    SOCKET = "socket"
    PIPE = "pipe"
    OTHER = "other"  # a directory, a device, another anonymous inode


@dataclass(frozen=True, slots=True)
class FdFacts:
    """What the I/O layer found out about one fd the front-end sent."""

    kind: FdKind
    size: int = 0
    """The file's size in bytes (FILE only)."""
    writable: bool = False
    """Open read-write, and not sealed against writes (FILE only)."""


class Answer(enum.Enum):
    """How a refused message is refused, as the vhost-user spec allows."""

    FAILURE_ACK = "failure-ack"
    """The front-end asked for a REPLY_ACK: it gets a non-zero status, and the
    session goes on."""
    DISCONNECT = "disconnect"
    """No reply can carry the refusal (none was asked for, or the request has
    its own reply, which has no error form): the back-end closes the connection,
    which the spec allows a back-end that detects an error."""


_RING_FD_REQUESTS = frozenset(
    {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}
)
_REPLY_ACK_BIT = 1 << ProtocolFeature.REPLY_ACK


def wants_ack(message: Message, acked_protocol_features: int) -> bool:
    """Whether the front-end expects a REPLY_ACK status for `message` (spec,
    "REPLY_ACK": NEED_REPLY set, REPLY_ACK negotiated, and no reply of its own)."""
    return can_ack(message.request, acked_protocol_features) and message.need_reply


def can_ack(request: Request, acked_protocol_features: int) -> bool:
    """Whether a back-end answers `request` with a status when NEED_REPLY asks it."""
    return bool(acked_protocol_features & _REPLY_ACK_BIT) and request not in HAS_OWN_REPLY


def refusal_answer(message: Message, acked_protocol_features: int) -> Answer:
    """How to refuse `message`: a failure status where one is expected, else hang up."""
    if wants_ack(message, acked_protocol_features):
        return Answer.FAILURE_ACK
    return Answer.DISCONNECT


def check_message(
    record: BackendSession,
    message: Message,
    facts: Mapping[int, FdFacts],
    *,
    guest_memory: int | None = None,
) -> str | None:
    """Why a back-end in `record`'s state must refuse `message`, or None.

    `facts` describes every fd of the message; `guest_memory`, when given, is
    the most guest RAM the regions of one memory table may add up to.  Neither
    `record` nor the message (nor its fds) is changed.
    """
    return Admission(record, guest_memory).check(message, facts)


class Admission:
    """`check_message` for one record, message after message, without a deep
    copy of the record for each: the trial that accepted a message equals the
    record once the record has taken that message too (`taken`), so it serves
    for the next check.  After anything else (a refusal, a message the record
    did not take) the next check copies the record afresh."""

    def __init__(self, record: BackendSession, guest_memory: int | None = None) -> None:
        self._record = record
        self._guest_memory = guest_memory
        self._trial: BackendSession | None = None
        self._checked: tuple[Message, BackendSession] | None = None

    def check(self, message: Message, facts: Mapping[int, FdFacts]) -> str | None:
        """Why `message` must be refused now, or None (see `check_message`)."""
        trial = self._trial if self._trial is not None else self._record.trial_copy()
        self._trial = self._checked = None
        reason = _session_refusal(trial, message)
        if reason is None:
            reason = _fd_refusal(message, facts, self._guest_memory)
        if reason is None:
            self._checked = (message, trial)
        return reason

    def taken(self, message: Message) -> None:
        """The record took `message`, the last one checked and accepted."""
        checked, self._checked = self._checked, None
        # GET_VRING_BASE: the record keeps the base the emulator answered, which
        # the trial could not know.
        if (
            checked is not None and checked[0] is message
            and message.request is not Request.GET_VRING_BASE
        ):
            self._trial = checked[1]


def _session_refusal(trial: BackendSession, message: Message) -> str | None:
    """Run `message` on a trial session (it changes); the reason it was refused."""
    bare = replace(message, flags=message.flags & ~HeaderFlag.NEED_REPLY)
    try:
        trial.handle(bare)
    except VhostUserError as e:
        return e.message
    return None


def _regions(message: Message) -> list[tuple[MemoryRegion, int]]:
    payload = message.payload
    if isinstance(payload, MemoryTable):
        return list(zip(payload.regions, message.fds, strict=True))
    if message.request is Request.ADD_MEM_REG and isinstance(payload, SingleMemoryRegion):
        return list(zip((payload.region,), message.fds, strict=True))
    return []


def _fd_refusal(
    message: Message, facts: Mapping[int, FdFacts], guest_memory: int | None
) -> str | None:
    regions = _regions(message)
    for region, fd in regions:
        where = f"region at guest address {region.guest_phys_addr:#x}"
        fact = facts.get(fd, FdFacts(FdKind.OTHER))
        if fact.kind is not FdKind.FILE:
            return f"{where}: its fd is {_a(fact.kind)}, not a file that can be mapped"
        if not fact.writable:
            return f"{where}: its fd is not open read-write, or is sealed against writes"
        end = region.mmap_offset + region.memory_size
        if end > fact.size:
            return (
                f"{where}: it ends at offset {end:#x} of its fd, "
                f"which holds only {fact.size:#x} bytes"
            )
    if message.request is Request.SET_LOG_BASE and isinstance(message.payload, LogDescription):
        log = message.payload
        fact = facts.get(message.fds[0], FdFacts(FdKind.OTHER))
        if fact.kind is not FdKind.FILE:
            return f"dirty log: its fd is {_a(fact.kind)}, not a file that can be mapped"
        if not fact.writable:
            return "dirty log: its fd is not open read-write, or is sealed against writes"
        end = log.mmap_offset + log.mmap_size
        if end > fact.size:
            return f"dirty log: it ends at offset {end:#x} of its fd, which holds only " \
                   f"{fact.size:#x} bytes"
    total = sum(region.memory_size for region, _ in regions)
    if guest_memory is not None and total > guest_memory:
        return f"regions add up to {total:#x} bytes, more than the guest's {guest_memory:#x}"
    if message.request in _RING_FD_REQUESTS and message.fds:
        assert isinstance(message.payload, VringFd)
        fact = facts.get(message.fds[0], FdFacts(FdKind.OTHER))
        if fact.kind is not FdKind.EVENTFD:
            return f"ring {message.payload.index}: the fd is {_a(fact.kind)}, not an eventfd"
    return None


def _a(kind: FdKind) -> str:
    name = kind.value
    return ("an " if name[0] in "aeiou" else "a ") + name
