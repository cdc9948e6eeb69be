"""The destination's side of a live migration: ``mplaunch --incoming URI``.

Theory of operation (docs/management.md, "Live migration"): the emulators
run (QEMU's vhost-user set-up needs them) and QEMU waits with ``-S
-incoming defer``. This listens on the URI and takes, in this order, the
state channel (whose hello must match this VM: disks, sizes, emulators,
layout) and then QEMU's stream, which goes to QEMU (``getfd``,
``migrate-incoming fd:NAME``). Once QEMU's incoming migration completed
and the source's state arrived (sent once the source's rings stopped),
each emulator is restarted from its state, QEMU ``cont``s, and the source
is told "running". Anything else ends it with the guest never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any

from launcher.migration.channel import (
    Abort,
    Accept,
    ChannelClosed,
    Done,
    Failed,
    Hello,
    Kind,
    Refuse,
    Role,
    Running,
    StateBlob,
)
from launcher.migration.compat import hello_problems
from launcher.migration.source import HELLO_TIMEOUT_S, MIGRATION_POLL_S, QEMU_FD_NAME, hello_of
from launcher.migration.status import Progress, Status
from launcher.migration.stream import (
    Arrivals,
    ChannelStream,
    MigrationError,
    listen,
    unlink_listener,
)
from launcher.migration.uri import MigrationUri
from launcher.statestore import layout, transfer
from launcher.status import LOG

if TYPE_CHECKING:
    from launcher.qemu import Qemu
    from launcher.supervisor import Supervisor

PREFIX = "incoming migration:"


async def read_hello(stream: ChannelStream) -> Hello | str:
    """The source's hello, or what came instead (for the log)."""
    try:
        got = await asyncio.wait_for(stream.receive(), HELLO_TIMEOUT_S)
    except TimeoutError:
        return f"no hello in {HELLO_TIMEOUT_S:.0f} s"
    except MigrationError as e:  # a broken channel or bad input, named
        return str(e)
    return got if isinstance(got, Hello) else "no hello before it closed"


class IncomingMigration:
    """One incoming migration for a VM's supervisor; `open()` first (binds
    the URI, so a bad one fails before anything starts), then `receive()`."""

    def __init__(self, sv: Supervisor, uri: MigrationUri) -> None:
        self.sv = sv
        self.uri = uri
        self.progress = Progress()
        self.listener: socket.socket | None = None
        self.arrivals: Arrivals | None = None
        #: True once the guest ran here (from then on: a plain VM).
        self.done = False

    def open(self) -> None:
        self.listener = listen(self.uri)

    def close(self) -> None:
        if self.arrivals is not None:
            self.arrivals.close()
            self.arrivals = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            unlink_listener(self.uri)

    def _set(self, status: Status, error: str | None = None) -> None:
        if self.progress.set(status, error):
            self.sv.emit("MIGRATION", self.progress.event())

    async def answer(self) -> dict[str, Any]:
        return self.progress.answer()

    async def receive(self, qemu: Qemu) -> bool:
        """True once the guest runs here; False (logged, the source told) if not."""
        stream: ChannelStream | None = None
        try:
            await qemu.connect()
            await qemu.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            self.progress.begin(str(self.uri))
            self.sv.emit("MIGRATION", self.progress.event())
            LOG.info("%s waiting on %s", PREFIX, self.uri)
            stream = await self._accept_source(qemu)
            self._set(Status.ACTIVE)
            peer = asyncio.create_task(self._collect_state(stream))
            try:
                await self._take_qemu_stream(qemu, peer)
                await self._incoming_done(qemu, peer)
                LOG.info("%s RAM and devices received", PREFIX)
                blobs = await self._wait(qemu, peer)
                arrived = time.monotonic()
            finally:
                if not peer.done():
                    peer.cancel()
                    with contextlib.suppress(BaseException):
                        await peer
            await self._load(blobs)
            await qemu.execute("cont")
            await stream.send(Running())
        except Exception as e:  # MigrationError, QEMU refused a command, QMP broke
            why = str(e) or type(e).__name__
            LOG.error("%s failed: %s; the guest never ran here", PREFIX, why)
            self._set(Status.FAILED, why)
            if stream is not None and stream.channel.state.value in ("transfer",
                                                                     "running-wait"):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(stream.send(Failed(why)), 2)
            return False
        finally:
            if stream is not None:
                stream.close()
            self.close()
        self.done = True
        LOG.info("%s guest running (%.0f ms after the source's state arrived)", PREFIX,
                 (time.monotonic() - arrived) * 1000)
        self._set(Status.COMPLETED)
        return True

    async def _accept_source(self, qemu: Qemu) -> ChannelStream:
        """The state channel, hello checked and answered."""
        while True:
            kind, conn = await self._race(qemu, self._arrivals().next())
            if kind is not Kind.STATE:
                LOG.warning("%s closed a connection that is %s before any state channel",
                            PREFIX, "QEMU's stream" if kind is Kind.QEMU else "neither "
                            "mplaunch's state channel nor QEMU's stream")
                conn.close()
                continue
            stream = ChannelStream(conn, Role.DESTINATION)
            try:
                hello = await self._race(qemu, read_hello(stream))
            except BaseException:
                stream.close()
                raise
            if isinstance(hello, Hello):
                break
            # Not a source to refuse: one that cannot even say hello gets no
            # say in this migration (anyone may connect to a tcp: URI).
            stream.close()
            LOG.warning("%s closed a state channel that sent %s; still waiting", PREFIX, hello)
        ours = hello_of(self.sv)
        problems = hello_problems(ours, hello)
        if problems:
            reason = f"VM {ours.vm} cannot take VM {hello.vm}: " + "; ".join(problems)
            with contextlib.suppress(Exception):
                await stream.send(Refuse(reason))
            stream.close()
            raise MigrationError(reason)
        await stream.send(Accept(ours.vm))
        LOG.info("%s source VM %s accepted (%d disks, sizes match)", PREFIX, hello.vm,
                 len(hello.disks))
        return stream

    def _arrivals(self) -> Arrivals:
        if self.arrivals is None:
            assert self.listener is not None
            self.arrivals = Arrivals(self.listener)
        return self.arrivals

    async def _race(self, qemu: Qemu, aw: Any) -> Any:
        """`aw`'s result, unless QEMU exits first (then MigrationError)."""
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait({task, qemu.exited},
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise MigrationError(f"QEMU exited (status {qemu.exited.result()}) during the "
                             "incoming migration")

    async def _collect_state(self, stream: ChannelStream) -> dict[str, StateBlob]:
        """Every emulator's state, once the source says done."""
        blobs: dict[str, StateBlob] = {}
        while True:
            got = await stream.receive()
            if isinstance(got, StateBlob):
                if got.emulator in blobs:
                    raise MigrationError(f"the source sent emulator {got.emulator}'s state "
                                         "twice")
                blobs[got.emulator] = got
            elif isinstance(got, Done):
                if got.count != len(blobs):
                    raise MigrationError(f"the source said {got.count} states, sent "
                                         f"{len(blobs)}")
                return blobs
            elif isinstance(got, Abort):
                raise MigrationError(f"the source aborted: {got.reason}")
            elif isinstance(got, ChannelClosed):
                raise MigrationError("the source closed the state channel before its "
                                     "state arrived")
            else:
                raise MigrationError(f"the source sent {got} out of order")

    async def _take_qemu_stream(self, qemu: Qemu, peer: asyncio.Task[Any]) -> None:
        while True:
            kind, conn = await self._wait(qemu, peer, self._arrivals().next())
            if kind is Kind.QEMU:
                break
            LOG.warning("%s closed a connection that is not QEMU's stream", PREFIX)
            conn.close()
        try:
            qemu.qmp.send_fd_scm(conn.fileno())
            await qemu.execute("getfd", {"fdname": QEMU_FD_NAME})
        finally:
            conn.close()
        await qemu.execute("migrate-incoming", {"uri": f"fd:{QEMU_FD_NAME}"})
        LOG.info("%s QEMU's stream arrived", PREFIX)
        self.close()  # nothing else may come

    async def _wait(self, qemu: Qemu, peer: asyncio.Task[Any], aw: Any = None) -> Any:
        """`aw`'s result (or, without one, `peer`'s), unless QEMU exits or the
        state channel fails first (MigrationError either way)."""
        task = asyncio.ensure_future(aw) if aw is not None else peer
        try:
            while True:
                done, _ = await asyncio.wait({task, peer, qemu.exited},
                                             return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    return task.result()
                if qemu.exited in done:
                    raise MigrationError(f"QEMU exited (status {qemu.exited.result()}): its "
                                         "incoming migration failed")
                if peer in done:
                    peer.result()  # raises if the source gave up or the channel broke
                    # The state is here before QEMU is done: fine, keep waiting.
                    await asyncio.wait({task, qemu.exited},
                                       return_when=asyncio.FIRST_COMPLETED)
                    if task.done():
                        return task.result()
        finally:
            if task is not peer and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _incoming_done(self, qemu: Qemu, peer: asyncio.Task[Any]) -> None:
        """Until QEMU says its incoming migration completed."""
        with qemu.qmp.listener("MIGRATION") as events:
            while True:
                info = await self._wait(qemu, peer, qemu.execute("query-migrate"))
                status = str(info.get("status", "none"))
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise MigrationError(f"QEMU's incoming migration {status}: "
                                         f"{info.get('error-desc', 'no reason given')}")
                with contextlib.suppress(TimeoutError):
                    await self._wait(qemu, peer, asyncio.wait_for(events.get(), MIGRATION_POLL_S))

    async def _load(self, blobs: dict[str, StateBlob]) -> None:
        """Each emulator restarted from the source's state store."""
        from launcher.slots import EmulatorSlot

        slots = [s for s in self.sv.slots if isinstance(s, EmulatorSlot)]
        missing = sorted({s.id for s in slots} - blobs.keys())
        extra = sorted(blobs.keys() - {s.id for s in slots})
        if missing or extra:
            raise MigrationError("the source's state does not match the emulators here: "
                                 + "; ".join([f"none for {', '.join(missing)}"] * bool(missing)
                                             + [f"unknown {', '.join(extra)}"] * bool(extra)))
        for slot in slots:
            blob = blobs[slot.id]
            if blob.store_version != layout.VERSION:
                raise MigrationError(f"emulator {slot.id}: the source's state store layout "
                                     f"{blob.store_version} is not {layout.VERSION}")
            problem = transfer.image_problem(slot.state_fd, blob.data)
            if problem is not None:
                raise MigrationError(f"emulator {slot.id}: {problem}")
        for slot in slots:
            started = time.monotonic()
            await slot.load_migrated_state(blobs[slot.id].data)
            LOG.info("%s emulator %s restarted from the source's state (%.0f ms)", PREFIX,
                     slot.id, (time.monotonic() - started) * 1000)
