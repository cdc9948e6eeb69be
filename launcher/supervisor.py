"""The VM's lifetime, from run folder to reaped children.

Theory of operation: the VM is the root of a supervision tree (drawn in
docs/recovery.md). Every task it starts is a child of one asyncio task
group: each slot's supervisor, the spare pool, QEMU's QMP follower, the
front-end acceptors, the watchdog. Whichever comes first of QEMU's exit and
a stop request (a signal, `quit`, a give-up that powers off) ends the VM:
the children are cancelled and awaited, then the same orderly teardown
runs: QMP quit, terminate, kill, then the spare and the emulators, then the
run folder. A child that fails ends the VM with its error logged. Teardown
is in `finally` blocks so that no path, including an error during start-up,
leaves a child or the run folder behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from launcher import children, holdnames, reattach
from launcher.accel import AccelChoice, choose_for
from launcher.emulators import DiskOpenError
from launcher.holder.client import HolderClient, start_holder
from launcher.libvirt import backend_socket, frontend_group_warning
from launcher.management.server import EventBus, ManagementServer, resolve_group
from launcher.migration.destination import IncomingMigration
from launcher.migration.source import MigrationSource, settle_orphaned_migration
from launcher.migration.stream import MigrationError
from launcher.migration.uri import MigrationUri
from launcher.qemu import Qemu, QemuStartError, bind_qmp_listener
from launcher.restart_policy import GiveUp, describe_status
from launcher.runfolder import RunFolder, RunFolderBusy
from launcher.sandbox.check import SandboxError, preflight
from launcher.sdnotify import NOTIFY_VARS, SdNotifier, strip_environment
from launcher.slotbase import Slot
from launcher.slots import EmulatorSlot
from launcher.spares import WARM_SPARE, SparePool
from launcher.spec import Accel, EmulatorKind, GiveUpAction, Spec
from launcher.status import LOG
from launcher.uidpool import UidPool
from launcher.vmcontrol import SupervisorControl

EXIT_OK = 0
EXIT_FAILED = 1


class FrontendGroupError(ValueError):
    """The spec's frontend_group is gone from the host since it was checked."""


@dataclass
class VmOutcome:
    """How the VM ended, for the exit status and the last status line."""

    guest_shutdown: bool = False
    stop_signal: str | None = None
    emulator_died: str | None = None
    gave_up: str | None = None
    events: list[str] = field(default_factory=list)


QEMU_MIGRATION_EVENTS = frozenset({"MIGRATION", "MIGRATION_PASS"})
"""QEMU's own migration events: mplaunch's MIGRATION replaces them."""


def _tether() -> None:
    """Until the guest of an incoming migration runs, the holder must not
    keep QEMU for a launcher that died (a guest that never ran has nothing
    to keep): it stops everything when its launcher goes while it holds
    this (launcher.holder)."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        children.host().hold(holdnames.TETHER, holdnames.TETHER, [fd])
    finally:
        os.close(fd)


CANCEL_REPORT_S = 10.0
HANDOVER_QUIET_S = 2.0
"""How long an upgrade waits for vhost-user exchanges in flight to finish."""


async def _report_stragglers(tasks: list[asyncio.Task[object]]) -> None:
    """A child that has not ended `CANCEL_REPORT_S` after it was cancelled
    holds the VM's teardown: name it and where it waits, rather than let a
    stop hang without a word. The task group still waits for it."""
    pending = [t for t in tasks if not t.done()]
    if not pending:
        return
    _, late = await asyncio.wait(pending, timeout=CANCEL_REPORT_S)
    for task in late:
        LOG.error("task %r has not ended %.0f s after it was cancelled: waits at %s",
                  task.get_name(), CANCEL_REPORT_S, _awaiting(task))


def _awaiting(task: asyncio.Task[object], depth: int = 12) -> str:
    """Where `task` waits, outermost first, down to the innermost await: a
    task's stack gives only its own coroutine's frame, and the await that
    holds it up is usually several calls further in."""
    where: list[str] = []
    step: Any = task.get_coro()
    while step is not None and len(where) < depth:
        frame = getattr(step, "cr_frame", None) or getattr(step, "gi_frame", None)
        if frame is None:
            where.append(type(step).__name__)  # a future, or a coroutine that ended
            break
        where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        step = getattr(step, "cr_await", None) or getattr(step, "gi_yieldfrom", None)
    return "; ".join(where) or "no frame"


class Supervisor:
    """Owns one VM: its run folder, its QEMU, (later) its emulators."""

    def __init__(
        self, spec: Spec, accel: AccelChoice | None = None, backends_only: bool = False,
        incoming: MigrationUri | None = None,
    ) -> None:
        self.spec = spec
        self.backends_only = backends_only
        self.accel = accel or (
            AccelChoice(spec.vm.accel, "QEMU is started by someone else")
            if backends_only else choose_for(spec)
        )
        self.outcome = VmOutcome()
        self._stop = asyncio.Event()
        self.qemu: Qemu | None = None
        self.slots: list[Slot] = []
        self.bus = EventBus()
        self.notifier = SdNotifier.from_environment()
        # A successor started by an upgrade is the same service: it gets them back.
        self._notify_env = {k: os.environ[k] for k in NOTIFY_VARS if k in os.environ}
        strip_environment()  # QEMU and the emulators must not talk to systemd
        self._upgrading = False
        self.spares: SparePool | None = None
        self._group: asyncio.TaskGroup | None = None
        self._children: list[asyncio.Task[object]] = []
        self._qmp_failed = False
        #: When the VM started (epoch seconds): kept across re-attaches.
        self.started = time.time()
        self.run_folder: RunFolder | None = None
        self._attachment: reattach.Attachment | None = None
        #: The spec file as it was read: a re-attaching launcher uses this one.
        self.spec_text = reattach.spec_text(spec.path) or ""
        #: `mplaunch --incoming`: the migration this VM waits for (launcher.migration).
        self.incoming = None if incoming is None else IncomingMigration(self, incoming)
        #: An outgoing migration (made by the first `migrate`).
        self.migration: MigrationSource | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def incoming_pending(self) -> bool:
        """An incoming migration whose guest has not run here yet."""
        return self.incoming is not None and not self.incoming.done

    def spawn_child(self, coro: Coroutine[Any, Any, object], name: str) -> asyncio.Task[object]:
        """A child task of the VM (see `_spawn`), for its management."""
        return self._spawn(coro, name)

    def migrated(self) -> None:
        """The guest runs at a migration's destination: stop here, as on quit."""
        self.outcome.stop_signal = "migrated"
        self._stop.set()

    def upgrade_refused(self) -> str | None:
        """Why this VM cannot be handed over to a new launcher now, or None."""
        if self.spec.has_lsi:
            return "a VM with lsi emulators cannot be handed over: their relay runs here"
        if self.backends_only:
            return "a --backends-only launcher cannot be handed over"
        if self.incoming_pending or (self.migration is not None
                                     and self.migration.progress.under_way):
            return "a migration is under way"
        if self.qemu is None or self._stop.is_set():
            return "the VM is starting or stopping"
        return None

    def request_upgrade(self) -> None:
        """Stop supervising without stopping anything, then exec the installed
        code, which re-attaches (see `_hand_over`)."""
        LOG.info("upgrade asked for: handing VM %s over to a new launcher", self.spec.vm.name)
        self._upgrading = True
        self._stop.set()

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            LOG.info("%s received: stopping the VM", reason)
            self.outcome.stop_signal = reason
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            group = self.spec.vm.management_group
            gid = None if group is None else resolve_group(group)
            try:
                run = RunFolder.acquire(self.spec.vm.run_dir, self.spec.vm.name, gid)
            except RunFolderBusy as busy:
                attachment = await reattach.connect(self.spec, busy)
                if attachment is None:  # its holder is gone meanwhile: a stale folder
                    run = RunFolder.acquire(self.spec.vm.run_dir, self.spec.vm.name, gid)
                else:
                    return await self._run_attached(attachment)
            with run:
                if run.stale_cleaned:
                    LOG.info("cleaned a stale run folder %s", run.path)
                LOG.info("run folder %s", run.path)
                LOG.info("accelerator %s (%s)", self.accel.accel, self.accel.reason)
                await self._start_holder(run)
                return await self._run_in(run)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _start_holder(self, run: RunFolder) -> None:
        """The VM's holder (launcher.holder): the parent of every process of
        the VM from now on, and the keeper of a copy of every long-lived fd,
        so that this launcher may die or be replaced under the running VM."""
        await start_holder(str(run.holder_sock))
        client, attached = await HolderClient.connect(str(run.holder_sock))
        host = children.HolderHost(client, attached.welcome)
        children.install(host)
        host.hold(holdnames.RUN_LOCK, "lock", [run.lock_fd])

    async def _run_attached(self, attachment: reattach.Attachment) -> int:
        """Carry on with a VM whose launcher went away (crashed, killed or
        upgraded): everything it needs is in the holder and the run folder."""
        self._attachment = attachment
        if self.incoming is not None:
            # Run again with --incoming (an upgrade keeps the arguments): a VM whose
            # holder outlived its launcher had its guest run (else the tether
            # stopped it), so there is nothing to receive.
            LOG.info("--incoming %s: the VM arrived already; re-attaching to it",
                     self.incoming.uri)
            self.incoming = None
        self.spec = attachment.spec
        self.spec_text = attachment.state.spec_text
        self.accel = AccelChoice(Accel(attachment.state.accel), "as the VM was started")
        self.started = attachment.state.started
        with attachment.run as run:
            return await self._run_in(run)

    async def _run_in(self, run: RunFolder) -> int:
        """Start-up and the VM's life in its task group, then teardown, always.

        Every task the VM starts is a child of this group (see `_spawn`);
        the children handle their own failures (a slot routes them into its
        restart policy), so an exception that still reaches the group is a
        bug: it ends the VM with the error logged, never silently."""
        self.run_folder = run
        attachment = self._attachment
        listener = None if attachment is not None else bind_qmp_listener(run.qemu_sock)
        control = SupervisorControl(self)
        control.started = time.monotonic() - max(0.0, time.time() - self.started)
        server = ManagementServer(run.mplaunch_sock, control, self.bus,
                                  group=self.spec.vm.management_group)
        held = attachment.management if attachment is not None else None
        await server.start(held)
        if held is None and server.listener is not None:
            children.host().hold(holdnames.MANAGEMENT, "socket", [server.listener.fileno()])
        code = EXIT_FAILED
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._spawn(self.notifier.run_watchdog(), "systemd watchdog")
                self._spawn(self._watch_holder(), "holder")
                try:
                    if attachment is not None:
                        code = await self._resume_vm(run, attachment)
                    else:
                        assert listener is not None
                        code = await self._run_vm(run, listener)
                finally:
                    self._group = None
                    for task in self._children:
                        task.cancel()  # on purpose: the VM is ending
                    await _report_stragglers(self._children)
        except* Exception as failed:
            for error in failed.exceptions:
                LOG.error("supervision failed: %s", error or type(error).__name__,
                          exc_info=error)
            self.outcome.emulator_died = self.outcome.emulator_died or "supervision failed"
            code = EXIT_FAILED
        finally:
            if self._upgrading and code == EXIT_OK:
                await self._hand_over(server)
            await self._teardown(listener, server)
        return code

    async def _hand_over(self, server: ManagementServer) -> None:
        """Leave the VM to the holder and exec the code installed now, with this
        process's arguments: the new program finds the run folder taken by the
        holder and re-attaches, as after a crash but with every record
        current. Same pid, so a service manager sees no change. Returns only
        if the exec failed (the VM then runs on under its holder; running
        mplaunch again attaches to it)."""
        deadline = time.monotonic() + HANDOVER_QUIET_S
        while time.monotonic() < deadline and any(
            keeper.waiting_for_reply for slot in self.slots if isinstance(slot, EmulatorSlot)
            for keeper in slot.keepers.values()
        ):
            await asyncio.sleep(0.005)  # a vhost-user exchange in flight: let it finish
        self.save_state()
        if self.qemu is not None:
            await self.qemu.disconnect()
        await server.close(unlink=False)
        host = children.host()
        if isinstance(host, children.HolderHost):
            await host.flush()
            host.close()
        argv = [sys.executable, *sys.orig_argv[1:]]
        LOG.info("exec %s", " ".join(argv))
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, argv, {**os.environ, **self._notify_env})
        except OSError as e:
            LOG.error("cannot start the new launcher (%s): the VM runs on under its holder; "
                      "run mplaunch with the same spec to attach to it", e)
            os._exit(EXIT_FAILED)

    def _spawn(self, coro: Coroutine[Any, Any, object], name: str) -> asyncio.Task[object]:
        """A child of the VM's task group: its failure ends the VM, loudly."""
        if self._group is None:
            coro.close()
            raise RuntimeError(f"{name}: the VM's task group is closed")
        task = self._group.create_task(coro, name=name)
        self._children.append(task)
        return task

    async def _watch_holder(self) -> None:
        """The holder's death kills QEMU and every emulator (their parent-death
        signal): the VM is gone, say so and stop."""
        await children.host().lost
        LOG.error("the VM's holder process died: QEMU and the emulators died with it")
        self.outcome.emulator_died = self.outcome.emulator_died or "the holder died"
        self._stop.set()

    async def _resume_vm(self, run: RunFolder, attachment: reattach.Attachment) -> int:
        """Re-attached: adopt the slots and QEMU, then supervise as usual."""
        first, last = self.spec.vm.uid_range
        uids = UidPool(first, last, owner=self.spec.vm.name)
        scsi = self.spec.emulators_of_kind(EmulatorKind.SCSI)
        self.spares = SparePool(self.spec, uids) if WARM_SPARE and scsi else None
        await attachment.discard_spares()
        for emulator in self.spec.emulators:
            held = attachment.slot(emulator, uids)
            adopted = EmulatorSlot(self.spec, emulator, run, self._give_up, uids, self.spares,
                                   held=held)
            adopted.emit = self.emit
            adopted.on_change = self.save_state
            self.slots.append(adopted)
        for slot in self.slots:
            slot.start_keepers(self._qemu_closed_session)
        await attachment.release_leftovers()
        qemu = attachment.qemu(run)
        self.qemu = qemu
        self.save_state()
        up = time.time() - self.started
        LOG.info("re-attached to VM %s (QEMU pid %d, up %.0f s)", self.spec.vm.name, qemu.pid, up)
        if qemu.exited.done():
            status = qemu.exited.result()
            LOG.warning("QEMU ended while no launcher was attached (%s)", describe_status(status))
            return EXIT_OK if status == 0 else EXIT_FAILED
        return await self._supervise(qemu)

    def save_state(self) -> None:
        """What a launcher that re-attaches needs to know, in the run folder;
        written whenever it changes."""
        run = self.run_folder
        if run is None:
            return
        try:
            reattach.state_of(self).save(run.vm_state_file)
        except OSError as e:
            LOG.error("cannot write %s: %s", run.vm_state_file, e)

    async def _run_vm(self, run: RunFolder, listener: socket.socket) -> int:
        """Start the emulators (each confined before QEMU exists), then QEMU,
        then supervise until the VM ends; the exit status."""
        fatal: tuple[type[Exception], ...] = (SandboxError, DiskOpenError, FrontendGroupError,
                                              MigrationError)
        try:
            if self.incoming is not None:
                self.incoming.open()  # a URI it cannot listen on fails before anything starts
                _tether()
            if self.spec.emulators:
                preflight(self.spec.vm.sandbox)  # the sandbox: fail closed, warn if weakened
            first, last = self.spec.vm.uid_range
            uids = UidPool(first, last, owner=self.spec.vm.name)  # host-wide leases
            # A warm spare is a Python emulator: only the scsi kind can use one.
            scsi = self.spec.emulators_of_kind(EmulatorKind.SCSI)
            self.spares = SparePool(self.spec, uids) if WARM_SPARE and scsi else None
            frontend_gid = self._frontend_gid()
            for emulator in self.spec.emulators:
                slot: Slot
                if emulator.kind is EmulatorKind.LSI:
                    # Loaded only for a spec that has one: it brings a QMP client.
                    from launcher.lsi.remote import RemoteError
                    from launcher.lsi.slot import RemoteSlot

                    fatal += (RemoteError,)
                    slot = RemoteSlot(self.spec, emulator, run, self._give_up, uids)
                else:
                    slot = EmulatorSlot(self.spec, emulator, run, self._give_up, uids,
                                        self.spares, listen=self.backends_only,
                                        frontend_gid=frontend_gid)
                slot.emit = self.emit
                if isinstance(slot, EmulatorSlot):
                    slot.on_change = self.save_state
                self.slots.append(slot)
            self.save_state()
            for slot in self.slots:
                slot.start_keepers(self._qemu_closed_session)
            for slot in self.slots:
                if self._stop.is_set():
                    return EXIT_OK
                await slot.start()
        except fatal as e:
            LOG.error("%s", e)  # not confined, or no start
            return EXIT_FAILED
        if self._stop.is_set():
            return EXIT_OK
        if self.backends_only:
            return await self._serve_backends(run)
        # Each controller's link: a vhost-user socket, or an lsi controller's proxy socket.
        links = {cid: s.fileno() for slot in self.slots for cid, s in slot.qemu_ends.items()}
        try:  # unprivileged and checked, like an emulator (launcher.qemu)
            qemu = await Qemu.launch(self.spec, self.accel.accel, listener.fileno(), links,
                                     run.qemu_sock, incoming=self.incoming is not None)
        except (SandboxError, QemuStartError) as e:
            LOG.error("%s", e)
            return EXIT_FAILED
        self.qemu = qemu
        listener.close()
        for slot in self.slots:
            slot.close_qemu_ends()
        self.save_state()
        LOG.info("QEMU started (pid %d)", qemu.pid)
        if self.incoming is not None and not await self._receive(self.incoming, qemu):
            return EXIT_FAILED
        return await self._supervise(qemu)

    async def _receive(self, incoming: IncomingMigration, qemu: Qemu) -> bool:
        """`mplaunch --incoming`: until the guest runs here (True), or the
        migration failed or a stop was asked for (False: the guest never ran)."""
        receiving = asyncio.create_task(incoming.receive(qemu))
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({receiving, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not receiving.done():
                receiving.cancel()
                with contextlib.suppress(BaseException):
                    await receiving
        if receiving.cancelled():
            LOG.error("incoming migration: stopped before the guest ran here")
            return False
        if not receiving.result():
            return False
        children.host().unhold(holdnames.TETHER)  # the guest runs: the holder keeps it
        self.save_state()
        return True

    def _frontend_gid(self) -> int | None:
        """Backend-only mode: the gid whose members' QEMU may connect to the
        vhost-user sockets (the spec's frontend_group), or None: root only,
        which no libvirt-run QEMU is, so say so."""
        group = self.spec.vm.frontend_group
        if not self.backends_only:
            return None
        if group is None:
            LOG.warning("%s", frontend_group_warning(self.spec))
            return None
        try:
            return resolve_group(group)
        except ValueError as e:
            raise FrontendGroupError(f"{self.spec.path}: [vm] frontend_group: {e}") from None

    def _supervise_emulators(self) -> None:
        """The slots' supervisors and the spare pool, as children of the VM."""
        for slot in self.slots:
            self._spawn(slot.supervise(), f"supervise {slot.id}")
        if self.spares is not None:
            self._spawn(self.spares.run(), "warm spares")
            self.spares.replenish()

    async def _teardown(self, listener: socket.socket | None, server: ManagementServer) -> None:
        """QEMU first (the guest stops using the disks), then the spare, then
        the emulators, then the management socket, then the holder. Runs
        after every child of the VM's group has ended, so no restart races it."""
        self.notifier.stopping()
        if listener is not None:
            listener.close()
        if self.incoming is not None:
            self.incoming.close()
        if self.qemu is not None:
            status = await self.qemu.stop()
            LOG.info("QEMU exited (%s)", describe_status(status))
        if self.spares is not None:
            await self.spares.close()
        for slot in self.slots:
            status_or_none = await slot.stop()
            if status_or_none is not None:
                LOG.info("emulator %s exited (%s)", slot.id, describe_status(status_or_none))
            slot.close()
        await server.close()
        host = children.host()
        if isinstance(host, children.HolderHost):
            with contextlib.suppress(Exception):  # gone already: its children went with it
                await host.flush()
                await host.shutdown()
            children.install(None)
        LOG.info("stopped")

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """An event for management clients (and a STATUS line for systemd)."""
        try:
            self.bus.emit(name, data)
        except ValueError as e:
            LOG.debug("event %s not sent: %s", name, e)
        if name.startswith("EMULATOR_"):
            self.notifier.status(f"{name.lower()} {data.get('id', '')}")

    def _qemu_closed_session(self, why: str) -> None:
        """In backend-only mode the slot makes a fresh device for the next QEMU;
        otherwise QEMU's exit, seen by its own watch, ends the VM."""
        LOG.debug("QEMU's end of a controller's link closed: %s", why)

    async def _serve_backends(self, run: RunFolder) -> int:
        """Backend-only mode: no QEMU of ours; serve every QEMU that comes, one
        after another, until a stop signal or `quit`."""
        served = [slot for slot in self.slots if isinstance(slot, EmulatorSlot)]
        for slot in served:
            for cid in slot.listeners:
                LOG.info("controller %s waits for QEMU on %s", cid, backend_socket(run.path, cid))
        self._supervise_emulators()
        for slot in served:
            self._spawn(slot.accept_frontends(), f"accept QEMU for {slot.id}")
        self.notifier.ready(f"VM {self.spec.vm.name}: emulators serving")
        await self._stop.wait()
        return EXIT_FAILED if self.outcome.emulator_died else EXIT_OK

    async def _give_up(self, action: GiveUp) -> None:
        """The restart policy gave up on an emulator (it logged why): pause or
        power off the VM."""
        self.outcome.gave_up = action.reason
        qemu = self.qemu
        if action.action is GiveUpAction.PAUSE and qemu is not None:
            try:
                await qemu.execute("stop")
                return
            except Exception as e:  # QEMU going away: power off is what is left
                LOG.error("cannot pause the VM (%s): stopping it", e)
        self.outcome.emulator_died = action.reason
        self._stop.set()

    async def _supervise(self, qemu: Qemu) -> int:
        """Until QEMU exits or a stop is asked for; the exit status."""
        self._supervise_emulators()
        self._spawn(self._follow_qemu(qemu), "QEMU's QMP")
        stop = self._spawn(self._stop.wait(), "stop request")
        await asyncio.wait({stop, qemu.exited}, return_when=asyncio.FIRST_COMPLETED)
        if self.outcome.emulator_died or self._qmp_failed:
            return EXIT_FAILED
        if self._stop.is_set():
            return EXIT_OK
        status = await qemu.exited
        if self.outcome.guest_shutdown and status == 0:
            return EXIT_OK
        LOG.error("QEMU died unexpectedly (%s)", describe_status(status))
        return EXIT_FAILED

    async def _follow_qemu(self, qemu: Qemu) -> None:
        """Connect to QEMU's QMP, then pass its events on until it goes.
        QMP that does not come up while QEMU runs stops the VM."""
        try:
            if qemu.qmp.runstate.name != "RUNNING":  # an incoming migration connected it
                await qemu.connect()
        except Exception as e:
            if not qemu.exited.done():
                LOG.error("cannot talk to QEMU: %s", e)
                self._qmp_failed = True
                self._stop.set()
            return
        LOG.debug("connected to QEMU's QMP")
        if self._attachment is not None and self.run_folder is not None:
            await settle_orphaned_migration(qemu, self.run_folder.path)  # its launcher died
        self.notifier.ready(f"VM {self.spec.vm.name} running")
        await self._follow_events(qemu)

    async def _follow_events(self, qemu: Qemu) -> None:
        async for name, data in qemu.events():
            if name in QEMU_MIGRATION_EVENTS:
                continue  # mplaunch reports its own MIGRATION (launcher.migration)
            self.outcome.events.append(name)
            if name == "SHUTDOWN":
                self.outcome.guest_shutdown = bool(data.get("guest"))
                LOG.info("guest %s", "powered off" if data.get("guest") else "shut down")
            elif name == "RESET":
                LOG.info("guest reset%s", "" if data.get("guest") else " (by the host)")
            elif name == "STOP":
                LOG.info("VM paused")
            elif name == "RESUME":
                LOG.info("VM running")
            else:
                LOG.debug("QEMU event %s %s", name, data)
            self.emit(name, data)  # QEMU's lifecycle events, passed on
