"""One ``lsi`` emulator across the lives of its remote processes.

Theory of operation. The slot owns what must outlive one remote process:
the opened disk images (their fds are handed to every remote, which opens
nothing itself), the VM's QEMU's end of the proxy's socketpair (until QEMU
inherits it) and the mpqemu relay holding the other end. A remote process
(:class:`launcher.lsi.remote.RemoteProcess`) is only the current occupant:
it gets a uid leased for its life, the same disk fds, and its own link,
which the relay is attached to. Once attached, the relay replays what the
proxy set up (guest memory, interrupt eventfds, PCI config) and re-sends
the access the proxy waits on, so the VM's QEMU never sees the link break.

While a remote serves, `_serve` watches four things: its exit, its
heartbeat (``query-status`` on its QMP monitor every ``heartbeat_ms``; no
answer within ``hang_timeout_ms`` and it is killed), the relay's report of
a remote fault (a malformed message, or its link ending), and a restart
asked for through management. Whichever comes first ends the occupant; the
same restart policy as the ``scsi`` kind decides what follows, with the
same events. There is no warm spare for this kind: every start is cold
(QEMU's own start-up and the sandbox checks), and the stall is from the
end being seen to the new remote being attached to the relay.

Disk changes at run time are refused (:class:`DiskChangeError`): the
remote's disks are fixed by its command line, so that every successor
starts with exactly what its predecessor served.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from launcher.heartbeat.detector import NoReply
from launcher.heartbeat.link import Judgement, ProtocolBroken
from launcher.lsi.remote import HeartbeatLost, RemoteDisk, RemoteProcess
from launcher.mpqemu.relay import MpqemuRelay
from launcher.occupant import EXIT_GRACE_S, Ending, exit_event, hang_event, now_ns
from launcher.restart_policy import (
    ExitReason,
    GiveUp,
    PolicyAction,
    RestartPolicy,
    describe_status,
)
from launcher.runfolder import RunFolder
from launcher.slotbase import DiskChangeError, PolicyDriven, SlotSnapshot, SlotStats
from launcher.spec import DiskSpec, EmulatorSpec, Spec
from launcher.status import LOG
from launcher.uidpool import UidPool

KIND = "lsi"
ANNOUNCE_RESET = True
"""After a restart, make the new controller report a SCSI bus reset
(`RemoteSlot._announce_reset`); without it the guest finds out by command
timeouts (30 s by default, then 5 s per failed abort and device reset)."""
COMMAND_TIMEOUT = 5.0
BAR_WAIT_S = 1.0
SCNTL1 = 0x01
"""SCSI control 1, and its bit that asserts the bus's RST line (53C895A)."""
SCNTL1_RST = 0x08
LSI_VENDOR = 0x1000


async def _io_bar(remote: RemoteProcess) -> int | None:
    """The I/O port the guest gave the controller's registers (BAR 0), as
    the remote sees it after the replay; None before the firmware set it."""
    buses = await remote.qmp.execute("query-pci")
    for bus in buses if isinstance(buses, list) else []:
        for device in bus.get("devices", []):
            if device.get("id", {}).get("vendor") != LSI_VENDOR:
                continue
            for region in device.get("regions", []):
                if region.get("bar") == 0 and region.get("type") == "io":
                    address = int(region.get("address", 0))
                    return address if 0 < address < 0xFFFF else None
    return None


class RemoteSlot(PolicyDriven):
    """One ``lsi`` emulator of the spec: one LSI53C895A controller, served
    by a remote process restarted as its policy says."""

    def __init__(
        self,
        spec: Spec,
        emulator: EmulatorSpec,
        run: RunFolder,
        on_give_up: Callable[[GiveUp], Awaitable[None]],
        uids: UidPool,
    ) -> None:
        self.spec = spec
        self.emulator = emulator
        self.id = emulator.id
        self.controllers = spec.controllers_of(emulator.id)
        if len(self.controllers) != 1:
            raise ValueError(f"emulator {self.id} of kind {KIND!r} serves "
                             f"{len(self.controllers)} controllers; it must serve one")
        self.controller = self.controllers[0]
        self.disks: dict[str, list[DiskSpec]] = {
            self.controller.id: list(spec.disks_of(self.controller.id))}
        self.policy = RestartPolicy.from_spec(emulator, log=LOG.info, log_give_up=LOG.error)
        self.stats = SlotStats()
        self.uids = uids
        self.base_uid = spec.vm.uid_range[0] + spec.emulators.index(emulator)
        self.emit: Callable[[str, dict[str, Any]], None] = lambda name, data: None
        self._on_give_up = on_give_up
        self._stopping = False
        self._restart_requested = asyncio.Event()
        self.remote: RemoteProcess | None = None
        self.uid: int | None = None  # leased for the current remote
        self.relay: MpqemuRelay | None = None
        self.rtt_ms: float | None = None
        #: How long each cold start took, from spawn to attached (ms).
        self.start_ms: list[float] = []
        self._fault: asyncio.Future[str] | None = None
        # The slot's part, empty for this kind: no keepers, no listeners.
        self.keepers: dict[str, object] = {}
        self.listeners: dict[str, socket.socket] = {}
        self.images: dict[str, RemoteDisk] = {}
        self.qemu_ends: dict[str, socket.socket] = {}
        self._relay_end: socket.socket | None = None
        try:
            for disk in self.disks[self.controller.id]:
                self.images[disk.id] = RemoteDisk.open(str(disk.image), disk.lun, disk.readonly)
            qemu_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            qemu_end.set_inheritable(True)
            self.qemu_ends[self.controller.id] = qemu_end
            self._relay_end = relay_end
        except BaseException:
            self.close()
            raise

    @property
    def disk_fds(self) -> dict[str, int]:
        """One fd per disk (the read-write one when there is one)."""
        return {i: d.ro_fd if d.rw_fd is None else d.rw_fd for i, d in self.images.items()}

    def snapshot(self) -> SlotSnapshot:
        remote = self.remote
        live = remote is not None and not remote.exited.done()
        waiting = self.relay is not None and self.relay.waiting_for_reply
        return SlotSnapshot(
            id=self.id,
            pid=remote.pid if remote is not None and live else None,
            uid=self.uid if live else None,
            state=self.policy.state.value,
            uptime_s=round((now_ns() - self.stats.started_ns) / 1e9, 1) if live else None,
            restarts=self.stats.restarts,
            last_exit=self.stats.last_exit,
            last_stall_ms=self.stats.last_stall_ms,
            controllers=(self.controller.id,),
            disks=tuple(d.id for d in self.disks[self.controller.id]),
            heartbeat_rtt_ms=self.rtt_ms if live else None,
            inflight=int(waiting) if live else None,
            completed=None,
            kind=KIND,
            targets=tuple((d.id, d.lun) for d in self.disks[self.controller.id]),
        )

    def start_keepers(self, on_qemu_closed: Callable[[str], None]) -> None:
        """The relay takes mplaunch's end of the proxy's link (this kind's
        keeper); QEMU's end is then QEMU's alone."""
        if self._relay_end is None or self.relay is not None:
            return
        end, self._relay_end = self._relay_end, None
        self.relay = MpqemuRelay(self.controller.id, end, on_qemu_closed, self._remote_fault)

    async def accept_frontends(self) -> None:
        """Nothing to accept: an x-pci-proxy-dev takes only an inherited fd."""

    def close_qemu_ends(self) -> None:
        for sock in self.qemu_ends.values():
            sock.close()
        self.qemu_ends.clear()

    # -- processes

    def _remote_fault(self, reason: str) -> None:
        """The relay detached the remote: it sent what it must not, or its link ended."""
        fault = self._fault
        if fault is not None and not fault.done():
            fault.set_result(reason)

    async def _launch(self) -> RemoteProcess:
        """A new remote, confined, greeted and attached to the relay; raises
        (nothing left running, the uid given back) if not."""
        relay = self.relay
        if relay is None:
            raise RuntimeError(f"emulator {self.id}: no relay (start_keepers not called)")
        uid = self.uids.take(self.base_uid)
        if uid is None:
            raise RuntimeError(f"uid_range has no uid left for emulator {self.id}")
        began = now_ns()
        try:
            remote = await RemoteProcess.start(
                self.controller.id, list(self.images.values()), uid, uid,
                self.spec.vm.memory, self.spec.vm.sandbox)
        except BaseException:
            self.uids.give_back(uid)
            raise
        self._fault = asyncio.get_running_loop().create_future()
        try:
            relay.attach(remote.link)
        except BaseException:
            remote.kill()
            await asyncio.shield(remote.stop())
            self.uids.give_back(uid)
            raise
        took_ms = (now_ns() - began) / 1e6
        self.start_ms.append(took_ms)
        LOG.info("emulator %s: LSI remote pid %d attached, %.0f ms after its spawn",
                 self.id, remote.pid, took_ms)
        self.uid = uid
        return remote

    def _occupy(self, remote: RemoteProcess) -> None:
        self.remote = remote
        self.rtt_ms = None
        self.stats.starts += 1
        self.stats.started_ns = now_ns()
        self.policy.on_started(now_ns())

    async def start(self) -> None:
        """The first start, before QEMU: a failure here ends the VM."""
        self.policy.start(now_ns())
        self._occupy(await self._launch())

    def request_restart(self) -> None:
        """Management asked for a restart: kill the remote; the policy restarts it."""
        self._restart_requested.set()

    async def supervise(self) -> None:
        """The slot's life after its first start: one task of the VM's group.
        Returns when the slot stops for good; only CancelledError (the VM's
        teardown) leaves early, and then `stop` reaps the remote."""
        while not self._stopping and self.remote is not None:
            remote = self.remote
            ending, seen_ns = await self._serve(remote)
            actions = await self._ended(remote, ending)
            if not await self._carry_out(actions, seen_ns, remote.pid):
                return

    async def _beat(self, remote: RemoteProcess, verdict: asyncio.Future[Judgement]) -> None:
        """Ping every heartbeat_ms; the first failure is the verdict."""
        interval = self.emulator.heartbeat_ms / 1000
        timeout = self.emulator.hang_timeout_ms / 1000
        while True:
            sent = now_ns()
            try:
                self.rtt_ms = await remote.ping(timeout)
            except HeartbeatLost as e:
                silent_ms = (now_ns() - sent) // 1_000_000
                verdict.set_result(NoReply(silent_ms) if e.hung
                                   else ProtocolBroken(f"its QMP monitor broke: {e.detail}"))
                return
            await asyncio.sleep(max(0.0, interval - self.rtt_ms / 1000))

    async def _serve(self, remote: RemoteProcess) -> tuple[Ending, int]:
        """Until the remote ends, hangs or faults (then it is killed) or a
        restart is asked for; how it ended (reaped) and when that was seen."""
        loop = asyncio.get_running_loop()
        verdict: asyncio.Future[Judgement] = loop.create_future()
        fault = self._fault if self._fault is not None else loop.create_future()
        beat = asyncio.create_task(self._beat(remote, verdict), name=f"heartbeat {self.id}")
        wanted = asyncio.ensure_future(self._restart_requested.wait())
        try:
            done, _ = await asyncio.wait({remote.exited, verdict, fault, wanted},
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            beat.cancel()
            wanted.cancel()
            await asyncio.wait({beat, wanted})
        seen_ns = now_ns()
        if remote.exited in done:
            status = remote.exited.result()
            if fault.done() and status == 0:  # it ended because the relay dropped its link
                return Ending(ExitReason.CRASHED, fault.result(), status), seen_ns
            return Ending(ExitReason.CRASHED, "", status), seen_ns
        if wanted in done:
            self._restart_requested.clear()
            return Ending(ExitReason.REQUESTED_RESTART, "requested through management",
                          await self._reap(remote)), seen_ns
        judged = verdict.result() if verdict.done() else None
        why = judged.reason if judged is not None else f"its mpqemu link: {fault.result()}"
        if not isinstance(judged, NoReply):  # usually dying: let its exit be seen
            await asyncio.wait({remote.exited}, timeout=EXIT_GRACE_S)
        if remote.exited.done():
            status = remote.exited.result()
            return Ending(ExitReason.CRASHED, why if status == 0 else "", status), seen_ns
        return Ending(ExitReason.KILLED_HUNG, why, await self._reap(remote), judged), seen_ns

    @staticmethod
    async def _reap(remote: RemoteProcess) -> int:
        remote.kill()
        return await asyncio.shield(remote.exited)

    async def _ended(self, remote: RemoteProcess, ending: Ending) -> list[PolicyAction]:
        """Bookkeeping, log and events for a remote that ended; the policy's answer."""
        if self.relay is not None:
            self.relay.detach()
        await asyncio.shield(remote.stop())  # reaped already: closes its sockets
        if self.uid is not None:
            self.uids.give_back(self.uid)
            self.uid = None
        self.remote = None
        if self._stopping:
            return []
        reason, detail, status = ending.reason, ending.detail, ending.status
        self.stats.last_exit = describe_status(status)
        if reason is ExitReason.CRASHED and status == 0 and not detail:
            reason = ExitReason.EXITED_CLEAN
        if ending.verdict is not None:
            self.emit("EMULATOR_HANG", hang_event(self.id, remote.pid, ending.verdict))
            LOG.warning("emulator %s hung: %s; killed pid %d", self.id, ending.verdict.reason,
                        remote.pid)
        elif reason is ExitReason.REQUESTED_RESTART:
            LOG.info("emulator %s: restart requested", self.id)
        elif reason is ExitReason.CRASHED:
            LOG.warning("emulator %s died (%s)%s", self.id, self.stats.last_exit,
                        f": {detail}" if detail else "")
        self.emit("EMULATOR_EXIT", exit_event(self.id, remote.pid, reason, status))
        return self.policy.on_exit(now_ns(), status, reason, detail)

    def _serving(self) -> bool:
        return self.remote is not None

    async def _restart(self, seen_ns: int, old_pid: int) -> None:
        """One Start: always cold for this kind."""
        remote = await self._launch()
        self._occupy(remote)
        stall_ms = (now_ns() - seen_ns) / 1e6
        self.stats.restarts += 1
        self.stats.last_stall_ms = stall_ms
        self.stats.stalls_ms.append(stall_ms)
        self.emit("EMULATOR_RESTART", {
            "id": self.id, "pid": remote.pid, "restarts": self.stats.restarts,
            "stall_ms": round(stall_ms, 3), "reason": "cold start", "old_pid": old_pid,
        })
        LOG.info("emulator %s restarted (pid %d, cold start) %.1f ms after its end", self.id,
                 remote.pid, stall_ms)
        if ANNOUNCE_RESET:
            await self._announce_reset(remote)

    async def _announce_reset(self, remote: RemoteProcess) -> None:
        """Make the new controller report a SCSI bus reset, as a real one
        would after the bus lost power: the guest's driver then starts the
        chip again at its next interrupt (or poll) and requeues what the old
        process lost, instead of waiting for each command's timeout. Best
        effort: a controller the firmware has not set up yet (no I/O BAR)
        needs nothing, and a failure here is logged, never fatal."""
        try:
            # The relay's replay (the BARs and command register) and this
            # monitor reach the remote's main loop by different sockets: wait
            # until the replay mapped the registers, or give up (none to map).
            deadline = now_ns() + int(BAR_WAIT_S * 1e9)
            while (port := await asyncio.wait_for(_io_bar(remote), COMMAND_TIMEOUT)) is None:
                if now_ns() > deadline:
                    LOG.debug("emulator %s: no I/O BAR mapped; no reset to announce", self.id)
                    return
                await asyncio.sleep(0.01)
            for value in (SCNTL1_RST, 0):  # assert, then release, the bus's RST line
                await asyncio.wait_for(remote.qmp.execute("human-monitor-command", {
                    "command-line": f"o /b {port + SCNTL1:#x} {value:#x}"}), COMMAND_TIMEOUT)
        except Exception as e:  # a timeout, a broken monitor, qemu.qmp's own errors
            LOG.warning("emulator %s: could not announce the controller's reset: %s", self.id, e)
            return
        LOG.info("emulator %s: SCSI bus reset announced to the guest (I/O port %#x)",
                 self.id, port)

    # -- disks: fixed for this kind

    def disk(self, disk_id: str) -> DiskSpec | None:
        return next((d for d in self.disks[self.controller.id] if d.id == disk_id), None)

    def disk_changes_refused(self, what: str) -> str | None:
        return (f"emulator {self.id} is of kind \"{KIND}\": {what} is not supported for it "
                "(an LSI53C895A's disks are fixed when its remote process starts); change "
                "the spec and start the VM again")

    def _refuse(self, what: str) -> DiskChangeError:
        return DiskChangeError(self.disk_changes_refused(what))

    async def add_disk(self, disk: DiskSpec, opened: int | None = None) -> None:
        raise self._refuse("disk-add")

    async def remove_disk(self, disk: DiskSpec) -> None:
        raise self._refuse("disk-remove")

    async def resize_disk(self, disk: DiskSpec, size: int) -> int:
        raise self._refuse("disk-resize")

    # -- the end

    async def stop(self) -> int | None:
        """No more restarts; the remote (if any) is stopped and reaped."""
        self._stopping = True
        self.policy.on_stop_requested(now_ns())
        remote = self.remote
        if remote is None:
            return None
        if self.relay is not None:
            self.relay.detach()
        status = await remote.stop()
        if self.uid is not None:
            self.uids.give_back(self.uid)
            self.uid = None
        return status

    def close(self) -> None:
        """Every fd the slot holds (the relay's included); the remote is stopped first."""
        if self.relay is not None:
            self.relay.close()
        for sock in (*self.qemu_ends.values(), *self.listeners.values()):
            sock.close()
        if self._relay_end is not None:
            self._relay_end.close()
            self._relay_end = None
        self.qemu_ends.clear()
        for image in self.images.values():
            with contextlib.suppress(OSError):
                image.close()
        self.images.clear()
