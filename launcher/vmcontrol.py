"""What management can do to a running VM, on top of the supervisor.

The management socket (launcher.management) parses and checks QMP commands
(an id's syntax, a LUN in range, a block size: the rules of emulators.limits);
this module carries them out against the supervisor's slots and QEMU, and
says in one clear sentence why when it cannot. It owns the semantic checks
that need the live VM: ids that exist or are free, a LUN not yet used, an
image that is really there and that the spec allows (launcher.imagepolicy:
its image_dirs and devices), a disk that may only grow.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emulators.limits import image_size_problem
from launcher.imagepolicy import ImagePolicy, ImageRefused
from launcher.management.commands import CommandError, mplaunch_version
from launcher.slotbase import DiskChangeError, Slot
from launcher.slots import EmulatorSlot, skew_problem
from launcher.spec import DiskSpec
from launcher.status import LOG

if TYPE_CHECKING:
    from launcher.supervisor import Supervisor

RESTART_TIMEOUT = 30.0
SPARE_TIMEOUT = 30.0
"""How long an emulator upgrade waits for each spare of the installed code."""


def _fail(desc: str) -> CommandError:
    return CommandError("GenericError", desc)


class SupervisorControl:
    """The VM-control interface the management server calls."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sv = supervisor
        self.started = time.monotonic()
        self._disk_changes = asyncio.Lock()
        vm = supervisor.spec.vm
        #: What disk-add and disk-resize may touch: the spec's image_dirs and devices.
        self.images = ImagePolicy(vm.image_dirs, vm.devices)

    # -- queries

    async def query_status(self) -> dict[str, Any]:
        qemu = self.sv.qemu
        status = "prelaunch"
        running = False
        if qemu is not None:
            try:
                answer = await asyncio.wait_for(qemu.execute("query-status"), 5)
                status, running = str(answer["status"]), bool(answer["running"])
            except Exception as e:  # QEMU going away: say so rather than fail
                status = f"unknown ({e.__class__.__name__})"
        uptime = round(time.monotonic() - self.started, 1)
        return {"name": self.sv.spec.vm.name, "status": status, "running": running,
                "accel": str(self.sv.accel.accel), "uptime_s": uptime}

    async def query_emulators(self) -> list[dict[str, Any]]:
        out = []
        for slot in self.sv.slots:
            snap = slot.snapshot()
            out.append({
                "id": snap.id, "pid": snap.pid, "uid": snap.uid, "state": snap.state,
                "uptime_s": snap.uptime_s, "restarts": snap.restarts,
                "last_exit": snap.last_exit, "last_stall_ms": snap.last_stall_ms,
                "controllers": list(snap.controllers), "disks": list(snap.disks),
                "heartbeat_rtt_ms": snap.heartbeat_rtt_ms, "inflight": snap.inflight,
                "completed": snap.completed, "kind": snap.kind, "version": snap.version,
                "targets": None if snap.targets is None else dict(snap.targets),
            })
        return out

    async def query_disks(self) -> list[dict[str, Any]]:
        out = []
        for slot in self.sv.slots:
            for controller, disks in slot.disks.items():
                for d in disks:
                    try:
                        size = os.stat(d.image).st_size
                    except OSError:
                        size = None
                    out.append({"id": d.id, "emulator": slot.id, "controller": controller,
                                "lun": d.lun, "image": str(d.image), "size": size,
                                "readonly": d.readonly, "block_size": d.block_size})
        return out

    # -- changes

    def _no_migration(self, what: str) -> None:
        """Disks stay as the migration's hello described them until it ends."""
        sv = self.sv
        if sv.incoming_pending or (sv.migration is not None and sv.migration.progress.under_way):
            raise _fail(f"{what} is refused while a migration is under way")

    def _slot(self, emulator_id: str) -> Slot:
        for slot in self.sv.slots:
            if slot.id == emulator_id:
                return slot
        known = ", ".join(s.id for s in self.sv.slots) or "none"
        raise CommandError("DeviceNotFound", f"no emulator '{emulator_id}'; known: {known}")

    def _disk(self, disk_id: str) -> tuple[Slot, DiskSpec]:
        for slot in self.sv.slots:
            disk = slot.disk(disk_id)
            if disk is not None:
                return slot, disk
        raise CommandError("DeviceNotFound", f"no disk '{disk_id}'")

    async def emulator_restart(self, id: str) -> None:
        slot = self._slot(id)
        snap = slot.snapshot()
        if snap.pid is None:
            raise _fail(f"emulator '{id}' is not running ({snap.state})")
        slot.request_restart()
        deadline = time.monotonic() + RESTART_TIMEOUT
        while slot.snapshot().restarts == snap.restarts:
            if time.monotonic() > deadline:
                raise _fail(f"emulator '{id}' did not come back in {RESTART_TIMEOUT:.0f} s")
            await asyncio.sleep(0.005)

    async def disk_add(self, id: str, controller: str, lun: int, image: str,
                       readonly: bool = False, block_size: int = 512) -> None:
        # One disk change at a time: two adds must not both pass the id and
        # LUN checks before either is recorded.
        self._no_migration("disk-add")
        async with self._disk_changes:
            if any(slot.disk(id) for slot in self.sv.slots):
                raise _fail(f"disk id '{id}' is already in use")
            owner = next((s for s in self.sv.slots if controller in s.disks), None)
            if owner is None:
                raise CommandError("DeviceNotFound", f"no controller '{controller}'")
            refused = owner.disk_changes_refused("disk-add")
            if refused is not None:  # before the image is even looked at
                raise _fail(refused)
            path = Path(image)
            try:
                fd, st = self.images.open(image, readonly)
            except ImageRefused as e:
                raise _fail(str(e)) from None
            except OSError as e:
                raise _fail(f"image '{image}': {e.strerror}") from None
            try:
                if stat.S_ISREG(st.st_mode):
                    problem = image_size_problem(st.st_size, block_size)
                    if problem is not None:
                        raise _fail(f"image '{image}' {problem}")
                real = Path(os.readlink(f"/proc/self/fd/{fd}"))
                disk = DiskSpec(id=id, controller=controller, lun=lun, image=real,
                                format="raw", readonly=readonly, block_size=block_size)
                await owner.add_disk(disk, opened=fd)
            except (DiskChangeError, OSError) as e:
                raise _fail(str(e)) from None
            finally:
                os.close(fd)
        LOG.info("disk %s added: %s at LUN %d of %s", id, path, lun, controller)
        self.sv.emit("DISK_ADDED", {"id": id, "controller": controller, "lun": lun,
                                    "image": str(path), "size": st.st_size,
                                    "readonly": readonly, "block_size": block_size})

    async def disk_remove(self, id: str) -> None:
        self._no_migration("disk-remove")
        async with self._disk_changes:
            slot, disk = self._disk(id)
            try:
                await slot.remove_disk(disk)
            except DiskChangeError as e:
                raise _fail(str(e)) from None
        LOG.info("disk %s removed from %s", id, disk.controller)
        self.sv.emit("DISK_REMOVED", {"id": id, "controller": disk.controller, "lun": disk.lun})

    async def disk_resize(self, id: str, size: int) -> None:
        self._no_migration("disk-resize")
        async with self._disk_changes:
            slot, disk = self._disk(id)
            refused = slot.disk_changes_refused("disk-resize")
            if refused is not None:
                raise _fail(refused)
            if disk.readonly:
                raise _fail(f"disk '{id}' is read-only")
            held = slot.disk_fds.get(id)
            if held is not None:
                try:
                    self.images.check(held, str(disk.image))
                except ImageRefused as e:
                    raise _fail(str(e)) from None
            try:
                old_size = await slot.resize_disk(disk, size)
            except (DiskChangeError, OSError) as e:
                raise _fail(str(e)) from None
        LOG.info("disk %s resized from %d to %d bytes", id, old_size, size)
        self.sv.emit("DISK_RESIZED", {"id": id, "old_size": old_size, "new_size": size})

    async def quit(self) -> None:
        self.sv.request_stop("quit command")

    async def upgrade_emulators(self) -> list[dict[str, Any]]:
        """Replace the spare by one of the code installed now, check that it can
        take over (state store layout; the control protocol was checked when
        its READY was read), then hand each scsi emulator's role to a fresh
        spare, one at a time, each with a warm spare's stall."""
        pool = self.sv.spares
        if pool is None:
            raise _fail("this VM has no warm spare to hand its emulators to "
                        "(none of its emulators is of kind scsi)")
        async with self._disk_changes:  # no disk change while roles move
            await pool.renew()
            try:
                spare = await pool.ready_spare(SPARE_TIMEOUT)
            except TimeoutError:
                raise _fail(f"no spare of the installed code was ready in {SPARE_TIMEOUT:.0f} s; "
                            "the emulators keep serving") from None
            ready = spare.link.ready.result()
            problem = skew_problem(ready)
            if problem is not None:
                raise _fail(f"the emulator code installed now cannot take over: {problem}; "
                            "the emulators keep serving")
            LOG.info("upgrading the emulators to %s", ready.version or "an unnamed version")
            for slot in self.sv.slots:
                if not isinstance(slot, EmulatorSlot):
                    continue
                await pool.ready_spare(SPARE_TIMEOUT)
                await self.emulator_restart(slot.id)
        return await self.query_emulators()

    async def migrate(self, uri: str) -> None:
        from launcher.migration.source import MigrationSource
        from launcher.migration.uri import parse_uri

        if self.sv.migration is None:
            self.sv.migration = MigrationSource(self.sv)
        refused = self.sv.migration.refused()
        if refused is not None:
            raise _fail(refused)
        self.sv.migration.start(parse_uri(uri))

    async def query_migrate(self) -> dict[str, Any]:
        if self.sv.migration is not None:  # a VM that arrived may leave again: this first
            return await self.sv.migration.answer()
        if self.sv.incoming is not None:
            return await self.sv.incoming.answer()
        return {"status": "none"}

    async def migrate_cancel(self) -> None:
        refused = ("no migration is under way" if self.sv.migration is None
                   else self.sv.migration.cancel())
        if refused is not None:
            raise _fail(refused)

    async def upgrade(self) -> dict[str, Any]:
        refused = self.sv.upgrade_refused()
        if refused is not None:
            raise _fail(refused)
        self.sv.request_upgrade()
        return {"pid": os.getpid(), "package": mplaunch_version()["package"]}
