"""The source's side of a live migration: one task of the VM's group.

Sequence (docs/management.md, "Live migration"): connect the state channel
and say hello; once the destination accepts, connect QEMU's stream and hand
it to QEMU (``getfd``, ``migrate fd:NAME``); follow QEMU until it completes;
then flush the disks, send every emulator's state store and wait for the
destination's "running"; then stop the VM as on ``quit``. Any failure
before "running" leaves the guest running here (QEMU's migration is
cancelled if under way, ``cont`` if QEMU left the guest paused).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.management.commands import mplaunch_version
from launcher.migration.channel import (
    Abort,
    Accept,
    ChannelClosed,
    DiskInfo,
    Done,
    EmulatorInfo,
    Failed,
    Hello,
    Message,
    Refuse,
    Role,
    Running,
    StateBlob,
)
from launcher.migration.status import Phase, Progress, Status, from_qemu
from launcher.migration.stream import ChannelStream, MigrationError, connect
from launcher.migration.uri import MigrationUri
from launcher.spec import Accel
from launcher.statestore import layout, transfer
from launcher.status import LOG

if TYPE_CHECKING:
    from launcher.qemu import Qemu
    from launcher.slots import EmulatorSlot
    from launcher.supervisor import Supervisor

QEMU_FD_NAME = "mplaunch-migration"
HELLO_TIMEOUT_S = 30.0
RUNNING_TIMEOUT_S = 60.0
"""How long the source waits, paused, for the destination to run the guest."""
ABORT_GRACE_S = 5.0
MIGRATION_POLL_S = 0.5
"""How often QEMU's query-migrate is read while no MIGRATION event comes."""
PROGRESS_LOG_S = 3.0
CANCEL_WAIT_S = 15.0
QEMU_RUNNING_STATES = frozenset({"running"})


def hello_of(sv: Supervisor) -> Hello:
    """What this VM is, for the destination to compare with its own."""
    from launcher.slots import EmulatorSlot

    disks = []
    emulators = []
    for slot in sv.slots:
        if not isinstance(slot, EmulatorSlot):  # refused before: see compat.unmigratable
            raise MigrationError(f"emulator '{slot.id}' cannot migrate")
        store_size = os.fstat(slot.state_fd).st_size if slot.state_fd >= 0 else 0
        emulators.append(EmulatorInfo(slot.id, str(slot.emulator.kind),
                                      tuple(c.id for c in slot.controllers), store_size))
        for controller, controller_disks in slot.disks.items():
            for d in controller_disks:
                fd = slot.disk_fds.get(d.id)
                size = disk_size(fd) if fd is not None else os.stat(d.image).st_size
                disks.append(DiskInfo(d.id, controller, d.lun, size, d.block_size, d.readonly))
    return Hello(sv.spec.vm.name, tuple(disks), tuple(emulators), layout.VERSION,
                 str(mplaunch_version()["package"]))


def disk_size(fd: int) -> int:
    """Bytes of an image or block device, by its open fd."""
    return os.lseek(fd, 0, os.SEEK_END)


class MigrationSource:
    """Drives one outgoing migration at a time for a VM's supervisor."""

    def __init__(self, sv: Supervisor) -> None:
        self.sv = sv
        self.progress = Progress()
        self._task: asyncio.Task[object] | None = None
        self._cancel = asyncio.Event()
        self._qemu_started = False
        self._last_log = 0.0
        self._completed_at = 0.0
        self._peer_waiting: asyncio.Task[Message | ChannelClosed] | None = None

    # -- management

    def refused(self) -> str | None:
        """Why no migration may start now, or None."""
        from launcher.migration.compat import unmigratable

        sv = self.sv
        problem = unmigratable(sv.spec)
        if problem is not None:
            return problem
        if sv.backends_only:
            return "a --backends-only mplaunch has no QEMU of its own to migrate"
        if self.progress.under_way:
            return f"a migration to {self.progress.uri} is under way"
        if self.progress.status is Status.COMPLETED:
            return "this VM has migrated already"
        if sv.qemu is None or sv.stopping or sv.incoming_pending:
            return "the VM is starting or stopping"
        return None

    def start(self, uri: MigrationUri) -> None:
        self.progress.begin(str(uri))
        self._cancel.clear()
        self._qemu_started = False
        self._emit()
        LOG.info("migration to %s: setup", uri)
        if self.sv.accel.accel is Accel.TCG:
            LOG.warning("migration to %s: the guest runs under TCG, where QEMU before 9.0 can "
                        "lose the guest's own writes to its RAM during a migration (see "
                        "docs/management.md, Live migration); use KVM to migrate", uri)
        self._task = self.sv.spawn_child(self._run(uri), "migration")

    def cancel(self) -> str | None:
        """Cancel the migration under way; why not, or None."""
        if not self.progress.under_way:
            return "no migration is under way"
        if self.progress.phase is Phase.STATE:
            return ("too late to cancel: QEMU has completed and the guest's state is "
                    "going over")
        self._cancel.set()
        return None

    async def answer(self) -> dict[str, Any]:
        if self.progress.status is Status.ACTIVE and self.progress.phase is Phase.RAM:
            await self._read_qemu()
        return self.progress.answer()

    # -- the migration

    def _emit(self) -> None:
        self.sv.emit("MIGRATION", self.progress.event())

    def _set(self, status: Status, error: str | None = None) -> None:
        if self.progress.set(status, error):
            self._emit()

    async def _run(self, uri: MigrationUri) -> None:
        qemu = self.sv.qemu
        assert qemu is not None
        stream: ChannelStream | None = None
        was_running = await self._guest_running(qemu)
        try:
            stream = await self._hello(uri)
            await self._migrate_ram(qemu, uri, stream)
            if self.progress.status is Status.CANCELLED:
                raise MigrationError("cancelled")
            await self._hand_over_state(stream)
        except Exception as e:  # MigrationError, or QEMU refused a command (ExecuteError)
            why = str(e) or type(e).__name__
            if stream is not None and stream.channel.state.value in ("accept-wait", "transfer"):
                with contextlib.suppress(Exception):  # the destination must not wait on
                    await asyncio.wait_for(stream.send(Abort(why)), 2)
            await self._recover(qemu, was_running)
            if self.progress.status is Status.CANCELLED or self._cancel.is_set():
                self._set(Status.CANCELLED)
                LOG.info("migration to %s: cancelled; the guest runs on here", uri)
            else:
                self._set(Status.FAILED, why)
                LOG.error("migration to %s: failed: %s; the guest runs on here", uri, why)
            return
        finally:
            if stream is not None:
                stream.close()
        self._mark_state_sent(False)  # the guest runs there: the folder goes as on quit
        handover_ms = (time.monotonic() - self._completed_at) * 1000
        qemu_ms = self.progress.qemu_downtime_ms
        self.progress.handover_ms = round(handover_ms, 1)
        self._set(Status.COMPLETED)
        LOG.info("migration to %s: completed; the guest runs at the destination (paused for "
                 "%.0f ms: QEMU's downtime %s ms, then %.0f ms to hand the state over and "
                 "start it there): stopping here", uri,
                 handover_ms + (qemu_ms or 0), "?" if qemu_ms is None else qemu_ms, handover_ms)
        self.sv.migrated()

    async def _guest_running(self, qemu: Qemu) -> bool:
        try:
            answer = await qemu.execute("query-status")
            return bool(answer.get("running"))
        except Exception:
            return True

    async def _hello(self, uri: MigrationUri) -> ChannelStream:
        sock = await connect(uri)
        stream = ChannelStream(sock, Role.SOURCE)
        try:
            await stream.send(hello_of(self.sv))
            reply = await self._receive(stream, HELLO_TIMEOUT_S, "its answer to the hello")
        except BaseException:
            stream.close()
            raise
        if isinstance(reply, Refuse):
            stream.close()
            raise MigrationError(f"the destination refused: {reply.reason}")
        if not isinstance(reply, Accept):
            stream.close()
            raise MigrationError(f"the destination answered the hello with {reply}")
        LOG.info("migration to %s: destination VM %s accepted the hello", uri, reply.vm)
        return stream

    async def _receive(self, stream: ChannelStream, timeout: float, what: str) -> Message:
        try:
            got = await asyncio.wait_for(stream.receive(), timeout)
        except TimeoutError:
            raise MigrationError(f"the destination sent no {what} in {timeout:.0f} s") from None
        if isinstance(got, ChannelClosed):
            raise MigrationError(f"the destination closed the state channel before {what}")
        return got

    async def _migrate_ram(self, qemu: Qemu, uri: MigrationUri, stream: ChannelStream) -> None:
        """QEMU's part; returns once QEMU says completed (or the migration
        was cancelled), raises MigrationError if it failed."""
        await qemu.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        sock = await connect(uri)
        try:
            qemu.qmp.send_fd_scm(sock.fileno())
            await qemu.execute("getfd", {"fdname": QEMU_FD_NAME})
        finally:
            sock.close()
        peer = asyncio.create_task(stream.receive())  # the destination may give up meanwhile
        with qemu.qmp.listener("MIGRATION") as listener:
            await qemu.execute("migrate", {"uri": f"fd:{QEMU_FD_NAME}"})
            self._qemu_started = True
            try:
                await self._follow(qemu, uri, listener, peer)
            finally:
                if self._peer_waiting is not peer and not peer.done():
                    peer.cancel()  # not carried into the state phase: nobody awaits it
                    with contextlib.suppress(BaseException):
                        await peer

    async def _follow(self, qemu: Qemu, uri: MigrationUri, listener: Any,
                      peer: asyncio.Task[Message | ChannelClosed]) -> None:
        cancel = asyncio.create_task(self._cancel.wait())
        try:
            while True:
                event = asyncio.create_task(listener.get())
                done, _ = await asyncio.wait({event, peer, cancel, qemu.exited},
                                             timeout=MIGRATION_POLL_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                if qemu.exited in done:
                    raise MigrationError("QEMU exited during the migration")
                if peer in done:
                    got = peer.result()  # raises MigrationError for a broken channel
                    why = got.reason if isinstance(got, Failed) else "it closed the channel"
                    await self._cancel_qemu(qemu)
                    raise MigrationError(f"the destination gave up: {why}")
                if cancel in done:
                    await self._cancel_qemu(qemu)
                    self._set(Status.CANCELLED)
                    return
                qemu_status = await self._read_qemu()
                if qemu_status == "completed":
                    self._completed_at = time.monotonic()
                    self.progress.phase = Phase.STATE
                    LOG.info("migration to %s: QEMU completed (%s): handing the emulators' "
                             "state over", uri, _mib(self.progress.ram))
                    self._peer_waiting = peer
                    return
                if qemu_status == "failed":
                    raise MigrationError(self.progress.error or "QEMU's migration failed")
                if qemu_status == "cancelled":
                    self._set(Status.CANCELLED)
                    return
                now = time.monotonic()
                if self.progress.status is Status.ACTIVE and now - self._last_log > PROGRESS_LOG_S:
                    self._last_log = now
                    LOG.info("migration to %s: active %s", uri, _mib(self.progress.ram))
        finally:
            cancel.cancel()

    async def _read_qemu(self) -> str | None:
        """Read QEMU's query-migrate into the progress; QEMU's status."""
        qemu = self.sv.qemu
        if qemu is None:
            return None
        try:
            info = await qemu.execute("query-migrate")
        except Exception as e:
            LOG.debug("query-migrate: %s", e)
            return None
        qemu_status = str(info.get("status", "none"))
        ram = info.get("ram")
        if isinstance(ram, dict):
            self.progress.ram = ram
        downtime = info.get("downtime")
        if isinstance(downtime, int):
            self.progress.qemu_downtime_ms = downtime
        if qemu_status == "failed":
            self.progress.error = str(info.get("error-desc") or "QEMU's migration failed")
            return qemu_status
        ours = from_qemu(qemu_status)
        if ours is not None and ours not in (Status.FAILED, Status.CANCELLED):
            if ours is Status.ACTIVE and self.progress.status is Status.SETUP:
                LOG.info("migration to %s: active", self.progress.uri)
            self._set(ours)
        elif qemu_status == "completed":
            self._set(Status.ACTIVE)
        return qemu_status

    async def _cancel_qemu(self, qemu: Qemu) -> None:
        """QEMU's migrate_cancel, then wait until QEMU's migration has ended."""
        with contextlib.suppress(Exception):
            await qemu.execute("migrate_cancel")
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            try:
                info = await qemu.execute("query-migrate")
            except Exception:
                return
            if info.get("status") not in _QEMU_UNDER_WAY:
                return
            await asyncio.sleep(0.05)

    async def _hand_over_state(self, stream: ChannelStream) -> None:
        """QEMU completed: the guest is paused here and its rings stopped."""
        peer, self._peer_waiting = self._peer_waiting, None
        if peer is None:
            raise MigrationError("the state channel was not followed into the state phase")
        try:
            got = await self._send_state(stream, peer)
        finally:
            if not peer.done():
                peer.cancel()
                with contextlib.suppress(BaseException):
                    await peer
        if isinstance(got, Running):
            return
        if isinstance(got, Failed):
            raise MigrationError(f"the destination could not start the guest: {got.reason}")
        raise MigrationError("the destination closed the state channel before the guest ran")

    async def _send_state(self, stream: ChannelStream,
                          peer: asyncio.Task[Message | ChannelClosed]) -> Message | ChannelClosed:
        """Flush, send every state store, then the destination's last word."""
        from launcher.slots import EmulatorSlot

        slots = [s for s in self.sv.slots if isinstance(s, EmulatorSlot)]
        for slot in slots:
            _flush(slot)
        self._mark_state_sent(True)
        for slot in slots:
            image = transfer.read_image(slot.state_fd)
            await stream.send(StateBlob(slot.id, layout.VERSION, image))
        await stream.send(Done(len(slots)))
        try:
            return await asyncio.wait_for(asyncio.shield(peer), RUNNING_TIMEOUT_S)
        except TimeoutError:
            await stream.send(Abort(f"no answer in {RUNNING_TIMEOUT_S:.0f} s"))
            try:
                return await asyncio.wait_for(asyncio.shield(peer), ABORT_GRACE_S)
            except TimeoutError:
                raise MigrationError(f"the destination did not start the guest in "
                                     f"{RUNNING_TIMEOUT_S:.0f} s") from None

    def _mark_state_sent(self, sent: bool) -> None:
        run = self.sv.run_folder
        if run is None:
            return
        mark = run.path / STATE_SENT_MARK
        try:
            if sent:
                mark.touch()
            else:
                mark.unlink(missing_ok=True)
        except OSError as e:
            LOG.warning("migration: %s: %s", mark, e.strerror)

    async def _recover(self, qemu: Qemu, was_running: bool) -> None:
        """After a failure: QEMU's migration ended, and the guest running here
        again if it ran before."""
        self._mark_state_sent(False)
        if qemu.exited.done():
            return
        if self._qemu_started:
            await self._cancel_qemu(qemu)
        if not was_running:
            return
        try:
            status = await qemu.execute("query-status")
            if not status.get("running"):
                LOG.info("migration: QEMU left the guest %s: cont", status.get("status"))
                await qemu.execute("cont")
        except Exception as e:
            LOG.error("migration: cannot resume the guest: %s", e)


STATE_SENT_MARK = "migration-state-sent"
"""In the run folder from the first state frame sent until the migration
ends here: a launcher that re-attaches then cannot tell whether the guest
runs at the destination."""


async def settle_orphaned_migration(qemu: Qemu, run_path: Path) -> None:
    """A launcher re-attached to a VM whose previous launcher died during a
    migration. QEMU's migration, if still going, is cancelled (the state
    channel died with that launcher). A guest QEMU left paused by its
    completion (postmigrate) runs on here if no state was sent (the
    destination then never ran it); if some was, it may run there, and it
    stays paused here, loudly, for the operator to decide."""
    try:
        info = await qemu.execute("query-migrate")
        if info.get("status") in _QEMU_UNDER_WAY:
            LOG.warning("migration: QEMU was migrating when its launcher died: cancelling")
            await qemu.execute("migrate_cancel")
            deadline = time.monotonic() + CANCEL_WAIT_S
            while time.monotonic() < deadline:
                info = await qemu.execute("query-migrate")
                if info.get("status") not in _QEMU_UNDER_WAY:
                    break
                await asyncio.sleep(0.05)
        status = await qemu.execute("query-status")
        if status.get("status") != "postmigrate":
            return
        if (run_path / STATE_SENT_MARK).exists():
            LOG.error("migration: the last launcher died after sending the guest's state to "
                      "the destination: the guest may run there, so it stays paused here; "
                      "if it does not run there, resume it with QMP 'cont' on %s",
                      run_path / "qemu.sock")
            return
        LOG.warning("migration: QEMU completed a migration whose launcher died before the "
                    "destination had the state; the guest runs on here (cont)")
        await qemu.execute("cont")
    except Exception as e:
        LOG.error("migration: cannot settle a migration left by the last launcher: %s", e)


_QEMU_UNDER_WAY = frozenset({"setup", "active", "cancelling", "pre-switchover", "device",
                             "wait-unplug"})


def _flush(slot: EmulatorSlot) -> None:
    """Every write the guest was told is done, on stable storage before the
    destination reads the disks (shared storage on another host)."""
    for disk_id, fd in slot.disk_fds.items():
        try:
            os.fdatasync(fd)
        except OSError as e:
            LOG.warning("disk %s: fdatasync: %s", disk_id, e.strerror)


def _mib(ram: dict[str, Any]) -> str:
    def mib(key: str) -> str:
        value = ram.get(key)
        return f"{value / (1 << 20):.1f} MiB" if isinstance(value, int) else "?"
    return f"{mib('transferred')} sent, {mib('remaining')} remaining"
