"""The VM's lifetime, from run folder to reaped children.

Theory of operation: one asyncio task per thing that can end the VM (QEMU's
exit, a stop signal) is raced; whichever comes first starts the same orderly
teardown: QMP quit, terminate, kill, then the emulators, then the run folder.
Teardown is in `finally` blocks so that no path, including an error during
start-up, leaves a child or the run folder behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any

from launcher.accel import AccelChoice, choose_accel
from launcher.libvirt import backend_socket
from launcher.management.server import EventBus, ManagementServer
from launcher.qemu import Qemu, bind_qmp_listener
from launcher.restart_policy import GiveUp, describe_status
from launcher.runfolder import RunFolder
from launcher.sandbox.check import SandboxError, preflight
from launcher.sdnotify import SdNotifier, strip_environment
from launcher.slots import EmulatorSlot
from launcher.spares import WARM_SPARE, SparePool
from launcher.spec import GiveUpAction, Spec
from launcher.status import LOG
from launcher.uidpool import UidPool
from launcher.vmcontrol import SupervisorControl
from launcher.vmm import QemuFds, qemu_argv

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass
class VmOutcome:
    """How the VM ended, for the exit status and the last status line."""

    guest_shutdown: bool = False
    stop_signal: str | None = None
    emulator_died: str | None = None
    gave_up: str | None = None
    events: list[str] = field(default_factory=list)


class Supervisor:
    """Owns one VM: its run folder, its QEMU, (later) its emulators."""

    def __init__(
        self, spec: Spec, accel: AccelChoice | None = None, backends_only: bool = False
    ) -> None:
        self.spec = spec
        self.backends_only = backends_only
        self.accel = accel or (
            AccelChoice(spec.vm.accel, "QEMU is started by someone else")
            if backends_only else choose_accel(spec.vm.accel)
        )
        self.outcome = VmOutcome()
        self._stop = asyncio.Event()
        self.qemu: Qemu | None = None
        self.slots: list[EmulatorSlot] = []
        self.bus = EventBus()
        self.notifier = SdNotifier.from_environment()
        strip_environment()  # QEMU and the emulators must not talk to systemd
        self.spares: SparePool | None = None

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
            with RunFolder.acquire(self.spec.vm.run_dir) as run:
                if run.stale_cleaned:
                    LOG.info("cleaned a stale run folder %s", run.path)
                LOG.info("run folder %s", run.path)
                LOG.info("accelerator %s (%s)", self.accel.accel, self.accel.reason)
                return await self._run_in(run)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _run_in(self, run: RunFolder) -> int:
        listener = bind_qmp_listener(run.qemu_sock)
        slots: list[EmulatorSlot] = []
        qemu: Qemu | None = None
        server = ManagementServer(run.mplaunch_sock, SupervisorControl(self), self.bus)
        await server.start()
        LOG.debug("management socket %s", run.mplaunch_sock)
        watchdog = asyncio.create_task(self.notifier.run_watchdog())
        try:
            if self.spec.emulators:
                preflight(self.spec.vm.sandbox)  # the sandbox: fail closed, warn if weakened
            first, last = self.spec.vm.uid_range
            uids = UidPool(first, last)
            spares = SparePool(self.spec, uids) if WARM_SPARE else None
            self.spares = spares
            for emulator in self.spec.emulators:
                slot = EmulatorSlot(self.spec, emulator, run, self._give_up, uids, spares,
                                    listen=self.backends_only)
                slot.emit = self.emit
                slots.append(slot)
            self.slots = slots
            for slot in slots:
                slot.start_keepers(self._qemu_closed_session)
            for slot in slots:
                if self._stop.is_set():
                    return EXIT_OK
                await slot.start()
            if self._stop.is_set():
                return EXIT_OK
            if self.backends_only:
                return await self._serve_backends(run, slots)
            vhost = {cid: s.fileno() for slot in slots for cid, s in slot.qemu_ends.items()}
            fds = QemuFds(qmp_listener=listener.fileno(), vhost_user=vhost)
            argv = qemu_argv(self.spec, self.accel.accel, fds)
            qemu = await Qemu.start(
                self.spec.vm.name, argv, fds.all(), run.qemu_sock, self.spec.vm.console == "stdio"
            )
            self.qemu = qemu
            listener.close()
            for slot in slots:
                slot.close_qemu_ends()
            LOG.info("QEMU started (pid %d)", qemu.pid)
            if spares is not None:
                spares.replenish()
            return await self._supervise(qemu, slots)
        except SandboxError as e:  # the sandbox: an emulator not confined stops the VM
            LOG.error("%s", e)
            return EXIT_FAILED
        finally:
            self.notifier.stopping()
            watchdog.cancel()
            listener.close()
            if qemu is not None:
                status = await qemu.stop()
                LOG.info("QEMU exited (%s)", describe_status(status))
            if self.spares is not None:
                await self.spares.close()
            for slot in slots:
                status_or_none = await slot.stop()
                if status_or_none is not None:
                    LOG.info("emulator %s exited (%s)", slot.id, describe_status(status_or_none))
                slot.close()
            await server.close()
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
        LOG.debug("vhost-user session ended: %s", why)
        if self.backends_only and all(
            k.closed for slot in self.slots for k in slot.keepers.values()
        ):
            self.request_stop("QEMU closed every vhost-user connection")

    async def _serve_backends(self, run: RunFolder, slots: list[EmulatorSlot]) -> int:
        """Backend-only mode: no QEMU of ours; serve until QEMU has come and gone,
        or a stop signal."""
        for slot in slots:
            for cid in slot.listeners:
                LOG.info("controller %s waits for QEMU on %s", cid, backend_socket(run.path, cid))
        if self.spares is not None:
            self.spares.replenish()
        tasks = [asyncio.create_task(slot.accept_frontends()) for slot in slots]
        tasks += [asyncio.create_task(slot.supervise()) for slot in slots]
        self.notifier.ready(f"VM {self.spec.vm.name}: emulators serving")
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        return EXIT_FAILED if self.outcome.emulator_died else EXIT_OK

    async def _give_up(self, action: GiveUp) -> None:
        """The restart policy gave up on an emulator: pause or power off the VM."""
        LOG.error("%s", action.reason)
        self.outcome.gave_up = action.reason
        qemu = self.qemu
        if action.action is GiveUpAction.PAUSE and qemu is not None:
            with contextlib.suppress(Exception):
                await qemu.execute("stop")
                return
        self.outcome.emulator_died = action.reason
        self._stop.set()

    async def _supervise(self, qemu: Qemu, slots: list[EmulatorSlot]) -> int:
        stop = asyncio.create_task(self._stop.wait())
        watchers = [asyncio.create_task(slot.supervise()) for slot in slots]
        connect = asyncio.create_task(qemu.connect())
        try:
            await asyncio.wait({connect, stop, qemu.exited}, return_when=asyncio.FIRST_COMPLETED)
            if connect.done() and connect.exception() is None:
                LOG.debug("connected to QEMU's QMP")
                self.notifier.ready(f"VM {self.spec.vm.name} running")
                events = asyncio.create_task(self._follow_events(qemu))
                try:
                    await asyncio.wait({stop, qemu.exited}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    events.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await events
            elif connect.done() and not qemu.exited.done():
                LOG.error("cannot talk to QEMU: %s", connect.exception())
                return EXIT_FAILED
        finally:
            for task in (stop, connect, *watchers):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.outcome.emulator_died:
            return EXIT_FAILED
        if self._stop.is_set():
            return EXIT_OK
        status = await qemu.exited
        if self.outcome.guest_shutdown and status == 0:
            return EXIT_OK
        LOG.error("QEMU died unexpectedly (%s)", describe_status(status))
        return EXIT_FAILED

    async def _follow_events(self, qemu: Qemu) -> None:
        async for name, data in qemu.events():
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
