"""The I/O around the state channel: connect, listen, tell connections
apart, and a channel over an asyncio socket. Nothing here decides anything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import time

from launcher.migration.channel import (
    Channel,
    ChannelClosed,
    ChannelError,
    Kind,
    Message,
    Role,
    _NeedData,
    classify,
)
from launcher.migration.uri import MigrationUri

CHANNEL_READ_SIZE = 1 << 20
CONNECT_TIMEOUT_S = 15.0
CLASSIFY_TIMEOUT_S = 30.0
"""How long an accepted connection may take to send its first bytes."""
MAX_UNSORTED = 16
"""Connections told apart at once; more that arrive meanwhile are closed."""
ACCEPT_RETRY_S = 0.1


class MigrationError(Exception):
    """A migration that cannot go on; the message says why, for an operator."""


async def connect(uri: MigrationUri, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A connected, blocking-free socket to `uri`; MigrationError if none."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            if uri.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, uri.path)
                except BaseException:
                    sock.close()
                    raise
                return sock
            assert uri.host is not None and uri.port is not None
            infos = await loop.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
            last: OSError | None = None
            for family, kind, proto, _, addr in infos:
                sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, addr)
                except OSError as e:
                    sock.close()
                    last = e
                    continue
                except BaseException:
                    sock.close()
                    raise
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            raise last or OSError("no address")
    except TimeoutError:
        raise MigrationError(f"cannot connect to {uri}: no answer in {timeout:.0f} s") from None
    except OSError as e:
        raise MigrationError(f"cannot connect to {uri}: {e.strerror or e}") from None


def listen(uri: MigrationUri) -> socket.socket:
    """A listening socket on `uri` (a unix socket: mode 0600, a stale socket
    at the path replaced, any other file refused); MigrationError if not."""
    try:
        if uri.path is not None:
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISSOCK(os.lstat(uri.path).st_mode):
                    raise MigrationError(f"cannot listen on {uri}: {uri.path} exists and is "
                                         "not a socket")
                os.unlink(uri.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                sock.bind(uri.path)
            finally:
                os.umask(old)
        else:
            assert uri.host is not None and uri.port is not None
            infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except BaseException:
                sock.close()
                raise
        sock.listen(4)
        sock.setblocking(False)
        return sock
    except OSError as e:
        raise MigrationError(f"cannot listen on {uri}: {e.strerror or e}") from None


def unlink_listener(uri: MigrationUri) -> None:
    if uri.path is not None:
        with contextlib.suppress(OSError):
            os.unlink(uri.path)


async def sort_connection(conn: socket.socket) -> Kind:
    """What `conn` is from its first bytes (UNKNOWN also for one that sent
    too little in CLASSIFY_TIMEOUT_S). Nothing is read: the bytes stay for
    whoever takes the connection."""
    deadline = time.monotonic() + CLASSIFY_TIMEOUT_S
    while True:
        try:
            first = conn.recv(8, socket.MSG_PEEK)
        except BlockingIOError:
            first = None
        if first == b"":
            return Kind.UNKNOWN
        if first is not None:
            kind = classify(first)
            if kind is not None:
                return kind
        if time.monotonic() > deadline:
            return Kind.UNKNOWN
        await asyncio.sleep(0.005)  # wait for more of the first bytes


class Arrivals:
    """The connections to a listener as they arrive, each told apart by its
    first bytes (:func:`sort_connection`) in a task of its own, so that one
    that sends nothing holds up none after it. Stops (and closes what it
    holds) on :meth:`close`; the listener stays the caller's."""

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._sorted: asyncio.Queue[tuple[Kind, socket.socket]] = asyncio.Queue()
        self._sorting: set[asyncio.Task[None]] = set()
        self._acceptor = asyncio.create_task(self._accept())

    async def next(self) -> tuple[Kind, socket.socket]:
        """The next connection told apart, and what it is; the caller's now."""
        return await self._sorted.get()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError:  # out of fds, or a connection reset before accept
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            conn.setblocking(False)
            if len(self._sorting) >= MAX_UNSORTED:
                conn.close()
                continue
            task = asyncio.create_task(self._sort(conn))
            self._sorting.add(task)
            task.add_done_callback(self._sorting.discard)

    async def _sort(self, conn: socket.socket) -> None:
        try:
            kind = await sort_connection(conn)
        except BaseException:
            conn.close()
            raise
        self._sorted.put_nowait((kind, conn))

    def close(self) -> None:
        self._acceptor.cancel()
        for task in self._sorting:
            task.cancel()
        while not self._sorted.empty():
            self._sorted.get_nowait()[1].close()


class ChannelStream:
    """A :class:`Channel` over a connected socket."""

    def __init__(self, sock: socket.socket, role: Role) -> None:
        self.sock = sock
        self.channel = Channel(role)
        self._loop = asyncio.get_running_loop()
        self._sent_preamble = False

    def _preamble(self) -> bytes:
        if self._sent_preamble:
            return b""
        self._sent_preamble = True
        return self.channel.initiate()

    async def _write(self, data: bytes) -> None:
        try:
            await self._loop.sock_sendall(self.sock, data)
        except OSError as e:
            raise MigrationError(f"the state channel broke: {e.strerror or e}") from None

    async def start(self) -> None:
        await self._write(self._preamble())

    async def send(self, msg: Message) -> None:
        preamble = self._preamble()
        await self._write(preamble + self.channel.send(msg))

    async def receive(self) -> Message | ChannelClosed:
        """The next message, or ChannelClosed; MigrationError for a broken
        channel or bad input (naming what was wrong)."""
        while True:
            try:
                event = self.channel.next_event()
            except ChannelError as e:
                raise MigrationError(str(e)) from None
            if not isinstance(event, _NeedData):
                return event
            try:
                data = await self._loop.sock_recv(self.sock, CHANNEL_READ_SIZE)
            except OSError as e:
                raise MigrationError(f"the state channel broke: {e.strerror or e}") from None
            self.channel.receive_data(data)

    def close(self) -> None:
        self.sock.close()


__all__ = ["Arrivals", "ChannelClosed", "ChannelStream", "MigrationError", "connect", "listen",
           "sort_connection", "unlink_listener"]
