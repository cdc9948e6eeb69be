"""One session keeper's record as a file: what a later launcher needs to carry on.

Theory of operation. A session keeper (launcher.sessionkeeper) holds QEMU's
vhost-user session for one controller. When the launcher dies, QEMU and the
emulator run on; the next launcher builds a fresh keeper and `restore`s it
from this record, so it replays and answers exactly as the old one would.

The record holds, as vhost-user messages encoded with the codec:
- the session: the messages `replay_messages(snapshot, {})` gives for the
  keeper's `BackendSession`. Fed to a fresh session in order they rebuild
  it, which is how a restore works (and how `decode` checks them);
- the message in flight to the emulator (QEMU waits for its answer), if
  any, and whether it reached the emulator attached now;
- the messages QEMU sent that are not yet forwarded.
Plus the parameters the session was built with (a restore refuses a keeper
built otherwise) and whether QEMU's connection is closed. The fds ride
beside the bytes: the n-th fd a message carries is the next one of the
record's fd list, in message order, each used once.

Layout (version 1, little-endian), then a CRC-32 of everything before it:

    header   magic "mpkeeper", version u16, flags u16 (1 closed, 2 delivered),
             num_queues u16, reserved u16 (0), offered features u64,
             offered protocol features u64, max queue size u32,
             entries u32, fds u32
    entry*   kind u8 (0 session, 1 in flight, 2 queued), fds u8,
             reserved u16 (0), length u32, then `length` bytes: one message

Entries come in kind order, at most one in flight. `decode` checks all of
it, syntax and then meaning, and raises `KeeperRecordError` on anything
else; it never touches the fds (they are only numbers to it).
"""

from __future__ import annotations

import enum
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from emulators.vhost_user.codec import (
    CONNECTION_CLOSED,
    CloseFd,
    Decoder,
    Message,
    Role,
    encode_request,
)
from emulators.vhost_user.effects import CloseFds, Reply
from emulators.vhost_user.errors import VhostUserError
from emulators.vhost_user.replay import ANSWERED_IN_REPLAY, replay_messages
from emulators.vhost_user.session import BackendSession, RingOwner

MAGIC = b"mpkeeper"
VERSION = 1
MAX_RECORD_BYTES = 1 << 20
"""Far above any real record (256 rings' set-up is under 100 KiB)."""
RECORD_MAX_FDS = 4096
RECORD_MAX_ENTRIES = 1 << 16

_HEADER = struct.Struct("<8sHHHHQQIII")
_ENTRY = struct.Struct("<BBHI")
_CRC = struct.Struct("<I")
_CLOSED = 1
_DELIVERED = 2
_FLAGS = _CLOSED | _DELIVERED


class KeeperRecordError(ValueError):
    """A record that cannot be used; the message says what is wrong with it."""


class _Kind(enum.IntEnum):
    SESSION = 0
    PENDING = 1
    QUEUED = 2


@dataclass(frozen=True, slots=True)
class KeeperRecord:
    """What a keeper must know to carry on; fds are numbers in this process.

    `session` are the messages that rebuild the keeper's `BackendSession`
    (in `replay_messages` order, no NEED_REPLY); `pending` the message in
    flight to the emulator, `delivered` whether it reached the one attached
    now; `queued` QEMU's messages not yet forwarded.
    """

    num_queues: int
    offered_features: int
    offered_protocol_features: int
    max_queue_size: int
    session: tuple[Message, ...] = ()
    pending: Message | None = None
    delivered: bool = False
    queued: tuple[Message, ...] = ()
    closed: bool = False

    def fds(self) -> list[int]:
        """Every fd the record references, in record order."""
        out: list[int] = []
        for message in self._entries():
            out.extend(message.fds)
        return out

    def _entries(self) -> list[Message]:
        return [*self.session, *((self.pending,) if self.pending else ()), *self.queued]


def from_session(
    session: BackendSession,
    *,
    pending: Message | None = None,
    delivered: bool = False,
    queued: Sequence[Message] = (),
    closed: bool = False,
) -> KeeperRecord:
    """The record of a keeper whose session is `session` (its fds are the session's)."""
    messages: tuple[Message, ...] = ()
    if not closed:
        messages = tuple(_one_message(data, fds, "session")
                         for data, fds in replay_messages(session.snapshot(), {}))
    return KeeperRecord(
        num_queues=session.num_queues,
        offered_features=session.offered_features,
        offered_protocol_features=session.offered_protocol_features,
        max_queue_size=session.max_queue_size,
        session=messages,
        pending=None if closed else pending,
        delivered=delivered and pending is not None and not closed,
        queued=() if closed else tuple(queued),
        closed=closed,
    )


def encode(record: KeeperRecord) -> tuple[bytes, list[int]]:
    """The record's bytes, and the fds they reference in order (not dup'd)."""
    if record.closed and (record._entries() or record.delivered):
        raise ValueError("a closed record holds no messages")
    if record.delivered and record.pending is None:
        raise ValueError("delivered, but nothing is in flight")
    body = bytearray()
    entries: list[tuple[_Kind, Message]] = [(_Kind.SESSION, m) for m in record.session]
    if record.pending is not None:
        entries.append((_Kind.PENDING, record.pending))
    entries += [(_Kind.QUEUED, m) for m in record.queued]
    fds: list[int] = []
    for kind, message in entries:
        data = _encoded(message)
        body += _ENTRY.pack(kind, len(message.fds), 0, len(data)) + data
        fds.extend(message.fds)
    if len(set(fds)) != len(fds):
        raise ValueError("an fd is referenced twice")
    flags = (_CLOSED if record.closed else 0) | (_DELIVERED if record.delivered else 0)
    head = _HEADER.pack(MAGIC, VERSION, flags, record.num_queues, 0, record.offered_features,
                        record.offered_protocol_features, record.max_queue_size,
                        len(entries), len(fds))
    data = head + bytes(body)
    return data + _CRC.pack(zlib.crc32(data)), fds


def decode(data: bytes, fds: Sequence[int]) -> KeeperRecord:
    """The record in `data`, its messages carrying `fds`; see the module docstring."""
    if len(data) > MAX_RECORD_BYTES:
        raise KeeperRecordError(f"{len(data)} bytes, more than any record ({MAX_RECORD_BYTES})")
    if len(data) < _HEADER.size + _CRC.size:
        raise KeeperRecordError(f"{len(data)} bytes, shorter than a record's header")
    (magic, version, flags, num_queues, reserved, features, protocol_features,
     max_queue_size, count, nfds) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise KeeperRecordError(f"magic {magic!r}, not a keeper record")
    if version != VERSION:
        raise KeeperRecordError(f"version {version}, only {VERSION} is known")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[:-_CRC.size]) != crc:
        raise KeeperRecordError("checksum mismatch: the record is damaged")
    if flags & ~_FLAGS or reserved:
        raise KeeperRecordError(f"flags {flags:#x} or reserved {reserved:#x} set unknown bits")
    if count > RECORD_MAX_ENTRIES or nfds > RECORD_MAX_FDS:
        raise KeeperRecordError(f"{count} messages and {nfds} fds, beyond any record")
    if nfds != len(fds):
        raise KeeperRecordError(f"the record references {nfds} fds, {len(fds)} were given")
    if len(set(fds)) != len(fds) or any(fd < 0 for fd in fds):
        raise KeeperRecordError("the fds given are not distinct open fd numbers")
    entries = _entries(memoryview(data)[_HEADER.size:len(data) - _CRC.size], count, fds)
    kinds = [kind for kind, _ in entries]
    if kinds != sorted(kinds) or kinds.count(_Kind.PENDING) > 1:
        raise KeeperRecordError("messages out of order, or more than one in flight")
    pending = [m for kind, m in entries if kind is _Kind.PENDING]
    closed, delivered = bool(flags & _CLOSED), bool(flags & _DELIVERED)
    if closed and (entries or delivered):
        raise KeeperRecordError("a closed connection's record holds messages")
    if delivered and not pending:
        raise KeeperRecordError("a message is said to be delivered, but none is in flight")
    record = KeeperRecord(
        num_queues=num_queues,
        offered_features=features,
        offered_protocol_features=protocol_features,
        max_queue_size=max_queue_size,
        session=tuple(m for kind, m in entries if kind is _Kind.SESSION),
        pending=pending[0] if pending else None,
        delivered=delivered,
        queued=tuple(m for kind, m in entries if kind is _Kind.QUEUED),
        closed=closed,
    )
    rebuild(record, _NoRings(), _keep)
    return record


def rebuild(record: KeeperRecord, ring_owner: RingOwner, close_fd: CloseFd) -> BackendSession:
    """A session in the recorded state: the session messages fed to a fresh
    one, which must take each without a reply (but the answer a replay gets
    anyway, to SET_LOG_BASE) or an fd to close, and end where a replay of it
    sends exactly those messages again."""
    try:
        session = BackendSession(
            num_queues=record.num_queues, ring_owner=ring_owner, close_fd=close_fd,
            features=record.offered_features,
            protocol_features=record.offered_protocol_features,
            max_queue_size=record.max_queue_size,
        )
    except VhostUserError as e:
        raise KeeperRecordError(f"session parameters: {e.message}") from None
    for n, message in enumerate(record.session):
        if message.need_reply:
            raise KeeperRecordError(f"session message {n} ({message.request.name}) asks "
                                    "for a reply")
        try:
            effects = session.handle(message)
        except VhostUserError as e:
            raise KeeperRecordError(f"session message {n} ({message.request.name}) "
                                    f"refused: {e.message}") from None
        answered = message.request in ANSWERED_IN_REPLAY
        if any(isinstance(e, CloseFds) or (isinstance(e, Reply) and not answered)
               for e in effects):
            raise KeeperRecordError(f"session message {n} ({message.request.name}) is not "
                                    "one a replay sends")
    again = [m for data, fds in replay_messages(session.snapshot(), {})
             for m in (_one_message(data, fds, "session"),)]
    if again != list(record.session):
        raise KeeperRecordError("the session messages are not the replay of the session "
                                "they build")
    return session


# -- files


@overload
def write_atomically(where: str | os.PathLike[str], name: bytes) -> None: ...
@overload
def write_atomically(where: int | str | os.PathLike[str], name: str, data: bytes) -> None: ...


def write_atomically(
    where: int | str | os.PathLike[str], name: str | bytes, data: bytes | None = None
) -> None:
    """Replace a file by `data` so a reader sees the old or the new one whole,
    even after the writer's crash: a temporary file (mode 0600) written, then
    renamed over the name.

    No fsync (as launcher.vmstate): the record has to outlive the launcher,
    not the host, whose crash ends the VM anyway. On a run folder that is not
    a tmpfs a sync costs milliseconds per vhost-user message, and QEMU's ring
    set-up (a VM start, a reboot, the end of an incoming migration) is twenty
    of them while the guest waits.

    `write_atomically(path, data)`, or `write_atomically(dir, name, data)`
    with `dir` a directory's path or open fd.
    """
    if isinstance(name, bytes):
        if isinstance(where, int) or data is not None:
            raise TypeError("write_atomically(path, data) or (dir, name, data)")
        path = Path(where)
        _write_in(str(path.parent), path.name, name)
    elif data is None:
        raise TypeError("write_atomically(dir, name, data) needs the data")
    else:
        _write_in(where, name, data)


def _write_in(directory: int | str | os.PathLike[str], name: str, data: bytes) -> None:
    dir_fd = directory if isinstance(directory, int) else os.open(
        directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    tmp = f".{name}.tmp{os.getpid()}"  # a name the run folder's cleanup knows
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        if not isinstance(directory, int):
            os.close(dir_fd)


def read(path: str | os.PathLike[str]) -> bytes:
    """A record file's bytes (at most one byte more than any record: `decode`
    says what is wrong with it). OSError as `open` raises it."""
    with open(path, "rb") as f:
        return f.read(MAX_RECORD_BYTES + 1)


# -- internals


class _NoRings:
    """Ring owner of a session that only checks a record: no queue runs."""

    def vring_base(self, index: int) -> int | None:
        return None


def _keep(fd: int) -> None:
    """The close_fd of a session that only checks: the fds are not ours."""


def _entries(body: memoryview, count: int, fds: Sequence[int]) -> list[tuple[_Kind, Message]]:
    out: list[tuple[_Kind, Message]] = []
    offset = used = 0
    for n in range(count):
        if len(body) - offset < _ENTRY.size:
            raise KeeperRecordError(f"message {n} of {count}: the record ends in its header")
        kind, nfds, reserved, length = _ENTRY.unpack_from(body, offset)
        offset += _ENTRY.size
        if kind not in _Kind.__members__.values() or reserved:
            raise KeeperRecordError(f"message {n}: kind {kind}, reserved {reserved:#x}")
        if length > len(body) - offset:
            raise KeeperRecordError(f"message {n}: {length} bytes, the record ends before")
        if used + nfds > len(fds):
            raise KeeperRecordError(f"message {n}: {nfds} fds, more than the record has left")
        data = bytes(body[offset:offset + length])
        message = _one_message(data, tuple(fds[used:used + nfds]), f"message {n}")
        if _encoded(message) != data:  # padding, or flags a keeper never writes
            raise KeeperRecordError(f"message {n} ({message.request.name}): not as "
                                    "a keeper encodes it")
        out.append((_Kind(kind), message))
        offset += length
        used += nfds
    if offset != len(body):
        raise KeeperRecordError(f"{len(body) - offset} bytes after the last message")
    if used != len(fds):
        raise KeeperRecordError(f"the messages carry {used} fds, the header says {len(fds)}")
    return out


def _encoded(message: Message) -> bytes:
    return encode_request(message.request, message.payload, need_reply=message.need_reply,
                          fds=message.fds)


def _one_message(data: bytes, fds: Sequence[int], what: str) -> Message:
    """Exactly one front-end request in `data`, carrying exactly `fds`."""
    decoder = Decoder(Role.BACKEND, close_fd=_keep)
    try:
        decoder.receive_data(data, fds)
        message = decoder.next_message()
        decoder.receive_data(b"")
        rest = decoder.next_message()
    except VhostUserError as e:
        raise KeeperRecordError(f"{what}: {e}") from None
    if not isinstance(message, Message):
        raise KeeperRecordError(f"{what}: not one whole vhost-user message")
    if rest is not CONNECTION_CLOSED:
        raise KeeperRecordError(f"{what}: bytes after the message")
    return message
