"""The management socket: QMP over a unix socket, for any number of clients.

Theory of operation. ``ManagementServer`` listens on ``mplaunch.sock`` and
runs one task per client: read bytes, feed the client's
``ServerConnection`` (protocol.py), act on each event (dispatch commands
through ``Dispatcher``, answer rejected input), write the replies. Commands
from one client run one after the other, as QMP promises; clients do not
wait for each other.

``EventBus`` is how the supervisor reports events: ``bus.emit(name, data)``
checks the data against events.py, stamps it, and hands it to every
subscriber; the server writes it to every negotiated client. A client that
stops reading is dropped once its unsent output passes ``MAX_BACKLOG``,
rather than letting it hold mplaunch's memory.

Access: the socket is created under a temporary name, given mode 0660 and
its group, then renamed into place, so it is never reachable with looser
permissions. Only root, the owner and the group may connect; the folder it
lives in must also let the group through (x permission).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from launcher.management.commands import CommandError, Dispatcher, VmControl, mplaunch_version
from launcher.management.events import check_event
from launcher.management.protocol import (
    NEED_DATA,
    Closed,
    ErrorClass,
    Execute,
    Negotiated,
    QmpEvent,
    Rejected,
    ServerConnection,
)

LOG = logging.getLogger("mplaunch")

SOCKET_MODE = 0o660
MAX_BACKLOG = 4 << 20  # bytes of unsent output before a client is dropped
READ_SIZE = 65536

EventSink = Callable[[QmpEvent], None]


class EventBus:
    """Fans events out to subscribers (the management server, a test, a log).

    ``clock`` gives the timestamp (seconds since the epoch) and is injected so
    tests need no real time. Subscribers are called synchronously and must
    not block.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._sinks: list[EventSink] = []

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        """Add ``sink``; returns the function that removes it."""
        self._sinks.append(sink)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._sinks.remove(sink)

        return unsubscribe

    def emit(self, name: str, data: Mapping[str, Any], when: float | None = None) -> QmpEvent:
        """Check, stamp and deliver one event. ``when`` overrides the clock (for
        QEMU's events, which carry their own timestamp). Raises ValueError if
        the data does not match events.py: a bug in the caller."""
        check_event(name, data)
        event = QmpEvent.at(name, dict(data), self._clock() if when is None else when)
        for sink in list(self._sinks):
            try:
                sink(event)
            except Exception:  # one broken subscriber must not starve the others
                LOG.exception("event subscriber failed on %s", name)
        return event


def resolve_group(group: str | int) -> int:
    """A group name or number as a gid; ValueError naming the group if unknown."""
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no such group: {group!r}") from None


def bind_management_socket(path: Path, group: str | int | None = None,
                           mode: int = SOCKET_MODE) -> socket.socket:
    """A listening unix socket at ``path`` with ``mode`` and group set before it
    appears under its name (a stale socket there is replaced)."""
    gid = None if group is None else resolve_group(group)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        sock.bind(str(temp))
        os.chmod(temp, mode)
        if gid is not None:
            os.chown(temp, -1, gid)
        os.rename(temp, path)
        sock.listen(16)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    return sock


class _Client:
    def __init__(self, conn: ServerConnection, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.writer = writer

    def send(self, data: bytes) -> bool:
        """Queue ``data``; False once the client is gone or too far behind."""
        if not data:
            return True
        transport = self.writer.transport
        if transport.is_closing():
            return False
        self.writer.write(data)
        if transport.get_write_buffer_size() > MAX_BACKLOG:
            LOG.warning("management client not reading; dropping it")
            transport.abort()
            return False
        return True


class ManagementServer:
    """mplaunch.sock for one VM. ``start()`` binds and listens, or serves a
    listening socket handed over (``start(sock)``: a launcher carrying on
    with a VM keeps the path, and clients that connected meanwhile wait in
    its backlog); ``listener`` is that socket. ``close()`` disconnects
    every client and removes the socket, ``close(unlink=False)`` leaves its
    path to a successor."""

    def __init__(self, path: Path, control: VmControl, bus: EventBus,
                 group: str | int | None = None, mode: int = SOCKET_MODE) -> None:
        self.path = path
        self.bus = bus
        self.dispatcher = Dispatcher(control)
        self._group = group
        self._mode = mode
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._version = mplaunch_version()
        self._listener: socket.socket | None = None

    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def listener(self) -> socket.socket | None:
        """The listening socket in use (the VM's holder keeps a copy)."""
        return self._listener

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind and listen, or serve on `sock`: a listening socket a previous
        launcher made at the same path, handed back by the VM's holder, so
        clients find the VM where they found it before."""
        if sock is None:
            sock = bind_management_socket(self.path, self._group, self._mode)
        self._listener = sock
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                           limit=READ_SIZE)
        except BaseException:
            sock.close()
            raise
        self._unsubscribe = self.bus.subscribe(self._on_event)
        LOG.debug("management socket %s", self.path)

    def broadcast(self, name: str, data: Mapping[str, Any]) -> QmpEvent:
        """Same as ``bus.emit``: send an event to every negotiated client."""
        return self.bus.emit(name, data)

    async def close(self, unlink: bool = True) -> None:
        """Disconnect every client and stop listening; `unlink` False leaves the
        socket's path to a successor (an upgrade: the holder keeps it open)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
            if unlink:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def _on_event(self, event: QmpEvent) -> None:
        for client in list(self._clients):
            if not client.send(client.conn.send_event(event)):
                self._clients.discard(client)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        client = _Client(ServerConnection(self._version), writer)
        self._clients.add(client)
        try:
            client.send(client.conn.greeting())
            await self._converse(client, reader)
        except (ConnectionError, OSError) as exc:
            LOG.debug("management client gone: %s", exc)
        except asyncio.CancelledError:
            # The server is closing. This task is the connection's top level:
            # asyncio's stream callback would report a cancelled task as an error.
            pass
        finally:
            self._clients.discard(client)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _converse(self, client: _Client, reader: asyncio.StreamReader) -> None:
        conn = client.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await reader.read(READ_SIZE))
                continue
            if isinstance(event, Closed):
                LOG.debug("management client closed: %s", event.reason)
                return
            if isinstance(event, Rejected):
                out = conn.send_rejection(event)
            elif isinstance(event, Negotiated):
                out = conn.send_return(event, {})
            elif isinstance(event, Execute):
                out = await self._execute(conn, event)
            else:  # pragma: no cover - the protocol has no other events
                raise AssertionError(event)
            if not client.send(out):
                return
            await client.writer.drain()

    async def _execute(self, conn: ServerConnection, request: Execute) -> bytes:
        try:
            result = await self.dispatcher.dispatch(request.command, request.arguments)
        except CommandError as exc:
            return conn.send_error(request, exc.error_class, exc.desc)
        try:
            return conn.send_return(request, result)
        except (TypeError, ValueError) as exc:  # a result JSON cannot carry
            LOG.error("management command %s returned %r: %s", request.command, result, exc)
            return conn.send_error(request, ErrorClass.GENERIC_ERROR,
                                   f"internal error in {request.command}: bad result")
