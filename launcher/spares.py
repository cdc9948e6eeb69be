"""Warm spare emulators: started, confined and waiting before they are needed.

A restart takes the VM's warm spare when one is ready: an emulator process
already started, confined and waiting, which receives the whole assignment
(config and fds) in one control message. That skips the interpreter
start-up that dominates a cold restart.

Theory of operation. `SparePool.run` is one task in the VM's task group and
the only owner of the spare while it waits: it starts a spare, watches it
(its exit, and a heartbeat like any emulator's, so a frozen spare is found
within its hang timeout rather than at the next restart), and when the
spare dies or hangs it kills it, reaps it and starts another. `take` moves
the spare to a slot, which owns it (and its heartbeat) from then on; the
pool starts the next one when the slot calls `replenish` after its restart,
so that start-up does not compete with the hand-over for the CPU. A spare
that fails to start is tried again after `SPARE_RETRY_S`: without one, the
next restart pays a cold start, which is slower but still correct.

Hot standby. The VM's first emulator of kind scsi makes the pool's spare
its hot standby (launcher.slots, `next_spare`): the spare then follows that
emulator and takes its place on its death. A VM with one emulator keeps no
warm spare beside its standby (one process, not two); a VM with several
keeps one (`keep_warm`) for the others, whose restarts take it as before.
`renew` (an upgrade) starts a new generation: standbys of an older one are
dropped by their slots (`on_renew`), so the code installed now is what
takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from emulators.config import EmulatorConfig
from launcher import emulators
from launcher.heartbeat.link import ControlLink, LinkClosed, ProtocolBroken, control_pair
from launcher.occupant import EXIT_GRACE_S, Occupant
from launcher.sandbox import jail
from launcher.spec import Spec
from launcher.status import LOG
from launcher.uidpool import UidPool

READY_TIMEOUT = 30.0
SPARE_RETRY_S = 1.0
SPARE_START_DELAY_S = 0.1
"""A new spare starts this long after it was asked for (after a restart, as
a rule): an interpreter starting up would compete for the CPU with the guest
and the process taking over, in the very milliseconds the guest waits."""
WARM_SPARE = True


class SparePool:
    """At most one warm spare per VM, replaced after it is used or lost."""

    def __init__(self, spec: Spec, uids: UidPool) -> None:
        self.spec = spec
        self.uids = uids
        self._spare: Occupant | None = None
        self._wanted = asyncio.Event()
        self._taken: asyncio.Future[None] | None = None
        #: A spare is being started: a standby waiting for one asks for no other.
        self._starting = False
        self.closed = False
        self.started = 0
        #: Another spare is kept waiting once one became a standby.
        self.keep_warm = len(spec.emulators) > 1
        self.generation = 0
        #: Called (synchronously) when `renew` starts a new generation.
        self.on_renew: list[Callable[[], None]] = []
        self._latest: Occupant | None = None
        self._controllers = max(
            (len(spec.controllers_of(e.id)) for e in spec.emulators), default=1
        )
        # A spare may replace any emulator: judge it by the strictest limits.
        self.heartbeat_ms = min((e.heartbeat_ms for e in spec.emulators), default=500)
        self.hang_timeout_ms = min((e.hang_timeout_ms for e in spec.emulators), default=2000)

    def replenish(self) -> None:
        """Ask for a spare (the pool's task starts one if none is waiting)."""
        if not self.closed and self.spec.emulators:
            self._wanted.set()

    async def run(self) -> None:
        """The pool's life, until cancelled: keep one spare waiting.

        Returns only when there is nothing to do (no emulators); errors in
        starting or watching a spare are logged and retried here, so this task
        never fails for a reason a retry can mend."""
        if not self.spec.emulators:
            return
        while not self.closed:
            await self._wanted.wait()
            self._wanted.clear()
            if self._spare is not None:
                continue
            self._starting = True
            try:
                await asyncio.sleep(SPARE_START_DELAY_S)
                spare = await self._start_one()
            finally:
                self._starting = False
            if spare is None:
                await asyncio.sleep(SPARE_RETRY_S)
                self._wanted.set()
                continue
            if await self._keep(spare):
                self._wanted.set()  # lost while waiting: replace it now

    async def _start_one(self) -> Occupant | None:
        """A new spare, confined and ready; None (logged) if that failed."""
        uid = self.uids.take()
        if uid is None:
            LOG.warning("no warm spare: uid_range has no uid left for one")
            return None
        ours, theirs = control_pair()
        try:
            base = self.spec.emulators[0]
            emulator = dataclasses.replace(base, id="spare")
            config = EmulatorConfig("spare", (), control_fd=theirs.fileno())
            res = emulators.EmulatorResources.for_vm(
                self.spec, emulator, config, uid, self._controllers
            )
            res.nproc = jail.SPARE_NPROC  # it may wait in a thread as a hot standby
            command = [sys.executable, "-I", "-m", "emulators", "--spare",
                       str(theirs.fileno()), self.spec.vm.sandbox.value]
            proc = await emulators.start(res, command=command, quiet=True, tag="spare")
        except BaseException as e:
            ours.close()
            self.uids.give_back(uid)
            if not isinstance(e, Exception):
                raise
            LOG.warning("warm spare failed to start: %s; trying again in %.0f s", e,
                        SPARE_RETRY_S)
            return None
        finally:
            theirs.close()
        spare = Occupant(proc, ControlLink("spare", ours), uid, generation=self.generation)
        try:
            await asyncio.wait_for(asyncio.shield(spare.link.ready), READY_TIMEOUT)
        except (TimeoutError, LinkClosed) as e:
            LOG.warning("warm spare (pid %d) never said ready (%s); trying again in %.0f s",
                        proc.pid, e or "timeout", SPARE_RETRY_S)
            await self._discard(spare)
            return None
        except BaseException:
            await self._discard(spare)
            raise
        self.started += 1
        self._latest = spare
        LOG.debug("warm spare ready (pid %d, uid %d)", proc.pid, uid)
        return spare

    async def _keep(self, spare: Occupant) -> bool:
        """Hold `spare` until a slot takes it (False) or it dies or hangs (True,
        once it is killed and reaped)."""
        self._spare = spare
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._taken = taken
        spare.link.watch(self.heartbeat_ms, self.hang_timeout_ms)
        try:
            async with spare.link.beating():
                waits: set[asyncio.Future[Any]] = {spare.proc.exited, spare.link.hung, taken}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if self._spare is spare:
                self._spare = None
                await self._discard(spare)
            raise
        if self._spare is not spare:
            return False  # a slot owns it now
        self._spare = None
        if isinstance(spare.link.hung.result() if spare.link.hung.done() else None,
                      ProtocolBroken):
            # A closed control channel is usually a death seen early: say so.
            await asyncio.wait({spare.proc.exited}, timeout=EXIT_GRACE_S)
        if spare.proc.exited.done():
            LOG.warning("warm spare (pid %d) died while waiting", spare.proc.pid)
        else:
            verdict = spare.link.hung.result()
            LOG.warning("warm spare (pid %d) hung while waiting: %s; killing it",
                        spare.proc.pid, verdict.reason)
            spare.proc.kill()
        await self._discard(spare)
        return True

    async def _discard(self, spare: Occupant) -> None:
        """Close, stop, reap and give the uid back; safe to call twice."""
        spare.link.close()
        await spare.proc.stop()
        self.uids.give_back(spare.uid)

    def take(self) -> Occupant | None:
        """The waiting spare, if it is alive and not judged hung; the caller
        owns it from now on (its heartbeat, its stop, its uid)."""
        spare = self._spare
        if spare is None or spare.proc.exited.done() or spare.link.hung.done():
            return None
        self._spare = None
        if self._taken is not None and not self._taken.done():
            self._taken.set_result(None)
        return spare

    async def next_spare(self) -> Occupant:
        """The next spare ready, for a hot standby (now the caller's); one is
        started if none waits. Waits as long as it takes."""
        while True:
            spare = self.take()
            if spare is not None:
                if self.keep_warm:
                    self.replenish()
                return spare
            if not self._starting:  # else the one starting is this one's
                self.replenish()
            await asyncio.sleep(0.02)

    async def renew(self) -> None:
        """Replace the waiting spare by one started now (from the code installed
        now: an upgrade of the emulators starts here); standbys of the old
        code are dropped by their slots."""
        self.generation += 1
        self._latest = None
        spare = self.take()
        if spare is not None:
            await self._discard(spare)
        for renewed in list(self.on_renew):
            renewed()
        self.replenish()

    async def ready_spare(self, timeout: float) -> Occupant:
        """The waiting spare once there is one (TimeoutError after `timeout`);
        it stays the pool's (or it is a standby of the current generation)."""
        async with asyncio.timeout(timeout):
            while True:
                for spare in (self._spare, self._latest):
                    # A standby of this generation counts: it is the one
                    # that takes over the slot it follows.
                    if spare is not None and spare.link.ready.done() and \
                            not spare.proc.exited.done() and \
                            spare.generation == self.generation:
                        return spare
                await asyncio.sleep(0.02)

    @property
    def spare_pid(self) -> int | None:
        return self._spare.proc.pid if self._spare else None

    async def close(self) -> None:
        """Stop the waiting spare (after `run` was cancelled, or instead of it)."""
        self.closed = True
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(ProcessLookupError):
                await self._discard(spare)
