"""The back-end side of a vhost-user-scsi session, as a pure state machine.

Theory of operation
-------------------
`BackendSession.handle(message)` takes one decoded `Message` and returns the
effects (see effects.py) the I/O layer applies in order.  The session checks
the semantics the codec cannot (STYLE.md, two-stage validation): was this
feature offered, is the ring index in range, is the ring in a state that
allows the change, do the regions overlap.  Every check runs before any
state changes, so a refused message is never half-applied.

A refused message gets a failure ack when the front-end asked for one
(NEED_REPLY with REPLY_ACK negotiated) and the session goes on; otherwise
`handle` raises `SessionError` and the session stays in the ERROR state: the
I/O layer tears the connection down.  Either way the refused message's fds
are closed through the injected `close_fd`, never handed to the I/O layer.

Ring life (as libvhost-user defines it): a ring is *started* by
SET_VRING_KICK once its size and addresses are known, and *stopped* by
GET_VRING_BASE or a device reset.  Separately it is *enabled*: with
VHOST_USER_F_PROTOCOL_FEATURES negotiated a ring starts disabled until
SET_VRING_ENABLE 1; without it every ring is enabled at SET_FEATURES.  The
queue is processed while started and enabled.

GET_VRING_BASE must answer with the index of the next avail entry the
back-end would consume, which only the queue knows.  The session asks the
injected `RingOwner` for it while handling the message: the I/O layer is
inside this call and not servicing the ring, so the value is final, and the
`StopRing` effect that follows makes sure the ring is not touched again.
This keeps one message in, one list of effects out, with no second step.
The ring's saved progress (state store) outlives the stop until the answer
is sent: `ForgetRing` comes after the `Reply`, so an emulator killed before
the answer left leaves its successor what it needs to give the same one.

Dirty logging (live migration; vhost-user spec, "Migration"): with
VHOST_USER_PROTOCOL_F_LOG_SHMFD negotiated, SET_LOG_BASE gives the log as a
shared memory fd, checked here like a memory region (size, offset) and
answered with a reply QEMU waits for; a new one replaces the old.  Logging
is on while VHOST_F_LOG_ALL is acked (`SetLogging` at every SET_FEATURES);
each ring's used ring is logged at its `log_guest_addr` while its
SET_VRING_ADDR log flag is set.  QEMU flips that flag on running rings when a
migration starts and ends, so a started ring takes a SET_VRING_ADDR that
changes only its flags and log address (`SetRingLog`).  SET_LOG_FD's eventfd
is taken and closed: this back-end never signals it.

A new memory table while rings run (memory hotplug) does not stop them:
`SetMemTable` carries every started ring translated through the new table,
and the I/O layer moves the queues onto it at their current positions.

Addresses: SET_VRING_ADDR carries QEMU's virtual addresses.  The session
translates them through the current memory table (userspace_addr ->
guest_phys_addr) and checks that each part of the ring lies inside one
region, so `StartRing` hands the virtio layer guest physical addresses it
can give straight to its `GuestMemory` (which checks every access again).
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from emulators.limits import VIRTIO_MAX_QUEUE_SIZE

from .codec import CloseFd, Message, encode_ack, encode_reply
from .constants import (
    DEFAULT_FEATURES,
    DEFAULT_PROTOCOL_FEATURES,
    LOG_MAX_BYTES,
    VRING_F_LOG,
    Feature,
    ProtocolFeature,
    Request,
)
from .effects import (
    CloseFds,
    Effect,
    EnableRing,
    ForgetRing,
    MappedLog,
    MappedRegion,
    Reply,
    ResetDevice,
    RingConfig,
    SetCall,
    SetErr,
    SetKick,
    SetLog,
    SetLogging,
    SetMemTable,
    SetRingLog,
    StartRing,
    StopRing,
)
from .errors import LocalProtocolError, SessionError
from .messages import (
    U64,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    VringAddr,
    VringFd,
    VringState,
)

_U64_LIMIT = 1 << 64
_PROTOCOL_FEATURES_BIT = 1 << Feature.PROTOCOL_FEATURES
_LOG_ALL_BIT = 1 << Feature.LOG_ALL
_VRING_LOG_BIT = 1 << VRING_F_LOG

HAS_OWN_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_INFLIGHT_FD,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
        Request.POSTCOPY_ADVISE,
        Request.SET_LOG_BASE,  # with LOG_SHMFD, the only way it is accepted
    }
)
"""Requests answered by their own reply; NEED_REPLY adds nothing to them."""


class RingOwner(Protocol):
    """Implemented by the I/O layer, which owns the queue objects."""

    def vring_base(self, index: int) -> int | None:
        """Return the avail index the started ring `index` would consume next,
        or None when no queue runs for it (the session then answers the base
        it recorded: never an exception out of a GET_VRING_BASE)."""
        ...


class SessionState(enum.Enum):
    READY = "ready"
    ERROR = "error"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class RingSnapshot:
    """One ring's negotiated state."""

    index: int
    num: int | None = None
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """Everything negotiated so far: enough to bring a fresh back-end to the
    same point (see replay.py).  Fd numbers are those this session received."""

    owner: bool
    features: int | None
    protocol_features: int | None
    memory: tuple[MappedRegion, ...]
    rings: tuple[RingSnapshot, ...]
    log: MappedLog | None = None


@dataclass(slots=True)
class _Ring:
    index: int
    num: int | None = None
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False


class _Refused(Exception):
    """A semantic check failed; raised before any state changed."""


class BackendSession:
    """vhost-user-scsi back-end state machine; see the module docstring."""

    def __init__(
        self,
        *,
        num_queues: int,
        ring_owner: RingOwner,
        close_fd: CloseFd,
        features: int = DEFAULT_FEATURES,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        max_queue_size: int = VIRTIO_MAX_QUEUE_SIZE,
    ) -> None:
        if not 3 <= num_queues <= 256:
            raise LocalProtocolError(f"{num_queues} queues: virtio-scsi needs 3 to 256")
        size_max = VIRTIO_MAX_QUEUE_SIZE
        if max_queue_size & (max_queue_size - 1) or not 1 <= max_queue_size <= size_max:
            raise LocalProtocolError(f"max queue size {max_queue_size} is not a power of two")
        self.num_queues = num_queues
        self.offered_features = features
        self.offered_protocol_features = protocol_features
        self.max_queue_size = max_queue_size
        self._ring_owner = ring_owner
        self._close_fd = close_fd
        self.state = SessionState.READY
        self._error: SessionError | None = None
        self._owner = False
        self._features: int | None = None
        self._protocol_features: int | None = None
        self._memory: tuple[MappedRegion, ...] = ()
        self._log: MappedLog | None = None
        self._rings = [_Ring(i) for i in range(num_queues)]
        self._handlers: dict[Request, Callable[[Message], list[Effect]]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset,
            Request.RESET_DEVICE: self._reset,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call_or_err,
            Request.SET_VRING_ERR: self._set_vring_call_or_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_VRING_BASE: self._get_vring_base,
        }

    # --- public interface

    @property
    def acked_features(self) -> int:
        """Features the front-end acknowledged (0 before SET_FEATURES)."""
        return self._features or 0

    @property
    def acked_protocol_features(self) -> int:
        return self._protocol_features or 0

    def held_fds(self) -> frozenset[int]:
        """Every fd the session holds (the I/O layer uses but must not close them)."""
        fds = {m.fd for m in self._memory}
        if self._log is not None:
            fds.add(self._log.fd)
        for ring in self._rings:
            fds.update(fd for fd in (ring.kick_fd, ring.call_fd, ring.err_fd) if fd is not None)
        return frozenset(fds)

    def handle(self, message: Message) -> list[Effect]:
        """Act on one message; return the effects to apply, in order."""
        if self.state is not SessionState.READY:
            self._close_all(message.fds)
            if self._error is not None:
                raise self._error
            raise LocalProtocolError("session is closed", message.request)
        ack = (
            message.need_reply
            and bool(self.acked_protocol_features & (1 << ProtocolFeature.REPLY_ACK))
            and message.request not in HAS_OWN_REPLY
        )
        handler = self._handlers.get(message.request, self._unsupported)
        try:
            effects = handler(message)
        except _Refused as refused:
            self._close_all(message.fds)
            if ack:
                return [Reply(encode_ack(message.request, ok=False))]
            self.state = SessionState.ERROR
            self._error = SessionError(str(refused), message.request)
            raise self._error from None
        if ack:
            effects.append(Reply(encode_ack(message.request, ok=True)))
        return effects

    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(
            owner=self._owner,
            features=self._features,
            protocol_features=self._protocol_features,
            memory=self._memory,
            log=self._log,
            rings=tuple(
                RingSnapshot(
                    index=r.index,
                    num=r.num,
                    base=r.base,
                    addr=r.addr,
                    kick_fd=r.kick_fd,
                    call_fd=r.call_fd,
                    err_fd=r.err_fd,
                    enabled=r.enabled,
                    started=r.started,
                )
                for r in self._rings
            ),
        )

    def trial_copy(self) -> BackendSession:
        """An independent copy to try a message on: same state and ring owner,
        and it closes no fd (they are this session's).  The launcher's session
        keeper asks one whether a message would be refused before it forwards
        the message to an emulator (admission.py)."""
        shared = {id(self._ring_owner): self._ring_owner, id(self._close_fd): _keep_fd}
        return copy.deepcopy(self, shared)

    def close(self) -> list[Effect]:
        """End of the connection: stop every ring and release every fd."""
        if self.state is SessionState.CLOSED:
            return []
        effects: list[Effect] = [StopRing(r.index) for r in self._rings if r.started]
        held = tuple(sorted(self.held_fds()))
        for ring in self._rings:
            ring.started = False
            ring.kick_fd = ring.call_fd = ring.err_fd = None
        if self._memory:
            effects.append(SetMemTable(()))
        if self._log is not None:
            effects.append(SetLog(None))
        self._memory = ()
        self._log = None
        if held:
            effects.append(CloseFds(held))
        self.state = SessionState.CLOSED
        return effects

    # --- checks shared by handlers

    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < self.num_queues:
            raise _Refused(f"ring {index} does not exist (the device has {self.num_queues})")
        return self._rings[index]

    def _stopped_ring(self, index: int, what: str) -> _Ring:
        ring = self._ring(index)
        if ring.started:
            raise _Refused(f"ring {index} is started; {what} is only allowed while stopped")
        return ring

    def _need_protocol(self, bit: ProtocolFeature) -> None:
        if not self.acked_protocol_features & (1 << bit):
            raise _Refused(f"protocol feature {bit.name} was not negotiated")

    def _translate(self, uva: int, length: int, what: str, align: int = 1) -> int:
        """Front-end virtual address range -> guest physical address, within one
        region, and `align`ed there too: the queue works on guest addresses."""
        for mapped in self._memory:
            r = mapped.region
            if r.userspace_addr <= uva and uva + length <= r.userspace_addr + r.memory_size:
                gpa = r.guest_phys_addr + (uva - r.userspace_addr)
                if gpa % align:
                    raise _Refused(f"{what} at guest address {gpa:#x} is not {align}-byte aligned")
                return gpa
        raise _Refused(f"{what} {uva:#x}+{length:#x} is not inside one memory region")

    def _ring_config(self, ring: _Ring) -> RingConfig:
        if ring.num is None or ring.addr is None:
            raise _Refused(f"ring {ring.index} has no size or no addresses yet")
        n, a = ring.num, ring.addr
        # Virtio 1.2, 2.7: descriptor table 16*n, avail 6+2*n, used 6+8*n bytes.
        return RingConfig(
            index=ring.index,
            num=n,
            base=ring.base,
            addr=a,
            desc_gpa=self._translate(a.desc_user_addr, 16 * n, "descriptor table", 16),
            avail_gpa=self._translate(a.avail_user_addr, 6 + 2 * n, "avail ring", 2),
            used_gpa=self._translate(a.used_user_addr, 6 + 8 * n, "used ring", 4),
        )

    def _close_all(self, fds: tuple[int, ...]) -> None:
        for fd in fds:
            self._close_fd(fd)

    # --- handlers: each checks everything, then changes state

    def _unsupported(self, message: Message) -> list[Effect]:
        raise _Refused("request not supported by this back-end")

    def _get_features(self, message: Message) -> list[Effect]:
        return [Reply(encode_reply(message.request, U64(self.offered_features)))]

    def _set_features(self, message: Message) -> list[Effect]:
        assert isinstance(message.payload, U64)
        value = message.payload.value
        if value & ~self.offered_features:
            raise _Refused(f"features {value & ~self.offered_features:#x} were never offered")
        self._features = value
        effects: list[Effect] = [SetLogging(bool(value & _LOG_ALL_BIT))]
        if not value & _PROTOCOL_FEATURES_BIT:
            # Without protocol features there is no SET_VRING_ENABLE: rings are enabled.
            for ring in self._rings:
                if not ring.enabled and ring.started:
                    effects.append(EnableRing(ring.index, True))
                ring.enabled = True
        return effects

    def _get_protocol_features(self, message: Message) -> list[Effect]:
        if not self.offered_features & _PROTOCOL_FEATURES_BIT:
            raise _Refused("VHOST_USER_F_PROTOCOL_FEATURES is not offered")
        return [Reply(encode_reply(message.request, U64(self.offered_protocol_features)))]

    def _set_protocol_features(self, message: Message) -> list[Effect]:
        assert isinstance(message.payload, U64)
        value = message.payload.value
        if not self.offered_features & _PROTOCOL_FEATURES_BIT:
            raise _Refused("VHOST_USER_F_PROTOCOL_FEATURES is not offered")
        if value & ~self.offered_protocol_features:
            extra = value & ~self.offered_protocol_features
            raise _Refused(f"protocol features {extra:#x} were never offered")
        self._protocol_features = value
        return []

    def _set_owner(self, message: Message) -> list[Effect]:
        self._owner = True
        return []

    def _reset(self, message: Message) -> list[Effect]:
        if message.request is Request.RESET_DEVICE:
            self._need_protocol(ProtocolFeature.RESET_DEVICE)
        # QEMU keeps its side of the negotiation (owner, features, protocol
        # features, memory table) across a reset and does not send it again,
        # so only the rings go back to their initial state.
        effects: list[Effect] = []
        closing: list[int] = []
        stopped: list[int] = []
        enabled = bool(self._features is not None and not self._features & _PROTOCOL_FEATURES_BIT)
        for ring in self._rings:
            if ring.started:
                effects.append(StopRing(ring.index))
                stopped.append(ring.index)
            if ring.kick_fd is not None:
                effects.append(SetKick(ring.index, None))
                closing.append(ring.kick_fd)
            ring.started = False
            ring.kick_fd = None
            ring.enabled = enabled
        effects.append(ResetDevice())
        effects += [ForgetRing(index) for index in stopped]
        if closing:
            effects.append(CloseFds(tuple(closing)))
        return effects

    def _get_queue_num(self, message: Message) -> list[Effect]:
        self._need_protocol(ProtocolFeature.MQ)
        return [Reply(encode_reply(message.request, U64(self.num_queues)))]

    def _set_mem_table(self, message: Message) -> list[Effect]:
        assert isinstance(message.payload, MemoryTable)
        regions = message.payload.regions
        if not regions:
            raise _Refused("memory table has no regions")
        _check_regions(regions)
        old = self._memory
        new = tuple(MappedRegion(r, fd) for r, fd in zip(regions, message.fds, strict=True))
        self._memory = new
        try:
            running = tuple(self._ring_config(r) for r in self._rings if r.started)
        except _Refused as refused:
            self._memory = old
            raise _Refused(f"new memory table drops a started ring: {refused}") from None
        effects: list[Effect] = [SetMemTable(new, running)]
        if old:
            effects.append(CloseFds(tuple(m.fd for m in old)))
        return effects

    def _set_log_base(self, message: Message) -> list[Effect]:
        log = message.payload
        assert isinstance(log, LogDescription)
        # Without LOG_SHMFD the log would be an address in QEMU's own memory.
        self._need_protocol(ProtocolFeature.LOG_SHMFD)
        size, offset = log.mmap_size, log.mmap_offset
        if not 0 < size <= LOG_MAX_BYTES:
            raise _Refused(f"dirty log of {size:#x} bytes: allowed 1 to {LOG_MAX_BYTES:#x}")
        # The log is read and written as 64-bit words (QEMU's vhost_log_chunk_t).
        if size % 8 or offset % 8:
            raise _Refused(f"dirty log of {size:#x} bytes at offset {offset:#x}: both must "
                           "be multiples of 8")
        if offset + size > _U64_LIMIT:
            raise _Refused(f"dirty log offset {offset:#x} + size {size:#x} overflows")
        (fd,) = message.fds
        old, self._log = self._log, MappedLog(size, offset, fd)
        effects: list[Effect] = [
            SetLog(self._log),
            # QEMU waits for this (any u64) before it counts on the log.
            Reply(encode_reply(message.request, U64(0))),
        ]
        if old is not None:
            effects.append(CloseFds((old.fd,)))
        return effects

    def _set_log_fd(self, message: Message) -> list[Effect]:
        # An eventfd to tell the front-end the log changed: QEMU reads the
        # log when it syncs, so this back-end never signals it.
        return [CloseFds(message.fds)]

    def _set_vring_num(self, message: Message) -> list[Effect]:
        assert isinstance(message.payload, VringState)
        ring = self._stopped_ring(message.payload.index, "changing its size")
        num = message.payload.num
        # Virtio 1.2, 2.7: a split queue's size is a power of two, at most 32768.
        if num == 0 or num & (num - 1) or num > self.max_queue_size:
            raise _Refused(f"ring size {num} is not a power of two <= {self.max_queue_size}")
        ring.num = num
        return []

    def _set_vring_base(self, message: Message) -> list[Effect]:
        assert isinstance(message.payload, VringState)
        ring = self._stopped_ring(message.payload.index, "setting its base")
        if message.payload.num > 0xFFFF:
            raise _Refused(f"split ring base {message.payload.num:#x} does not fit in 16 bits")
        ring.base = message.payload.num
        return []

    def _set_vring_addr(self, message: Message) -> list[Effect]:
        addr = message.payload
        assert isinstance(addr, VringAddr)
        ring = self._ring(addr.index)
        if addr.flags & ~_VRING_LOG_BIT:
            raise _Refused(f"ring flags {addr.flags:#x}: only the log flag (bit 0) is known")
        if addr.flags and addr.log_guest_addr + 6 + 8 * self.max_queue_size > _U64_LIMIT:
            raise _Refused(f"used ring log address {addr.log_guest_addr:#x} overflows")
        if ring.started:
            # A migration turns logging on and off on running rings.
            old = ring.addr
            assert old is not None
            if (old.desc_user_addr, old.avail_user_addr, old.used_user_addr) != (
                addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr
            ):
                raise _Refused(f"ring {ring.index} is started; only its log flag and log "
                               "address may change")
            ring.addr = addr
            return [SetRingLog(self._ring_config(ring))]
        if not self._memory:
            raise _Refused("ring addresses before any memory table")
        # Virtio 1.2, 2.7: alignment of descriptor table 16, avail 2, used 4.
        for uva, align, what in (
            (addr.desc_user_addr, 16, "descriptor table"),
            (addr.avail_user_addr, 2, "avail ring"),
            (addr.used_user_addr, 4, "used ring"),
        ):
            if uva % align:
                raise _Refused(f"{what} at {uva:#x} is not {align}-byte aligned")
            self._translate(uva, 1, what)
        ring.addr = addr
        return []

    def _set_vring_kick(self, message: Message) -> list[Effect]:
        assert isinstance(message.payload, VringFd)
        ring = self._ring(message.payload.index)
        if message.payload.no_fd:
            raise _Refused("rings without a kick fd (polling) are not supported")
        (fd,) = message.fds
        effects: list[Effect] = [SetKick(ring.index, fd)]
        old = ring.kick_fd
        if ring.started:
            ring.kick_fd = fd
        else:
            config = self._ring_config(ring)
            ring.kick_fd = fd
            ring.started = True
            effects.append(StartRing(config, self.acked_features, ring.enabled))
        if old is not None:
            effects.append(CloseFds((old,)))
        return effects

    def _set_vring_call_or_err(self, message: Message) -> list[Effect]:
        assert isinstance(message.payload, VringFd)
        ring = self._ring(message.payload.index)
        fd = None if message.payload.no_fd else message.fds[0]
        effects: list[Effect]
        if message.request is Request.SET_VRING_CALL:
            old, ring.call_fd = ring.call_fd, fd
            effects = [SetCall(ring.index, fd)]
        else:
            old, ring.err_fd = ring.err_fd, fd
            effects = [SetErr(ring.index, fd)]
        if old is not None:
            effects.append(CloseFds((old,)))
        return effects

    def _set_vring_enable(self, message: Message) -> list[Effect]:
        assert isinstance(message.payload, VringState)
        ring = self._ring(message.payload.index)
        if message.payload.num not in (0, 1):
            raise _Refused(f"enable value {message.payload.num}, must be 0 or 1")
        if not self.acked_features & _PROTOCOL_FEATURES_BIT:
            raise _Refused("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES acked")
        enabled = bool(message.payload.num)
        changed = ring.enabled != enabled
        ring.enabled = enabled
        return [EnableRing(ring.index, enabled)] if changed and ring.started else []

    def _get_vring_base(self, message: Message) -> list[Effect]:
        assert isinstance(message.payload, VringState)
        ring = self._ring(message.payload.index)
        effects: list[Effect] = []
        if ring.started:
            base = self._ring_owner.vring_base(ring.index)
            if base is None:
                base = ring.base
            if not 0 <= base <= 0xFFFF:
                raise LocalProtocolError(f"ring owner gave base {base} for ring {ring.index}")
            # Stopping drops kick and call fds (as libvhost-user does); QEMU sends
            # both again at the next start.  The saved progress is forgotten only
            # once the answer is sent (ForgetRing after Reply): a process killed
            # in between leaves it to a successor, which gives the same answer.
            effects += [StopRing(ring.index), SetKick(ring.index, None), SetCall(ring.index, None)]
            closing = tuple(fd for fd in (ring.kick_fd, ring.call_fd) if fd is not None)
            ring.started = False
            ring.kick_fd = ring.call_fd = None
            ring.base = base
            effects.append(Reply(encode_reply(message.request, VringState(ring.index, base))))
            effects.append(ForgetRing(ring.index))
            if closing:
                effects.append(CloseFds(closing))
            return effects
        return [Reply(encode_reply(message.request, VringState(ring.index, ring.base)))]


def _keep_fd(fd: int) -> None:
    """A trial copy's close_fd: the fds belong to the session it was copied from."""


def _check_regions(regions: tuple[MemoryRegion, ...]) -> None:
    """No empty region, no address overflow, no overlap in either address space."""
    for r in regions:
        if r.memory_size == 0:
            raise _Refused(f"region at gpa {r.guest_phys_addr:#x} has size 0")
        for name, start in (
            ("guest_phys_addr", r.guest_phys_addr),
            ("userspace_addr", r.userspace_addr),
            ("mmap_offset", r.mmap_offset),
        ):
            if start + r.memory_size > _U64_LIMIT:
                raise _Refused(f"region {name} {start:#x} + size {r.memory_size:#x} overflows")
    for key in ("guest_phys_addr", "userspace_addr"):
        spans = sorted((getattr(r, key), getattr(r, key) + r.memory_size) for r in regions)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise _Refused(f"memory regions overlap at {key} {start:#x}")
