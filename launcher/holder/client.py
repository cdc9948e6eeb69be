"""The launcher's side of the holder protocol, on asyncio.

One request is outstanding at a time (a lock); EXIT events that arrive
between or before replies go to a queue read by :meth:`HolderClient.events`.
A message the socket cannot take now (its buffer full: the holder is busy
reaping or spawning) waits for the socket to be writable; it is never lost
and never reordered.

Errors (see :mod:`launcher.holder.protocol` for the root)::

    HolderError
     +-- ProtocolError   the holder sent something this protocol does not allow
     +-- Refused         the holder refused this launcher (busy, version)
     +-- RequestFailed   the holder answered a request with Failed
     +-- HolderGone      the connection ended
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from launcher.holder import protocol as p
from launcher.holder.wire import recv, send


class Refused(p.HolderError):
    """The holder refused us; its message says why. Retrying will not help
    while another launcher is attached."""


class RequestFailed(p.HolderError):
    pass


class HolderGone(p.HolderError):
    """The connection to the holder ended (the holder died or closed it)."""


@dataclass
class Attached:
    """What a (re-)attaching launcher gets back."""
    welcome: p.Welcome
    fds: dict[str, list[int]] = field(default_factory=dict)


async def start_holder(path: str, idle_exit: float | None = None) -> asyncio.subprocess.Process:
    """Start a holder in a session of its own and wait for its socket."""
    argv = [sys.executable, "-I", "-m", "launcher.holder", path]
    if idle_exit is not None:
        argv.append(str(idle_exit))
    # An empty environment: the holder needs none (each spawn carries its
    # own), and its memory is what every emulator forked from it starts
    # with (launcher/template.py), so none of the launcher's may be in it.
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True, env={})
    for _ in range(500):
        if os.path.exists(path):
            return proc
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.01)
    raise HolderGone(f"holder did not come up on {path}")


def _close_reply_fds(exchange: asyncio.Future[tuple[p.Message, list[int]]]) -> None:
    if not exchange.cancelled() and exchange.exception() is None:
        for fd in exchange.result()[1]:
            os.close(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class HolderClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[tuple[p.Message, list[int]] | None] = asyncio.Queue()
        self._exits: asyncio.Queue[p.Exit | None] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._writable: asyncio.Future[None] | None = None  # a send waiting for room
        self._loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    async def connect(cls, path: str) -> tuple[HolderClient, Attached]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except OSError:
            sock.close()
            raise
        client = cls(sock)
        try:
            attached = await client._hello()
        except BaseException:
            client.close()
            raise
        return client, attached

    def _readable(self) -> None:
        try:
            got = recv(self._sock)
            if got is None:
                raise HolderGone("holder closed the connection")
            data, fds = got
            try:
                msg = p.decode(data, len(fds))
            except p.ProtocolError:
                for fd in fds:
                    os.close(fd)
                raise
        except BlockingIOError:
            return
        except (OSError, p.HolderError):
            self._loop.remove_reader(self._sock.fileno())
            self._inbox.put_nowait(None)
            self._exits.put_nowait(None)
            return
        if isinstance(msg, p.Exit):
            self._exits.put_nowait(msg)
        else:
            self._inbox.put_nowait((msg, fds))

    async def _next(self) -> tuple[p.Message, list[int]]:
        got = await self._inbox.get()
        if got is None:
            self._inbox.put_nowait(None)
            raise HolderGone("connection to the holder ended")
        return got

    async def _send(self, msg: p.Message, fds: list[int]) -> None:
        """Send one message, waiting while the socket's buffer is full."""
        while True:
            try:
                send(self._sock, msg, fds)
                return
            except BlockingIOError:
                pass
            if self._sock.fileno() < 0:
                raise HolderGone("connection to the holder closed")
            writable: asyncio.Future[None] = self._loop.create_future()
            fd = self._sock.fileno()
            self._loop.add_writer(fd, _wake, writable)
            self._writable = writable
            try:
                await writable
            finally:
                self._writable = None
                if self._sock.fileno() >= 0:
                    self._loop.remove_writer(fd)

    async def _hello(self) -> Attached:
        try:
            await self._send(p.Hello(p.VERSION), [])
        except OSError as e:
            raise HolderGone(f"sending hello: {e}") from None
        msg, _ = await self._next()
        if isinstance(msg, p.Refused):
            raise Refused(msg.message)
        if not isinstance(msg, p.Welcome):
            raise p.ProtocolError(f"{msg.TYPE} where a welcome was due")
        attached = Attached(msg)
        for entry in msg.inventory:
            part, fds = await self._next()
            if not (isinstance(part, p.Handover) and part.name == entry.name):
                raise p.ProtocolError(f"{part.TYPE} where the fds of {entry.name} were due")
            attached.fds[entry.name] = fds
        return attached

    async def _request(self, msg: p.Message, fds: list[int] = ()) -> tuple[p.Message, list[int]]:  # type: ignore[assignment]
        """Send `msg` and take its reply. A caller cancelled meanwhile does
        not cut the exchange short (the reply would answer the next request):
        it runs to its end, and the fds of its reply are closed."""
        exchange = asyncio.ensure_future(self._exchange(msg, list(fds)))
        try:
            reply, rfds = await asyncio.shield(exchange)
        except asyncio.CancelledError:
            exchange.add_done_callback(_close_reply_fds)
            raise
        if isinstance(reply, p.Failed):
            raise RequestFailed(reply.message)
        return reply, rfds

    async def _exchange(self, msg: p.Message, fds: list[int]) -> tuple[p.Message, list[int]]:
        async with self._lock:
            try:
                await self._send(msg, fds)
            except OSError as e:
                raise HolderGone(f"sending {msg.TYPE}: {e}") from None
            return await self._next()

    async def put(self, name: str, kind: str, fds: list[int]) -> None:
        await self._request(p.Put(name, kind, len(fds)), fds)

    async def drop(self, name: str) -> None:
        await self._request(p.Drop(name))

    async def spawn(self, tag: str, argv: list[str], env: dict[str, str] | None = None,
                    fds: list[p.Placement] = (), passed: list[int] = ()  # type: ignore[assignment]
                    ) -> tuple[int, int]:
        """Start a child of the holder; returns (pid, pidfd)."""
        msg = p.Spawn(tag, tuple(argv), tuple((env or {}).items()), tuple(fds), len(passed))
        reply, rfds = await self._request(msg, list(passed))
        if not isinstance(reply, p.Spawned):
            raise p.ProtocolError(f"{reply.TYPE} in answer to spawn")
        return reply.pid, rfds[0]

    async def signal(self, pid: int, sig: int) -> None:
        await self._request(p.Signal(int(pid), int(sig)))

    async def shutdown(self) -> None:
        """The holder kills every child and exits."""
        await self._request(p.Shutdown())
        self.close()

    async def events(self) -> AsyncIterator[p.Exit]:
        while True:
            x = await self._exits.get()
            if x is None:
                self._exits.put_nowait(None)
                return
            yield x

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def close(self) -> None:
        """Detach without a word (the holder keeps everything). A request in
        flight fails with :class:`HolderGone` and :meth:`events` ends."""
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
            self._sock.close()
            if self._writable is not None and not self._writable.done():
                self._writable.set_exception(HolderGone("connection to the holder closed"))
            self._inbox.put_nowait(None)
            self._exits.put_nowait(None)
