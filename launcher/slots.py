"""Emulators across their lives: one slot per [[emulator]], many processes.

Theory of operation. A slot owns everything that must outlive one emulator
process: the opened disk images, the state store file, QEMU's ends of the
vhost-user sockets and the session keepers that hold them. A process is
only the current occupant: it gets fresh socketpairs to the keepers, the
same disk fds and the same state store. When it ends, or its heartbeat says
it hangs (then it is killed), the restart policy decides; a restart replays
each keeper's recorded session to the new process, which resumes the rings
from the state store, so the guest sees only a pause.
A restart takes the VM's warm spare when one is ready (launcher.spares).

Hot standby. One slot per VM, that of its first scsi emulator, keeps a
spare following its occupant's session, which serves the moment the
occupant dies (launcher.standby): `_restart` promotes it then, and drops
it, waiting for its death, when it cannot take over, so that never two
processes serve the rings; whatever else ends the occupant on purpose or
changes its LUNs drops it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from emulators import faults
from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from emulators.limits import EXIT_PROTOCOL, LUN_SLOTS, resize_problem
from launcher import children, emulators, holdnames, keeperrecord
from launcher.heartbeat import protocol as proto
from launcher.heartbeat.link import ControlLink, LinkClosed, control_pair
from launcher.libvirt import backend_socket
from launcher.occupant import (
    Ending,
    HandOverFailed,
    Occupant,
    exit_event,
    hand_over,
    hang_event,
    now_ns,
    reap,
    serve,
)
from launcher.restart_policy import (
    ExitReason,
    GiveUp,
    PolicyAction,
    RestartPolicy,
    Start,
    describe_status,
)
from launcher.runfolder import RunFolder, frontend_socket_mode
from launcher.sessionkeeper import OneInFlight, SessionKeeper
from launcher.slotbase import DiskChangeError, NoAnswer, PolicyDriven, SlotSnapshot, SlotStats
from launcher.spares import SparePool
from launcher.spec import DiskSpec, EmulatorSpec, Spec
from launcher.standby import StandbyKeeper, keeps_standby
from launcher.statestore import layout, transfer
from launcher.status import LOG
from launcher.uidpool import UidPool

QUEUE_SLOTS = proto.MAX_RINGS  # every ring a controller may have
COMMAND_TIMEOUT = 5.0
RESIZE_SUCCESSOR_WAIT = 10.0
"""How long a resize whose LUN_RESIZE went unanswered waits for the
emulator's successor to show the guest the new size."""
FRONTEND_BACKLOG = 4
"""Front-end connections a backend-only controller's listener queues: a new
QEMU may connect while the emulator is still being made a fresh device."""
FRONTEND_RECHECK_S = 0.1
"""How often a QEMU that connected while another QEMU still holds a
controller of the same emulator looks again whether it may go on."""


def skew_problem(ready: proto.Ready) -> str | None:
    """Why an emulator that said `ready` cannot serve this launcher's slots,
    or None. An emulator that names no versions is of the same code."""
    if ready.store_version and ready.store_version != layout.VERSION:
        return (f"it reads state store layout {ready.store_version}, this launcher "
                f"writes layout {layout.VERSION}")
    return None


@dataclass
class HeldSlot:
    """One slot as a re-attaching launcher finds it: the fds the holder kept
    and what the run folder says. `occupant` is the emulator that served
    when the last launcher went, adopted (None if it ended meanwhile: then
    `ended_status` is its wait status if the holder saw it end)."""

    disks: dict[str, list[DiskSpec]]
    disk_fds: dict[str, int]
    state_fd: int
    keeper_ends: dict[str, socket.socket]
    records: dict[str, tuple[bytes, list[int]]]
    stats: SlotStats
    policy: dict[str, Any] | None = None
    occupant: Occupant | None = None
    ended_pid: int = 0
    ended_status: int | None = None
    version: str | None = None  # what the adopted occupant reported to its launcher


def _listen(run: RunFolder, controller_id: str, gid: int | None) -> socket.socket:
    """The controller's vhost-user socket in the run folder's front-end
    folder, for root and ``gid`` (the spec's frontend_group) only. Its mode
    and group are set before it listens: until then a connect is refused."""
    run.frontend_dir(gid)
    path = backend_socket(run.path, controller_id)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, frontend_socket_mode(gid))
    sock.listen(FRONTEND_BACKLOG)
    sock.setblocking(False)
    return sock


class EmulatorSlot(PolicyDriven):
    """One emulator of the spec, restarted as its policy says."""

    def __init__(
        self,
        spec: Spec,
        emulator: EmulatorSpec,
        run: RunFolder,
        on_give_up: Callable[[GiveUp], Awaitable[None]],
        uids: UidPool,
        spares: SparePool | None = None,
        listen: bool = False,
        held: HeldSlot | None = None,
        frontend_gid: int | None = None,
    ) -> None:
        """`listen`: backend-only mode, QEMU connects to sockets in the run
        folder, open to root and `frontend_gid`. `held`: re-attach to a slot
        whose fds the holder kept (nothing is opened or made then)."""
        self.spec = spec
        self.emulator = emulator
        self.id = emulator.id
        self.run = run
        self.controllers = spec.controllers_of(emulator.id)
        # Disks change at run time (management); the spec's are the first ones.
        self.disks: dict[str, list[DiskSpec]] = {
            c.id: list(spec.disks_of(c.id)) for c in self.controllers
        }
        #: Called whenever what vm-state.json says of this slot changed.
        self.on_change: Callable[[], None] = lambda: None
        self._held = held
        #: (pid, version) of an adopted occupant, as the run folder said.
        self._held_version = (held.ended_pid, held.version) if held and held.version else None
        #: Whether the holder keeps the serving occupant's fds (an adopted one's: yes).
        self._occupant_held = held is not None
        #: Records whose fds the holder keeps (a re-attached slot starts with them).
        self._records_held: set[str] = set() if held is None else {
            holdnames.record(self.id, cid) for cid in held.records}
        self._commands = asyncio.Lock()
        self.policy = RestartPolicy.from_spec(emulator, log=LOG.info, log_give_up=LOG.error)
        self.stats = SlotStats()
        self.occupant: Occupant | None = None
        self.uids = uids
        self.spares = spares
        self.base_uid = spec.vm.uid_range[0] + spec.emulators.index(emulator)
        self._on_give_up = on_give_up
        self.emit: Callable[[str, dict[str, Any]], None] = lambda name, data: None
        self._stopping = False
        self._restart_requested = asyncio.Event()
        self._cold_next = False  # the last start failed on a warm spare
        self.disk_fds: dict[str, int] = {}
        self.qemu_ends: dict[str, socket.socket] = {}
        self._keeper_ends: dict[str, socket.socket] = {}
        self.keepers: dict[str, SessionKeeper] = {}
        self.state_fd = -1
        # Backend-only mode: QEMU, started by someone else, connects to these.
        self.listeners: dict[str, socket.socket] = {}
        self._on_qemu_closed: Callable[[str], None] = lambda why: None
        #: Backend-only mode, every QEMU of the emulator has gone: its occupant
        #: is to end and the slot to power off (`_power_off`), then the next
        #: start is a first start. `_fresh` is clear from the one to the other.
        self._power_off_due = False
        self._first_start_due = False
        self._fresh = asyncio.Event()
        self._fresh.set()
        #: The slot's hot standby, if it keeps one (launcher.standby).
        self.hot_standby: StandbyKeeper | None = None
        if spares is not None and keeps_standby(spec, emulator, listen):
            self.hot_standby = StandbyKeeper(
                emulator, self.keepers, spares, uids,
                occupant=lambda: self.occupant,
                config=lambda: self._config(first_start=False),
                may_stand_by=lambda: self._fresh.is_set() and not self._stopping,
            )
        if held is not None:
            self._adopt(held)
            return
        try:
            for controller in self.controllers:
                for disk in self.disks[controller.id]:
                    self.disk_fds[disk.id] = emulators.open_disk(str(disk.image), disk.readonly)
                    self._hold_disk(disk.id)
                if listen:
                    self.listeners[controller.id] = _listen(run, controller.id, frontend_gid)
                    continue
                qemu_end, keeper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                qemu_end.set_inheritable(True)
                self.qemu_ends[controller.id] = qemu_end
                self._keeper_ends[controller.id] = keeper_end
                children.host().hold(holdnames.keeper(self.id, controller.id), "socket",
                                     [keeper_end.fileno()])
            shape = layout.Layout(len(self.controllers), QUEUE_SLOTS, LUN_SLOTS)
            self.state_fd = layout.create(run.state_file(emulator.id), shape)
            children.host().hold(holdnames.state(self.id), "file", [self.state_fd])
        except BaseException:
            self.close()
            raise

    def _adopt(self, held: HeldSlot) -> None:
        """Take the slot's fds and record from what a crashed (or upgraded)
        launcher left in the holder; the holder keeps its copies."""
        self.disks = held.disks
        self.disk_fds = dict(held.disk_fds)
        self.state_fd = held.state_fd
        self._keeper_ends = dict(held.keeper_ends)
        self.stats = held.stats
        if held.policy is not None:
            self.policy.restore(held.policy)

    def _hold_disk(self, disk_id: str) -> None:
        children.host().hold(holdnames.disk(self.id, disk_id), "file", [self.disk_fds[disk_id]])

    @property
    def proc(self) -> emulators.EmulatorProcess | None:
        return self.occupant.proc if self.occupant else None

    def snapshot(self) -> SlotSnapshot:
        occ = self.occupant
        live = occ is not None and not occ.proc.exited.done()
        detector = occ.link.detector if occ is not None and live else None
        totals = detector.totals if detector is not None else None
        return SlotSnapshot(
            id=self.id,
            pid=occ.proc.pid if occ is not None and live else None,
            uid=occ.uid if occ is not None and live else None,
            state=self.policy.state.value,
            uptime_s=round((now_ns() - self.stats.started_ns) / 1e9, 1) if live else None,
            restarts=self.stats.restarts,
            last_exit=self.stats.last_exit,
            last_stall_ms=self.stats.last_stall_ms,
            controllers=tuple(c.id for c in self.controllers),
            disks=tuple(d.id for disks in self.disks.values() for d in disks),
            heartbeat_rtt_ms=detector.round_trip_ms if detector is not None else None,
            inflight=totals.in_flight if totals is not None else None,
            completed=totals.completed if totals is not None else None,
            version=self._version(occ) if live and occ is not None else None,
        )

    def _version(self, occupant: Occupant) -> str | None:
        """What the occupant said in its READY (an adopted one said it to the
        launcher before, which wrote it down)."""
        ready = occupant.link.ready
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            return ready.result().version or None
        held = self._held_version
        return held[1] if held is not None and held[0] == occupant.proc.pid else None

    def start_keepers(self, on_qemu_closed: Callable[[str], None]) -> None:
        """Keepers hold QEMU's sessions; QEMU's ends are then QEMU's alone."""
        self._on_qemu_closed = on_qemu_closed
        self._new_keepers()
        for controller in self.controllers:
            cid = controller.id
            keeper = self.keepers[cid]
            held = self._held
            if held is not None and cid in held.records:
                data, fds = held.records.pop(cid)
                try:
                    keeper.restore(data, fds)
                except keeperrecord.KeeperRecordError as e:
                    LOG.error("emulator %s, controller %s: the recorded vhost-user session "
                              "cannot be read (%s): a restart of this emulator will not "
                              "know the guest's rings", self.id, cid, e)
            qemu_side = self._keeper_ends.pop(cid, None)
            if qemu_side is not None:
                keeper.set_frontend(qemu_side)
        held = self._held
        if held is not None and held.occupant is not None:
            occupant = held.occupant
            for cid, sock in occupant.backends.items():
                self.keepers[cid].attach(sock, replay=False)
            self.occupant = occupant  # adopted: its start was counted by its launcher

    def _new_keepers(self) -> None:
        """A fresh keeper for every controller: no session, no QEMU yet."""
        in_flight = OneInFlight()  # one message in flight to this emulator at a time
        for controller in self.controllers:
            cid = controller.id
            self.keepers[cid] = SessionKeeper(
                cid,
                None,
                num_queues=2 + controller.queues,
                on_qemu_closed=self._qemu_closed,
                on_refused=lambda r: self.emit("FRONTEND_REFUSED",
                                               {"id": self.id, **r.event_data()}),
                guest_memory=self.spec.vm.memory,
                in_flight=in_flight,
                on_record=functools.partial(self._record_changed, cid),
            )

    def _qemu_closed(self, why: str) -> None:
        """A keeper lost its QEMU. In backend-only mode, once no QEMU is
        connected to any controller of this emulator (each one either hung
        up or never came), the emulator is made a fresh device for the next
        QEMU: its occupant is ended here, and `supervise` does the rest."""
        self._on_qemu_closed(why)
        keepers = self.keepers.values()
        gone = any(k.closed for k in keepers) and all(k.closed or k.qemu is None
                                                      for k in keepers)
        if not self.listeners or self._stopping or not self._fresh.is_set() or not gone:
            return
        LOG.info("QEMU closed every connection of emulator %s: it restarts as a fresh "
                 "device", self.id)
        self._drop_standby("the emulator becomes a fresh device")
        self._power_off_due = True
        self._fresh.clear()
        self._restart_requested.set()

    def _power_off(self) -> None:
        """Backend-only mode, the occupant ended after the last QEMU of this
        emulator went: what the next QEMU meets is a device just powered on,
        as in a new machine: no session, no rings to resume, LUN state (unit
        attention, sense, reservations, mode pages) as at power-on. The state
        store is reset (nothing maps it: its occupant is dead) and the keepers
        are new; the next start (`_restart`) is a first start."""
        for keeper in self.keepers.values():
            keeper.close()
        layout.reset(self.state_fd, layout.Layout(len(self.controllers), QUEUE_SLOTS, LUN_SLOTS))
        self._new_keepers()
        self._fresh.set()  # a QEMU may talk to the new keepers: they queue until it runs

    def _record_changed(self, cid: str, data: bytes, fds: list[int]) -> None:
        """A keeper's record changed: on disk and in the holder before anything
        else happens, so a launcher that dies now leaves the record behind."""
        keeperrecord.write_atomically(self.run.keeper_record(self.id, cid), data)
        host = children.host()
        name = holdnames.record(self.id, cid)
        if name in self._records_held:
            host.unhold(name)
            self._records_held.discard(name)
        if fds:
            host.hold(name, "record", fds)
            self._records_held.add(name)

    async def accept_frontends(self) -> None:
        """Backend-only mode: hand each QEMU connection to its controller's
        keeper, for as long as the backend runs. A QEMU that comes while the
        emulator is being made a fresh device waits for it; one that comes
        while another QEMU is connected to the controller is turned away."""
        loop = asyncio.get_running_loop()

        async def accept(cid: str, listener: socket.socket) -> None:
            while True:
                conn, _ = await loop.sock_accept(listener)
                if self.keepers[cid].closed and self._fresh.is_set():
                    LOG.info("controller %s: a QEMU connected while another still holds a "
                             "controller of emulator %s: it waits until that one goes",
                             cid, self.id)
                while self.keepers[cid].closed or not self._fresh.is_set():
                    if not self._fresh.is_set():
                        await self._fresh.wait()
                    else:
                        await asyncio.sleep(FRONTEND_RECHECK_S)
                keeper = self.keepers[cid]
                if keeper.qemu is not None:
                    LOG.warning("controller %s: a second QEMU connected while one is "
                                "connected: turned away", cid)
                    conn.close()
                    continue
                keeper.set_frontend(conn)
                LOG.info("QEMU connected to controller %s", cid)

        await asyncio.gather(*(accept(c, s) for c, s in self.listeners.items()))

    def close_qemu_ends(self) -> None:
        """After QEMU has inherited them, the launcher's copies must go, or
        QEMU's exit would not be seen as the sockets closing."""
        for sock in self.qemu_ends.values():
            sock.close()
        self.qemu_ends.clear()

    # -- processes

    def _config(self, first_start: bool) -> tuple[EmulatorConfig, dict[str, socket.socket],
                                                  list[socket.socket]]:
        """A config for the next occupant, with fresh sockets to the keepers."""
        ours: dict[str, socket.socket] = {}
        theirs: list[socket.socket] = []
        controllers = []
        for controller in self.controllers:
            mine, emu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours[controller.id] = mine
            theirs.append(emu_end)
            luns = tuple(
                LunConfig(d.lun, d.id, self.disk_fds[d.id], d.readonly, d.block_size)
                for d in self.disks[controller.id]
            )
            controllers.append(
                ControllerConfig(controller.id, emu_end.fileno(), controller.queues, luns)
            )
        config = EmulatorConfig(
            self.id, tuple(controllers), state_fd=self.state_fd, first_start=first_start,
            liveness_fd=self.hot_standby.liveness_fd if self.hot_standby is not None else -1,
        )
        return config, ours, theirs

    async def _launch_cold(self, first_start: bool) -> Occupant:
        """A new process, confined; raises (everything closed) if not."""
        config, ours, theirs = self._config(first_start)
        link_ours, link_theirs = control_pair()
        theirs.append(link_theirs)
        config = dataclasses.replace(config, control_fd=link_theirs.fileno())
        # The holder's copy of the last occupant's fds (its uid lease among
        # them) is dropped by a queued request: wait for it, or the uid
        # still looks taken and the start fails into the restart backoff.
        await children.host().flush()
        uid = self.uids.take(self.base_uid)
        if uid is None:
            for sock in (*ours.values(), *theirs, link_ours):
                sock.close()
            raise RuntimeError(f"uid_range has no uid left for emulator {self.id}")
        res = emulators.EmulatorResources.for_vm(self.spec, self.emulator, config, uid)
        try:
            proc = await emulators.start(res)
        except BaseException:
            self.uids.give_back(uid)
            link_ours.close()
            for sock in ours.values():
                sock.close()
            raise
        finally:
            for sock in theirs:
                sock.close()
        faults.strike("cold.process_started", proc.pid)
        occupant = Occupant(proc, ControlLink(self.id, link_ours), uid, backends=ours)
        for cid, sock in ours.items():
            self.keepers[cid].attach(sock, replay=not first_start)
        return occupant

    async def _launch_spare(self, spare: Occupant, first_start: bool = False) -> Occupant:
        """Hand the assignment to a waiting spare (now ours); raises
        HandOverFailed with the spare reaped and its uid given back."""
        config, ours, theirs = self._config(first_start)

        def replay() -> None:
            for cid, sock in ours.items():
                self.keepers[cid].attach(sock, replay=not first_start)

        try:
            await hand_over(spare, config, replay)
        except BaseException:
            for keeper in self.keepers.values():
                keeper.detach()
            for sock in ours.values():
                sock.close()
            spare.link.close()
            await reap(spare.proc)
            self.uids.give_back(spare.uid)
            raise
        finally:
            for sock in theirs:
                sock.close()
        spare.link.name = self.id
        spare.proc.id = self.id
        spare.backends = ours
        self.stats.spare_restarts += 1
        return spare

    def _occupy(self, occupant: Occupant) -> None:
        self.occupant = occupant
        self.stats.starts += 1
        self.stats.started_ns = now_ns()
        self.policy.on_started(now_ns())
        fds = [occupant.link.sock.fileno()]
        fds += [occupant.backends[c.id].fileno() for c in self.controllers]
        if occupant.proc.output_fd >= 0:
            fds.append(occupant.proc.output_fd)
        self._occupant_held = min(fds) >= 0  # else it is ending already: nothing to keep
        if self._occupant_held:
            children.host().hold(holdnames.occupant(self.id), "occupant", fds)
        self.on_change()

    async def start(self) -> None:
        """The first start, before QEMU: a failure here ends the VM."""
        self.policy.start(now_ns())
        self._occupy(await self._launch_cold(first_start=True))

    async def load_migrated_state(self, image: bytes) -> None:
        """Incoming migration, before the guest ever ran here and before this
        slot is supervised: the first occupant (which only answered QEMU's
        set-up) is killed, the source's state store image is loaded into
        this slot's store (launcher.statestore.transfer: ring slots cleared),
        and a new occupant starts from it as a successor would (the session
        replayed, the LUNs' state read from the store: no new power-on unit
        attention). Raises as `start` does."""
        occupant = self.occupant
        if occupant is not None:
            occupant.proc.child.kill()  # it served no guest request: nothing to finish
            status = await occupant.proc.exited
            self._retire(occupant)
            self.policy.on_exit(now_ns(), status, ExitReason.REQUESTED_RESTART,
                                "restarted from the migration's state")
        transfer.load_image(self.state_fd, image)
        self._occupy(await self._launch_cold(first_start=False))

    def request_restart(self) -> None:
        """Management asked for a restart: kill the occupant; the policy restarts it."""
        self._restart_requested.set()

    async def supervise(self) -> None:
        """The slot's life after its first start: one task of the VM's group.

        Returns when the slot stops for good (stop requested, clean end,
        give-up). Every end of an occupant and every failed restart goes
        through the policy; only CancelledError (the VM's teardown) leaves
        early. The hot standby's task is its child."""
        if self.hot_standby is None:
            await self._supervise()
            return
        async with asyncio.TaskGroup() as group:
            standby = group.create_task(self.hot_standby.keep(), name=f"standby {self.id}")
            try:
                await self._supervise()
            finally:
                self._drop_standby("the slot stops")
                standby.cancel()

    async def _supervise(self) -> None:
        held, self._held = self._held, None
        lost = held is not None and held.occupant is None and not self._stopping
        if lost and held is not None and not await self._ended_while_detached(
                held.ended_pid, held.ended_status):
            return  # its occupant ended while detached, and the policy did not restart it
        while not self._stopping and self.occupant is not None:
            occupant = self.occupant
            ending = await serve(occupant, self._restart_requested,
                                 self.emulator.heartbeat_ms, self.emulator.hang_timeout_ms)
            actions = self._ended(occupant, ending)
            if not any(isinstance(a, Start) for a in actions):
                self._drop_standby("no restart follows")
            if not await self._carry_out(actions, now_ns(), occupant.proc.pid):
                return

    async def _ended_while_detached(self, pid: int, status: int | None) -> bool:
        """The occupant ended while no launcher was attached: as if it had
        crashed now (the holder recorded its status, if it saw the end).
        True once a process serves the slot again."""
        text = describe_status(status) if status is not None else "status unknown"
        self.stats.last_exit = text
        LOG.warning("emulator %s ended while no launcher was attached (%s)", self.id, text)
        known = status if status is not None else -signal.SIGKILL
        self.emit("EMULATOR_EXIT", exit_event(self.id, pid, ExitReason.CRASHED, known))
        actions = self.policy.on_exit(now_ns(), known, ExitReason.CRASHED,
                                      "ended while no launcher was attached")
        return await self._carry_out(actions, now_ns(), pid)

    def _ended(self, occupant: Occupant, ending: Ending) -> list[PolicyAction]:
        """Bookkeeping, log and events for an occupant that ended; the policy's answer."""
        died_ns = now_ns()
        reason, detail, status = ending.reason, ending.detail, ending.status
        blame = self._blame() if status == EXIT_PROTOCOL else None  # before detach
        self._retire(occupant)
        if self._stopping:
            return []
        self.stats.last_exit = describe_status(status)
        if self._power_off_due:
            self._power_off_due = False
            self._restart_requested.clear()  # it may have ended by itself first
            self._power_off()
            self._first_start_due = True
            return self.policy.on_exit(died_ns, status, ExitReason.REQUESTED_RESTART,
                                       "every QEMU of it went: it starts as a fresh device")
        if reason is ExitReason.CRASHED and status == 0:
            reason = ExitReason.EXITED_CLEAN
        if reason is ExitReason.CRASHED and blame is not None:
            reason, detail = ExitReason.FRONTEND_FAULT, blame
            LOG.warning("emulator %s refused a front-end message (%s): %s", self.id,
                        self.stats.last_exit, blame)
        elif reason is ExitReason.CRASHED:
            LOG.warning("emulator %s died (%s)", self.id, self.stats.last_exit)
        if ending.verdict is not None:
            self.emit("EMULATOR_HANG", hang_event(self.id, occupant.proc.pid, ending.verdict))
            LOG.warning("emulator %s hung: %s; killed pid %d", self.id, ending.verdict.reason,
                        occupant.proc.pid)
        elif reason is ExitReason.REQUESTED_RESTART:
            LOG.info("emulator %s: restart requested", self.id)
        self.emit("EMULATOR_EXIT", exit_event(self.id, occupant.proc.pid, reason, status))
        return self.policy.on_exit(died_ns, status, reason, detail)

    def _retire(self, occupant: Occupant) -> None:
        """Let go of an occupant that has ended: its sockets, its fds in the
        holder, its uid."""
        for keeper in self.keepers.values():
            keeper.detach()
        occupant.link.close()
        if self._occupant_held:
            children.host().unhold(holdnames.occupant(self.id))
            self._occupant_held = False
        self.uids.give_back(occupant.uid)
        self.occupant = None
        self.on_change()

    def _blame(self) -> str | None:
        """The front-end message an emulator was right to refuse (it exited
        with the protocol status), if a keeper had one in flight; the keeper
        drops it, so it is never sent again."""
        for keeper in self.keepers.values():  # one message in flight per emulator
            text = keeper.blame_pending()
            if text:
                return text
        return None

    def _start_failed(self, error: Exception) -> None:
        if isinstance(error, HandOverFailed):  # a process that was to be ours ended
            self.emit("EMULATOR_EXIT", exit_event(
                self.id, error.pid, ExitReason.START_FAILED, error.status))

    def _serving(self) -> bool:
        return self.occupant is not None

    async def _restart(self, died_ns: int, old_pid: int) -> None:
        """One Start: the warm spare if one is ready and the last start did
        not just fail on one, else a cold start. A failed hand-over raises
        (the policy counts it; the next start is cold)."""
        fresh = self._first_start_due  # a first start, of a device just powered on
        standby = None
        if self.hot_standby is not None:
            standby = await self.hot_standby.standby_for(old_pid, fresh)
        spare = None
        if standby is None and self.spares is not None and not self._cold_next:
            spare = self.spares.take()
        self._cold_next = False
        try:
            if standby is not None:
                via = "hot standby"
                assert self.hot_standby is not None
                occupant = await self.hot_standby.promote(standby)
                self.stats.spare_restarts += 1
            elif spare is not None:
                via = "warm spare"
                occupant = await self._launch_spare(spare, first_start=fresh)
            else:
                via = "cold start"
                occupant = await self._launch_cold(first_start=fresh)
        except HandOverFailed:
            self._cold_next = True
            raise
        finally:
            if self.spares is not None:
                self.spares.replenish()
        self._occupy(occupant)
        if fresh:
            self._first_start_due = False
            LOG.info("emulator %s is a fresh device again (pid %d, %s)", self.id,
                     occupant.proc.pid, via)
            return
        if via != "cold start":
            faults.strike("handover.occupant_installed", occupant.proc.pid)
        else:
            faults.strike("cold.occupant_installed", occupant.proc.pid)
        stall_ms = (now_ns() - died_ns) / 1e6
        self.stats.restarts += 1
        self.stats.last_stall_ms = stall_ms
        self.stats.stalls_ms.append(stall_ms)
        self.emit("EMULATOR_RESTART", {
            "id": self.id, "pid": occupant.proc.pid,
            "restarts": self.stats.restarts, "stall_ms": round(stall_ms, 3),
            "reason": via, "old_pid": old_pid,
        })
        LOG.info("emulator %s restarted (pid %d, %s) %.1f ms after its end", self.id,
                 occupant.proc.pid, via, stall_ms)

    # -- the hot standby (launcher.standby)

    def _drop_standby(self, why: str) -> None:
        """Kill the hot standby, if there is one, before anything else may
        serve the slot or the occupant ends on purpose (see StandbyKeeper.drop)."""
        if self.hot_standby is not None:
            self.hot_standby.drop(why)

    def _no_standby(self) -> contextlib.AbstractAsyncContextManager[None]:
        """No hot standby while the LUNs change (see StandbyKeeper.paused)."""
        if self.hot_standby is None:
            return contextlib.nullcontext()
        return self.hot_standby.paused()

    # -- disks changed through management

    def disk_changes_refused(self, what: str) -> str | None:
        return None  # LUNs come and go through the control link

    def disk(self, disk_id: str) -> DiskSpec | None:
        for disks in self.disks.values():
            for disk in disks:
                if disk.id == disk_id:
                    return disk
        return None

    async def _command(self, command: proto.Command) -> proto.Result:
        """``command``'s answer from the serving emulator. DiskChangeError when
        none comes (no emulator, a timeout, a broken link); the caller holds
        ``_commands`` and decides what a refusal means."""
        occupant = self.occupant
        if occupant is None or occupant.link.closed:
            raise DiskChangeError(f"emulator {self.id} is restarting; try again")
        try:
            return await occupant.link.command(command, COMMAND_TIMEOUT)
        except (TimeoutError, OSError, LinkClosed) as e:
            raise NoAnswer(f"emulator {self.id} did not answer: {e or 'timeout'}") from None

    def _refused(self, result: proto.Result) -> DiskChangeError:
        return DiskChangeError(f"emulator {self.id} refused: {result.error}")

    async def add_disk(self, disk: DiskSpec, opened: int | None = None) -> None:
        """Open the image (or use a copy of ``opened``, an fd management already
        opened and checked; the caller keeps and closes its own), hand its fd
        to the emulator; the guest then sees it.

        One disk change at a time per slot (``_commands``): the LUN check and
        the change it allowed are not separated by another change."""
        async with self._commands, self._no_standby():
            if any(d.lun == disk.lun for d in self.disks[disk.controller]):
                raise DiskChangeError(f"LUN {disk.lun} is already in use on {disk.controller}")
            try:
                fd = emulators.open_disk(str(disk.image), disk.readonly) if opened is None \
                    else os.dup(opened)
            except emulators.DiskOpenError as e:
                raise DiskChangeError(str(e)) from None
            try:
                result = await self._command(proto.LunAdd(
                    disk.controller, disk.lun, disk.id, fd, disk.readonly, disk.block_size,
                ))
                if not result.ok:
                    raise self._refused(result)
            except NoAnswer as e:
                # In doubt: the emulator may have added the LUN and told the guest
                # before it ended, and a guest that lost a disk it was just given
                # sees I/O errors. So the disk stays: the successor's config
                # carries it (and the state store any event not yet delivered).
                LOG.warning("disk %s: %s; it stays attached, served by the emulator's "
                            "successor", disk.id, e)
            except BaseException:
                os.close(fd)
                raise
            self.disk_fds[disk.id] = fd
            self.disks[disk.controller].append(disk)
            self._hold_disk(disk.id)
            self.on_change()

    async def remove_disk(self, disk: DiskSpec) -> None:
        async with self._commands, self._no_standby():
            result = await self._command(proto.LunRemove(disk.controller, disk.lun))
            if not result.ok:
                raise self._refused(result)
            self.disks[disk.controller] = [
                d for d in self.disks[disk.controller] if d.id != disk.id
            ]
            with contextlib.suppress(OSError, KeyError):
                os.close(self.disk_fds.pop(disk.id))
            children.host().unhold(holdnames.disk(self.id, disk.id))
            self.on_change()

    async def resize_disk(self, disk: DiskSpec, size: int) -> int:
        """Grow ``disk`` to ``size`` bytes; the guest sees the new capacity.
        Returns the old size.

        The file is the one behind the fd held for the disk (a path may name
        another file by now), and the order is what keeps the guest safe: the
        emulator agrees to the size first (LUN_RESIZE_CHECK, nothing changes),
        then the file grows, then the emulator shows the guest the new
        capacity (LUN_RESIZE). A refusal at either step leaves the file at its
        old size, which no guest request reached beyond."""
        async with self._commands, self._no_standby():
            fd = self.disk_fds[disk.id]
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DiskChangeError(f"disk '{disk.id}' is a block device: resize it "
                                      "outside mplaunch")
            problem = resize_problem(st.st_size, size, disk.block_size)
            if problem is not None:
                raise DiskChangeError(problem)
            result = await self._command(proto.LunResizeCheck(disk.controller, disk.lun, size))
            if not result.ok:
                raise self._refused(result)
            grown_under = self.occupant
            os.ftruncate(fd, size)
            faults.strike("disk.resize.after_grow", self.occupant.proc.pid
                          if self.occupant is not None else None)
            resize = proto.LunResize(disk.controller, disk.lun, size)
            try:
                result = await self._command(resize)
            except DiskChangeError as e:
                # Whether the guest was shown the new size is unknown, and the
                # image keeps it (the guest may use it already): the successor,
                # which serves the new size from its start, shows it again.
                result = await self._on_successor(resize, grown_under, e)
            if not result.ok:
                os.ftruncate(fd, st.st_size)
                raise self._refused(result)
            return st.st_size

    async def _on_successor(self, command: proto.LunResize, gone: Occupant | None,
                            error: DiskChangeError) -> proto.Result:
        """`command`'s answer from the first occupant after `gone`, once one
        serves (within RESIZE_SUCCESSOR_WAIT); DiskChangeError after `error`
        if none answers."""
        deadline = asyncio.get_running_loop().time() + RESIZE_SUCCESSOR_WAIT
        while asyncio.get_running_loop().time() < deadline and not self._stopping:
            occupant = self.occupant
            if occupant is not None and occupant is not gone and not occupant.link.closed:
                try:
                    return await self._command(command)
                except DiskChangeError as e:
                    error, gone = e, occupant
            await asyncio.sleep(0.05)
        raise DiskChangeError(f"{error}; the image now holds {command.size} bytes, and no "
                              f"successor showed the guest that size within "
                              f"{RESIZE_SUCCESSOR_WAIT:.0f} s: it sees it once it rescans "
                              "the disk") from None

    async def stop(self) -> int | None:
        self._stopping = True
        self._drop_standby("the slot stops")
        self.policy.on_stop_requested(now_ns())
        occupant = self.occupant
        if occupant is None:
            return None
        status = await occupant.proc.stop()
        occupant.link.close()
        self.uids.give_back(occupant.uid)
        return status

    def close(self) -> None:
        self._drop_standby("the slot closes")
        if self.hot_standby is not None:
            self.hot_standby.close()
        if self.occupant is not None:
            self.occupant.link.close()
        for keeper in self.keepers.values():
            keeper.close()
        self.keepers.clear()
        for sock in (*self.qemu_ends.values(), *self._keeper_ends.values(),
                     *self.listeners.values()):
            sock.close()
        self.qemu_ends.clear()
        self._keeper_ends.clear()
        for fd in (*self.disk_fds.values(), self.state_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.disk_fds.clear()
        self.state_fd = -1

