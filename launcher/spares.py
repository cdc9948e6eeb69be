"""Warm spare emulators: started, confined and waiting before they are needed.

A restart takes the VM's warm spare when one is ready: an emulator process
already started, confined and waiting, which receives the whole assignment
(config and fds) in one control message. That skips the interpreter
start-up that dominates a cold restart. The pool then starts a new spare.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys

from emulators.config import EmulatorConfig
from launcher import emulators
from launcher.heartbeat.link import ControlLink, control_pair
from launcher.occupant import Occupant
from launcher.spec import Spec
from launcher.status import LOG
from launcher.uidpool import UidPool

READY_TIMEOUT = 30.0
SPARE_RETRY_S = 1.0
WARM_SPARE = True


class SparePool:
    """At most one warm spare per VM, replaced after it is used."""

    def __init__(self, spec: Spec, uids: UidPool) -> None:
        self.spec = spec
        self.uids = uids
        self._spare: Occupant | None = None
        self._starting: asyncio.Task[None] | None = None
        self.closed = False
        self.started = 0
        controllers = max((len(spec.controllers_of(e.id)) for e in spec.emulators), default=1)
        self._controllers = controllers

    def replenish(self) -> None:
        if self.closed or self._spare is not None or not self.spec.emulators:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._start())

    async def _start(self) -> None:
        uid = self.uids.take()
        if uid is None:
            LOG.warning("no warm spare: uid_range has no uid left for one")
            return
        ours, theirs = control_pair()
        try:
            base = self.spec.emulators[0]
            emulator = dataclasses.replace(base, id="spare")
            config = EmulatorConfig("spare", (), control_fd=theirs.fileno())
            res = emulators.EmulatorResources.for_vm(
                self.spec, emulator, config, uid, self._controllers
            )
            command = [sys.executable, "-I", "-m", "emulators", "--spare",
                       str(theirs.fileno()), self.spec.vm.sandbox.value]
            proc = await emulators.start(res, command=command, quiet=True)
        except BaseException as e:
            ours.close()
            self.uids.give_back(uid)
            if not isinstance(e, Exception):
                raise
            LOG.warning("warm spare failed to start: %s; trying again in %.0f s", e,
                        SPARE_RETRY_S)
            self._retry_later()
            return
        finally:
            theirs.close()
        link = ControlLink("spare", ours)
        try:
            await asyncio.wait_for(asyncio.shield(link.ready), READY_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            link.close()
            await proc.stop()
            self.uids.give_back(uid)
            if not self.closed:
                LOG.warning("warm spare (pid %d) never said ready", proc.pid)
                self._retry_later()
            return
        if self.closed:
            link.close()
            await proc.stop()
            self.uids.give_back(uid)
            return
        self._spare = Occupant(proc, link, uid)
        self.started += 1
        asyncio.create_task(self._watch(self._spare))
        LOG.debug("warm spare ready (pid %d, uid %d)", proc.pid, uid)

    async def _watch(self, spare: Occupant) -> None:
        """A spare that dies while waiting is replaced (and never handed out)."""
        await asyncio.shield(spare.proc.exited)
        if self._spare is spare:
            self._spare = None
            spare.link.close()
            self.uids.give_back(spare.uid)
            if not self.closed:
                LOG.warning("warm spare (pid %d) died while waiting", spare.proc.pid)
                self.replenish()

    def _retry_later(self) -> None:
        """A spare that failed to start is tried again, not given up on: without
        one, the next restart pays a cold start."""
        if not self.closed:
            asyncio.get_running_loop().call_later(SPARE_RETRY_S, self.replenish)

    def take(self) -> Occupant | None:
        spare = self._spare
        if spare is None or spare.proc.exited.done():
            return None
        self._spare = None
        return spare

    @property
    def spare_pid(self) -> int | None:
        return self._spare.proc.pid if self._spare else None

    async def close(self) -> None:
        self.closed = True
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.link.close()
            await spare.proc.stop()
            self.uids.give_back(spare.uid)
