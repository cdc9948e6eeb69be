"""Emulators across their lives: one slot per [[emulator]], many processes.

Theory of operation. A slot owns everything that must outlive one emulator
process: the opened disk images, the state store file, QEMU's ends of the
vhost-user sockets and the session keepers that hold them. A process is
only the current occupant: it gets fresh socketpairs to the keepers, the
same disk fds and the same state store. When it ends, the restart policy
decides; a restart replays each keeper's recorded session to the new
process, which resumes the rings from the state store, so the guest sees
only a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from launcher import emulators
from launcher.restart_policy import (
    ExitReason,
    GiveUp,
    Nothing,
    RestartPolicy,
    Start,
    describe_status,
)
from launcher.runfolder import RunFolder
from launcher.sandbox.jail import ADDRESS_SPACE_HEADROOM
from launcher.sessionkeeper import SessionKeeper
from launcher.spec import EmulatorSpec, Spec
from launcher.statestore import layout
from launcher.status import LOG

REQUEST_QUEUES_MAX = 16
QUEUE_SLOTS = 2 + REQUEST_QUEUES_MAX
LUN_SLOTS = 256


def now_ns() -> int:
    return time.monotonic_ns()


@dataclass
class SlotStats:
    """What management and the tests want to know about a slot."""

    starts: int = 0
    restarts: int = 0
    last_exit: str | None = None
    last_stall_ms: float | None = None
    stalls_ms: list[float] = field(default_factory=list)


class EmulatorSlot:
    """One emulator of the spec, restarted as its policy says."""

    def __init__(
        self,
        spec: Spec,
        emulator: EmulatorSpec,
        run: RunFolder,
        on_give_up: Callable[[GiveUp], Awaitable[None]],
    ) -> None:
        self.spec = spec
        self.emulator = emulator
        self.id = emulator.id
        self.run_folder = run
        self.controllers = spec.controllers_of(emulator.id)
        self.policy = RestartPolicy.from_spec(emulator, log=LOG.info)
        self.stats = SlotStats()
        self.proc: emulators.EmulatorProcess | None = None
        self._on_give_up = on_give_up
        self._stopping = False
        self.disk_fds: dict[str, int] = {}
        self.qemu_ends: dict[str, socket.socket] = {}
        self._keeper_ends: dict[str, socket.socket] = {}
        self.keepers: dict[str, SessionKeeper] = {}
        self.state_fd = -1
        try:
            for controller in self.controllers:
                for disk in spec.disks_of(controller.id):
                    self.disk_fds[disk.id] = emulators.open_disk(str(disk.image), disk.readonly)
                qemu_end, keeper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                qemu_end.set_inheritable(True)
                self.qemu_ends[controller.id] = qemu_end
                self._keeper_ends[controller.id] = keeper_end
            shape = layout.Layout(len(self.controllers), QUEUE_SLOTS, LUN_SLOTS)
            self.state_fd = layout.create(run.state_file(emulator.id), shape)
        except BaseException:
            self.close()
            raise

    @property
    def uid(self) -> int:
        return self.spec.vm.uid_range[0] + self.spec.emulators.index(self.emulator)

    def start_keepers(self, on_qemu_closed: Callable[[str], None]) -> None:
        """Keepers hold QEMU's sessions; QEMU's ends are then QEMU's alone."""
        for controller in self.controllers:
            self.keepers[controller.id] = SessionKeeper(
                controller.id,
                self._keeper_ends.pop(controller.id),
                num_queues=2 + controller.queues,
                on_qemu_closed=on_qemu_closed,
            )

    def close_qemu_ends(self) -> None:
        """After QEMU has inherited them, the launcher's copies must go, or
        QEMU's exit would not be seen as the sockets closing."""
        for sock in self.qemu_ends.values():
            sock.close()
        self.qemu_ends.clear()

    # -- processes

    def _resources(
        self, first_start: bool
    ) -> tuple[emulators.EmulatorResources, dict[str, socket.socket]]:
        ours: dict[str, socket.socket] = {}
        theirs: list[socket.socket] = []
        controllers = []
        for controller in self.controllers:
            mine, emu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours[controller.id] = mine
            theirs.append(emu_end)
            luns = tuple(
                LunConfig(d.lun, d.id, self.disk_fds[d.id], d.readonly, d.block_size)
                for d in self.spec.disks_of(controller.id)
            )
            controllers.append(
                ControllerConfig(controller.id, emu_end.fileno(), controller.queues, luns)
            )
        config = EmulatorConfig(
            self.id, tuple(controllers), state_fd=self.state_fd, first_start=first_start
        )
        res = emulators.EmulatorResources(self.emulator, config, emulator_ends=theirs)
        res.sandbox = self.spec.vm.sandbox
        res.uid = self.uid
        ram = self.spec.vm.memory * max(1, len(controllers))
        res.address_space = ram + ADDRESS_SPACE_HEADROOM
        return res, ours

    async def _launch(self, first_start: bool) -> None:
        res, ours = self._resources(first_start)
        try:
            self.proc = await emulators.start(res)
        except BaseException:
            for sock in ours.values():
                sock.close()
            raise
        finally:
            res.close_emulator_side()
        for cid, sock in ours.items():
            self.keepers[cid].attach(sock, replay=not first_start)
        self.stats.starts += 1
        self.policy.on_started(now_ns())

    async def start(self) -> None:
        self.policy.start(now_ns())
        await self._launch(first_start=True)

    async def supervise(self) -> None:
        """Watch the process; restart it as the policy decides. Returns when the
        slot stops for good (stop requested, clean end, or give-up)."""
        while not self._stopping and self.proc is not None:
            proc = self.proc
            status = await asyncio.shield(proc.exited)
            died_ns = now_ns()
            for keeper in self.keepers.values():
                keeper.detach()
            if self._stopping:
                return
            reason = ExitReason.EXITED_CLEAN if status == 0 else ExitReason.CRASHED
            self.stats.last_exit = describe_status(status)
            if status != 0:
                LOG.warning("emulator %s died (%s)", self.id, self.stats.last_exit)
            actions = self.policy.on_exit(died_ns, status, reason)
            while actions:
                action = actions.pop(0)
                if isinstance(action, Start):
                    await self._restart(died_ns)
                elif isinstance(action, GiveUp):
                    self.proc = None
                    await self._on_give_up(action)
                    return
                elif isinstance(action, Nothing):
                    deadline = self.policy.next_deadline_ns()
                    if deadline is None:
                        self.proc = None
                        return
                    await asyncio.sleep(max(0, deadline - now_ns()) / 1e9)
                    if self._stopping:
                        return
                    actions = self.policy.tick(now_ns())

    async def _restart(self, died_ns: int) -> None:
        await self._launch(first_start=False)
        stall_ms = (now_ns() - died_ns) / 1e6
        self.stats.restarts += 1
        self.stats.last_stall_ms = stall_ms
        self.stats.stalls_ms.append(stall_ms)
        LOG.info("emulator %s restarted (pid %d) %.1f ms after its end", self.id,
                 self.proc.pid if self.proc else -1, stall_ms)

    async def stop(self) -> int | None:
        self._stopping = True
        self.policy.on_stop_requested(now_ns())
        if self.proc is None:
            return None
        return await self.proc.stop()

    def close(self) -> None:
        for keeper in self.keepers.values():
            keeper.close()
        self.keepers.clear()
        for sock in (*self.qemu_ends.values(), *self._keeper_ends.values()):
            sock.close()
        self.qemu_ends.clear()
        self._keeper_ends.clear()
        for fd in (*self.disk_fds.values(), self.state_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.disk_fds.clear()
        self.state_fd = -1
