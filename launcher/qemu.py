"""QEMU as a child: start it, talk QMP to it, stop it, always reap it.

mplaunch binds QEMU's QMP socket itself and hands QEMU the listening fd, so
it can connect at once without waiting for a path to appear, and speaks QMP
through QEMU's own client library (qemu.qmp).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from launcher.status import LOG

QUIT_TIMEOUT = 5.0
TERM_TIMEOUT = 5.0


def bind_qmp_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(4)
    sock.set_inheritable(True)
    return sock


class Qemu:
    """One QEMU process and our QMP connection to it."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, qmp_path: Path) -> None:
        self.name = name
        self.process = process
        self.qmp_path = qmp_path
        self.qmp = QMPClient(name)
        self.exited: asyncio.Task[int] = asyncio.create_task(process.wait())

    @classmethod
    async def start(
        cls, name: str, argv: Sequence[str], pass_fds: Sequence[int], qmp_path: Path, stdio: bool
    ) -> Qemu:
        LOG.debug("starting %s", " ".join(argv))
        process = await asyncio.create_subprocess_exec(
            *argv,
            pass_fds=tuple(pass_fds),
            stdin=None if stdio else subprocess.DEVNULL,
            stdout=None if stdio else subprocess.DEVNULL,
            stderr=None,
            # QEMU stays in mplaunch's process group when it owns the terminal (a
            # background group would be stopped by SIGTTIN); otherwise it gets its
            # own, so a terminal's Ctrl-C reaches only mplaunch, which stops it in order.
            process_group=None if stdio and sys.stdin.isatty() else 0,
        )
        return cls(name, process, qmp_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def connect(self, timeout: float = 30.0) -> None:
        """Connect QMP; fails early if QEMU exits first."""
        connecting = asyncio.create_task(self.qmp.connect(str(self.qmp_path)))
        done, _ = await asyncio.wait(
            {connecting, self.exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if connecting in done:
            connecting.result()
            return
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        if self.exited in done:
            raise RuntimeError(f"QEMU exited with status {self.exited.result()} during start-up")
        raise TimeoutError(f"QEMU's QMP did not answer within {timeout:.0f} s")

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        async for event in self.qmp.events:
            name = str(event["event"])
            data = event.get("data", {})
            yield name, data if isinstance(data, dict) else {}

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, arguments)

    async def stop(self) -> int:
        """quit through QMP, then SIGTERM, then SIGKILL; always reaps."""
        quit_sent = False
        if not self.exited.done() and self.qmp.runstate.name == "RUNNING":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), QUIT_TIMEOUT)
                quit_sent = True
        # Without a quit on its way (QMP not up yet), waiting would only let the guest run on.
        steps = (
            ((None, QUIT_TIMEOUT),) if quit_sent else ()
        ) + ((signal.SIGTERM, TERM_TIMEOUT), (signal.SIGKILL, None))
        for sig, timeout in steps:
            if self.exited.done():
                break
            if sig is not None:
                LOG.debug("sending %s to QEMU (pid %d)", sig.name, self.pid)
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        await self.disconnect()
        return await self.exited

    async def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
