"""The hot standby of a slot: a spare that already serves when its occupant dies.

Theory of operation. A warm spare still pays, at a restart, for the
keepers' replay, mapping guest RAM and building the rings, all after the
launcher has seen the exit and the policy has decided. A hot standby has
all that done beforehand and does not wait for the launcher. One slot per
VM keeps one (`keeps_standby`): that of the first [[emulator]] of kind
scsi, not in backend-only mode (each new QEMU makes the emulator a fresh
device), not with restart = "never".

How it follows. While the slot's occupant serves, `StandbyKeeper.keep` (a
child task of the slot's `supervise`) takes the pool's next spare and
assigns it the slot's config, with fresh sockets to the keepers and one
more fd: a dup of the occupant's pidfd (`predecessor_fd`). Each keeper
makes the spare's socket a follower of its session
(launcher.sessionkeeper): the replay of its record at once, then every
message the record takes, so nothing is replayed at takeover. Its heartbeat
runs while it waits. Until that pidfd is readable the standby touches
nothing (emulators.process, emulators.controller): no ring started, no kick
read, no call signalled, nothing written in the state store. When the
occupant dies, for any reason, the standby sees it on the pidfd and serves
at once; the slot's restart then PROMOTEs it (`promote`), the keepers
relay to it on the sockets it followed on (re-sending a message in
flight), the slot makes it the occupant, and the next standby is made.

Never two serving. So a standby is dropped (`drop`: SIGKILL, its keepers'
sockets closed) before anything else may serve the slot or before the
occupant is ended on purpose with no takeover wanted, and, when another
process is to take over, its death is awaited first: a restart that cannot
promote it (it is still being assigned, it follows a process other than
the one that ended, or it is the first start of a fresh device;
`standby_for`) kills it and waits before the warm spare or a cold start;
the slot's stop, a power-off in backend-only mode, a disk added, removed
or resized (`paused`: its LUNs would be stale; a new standby is made after
the change), an upgrade (`SparePool.renew`) and a policy answer without a
start (give-up, a clean exit) all drop it. A standby that dies, freezes
(its heartbeat) or cannot keep up with its keepers is killed, reaped, its
uid given back, and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import select
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from emulators import faults
from emulators.config import EmulatorConfig
from launcher.heartbeat.link import LinkClosed
from launcher.occupant import HandOverFailed, Occupant, hand_over, reap
from launcher.restart_policy import describe_status
from launcher.sessionkeeper import SessionKeeper
from launcher.spares import SparePool
from launcher.spec import EmulatorSpec, Spec
from launcher.statestore import liveness
from launcher.status import LOG
from launcher.uidpool import UidPool

HOT_STANDBY = True
"""Whether the VM's first scsi emulator keeps a hot standby."""
STANDBY_RECHECK_S = 0.05
"""How often the standby task looks again for an occupant to stand by for."""
LIVENESS_ENV = "MPLAUNCH_STANDBY_LIVENESS"
""""0" in mplaunch's environment: no liveness page, so a standby learns of
its predecessor's death from the pidfd alone (bench/recovery.py
``--pidfd-only`` measures the difference)."""
LIVENESS_LOCK = os.environ.get(LIVENESS_ENV, "1") != "0"

ConfigMaker = Callable[[], tuple[EmulatorConfig, dict[str, socket.socket], list[socket.socket]]]
"""The slot's config for a next occupant, with fresh sockets to the keepers:
(config, the keepers' ends by controller, the emulator's ends)."""


def keeps_standby(spec: Spec, emulator: EmulatorSpec, listen: bool) -> bool:
    """Whether `emulator`'s slot keeps the VM's one hot standby: the first
    scsi emulator, unless in backend-only mode (`listen`) or never restarted.
    The spec's author says which emulator matters most by putting it first."""
    return bool(HOT_STANDBY and not listen and spec.emulators and emulator.id == next(
        (e.id for e in spec.emulators if e.kind == "scsi"), None)
        and emulator.restart != "never")


@dataclass
class Standby:
    """A spare assigned to follow the occupant `for_pid`; `following` once it
    answered its assignment and the keepers feed it. `over` says why its
    watch ends: "promoted" (it is the occupant now) or why it was dropped."""

    occupant: Occupant
    sockets: dict[str, socket.socket]
    for_pid: int
    over: asyncio.Future[str]
    following: bool = False


class StandbyKeeper:
    """The hot standby of one slot, owned by it: made, watched, promoted or
    dropped here; the slot decides when (see the module docstring)."""

    def __init__(
        self,
        emulator: EmulatorSpec,
        keepers: Mapping[str, SessionKeeper],
        spares: SparePool,
        uids: UidPool,
        occupant: Callable[[], Occupant | None],
        config: ConfigMaker,
        may_stand_by: Callable[[], bool],
    ) -> None:
        """`keepers`: the slot's own mapping, read at each use (the slot
        fills it anew after a power-off). `occupant`: the slot's occupant
        now. `may_stand_by`: False while the slot stops or is being made a
        fresh device. The pool's renewals drop the standby."""
        self.emulator = emulator
        self.id = emulator.id
        self.keepers = keepers
        self.spares = spares
        self.uids = uids
        self._occupant = occupant
        self._config = config
        self._may_stand_by = may_stand_by
        self.standby: Standby | None = None
        self._paused = 0  # disk changes under way
        #: The slot's liveness page, in every occupant's and standby's config.
        self.liveness_fd = liveness.create() if LIVENESS_LOCK else -1
        spares.on_renew.append(lambda: self.drop("the emulator code was renewed"))

    def close(self) -> None:
        """Close the liveness page (the slot closes); its processes keep their maps."""
        if self.liveness_fd >= 0:
            os.close(self.liveness_fd)
            self.liveness_fd = -1

    def drop(self, why: str) -> None:
        """Kill the standby now (its watch reaps it and gives its uid back)
        and stop feeding it; a no-op without one. Synchronous, so that it can
        come before whatever ends the occupant on purpose: a SIGKILL sent
        first is delivered before the standby can see the occupant's end."""
        standby, self.standby = self.standby, None
        if standby is None:
            return
        LOG.debug("emulator %s: standby pid %d dropped: %s", self.id,
                  standby.occupant.proc.pid, why)
        if not standby.occupant.proc.exited.done():
            standby.occupant.proc.kill()
        for cid, sock in standby.sockets.items():
            keeper = self.keepers.get(cid)
            if keeper is not None and keeper.following is sock:
                keeper.unfollow()
            else:
                sock.close()
        if not standby.over.done():
            standby.over.set_result(why)

    async def standby_for(self, old_pid: int, fresh: bool) -> Standby | None:
        """The standby to promote for the occupant `old_pid` that ended, or
        None once any standby there was is dead (never two serving)."""
        standby = self.standby
        if standby is None:
            return None
        if standby.following and standby.for_pid == old_pid and not fresh \
                and not standby.occupant.proc.exited.done():
            return standby
        self.drop("it cannot take over this restart")
        await asyncio.shield(standby.occupant.proc.exited)
        return None

    async def promote(self, standby: Standby) -> Occupant:
        """Make the standby (already serving the rings since the old
        occupant's death) the occupant: PROMOTE, then the keepers relay to it
        on the sockets it followed on. HandOverFailed with it killed if it
        does not answer within its hang timeout."""
        spare = standby.occupant
        if not standby.over.done():
            standby.over.set_result("promoted")
        self.standby = None
        why = None
        try:
            result = await spare.link.promote(self.emulator.hang_timeout_ms / 1000)
            if not result.ok:
                why = f"refused: {result.error}"
        except (TimeoutError, OSError, LinkClosed) as e:
            why = str(e) or "no answer"
        if why is not None:
            for sock in standby.sockets.values():
                for keeper in self.keepers.values():
                    if keeper.following is sock:
                        keeper.unfollow()
                sock.close()
            spare.link.close()
            status = await reap(spare.proc)
            self.uids.give_back(spare.uid)
            raise HandOverFailed(spare.proc.pid, why, status)
        faults.strike("handover.answer_received", spare.proc.pid)
        for cid, sock in standby.sockets.items():
            self.keepers[cid].attach(sock, replay=False, resend=True)
        spare.link.name = self.id
        spare.proc.id = self.id
        spare.backends = dict(standby.sockets)
        return spare

    async def keep(self) -> None:
        """Keep a standby following the occupant, for as long as the slot
        supervises; cancelled by the slot's `supervise`. Never raises but
        CancelledError: a standby that fails is logged and replaced."""
        while True:
            occupant = self._occupant()
            if occupant is None or self._paused or self.standby is not None \
                    or occupant.proc.exited.done() or occupant.proc.child.pidfd < 0 \
                    or not self._may_stand_by():
                await asyncio.sleep(STANDBY_RECHECK_S)
                continue
            spare = await self.spares.next_spare()
            try:
                await self._stand_by(spare)
            except Exception as e:  # a bug: say it, and try again later
                LOG.error("emulator %s: standby failed: %r", self.id, e)
                await asyncio.sleep(STANDBY_RECHECK_S)

    async def _stand_by(self, spare: Occupant) -> None:
        """Assign `spare` as the standby of the occupant now, and watch it
        until it is promoted or dropped; anything but a promotion ends with
        it killed, reaped and its uid given back."""
        occupant = self._occupant()
        promoted = False
        standby: Standby | None = None
        try:
            if occupant is None or occupant.proc.exited.done() or self._paused \
                    or occupant.proc.child.pidfd < 0 or _ended(occupant.proc.child.pidfd):
                return  # dead already, maybe before its exit was seen: no standby
            config, ours, theirs = self._config()
            pidfd = os.dup(occupant.proc.child.pidfd)
            theirs_fds = [pidfd]
            config = dataclasses.replace(config, predecessor_fd=pidfd)
            over: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            standby = Standby(spare, ours, occupant.proc.pid, over)
            self.standby = standby
            spare.link.watch(self.emulator.heartbeat_ms, self.emulator.hang_timeout_ms)

            def follow() -> None:
                for cid, sock in ours.items():
                    if not self.keepers[cid].follow(sock, self._follower_lost):
                        self.drop("its session could not be sent")
                        return

            try:
                await hand_over(spare, config, follow)
            except HandOverFailed as e:
                LOG.warning("emulator %s: %s", self.id, e)
                self.drop("its assignment failed")
                return
            finally:
                for sock in theirs:
                    sock.close()
                for fd in theirs_fds:
                    os.close(fd)
            if self.standby is not standby:
                return  # dropped meanwhile
            standby.following = True
            LOG.debug("emulator %s: standby pid %d follows pid %d", self.id, spare.proc.pid,
                      occupant.proc.pid)
            async with spare.link.beating():
                waits: set[asyncio.Future[Any]] = {spare.proc.exited, spare.link.hung, over}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if over.done() and over.result() == "promoted":
                promoted = True
                return
            if any(keeper.closed for keeper in self.keepers.values()):
                # QEMU closed the session (a power-off, QEMU's exit): the
                # keeper closed the standby's socket too, and it ended.
                LOG.debug("emulator %s: its standby (pid %d) ended with the session", self.id,
                          spare.proc.pid)
            elif spare.proc.exited.done():
                LOG.warning("emulator %s: its standby (pid %d) died (%s)", self.id,
                            spare.proc.pid, describe_status(spare.proc.exited.result()))
            elif spare.link.hung.done():
                LOG.warning("emulator %s: its standby (pid %d) %s; killing it", self.id,
                            spare.proc.pid, spare.link.hung.result().reason)
        finally:
            if not promoted:
                if standby is not None and self.standby is standby:
                    self.drop("its watch ended")
                spare.link.close()
                await reap(spare.proc)
                self.uids.give_back(spare.uid)

    def _follower_lost(self, why: str) -> None:
        self.drop(f"it fell behind its session keepers: {why}")

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No standby while the LUNs change: its config would name the old
        ones, its LUNs the old sizes. The one there is dropped (and dead
        before the change); the next is made with the new config afterwards."""
        self._paused += 1
        try:
            standby = self.standby
            self.drop("a disk is being added or removed")
            if standby is not None:
                await asyncio.shield(standby.occupant.proc.exited)
            yield
        finally:
            self._paused -= 1


def _ended(pidfd: int) -> bool:
    """Whether the process behind `pidfd` has ended (its pidfd is readable),
    though the launcher may not have seen its exit yet: a standby assigned to
    it would take over at once, before it holds the session."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
