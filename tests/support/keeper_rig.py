"""Real emulator processes behind real session keepers, for tests.

The launcher's arrangement without the rest of the launcher: each controller's
front-end (a `VhostFrontend` playing QEMU 7.2, with its guest-side drivers) is
connected to a `SessionKeeper`, and the keeper relays to an emulator process
started as ``python -m emulators CONFIG_JSON`` over a socketpair of its own,
with a state store so that a replacement emulator resumes the rings.
`KeeperRig.replace_emulator` does what a slot does on a restart: a new
process, fresh socketpairs, and every keeper replaying its record to it.

Keepers live in an asyncio loop on a thread of their own (they are driven by
the loop's readers); the test thread plays QEMU and the guest with blocking
calls, and reaches a keeper through `KeeperRig.call`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from launcher.sessionkeeper import OneInFlight, Refusal, SessionKeeper
from launcher.statestore import layout
from tests.support.emulator_harness import (
    FIRST_REQUEST_QUEUE,
    REPO,
    ControllerRig,
    ControllerSpec,
    _make_rig,
    _open_disk,
)

T = TypeVar("T")
QUEUE_SLOTS = 18
LUN_SLOTS = 256


class LoopThread:
    """An asyncio loop running on its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn` on the loop's thread; its result (or exception)."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the caller
                done.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        self.loop.close()


@dataclass
class Emulator:
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


@dataclass
class KeeperRig:
    """Controllers as QEMU and the guest see them, each through a keeper."""

    specs: Sequence[ControllerSpec]
    loop: LoopThread
    rigs: list[ControllerRig]
    keepers: list[SessionKeeper]
    refusals: list[Refusal]
    disk_fds: list[int]
    state_fd: int
    state_path: Path
    emulator: Emulator | None = None
    old_emulators: list[Emulator] = field(default_factory=list)

    @classmethod
    def start(cls, specs: Sequence[ControllerSpec], tmp: Path) -> KeeperRig:
        """Spawn an emulator; connect each controller's front-end through a
        keeper and run QEMU's init and start on it."""
        loop = LoopThread()
        disk_fds = [_open_disk(d) for spec in specs for d in spec.disks]
        state_path = tmp / "state"
        state_fd = layout.create(state_path, layout.Layout(len(specs), QUEUE_SLOTS, LUN_SLOTS))
        refusals: list[Refusal] = []
        rigs: list[ControllerRig] = []
        keepers: list[SessionKeeper] = []
        rig = cls(specs, loop, rigs, keepers, refusals, disk_fds, state_fd, state_path)
        try:
            in_flight = loop.call(OneInFlight)  # one per emulator, as a slot has
            for spec in specs:
                qemu_side, keeper_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

                def make(spec: ControllerSpec = spec, sock: socket.socket = keeper_side) -> (
                    SessionKeeper
                ):
                    return SessionKeeper(
                        spec.id, sock, FIRST_REQUEST_QUEUE + spec.queues,
                        on_refused=refusals.append, guest_memory=spec.memory_size,
                        in_flight=in_flight,
                    )

                keepers.append(loop.call(make))
                rigs.append(_make_rig(spec, qemu_side))
            rig._spawn(replay=False)
            for controller in rigs:
                controller.frontend.init()
                controller.start()
        except BaseException:
            rig.close()
            raise
        return rig

    def call(self, fn: Callable[[], T]) -> T:
        return self.loop.call(fn)

    def _spawn(self, replay: bool) -> None:
        """A new emulator process; each keeper relays to it (replaying to a
        successor). Not a first start: no power-on unit attention to clear."""
        ours: list[socket.socket] = []
        child_fds: list[int] = []
        configs = []
        fds = iter(self.disk_fds)
        for spec in self.specs:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.append(mine)
            child_fds.append(theirs.detach())
            luns = tuple(
                LunConfig(d.lun, d.disk_id or f"{spec.id}-lun{d.lun}", next(fds), d.readonly,
                          d.block_size)
                for d in spec.disks
            )
            configs.append(ControllerConfig(spec.id, child_fds[-1], spec.queues, luns))
        config = EmulatorConfig(
            "emu", tuple(configs), state_fd=self.state_fd, first_start=False
        )
        fd, name = tempfile.mkstemp(prefix="emulator-stderr-")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "emulators", config.to_json()],
                pass_fds=config.all_fds(), env={}, cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
            )
        finally:
            os.close(fd)
            for child in child_fds:
                os.close(child)
        self.emulator = Emulator(proc, Path(name))
        for keeper, sock in zip(self.keepers, ours, strict=True):
            self.call(functools.partial(keeper.attach, sock, replay))

    def replace_emulator(self) -> Emulator:
        """The old emulator is gone (or is killed now): detach, start another,
        replay. Returns the old one."""
        old = self.emulator
        assert old is not None
        if old.alive():
            old.proc.kill()
        old.proc.wait(5.0)
        for keeper in self.keepers:
            self.call(keeper.detach)
        self.old_emulators.append(old)
        self._spawn(replay=True)
        return old

    def close(self) -> None:
        for keeper in self.keepers:
            self.call(keeper.close)
        for emulator in [*self.old_emulators, *([self.emulator] if self.emulator else [])]:
            emulator.stop()
            emulator.stderr_path.unlink(missing_ok=True)
        for rig in self.rigs:
            rig.close()
        for fd in (*self.disk_fds, self.state_fd):
            os.close(fd)
        self.disk_fds.clear()
        self.loop.close()
