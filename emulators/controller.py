"""One virtio-scsi controller served over one vhost-user connection.

Theory of operation: the control socket's bytes go through the sans-I/O
decoder and session; the session's effects are applied here (map memory,
watch kick eventfds, build queues). Kicks are not served as they arrive but
collected, and served after every pending control message of this round has
been applied: a completion signalled on a call fd that a queued
SET_VRING_CALL is about to replace would be lost, and the guest would hang.

Request queues are drained in batches: every chain available at a wake-up is
served, the used ring is published once, and the guest is signalled once.
The event queue's buffers stay in the avail ring until an event needs one,
so a ring stop (GET_VRING_BASE) never strands a consumed buffer.

A ring the guest corrupted (QueueError while serving it, or saved progress
its used index contradicts when a successor resumes it) gets the virtio
answer, not a crash: it stays stopped, and is said to be on the ring's err
eventfd and in one log line, until the driver resets the device and the
front-end sets the ring up anew. The other rings go on, and the heartbeat
reports nothing in flight for it: nothing is being worked on, and a restart
would only find the same ring. (virtio's VIRTIO_CONFIG_S_NEEDS_RESET is not
reachable: QEMU 7.2's vhost-user-scsi has no config notifier for a back-end
config-change message, and no vhost-user message sets the device status.)

A hot standby's controller (`dormant`) follows the session as its keeper
forwards it, but is only a shadow of the serving one until `activate`:
it maps guest memory and keeps every fd, but starts no ring (a ring's
configuration waits in `_deferred`), watches no kick fd (its kick fds wait
in `_dormant_kicks`: a kick read here would be stolen from the serving
predecessor), writes no call or err fd and nothing in the state store, and
builds its LUNs only to throw them away: `activate` builds them again
from the store as the predecessor left it, loads the undelivered events,
and starts the deferred rings exactly as a replay would (resumed from the
store). While `following`, no reply goes back to the keeper: it answered
QEMU through the predecessor already; `promote` applies what is still in
the socket that way, then answers from then on.

State store order (DESIGN.md, "The state store"; launcher/statestore):
a ring's slot is cleared before its progress words are reset and set valid
only after them; it is cleared at a stop only once the GET_VRING_BASE answer
was sent (`ForgetRing`), never on close, which a successor's start follows.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from emulators import faults
from emulators.config import ControllerConfig, LunConfig
from emulators.scsi.backend import FdBackend
from emulators.scsi.lun import LogicalUnit, LunState
from emulators.scsi.virtio_scsi import EventQueueState, VirtioScsiTarget
from emulators.vhost_user.codec import CONNECTION_CLOSED, Decoder, Message, Role
from emulators.vhost_user.effects import (
    CloseFds,
    Effect,
    EnableRing,
    ForgetRing,
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
from emulators.vhost_user.errors import SessionError
from emulators.vhost_user.session import BackendSession
from emulators.virtio.chain import BadChain, DescriptorChain, SplitChain
from emulators.virtio.dirtylog import DirtyLog, DirtyLogError
from emulators.virtio.errors import (
    GuestMemoryError,
    QueueConfigError,
    QueueError,
    RecoveryError,
)
from emulators.virtio.memory import GuestMemory, MemoryRegion
from emulators.virtio.splitqueue import SplitQueue
from emulators.virtio.state import BufferQueueState, QueueState, required_size
from launcher.statestore.layout import MAX_QUEUE_SIZE, RingIdentity, StateStore

LOG = logging.getLogger("emulator")

CONTROL_QUEUE = 0
EVENT_QUEUE = 1
FIRST_REQUEST_QUEUE = 2
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VHOST_VRING_F_LOG_BIT = 1  # SET_VRING_ADDR flags: log the used ring
RECV_BYTES = 65536
RECV_MAX_FDS = 16


@dataclass
class Ring:
    queue: SplitQueue
    enabled: bool
    config: RingConfig


class ControllerLoop:
    """The I/O side of one controller; `poll_fds` says what to watch."""

    def __init__(
        self,
        config: ControllerConfig,
        first_start: bool,
        store: StateStore | None = None,
        index: int = 0,
        dormant: bool = False,
    ) -> None:
        self.config = config
        self.store = store
        self.index = index
        #: A hot standby's until `activate`; `following` until `promote`.
        self.dormant = dormant
        self.following = dormant
        self._deferred: dict[int, tuple[RingConfig, int, bool, SplitQueue]] = {}
        self._dormant_kicks: dict[int, int] = {}
        # Family and type given: detecting them would need getsockname and
        # getsockopt, which a locked-down (spare) emulator may not call.
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=config.socket_fd)
        self.sock.setblocking(False)
        self.decoder = Decoder(Role.BACKEND, close_fd=os.close)
        self.session = BackendSession(
            num_queues=FIRST_REQUEST_QUEUE + config.queues,
            ring_owner=self,
            close_fd=os.close,
            max_queue_size=MAX_QUEUE_SIZE,
        )
        unannounced = [] if first_start or dormant else self._unsaved_luns()
        self.target = self._build_target(first_start)
        self.memory: GuestMemory | None = None
        self.rings: dict[int, Ring] = {}
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.err_fds: dict[int, int] = {}
        self.pending_kicks: set[int] = set()
        self.closed = False
        self.completed = 0
        self.completed_per_ring: dict[int, int] = {}
        #: The mapped dirty log (SET_LOG_BASE), whether LOG_ALL is acked, and
        #: the log while both hold: the one attribute a batch looks at.
        self.dirty_log: DirtyLog | None = None
        self.log_all = False
        self.logging: DirtyLog | None = None
        self._log_refused = False  # a write beyond the log was reported
        if not dormant:
            self._load_events()
            self._announce(unannounced)

    def _build_target(self, first_start: bool) -> VirtioScsiTarget:
        """The LUNs with their state from the store (saved back, unless dormant)."""
        luns = {
            lun.lun: LogicalUnit(
                FdBackend(lun.fd, lun.block_size, lun.readonly),
                lun.disk_id,
                self._lun_state(lun.lun, first_start),
                on_change=self._lun_saver(lun.lun),
            )
            for lun in self.config.luns
        }
        if not self.dormant:
            for lun, unit in luns.items():
                self._save_lun(lun, unit.state)
        return VirtioScsiTarget(luns)

    # -- hot standby

    def activate(self) -> None:
        """The predecessor is dead: take its place at once. The LUNs and
        events are read from the store as it left them, the deferred rings
        start (each resumed from its slot, as after a replay), kick fds are
        watched, and every call fd is signalled (an interrupt may have died
        with the predecessor)."""
        if not self.dormant or self.closed:
            return
        self.dormant = False
        unannounced = self._unsaved_luns()
        for lun, unit in self.target.scsi.luns.items():  # built while dormant, state read now
            unit.state = self._lun_state(lun, first_start=False)
            self._save_lun(lun, unit.state)
        self._load_events()
        self._announce(unannounced)
        self.kick_fds.update(self._dormant_kicks)
        self._dormant_kicks.clear()
        self.pending_kicks.update(self.kick_fds)
        deferred, self._deferred = self._deferred, {}
        # Request queues first: the guest's I/O waits on them.
        order = sorted(deferred, key=lambda i: (i < FIRST_REQUEST_QUEUE, i))
        for ring, features, enabled, queue in (deferred[i] for i in order):
            self._start_ring(ring, features, enabled, queue)
        for fd in self.call_fds.values():
            os.eventfd_write(fd, 1)

    def promote(self) -> None:
        """The launcher made this process the occupant: apply what the keeper
        sent while following (without replying: QEMU had its answers), then
        answer whatever comes next. The keeper sends nothing new until it is
        told of the promotion, so what is in the socket now is all of it."""
        while not self.closed and self.on_socket_readable():
            pass
        self.following = False

    # -- state that outlives this process

    def _lun_state(self, lun: int, first_start: bool) -> LunState:
        """A successor inherits the unit state: no new power-on attention."""
        if self.store is not None:
            valid, stored_lun, body = self.store.lun_slot(self.index, lun)
            try:
                if valid and stored_lun == lun:
                    return LunState.unpack(body)
            except ValueError as e:
                LOG.warning("%s: LUN %d: stored state unusable (%s)", self.config.id, lun, e)
            finally:
                body.release()
        return LunState.fresh(initial_unit_attention=first_start)

    def _unsaved_luns(self) -> list[int]:
        """The LUNs of this controller's config that have no state in the
        store. A predecessor saves a LUN's state at its first start, and a
        hot-added one's only once the guest's event about it is saved
        (:meth:`add_lun`): a LUN without state is one the guest may never
        have been told of, because the predecessor ended in the middle of
        adding it (or of removing it, which the launcher then kept)."""
        if self.store is None:
            return []
        unsaved = []
        for lun in self.config.luns:
            valid, stored_lun, body = self.store.lun_slot(self.index, lun.lun)
            body.release()
            if not valid or stored_lun != lun.lun:
                unsaved.append(lun.lun)
        return unsaved

    def _announce(self, luns: list[int]) -> None:
        """Make sure the guest ends up knowing `luns` (EventQueueState.lun_served):
        a RESCAN event finds a disk it already knows again and keeps it."""
        if not luns:
            return
        for lun in luns:
            LOG.info("%s: LUN %d has no saved state: the guest is told of it", self.config.id,
                     lun)
            self.target.events.lun_served(lun)
        self._save_events()
        self.pending_kicks.add(EVENT_QUEUE)

    def _lun_saver(self, lun: int) -> Callable[[LunState], None]:
        return lambda state: self._save_lun(lun, state)

    def _save_lun(self, lun: int, state: LunState) -> None:
        if self.store is not None:
            faults.point("lun.save.before")
            self.store.write_lun_slot(self.index, lun, lun, state.pack())
            faults.point("lun.save.after")

    def _load_events(self) -> None:
        """A successor delivers the events its predecessor had not: a disk
        added just before a crash still makes the guest rescan."""
        if self.store is None:
            return
        valid, body = self.store.events_slot(self.index)
        try:
            if valid:
                self.target.events = EventQueueState.unpack(body)
        except ValueError as e:
            LOG.warning("%s: stored events unusable (%s)", self.config.id, e)
        finally:
            body.release()
        if self.target.events.pending():
            self.pending_kicks.add(EVENT_QUEUE)

    def _save_events(self) -> None:
        if self.store is not None:
            faults.point("events.save.before")
            self.store.write_events_slot(self.index, self.target.events.pack())
            faults.point("events.save.after")

    def _queue_state(self, ring: RingConfig) -> tuple[QueueState, bool]:
        """The ring's progress state, and whether it resumes a predecessor's:
        only a slot saved for this very ring (size, start base, addresses)."""
        num = ring.num
        if self.store is None:
            return BufferQueueState(bytearray(required_size(num)), num), False
        saved, body = self.store.queue_slot(self.index, ring.index)
        state = BufferQueueState(body[: required_size(num)], num)
        body.release()
        return state, saved == _identity(ring)

    def _new_queue(self, ring: RingConfig, features: int) -> tuple[SplitQueue, bool]:
        """The ring's queue on its state store slot (nothing is written: a
        dormant standby builds it ahead), and whether the slot is this ring's."""
        if self.memory is None:
            raise SessionError("a ring started before any memory table")
        state, resume = self._queue_state(ring)
        try:
            queue = SplitQueue(
                self.memory, ring.num, ring.desc_gpa, ring.avail_gpa, ring.used_gpa,
                event_idx=bool(features & VIRTIO_RING_F_EVENT_IDX),
                indirect=bool(features & VIRTIO_RING_F_INDIRECT_DESC),
                state=state,
            )
        except QueueConfigError as e:
            raise SessionError(f"ring {ring.index}: {e}") from None
        return queue, resume

    def _start_ring(self, ring: RingConfig, features: int, enabled: bool,
                    queue: SplitQueue | None = None) -> None:
        """Start (or resume) a ring; `queue`: one a dormant standby built ahead."""
        faults.point("ring.start.before")
        if queue is None:
            queue, resume = self._new_queue(ring, features)
        else:  # the slot may have changed hands since: ask it now
            resume = False
            if self.store is not None:
                saved, body = self.store.queue_slot(self.index, ring.index)
                body.release()
                resume = saved == _identity(ring)
        self.rings[ring.index] = Ring(queue, enabled, ring)
        if not resume or not self._resume(queue, ring):
            self._fresh(queue, ring)
        faults.point("ring.start.after")
        self.pending_kicks.add(ring.index)

    def _fresh(self, queue: SplitQueue, ring: RingConfig) -> None:
        """Start at the front-end's base: slot cleared, progress reset, then
        the slot vouches for it (a crash in between leaves no valid slot)."""
        if self.store is not None:
            self.store.set_queue_slot(self.index, ring.index, None)
        faults.point("ring.fresh.slot_cleared")
        queue.set_base(ring.base)
        faults.point("ring.fresh.based")
        if self.store is not None:
            self.store.set_queue_slot(self.index, ring.index, _identity(ring))

    def _resume(self, queue: SplitQueue, ring: RingConfig) -> bool:
        """Carry on where the dead emulator stopped: settle its last batch and
        run again every request it had taken but not completed, oldest first.

        Returns False when the saved progress is stale rather than the
        guest's fault: nothing was in flight and the guest's used index is
        the base the ring starts at, i.e. a ring set up anew over a slot its
        predecessor was killed before clearing. The caller starts it fresh.
        """
        index = ring.index
        try:
            plan = queue.resume()
        except RecoveryError as e:
            if queue.inflight == 0 and queue.guest_used_idx() == ring.base:
                LOG.info("%s: queue %d: saved progress is stale (%s); starting at %d",
                         self.config.id, index, e, ring.base)
                return False
            assert queue.broken is not None
            self._stopped(index, queue.broken, str(e))
            return True
        faults.point("queue.resumed")
        if plan.rerun:
            LOG.info("%s: queue %d resumes at %d, re-running %d request(s)",
                     self.config.id, index, plan.last_avail_idx, len(plan.rerun))
            handle = self._handler(index)
            done = []
            chains: list[DescriptorChain | BadChain] = []
            for head in plan.rerun:
                chain = queue.chain_for(head)
                if isinstance(chain, BadChain):
                    done.append((chain.head, 0))
                elif index == EVENT_QUEUE:  # an event buffer, not a request
                    done.append((head, self.target.events.refill(chain.writable)))
                else:
                    done.append((head, handle(chain.readable, chain.writable)))
                chains.append(chain)
            log = self.logging
            if log is not None:
                self._log_chains(log, chains)
            queue.push_used_many(done)
            if log is not None:
                self._log_used(log, index)
            if index == EVENT_QUEUE:
                self._save_events()
        fd = self.call_fds.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)  # an interrupt may have died with the old emulator
        return True

    def _stopped(self, index: int, error: QueueError, detail: str = "") -> None:
        """The guest broke ring `index`: say so once, on its err fd and in the log."""
        why = f"{error}: {detail}" if detail else str(error)
        LOG.warning("%s: queue %d stopped until the driver resets the device: %s",
                    self.config.id, index, why)
        fd = self.err_fds.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)  # QEMU logs "vhost vring error in virtqueue N"

    def _handler(self, index: int) -> Callable[[Sequence[memoryview], Sequence[memoryview]], int]:
        target = self.target
        return target.handle_control if index == CONTROL_QUEUE else target.handle_request

    # -- RingOwner, for GET_VRING_BASE

    def vring_base(self, index: int) -> int | None:
        if self.dormant:
            return None  # the session's own base; the answer is not sent
        ring = self.rings.get(index)
        return None if ring is None else ring.queue.get_base()

    # -- control messages

    def on_socket_readable(self) -> bool:
        """Read and apply every complete control message now available; False
        when nothing was there (or the connection ended)."""
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, RECV_BYTES, RECV_MAX_FDS)
        except BlockingIOError:
            return False
        self.decoder.receive_data(data, fds)
        while True:
            message = self.decoder.next_message()
            if message is CONNECTION_CLOSED:
                LOG.info("%s: the front-end closed the connection", self.config.id)
                self.close()
                return False
            if not isinstance(message, Message):
                return True
            LOG.debug("%s: %s", self.config.id, message.request.name)
            self._apply(self.session.handle(message))

    def _apply(self, effects: Sequence[Effect]) -> None:
        for effect in effects:
            match effect:
                case Reply(data):
                    if self.following:
                        continue  # QEMU had this answer from the predecessor
                    faults.point("vhost.reply.before")
                    self.sock.setblocking(True)
                    try:
                        self.sock.sendall(data)
                    finally:
                        self.sock.setblocking(False)
                    faults.point("vhost.reply.after")
                case SetMemTable(regions, rings):
                    self._set_memory(regions, rings)
                case SetLog(log):
                    self._set_log(log.fd, log.size, log.offset) if log else self._drop_log()
                case SetLogging(enabled):
                    self.log_all = enabled
                    self._logging_changed()
                case SetRingLog(ring):
                    self._set_ring_log(ring)
                case SetKick(index, fd) if self.dormant:
                    self._dormant_kicks.pop(index, None)
                    if fd is not None:
                        self._dormant_kicks[index] = fd
                case SetKick(index, fd):
                    self.kick_fds.pop(index, None)
                    if fd is not None:
                        self.kick_fds[index] = fd
                        self.pending_kicks.add(index)
                case SetCall(index, fd):
                    self.call_fds.pop(index, None)
                    if fd is not None:
                        self.call_fds[index] = fd
                        if not self.dormant:  # `activate` signals them all
                            os.eventfd_write(fd, 1)  # a completion may have gone to the old one
                case SetErr(index, fd):
                    self.err_fds.pop(index, None)
                    if fd is not None:
                        self.err_fds[index] = fd
                case StartRing(ring, features, enabled) if self.dormant:
                    queue, _ = self._new_queue(ring, features)
                    queue.guest_used_idx()  # its pages mapped now, not at the takeover
                    self._deferred[ring.index] = (ring, features, enabled, queue)
                case StartRing(ring, features, enabled):
                    self._start_ring(ring, features, enabled)
                case EnableRing(index, enabled) if self.dormant:
                    if index in self._deferred:
                        ring, features, _, queue = self._deferred[index]
                        self._deferred[index] = (ring, features, enabled, queue)
                case EnableRing(index, enabled):
                    if index in self.rings:
                        self.rings[index].enabled = enabled
                        self.pending_kicks.add(index)
                case StopRing(index) if self.dormant:
                    deferred = self._deferred.pop(index, None)
                    if deferred is not None:
                        deferred[3].release()
                case StopRing(index):
                    # On GET_VRING_BASE the answer follows with nothing stored
                    # in between; the progress stays valid until ForgetRing.
                    faults.point("ring.stop.before_reply")
                    stopped = self.rings.pop(index, None)
                    if stopped is not None:
                        stopped.queue.release()
                case ForgetRing(index) if self.dormant:
                    pass  # the serving predecessor forgets it in the store
                case ForgetRing(index):
                    faults.point("ring.stop.after_reply")
                    if self.store is not None:
                        self.store.set_queue_slot(self.index, index, None)
                case ResetDevice():
                    faults.point("device.reset")
                case CloseFds(fds):
                    for fd in fds:
                        os.close(fd)
                case _:
                    raise RuntimeError(f"unknown effect {effect!r}")

    # -- data plane

    def on_kick(self, index: int) -> None:
        fd = self.kick_fds.get(index)
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.pending_kicks.add(index)

    def serve_pending(self) -> None:
        """Serve every ring kicked this round (after all control messages).

        The usual round kicked one ring: it is taken out of the set as it
        is, with no new set and no sort. Several are served in ring order.
        """
        kicked = self.pending_kicks
        if not kicked or self.closed:
            return
        if len(kicked) == 1:
            self._serve_ring(kicked.pop())
            return
        self.pending_kicks = set()
        for index in sorted(kicked):
            self._serve_ring(index)

    def _serve_ring(self, index: int) -> None:
        ring = self.rings.get(index)
        if ring is None or not ring.enabled:
            if ring is not None:
                self.pending_kicks.add(index)  # served once enabled
            return
        queue = ring.queue
        if queue.broken is not None:
            return  # stays stopped until the front-end sets the ring up anew
        try:
            if index == EVENT_QUEUE:
                self._serve_events(queue, index)
            else:
                self._serve(queue, index)
        except QueueError as e:
            # The guest corrupted this ring itself: stop serving it, keep the others.
            self._stopped(index, e)

    def poll_rings(self) -> bool:
        """The adaptive poll's look (emulators.process): serve the request
        rings that have chains waiting; whether there were any."""
        if self.closed or self.dormant:
            return False
        found = False
        for index, ring in self.rings.items():
            if index >= FIRST_REQUEST_QUEUE and ring.queue.has_pending():
                self.pending_kicks.add(index)
                found = True
        if found:
            self.serve_pending()
        return found

    def _serve(self, queue: SplitQueue, index: int) -> None:
        """Serve every chain available now, publish once, signal once.

        One pass: a chain the guest adds while this batch is served comes
        with a kick (or, with EVENT_IDX, was seen by pop's second look), so
        the next loop round serves it. Request queues take chains of the
        usual shape already split (`SplitQueue.pop_split`); the rest, and
        the control queue, go through the checked walker and handler.
        """
        target = self.target
        chains: list[SplitChain | DescriptorChain | BadChain]
        if index == CONTROL_QUEUE:
            chains = list(queue.pop_all())
        else:
            chains = queue.pop_split(target.req_size, target.resp_size)
        if not chains:
            return
        handle = self._handler(index)
        split = target.handle_split
        heads: list[int] = []
        lengths: list[int] = []
        for chain in chains:
            if type(chain) is tuple:  # a SplitChain (DescriptorChain is a subclass)
                heads.append(chain[0])
                lengths.append(split(chain))  # type: ignore[arg-type]
            elif isinstance(chain, BadChain):
                LOG.warning("%s: queue %d: %s", self.config.id, index, chain.error)
                heads.append(chain.head)
                lengths.append(0)
            else:
                assert isinstance(chain, DescriptorChain)
                heads.append(chain.head)
                lengths.append(handle(chain.readable, chain.writable))
        log = self.logging
        if log is not None:
            self._log_chains(log, chains)
        queue.push_used_batch(heads, lengths)
        if log is not None:
            self._log_used(log, index)
        n = len(heads)
        self.completed += n
        self.completed_per_ring[index] = self.completed_per_ring.get(index, 0) + n
        self._notify(queue, index)

    def _serve_events(self, queue: SplitQueue, index: int) -> None:
        events = self.target.events
        log = self.logging
        sent = False
        while events.pending():
            chain = queue.pop()
            if chain is None:
                break
            used = 0 if isinstance(chain, BadChain) else events.fill(chain.writable)
            if log is not None:
                self._log_chains(log, (chain,))
            queue.push_used(chain.head, used)
            sent = True
        if sent and log is not None:
            self._log_used(log, index)
        if sent:
            self._notify(queue, index)
            # Saved as delivered only now that the guest can see them: a
            # crash before this repeats an event, never loses one.
            self._save_events()

    def _notify(self, queue: SplitQueue, index: int) -> None:
        fd = self.call_fds.get(index)
        if fd is not None and queue.needs_notification():
            os.eventfd_write(fd, 1)

    # -- changes while running (management)

    def add_lun(self, lun: LunConfig) -> None:
        """A new disk: the guest hears of it through the event queue and rescans."""
        if lun.lun in self.target.scsi.luns:
            raise ValueError(f"LUN {lun.lun} is already in use on {self.config.id}")
        unit = LogicalUnit(
            FdBackend(lun.fd, lun.block_size, lun.readonly),
            lun.disk_id,
            LunState.fresh(initial_unit_attention=False),
            on_change=self._lun_saver(lun.lun),
        )
        self.target.add_lun(lun.lun, unit)
        self._save_events()
        # Saved last: a successor that finds no state for a LUN its config
        # holds tells the guest of it (_unsaved_luns), whichever step this
        # process ended at.
        self._save_lun(lun.lun, unit.state)
        self.pending_kicks.add(EVENT_QUEUE)

    def remove_lun(self, lun: int) -> None:
        if lun not in self.target.scsi.luns:
            raise ValueError(f"no LUN {lun} on {self.config.id}")
        unit = self.target.remove_lun(lun)
        if self.store is not None:
            self.store.clear_lun_slot(self.index, lun)
        self._save_events()
        backend = unit.backend
        if isinstance(backend, FdBackend):
            os.close(backend.fd)
        self.pending_kicks.add(EVENT_QUEUE)

    def resize_lun(self, lun: int) -> bool:
        """The image grew (or shrank): the guest gets CAPACITY DATA HAS CHANGED.

        Told even when this process already serves the new size: it started
        after the image grew, when the launcher's first LUN_RESIZE went
        unanswered, and the guest still holds the size it saw before."""
        if lun not in self.target.scsi.luns:
            raise ValueError(f"no LUN {lun} on {self.config.id}")
        changed = self.target.refresh_capacity(lun, always=True)
        if changed:
            self._save_events()
        self.pending_kicks.add(EVENT_QUEUE)
        return changed

    def progress(self) -> list[tuple[int, int, int]]:
        """(ring, completed, in flight) of every started ring, for the heartbeat.

        A stopped (broken) ring reports nothing in flight: the heads it holds
        wait for the driver's reset, not for this process, so they are no
        sign of a hang, and a restart would not complete them either.
        """
        return [
            (
                index,
                self.completed_per_ring.get(index, 0),
                0 if ring.queue.broken is not None else ring.queue.inflight,
            )
            for index, ring in sorted(self.rings.items())
        ]

    # -- dirty logging (live migration; emulators.virtio.dirtylog)

    def _set_log(self, fd: int, size: int, offset: int) -> None:
        """Map a new dirty log; the old one is unmapped once the new one is in
        place. One that cannot be mapped is the front-end's error."""
        try:
            log = DirtyLog.from_fd(fd, size, offset)
        except DirtyLogError as e:
            raise SessionError(f"cannot map the dirty log: {e}") from None
        self._drop_log()
        self.dirty_log = log
        self._log_refused = False
        self._logging_changed()

    def _drop_log(self) -> None:
        log, self.dirty_log = self.dirty_log, None
        self._logging_changed()
        if log is not None:
            log.close()

    def _logging_changed(self) -> None:
        self.logging = self.dirty_log if self.log_all else None

    def _set_ring_log(self, config: RingConfig) -> None:
        """A running ring's log flag or address changed (only its `addr`)."""
        ring = self.rings.get(config.index)
        if ring is not None:
            ring.config = config
        deferred = self._deferred.get(config.index)
        if deferred is not None:
            self._deferred[config.index] = (config, *deferred[1:])

    def _log_chains(self, log: DirtyLog, chains: Sequence[object]) -> None:
        """Mark every device-writable buffer of `chains`: written by now, not
        yet published (the guest, and QEMU, may look once the index moves)."""
        memory = self.memory
        assert memory is not None
        masks: dict[int, int] = {}
        ok = True
        for chain in chains:
            if type(chain) is tuple:  # a SplitChain: in header, data in
                views = [chain[4], *chain[5]]
            elif isinstance(chain, DescriptorChain):
                views = chain.writable
            else:
                continue  # a BadChain: nothing was written
            for view in views:
                if len(view):
                    ok = log.add(masks, memory.gpa_of(view), len(view)) and ok
        log.commit(masks)
        if not ok:
            self._log_beyond("a buffer")

    def _log_used(self, log: DirtyLog, index: int) -> None:
        """Mark ring `index`'s used ring (elements, index, avail_event), after
        it was written, at its log address, if its log flag is set."""
        ring = self.rings.get(index)
        if ring is None:
            return
        addr = ring.config.addr
        if addr.flags & VHOST_VRING_F_LOG_BIT and not log.mark(
            addr.log_guest_addr, 6 + 8 * ring.config.num
        ):
            self._log_beyond(f"ring {index}'s used ring")

    def _log_beyond(self, what: str) -> None:
        if not self._log_refused:
            self._log_refused = True
            LOG.warning("%s: %s lies beyond the front-end's dirty log; not logged "
                        "(the log is too small for its own memory map)", self.config.id, what)

    # -- guest memory

    def _set_memory(self, regions: Sequence[MappedRegion], rings: Sequence[RingConfig]) -> None:
        """A new memory table: map it, move every running ring onto it at its
        current position, then unmap the old one (as libvhost-user does)."""
        if not regions:
            self._unmap()
            return
        memory = _map([
            MemoryRegion(
                guest_phys_addr=r.region.guest_phys_addr,
                memory_size=r.region.memory_size,
                userspace_addr=r.region.userspace_addr,
                mmap_offset=r.region.mmap_offset,
                fd=r.fd,
            )
            for r in regions
        ])
        faults.point("memtable.mapped")
        moved = {r.index: r for r in rings}
        for index, (_, features, enabled, queue) in list(self._deferred.items()):
            config = moved.get(index)
            if config is None:
                queue.release()
                del self._deferred[index]
                continue
            try:
                queue.move(memory, config.desc_gpa, config.avail_gpa, config.used_gpa)
            except QueueConfigError as e:
                raise SessionError(f"ring {index} does not fit the new memory table: {e}") from None
            self._deferred[index] = (config, features, enabled, queue)
        for index, ring in list(self.rings.items()):
            config = moved.get(index)
            if config is None:  # not started in the session: cannot happen, but never keep
                ring.queue.release()  # a view of the old map
                del self.rings[index]
                continue
            try:
                ring.queue.move(memory, config.desc_gpa, config.avail_gpa, config.used_gpa)
            except QueueConfigError as e:
                raise SessionError(f"ring {index} does not fit the new memory table: {e}") from None
            ring.config = config
            self.pending_kicks.add(index)  # a kick may have come during the change
        old, self.memory = self.memory, memory
        if old is not None:
            old.close()
        faults.point("memtable.moved")

    # -- teardown

    def _unmap(self) -> None:
        for deferred in self._deferred.values():
            deferred[3].release()
        self._deferred.clear()
        for ring in self.rings.values():
            ring.queue.release()
        self.rings.clear()
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for effect in self.session.close():
            if isinstance(effect, CloseFds):
                for fd in effect.fds:
                    os.close(fd)
        self._unmap()
        self._drop_log()
        self.decoder.close()
        self.kick_fds.clear()
        self.call_fds.clear()
        self.err_fds.clear()
        self.sock.close()


def _identity(ring: RingConfig) -> RingIdentity:
    """What a queue slot's progress belongs to: the ring as the front-end set
    it up (its own addresses, which a new memory table does not change)."""
    a = ring.addr
    return RingIdentity(ring.num, ring.base, a.desc_user_addr, a.avail_user_addr,
                        a.used_user_addr)


def _map(regions: list[MemoryRegion]) -> GuestMemory:
    """Map a memory table; one that cannot be mapped (a region larger than its
    file, a bad offset) is the front-end's error, and ends the connection."""
    try:
        return GuestMemory.from_fds(regions)
    except GuestMemoryError as e:
        raise SessionError(f"cannot map the memory table: {e}") from None
