"""A launcher carrying on with a VM whose launcher went away.

Why this works at all: the VM's processes are the holder's children, not
the launcher's, and every long-lived fd the launcher used has a copy in the
holder (names: :mod:`launcher.holdnames`). What the fds cannot say is in
the run folder: vm-state.json (the spec as started, who served each slot,
the disks as they are now, the restart counters) and one record per
session keeper (the vhost-user session QEMU set up). A launcher that finds
the run folder locked connects to the holder; if no other launcher is
attached, it gets all of that back and adopts:

1. the run folder, through the lock fd the holder kept (flock belongs to
   the open file, and that fd is the one that holds it);
2. the spec as started (an edited file takes effect at the next start);
3. each slot: disks, state store, the keepers' QEMU-side sockets and their
   records; the serving emulator with its control link and vhost-user
   sockets if it still runs (no replay: it holds the session already),
   else the slot restarts it as after a crash;
4. QEMU, by its pid and pidfd, and QMP again by its socket's path;
5. the management socket, still listening on the same path.

Spares, and any process the state does not name, are killed: a spare is
cheap to make again, and an unnamed child is one the last launcher had not
finished installing when it went. A VM this launcher cannot carry on with
(no usable state, or a kind whose relay lived in the launcher) is stopped
whole through the holder, and then started afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from launcher import children, holdnames, keeperrecord
from launcher.emulators import EmulatorProcess
from launcher.heartbeat.link import ControlLink
from launcher.holder import protocol as hp
from launcher.holder.client import HolderClient, HolderGone, Refused
from launcher.occupant import Occupant
from launcher.qemu import Qemu
from launcher.runfolder import RunFolder, RunFolderBusy, RunFolderError, RunFolderForeign
from launcher.slots import HeldSlot
from launcher.spec import EmulatorSpec, Spec, SpecError
from launcher.status import LOG
from launcher.uidpool import Lease, UidPool
from launcher.vmstate import SlotState, VmState, VmStateError

if TYPE_CHECKING:
    from launcher.supervisor import Supervisor

DISCARD_WAIT_S = 5.0
"""How long a killed spare may take to be reaped before its uid is let go anyway."""


class CannotReattach(Exception):
    """The VM is running under a holder but this launcher cannot carry it on;
    it is left running (the message says how to stop it)."""


class Unsupported(CannotReattach):
    """A VM no launcher can carry on (a kind whose relay lived in the launcher
    that went, or one that was still starting): it is stopped and started
    afresh."""


@dataclass
class Attachment:
    """What the holder and the run folder gave back; consumed once."""

    client: HolderClient
    host: children.HolderHost
    welcome: hp.Welcome
    fds: dict[str, list[int]]
    run: RunFolder
    state: VmState
    spec: Spec
    management: socket.socket | None = None
    leases: dict[int, Lease] = field(default_factory=dict)

    # -- what the supervisor asks for, in this order

    async def discard_spares(self) -> None:
        """Kill every live child the state does not name as QEMU or as a
        slot's occupant: spares, and processes a launcher left half-installed."""
        named = {self.state.qemu_pid} | {s.pid for s in self.state.slots.values() if s.pid}
        doomed = []
        for child in self.welcome.children:
            if child.pid in named:
                continue
            process = self.host.adopt(child.pid)
            LOG.info("stopping %s (pid %d), which the re-attached launcher does not use",
                     child.tag, child.pid)
            process.kill()
            doomed.append(process.exited)
        if doomed:
            await asyncio.wait(doomed, timeout=DISCARD_WAIT_S)

    def slot(self, emulator: EmulatorSpec, uids: UidPool) -> HeldSlot:
        """One slot's fds and record, its occupant adopted if it still runs."""
        eid = emulator.id
        state = self.state.slots.get(eid) or SlotState()
        disks = {c.id: list(state.disks.get(c.id, ())) for c in self.spec.controllers_of(eid)}
        disk_fds = {d.id: self._one(holdnames.disk(eid, d.id))
                    for ds in disks.values() for d in ds}
        keeper_ends = {cid: socket.socket(fileno=self._one(holdnames.keeper(eid, cid)))
                       for cid in disks}
        records: dict[str, tuple[bytes, list[int]]] = {}
        for cid in disks:
            path = self.run.keeper_record(eid, cid)
            try:
                data = keeperrecord.read(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                LOG.error("%s: cannot read: %s", path, e.strerror)
                continue
            records[cid] = (data, self.fds.pop(holdnames.record(eid, cid), []))
        held = HeldSlot(disks=disks, disk_fds=disk_fds,
                        state_fd=self._one(holdnames.state(eid)),
                        keeper_ends=keeper_ends, records=records, stats=state.stats(),
                        policy=state.policy, ended_pid=state.pid or 0,
                        version=state.version or None)
        held.occupant = self._occupant(eid, state, [c.id for c in self.spec.controllers_of(eid)],
                                       uids)
        if held.occupant is None and state.pid:
            try:
                process = self.host.adopt(state.pid)
            except children.UnknownChild:  # its end went to the launcher that went
                return held
            if process.exited.done():
                held.ended_status = process.exited.result()
            else:  # alive but not adoptable: kill it, then restart as after a crash
                process.kill()
        return held

    def _occupant(self, eid: str, state: SlotState, controllers: list[str],
                  uids: UidPool) -> Occupant | None:
        live = {c.pid for c in self.welcome.children}
        name = holdnames.occupant(eid)
        fds = self.fds.pop(name, None)
        usable = bool(state.pid and state.pid in live and state.uid is not None and fds)
        if fds is not None and len(fds) < 1 + len(controllers):
            LOG.error("emulator %s: the holder kept %d of its fds, %d wanted: restarting it",
                      eid, len(fds), 1 + len(controllers))
            usable = False
        if not usable or fds is None or state.pid is None or state.uid is None:
            for fd in fds or ():
                os.close(fd)
            if fds is not None:
                self.host.unhold(name)  # its successor's go under the same name
            return None
        link = ControlLink(eid, socket.socket(fileno=fds[0]), adopted=True)
        backends = {cid: socket.socket(fileno=fd)
                    for cid, fd in zip(controllers, fds[1:], strict=False)}
        output = fds[1 + len(controllers)] if len(fds) > 1 + len(controllers) else -1
        proc = EmulatorProcess.adopt(eid, self.host.adopt(state.pid), output)
        lease = self.leases.pop(state.uid, None)
        if lease is not None:
            uids.adopt(lease)
        else:
            LOG.warning("emulator %s: uid %d was not held while no launcher was attached",
                        eid, state.uid)
        return Occupant(proc, link, state.uid, backends)

    async def release_leftovers(self) -> None:
        """Uids that no adopted process runs under any more, and held fds
        nobody took: let go (in the holder too)."""
        for uid, lease in list(self.leases.items()):
            if uid == self.state.qemu_uid:
                continue
            lease.release()  # in the holder too
            del self.leases[uid]
        for name, fds in list(self.fds.items()):
            if name.startswith(("record:", "occ:")):
                self.host.unhold(name)
                for fd in fds:
                    os.close(fd)
                del self.fds[name]

    def qemu(self, run: RunFolder) -> Qemu:
        """QEMU, adopted: its QMP is reached again by path (QEMU takes a new
        client once the old one is gone)."""
        output = self.fds.pop(holdnames.QEMU_OUTPUT, [-1])[0]
        assert self.state.qemu_pid is not None  # checked by _adopt
        qemu = Qemu.adopt(self.spec.vm.name, self.host.adopt(self.state.qemu_pid),
                          run.qemu_sock, output)
        qemu.uid = self.state.qemu_uid
        lease = self.leases.pop(self.state.qemu_uid or -1, None)
        if lease is not None:
            held = lease
            qemu.exited.add_done_callback(lambda _: held.release())  # reaped: uid free
        return qemu

    def _one(self, name: str) -> int:
        fds = self.fds.pop(name, None)
        if not fds:
            raise CannotReattach(f"the holder keeps no {name}")
        for extra in fds[1:]:
            os.close(extra)
        return fds[0]


def _close_all(fds: dict[str, list[int]]) -> None:
    for group in fds.values():
        for fd in group:
            with contextlib.suppress(OSError):
                os.close(fd)
    fds.clear()


async def connect(spec: Spec, busy: RunFolderBusy) -> Attachment | None:
    """Attach to the VM's holder. Raises `busy` (another launcher is
    attached, or the folder's owner is not a holder this launcher can
    reach); None when the VM was stopped here because it could not be
    carried on, or its holder just went (the folder is stale: start afresh)."""
    path = spec.vm.run_dir / "holder.sock"
    try:
        client, attached = await HolderClient.connect(str(path))
    except Refused:
        raise busy from None
    except (FileNotFoundError, ConnectionRefusedError, HolderGone):
        await asyncio.sleep(0.2)  # a holder in its last moments: the lock goes with it
        return None
    fds = attached.fds
    try:
        return _adopt(spec, client, attached.welcome, fds)
    except RunFolderForeign:
        _close_all(fds)
        client.close()
        raise busy from None
    except Unsupported as e:
        LOG.error("cannot re-attach to VM %s: %s; stopping what is left of it",
                  spec.vm.name, e)
        _close_all(fds)
        with contextlib.suppress(Exception):
            await client.shutdown()
        for _ in range(100):  # its socket goes last, once every child is reaped
            if not path.exists():
                break
            await asyncio.sleep(0.05)
        return None
    except (CannotReattach, VmStateError, RunFolderError, SpecError, OSError) as e:
        # Another mplaunch's state (older or newer), a damaged one, or a spec
        # that no longer checks out (an image removed since): the VM runs on.
        # Stopping a guest because this launcher cannot read its state would
        # lose more than it saves.
        _close_all(fds)
        client.close()
        why = "; ".join(e.problems) if isinstance(e, SpecError) else str(e)
        raise CannotReattach(
            f"cannot re-attach to VM {spec.vm.name}: {why}; it runs on under its holder "
            f"(pid {attached.welcome.pid}): an mplaunch that can read its state may attach, "
            f"and `kill {attached.welcome.pid}` stops it") from None


def _adopt(spec: Spec, client: HolderClient, welcome: hp.Welcome,
           fds: dict[str, list[int]]) -> Attachment:
    lock = fds.pop(holdnames.RUN_LOCK, None)
    if not lock:
        raise Unsupported("the holder keeps no run folder lock")
    run = RunFolder.adopt(spec.vm.run_dir, spec.vm.name, lock[0])
    try:
        state = VmState.load(run.vm_state_file)
        as_started = state.spec()
        if as_started.has_lsi:
            raise Unsupported("its lsi emulators' relay ran in the launcher that went")
        if state.backends_only:
            raise Unsupported("it serves backends only (--backends-only)")
        if state.qemu_pid is None:
            raise Unsupported("QEMU had not started yet")
        if spec_text(spec.path) != state.spec_text:
            LOG.warning("%s changed since VM %s started; the spec as started applies "
                        "until the VM stops", spec.path, spec.vm.name)
        host = children.HolderHost(client, welcome)
        children.install(host)
        attachment = Attachment(client, host, welcome, fds, run, state, as_started)
        mgmt = fds.pop(holdnames.MANAGEMENT, None)
        if mgmt:
            attachment.management = socket.socket(fileno=mgmt[0])
        for name in list(fds):
            if name.startswith("lease:"):
                uid = int(name.partition(":")[2])
                attachment.leases[uid] = Lease.from_fd(uid, spec.vm.name, fds.pop(name)[0])
        return attachment
    except BaseException:
        run.release_lock_only()
        raise


def spec_text(path: Path | str) -> str | None:
    """The spec file's text as it is now (None if it cannot be read)."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def state_of(sv: Supervisor) -> VmState:
    """The VM's state as a re-attaching launcher needs it."""
    qemu = sv.qemu
    slots = {}
    for slot in sv.slots:
        snap = slot.snapshot()
        slots[slot.id] = SlotState.of(snap.pid, snap.uid, dict(slot.disks),
                                      getattr(slot, "stats", None),
                                      getattr(slot, "policy", None), snap.version)
    return VmState(spec_path=str(sv.spec.path), spec_text=sv.spec_text,
                   accel=str(sv.accel.accel), started=sv.started,
                   backends_only=sv.backends_only,
                   qemu_pid=qemu.pid if qemu is not None else None,
                   qemu_uid=qemu.uid if qemu is not None else None,
                   slots=slots)
