"""The VM's long-lived children: one way to start, adopt, signal and wait for them,
and to keep copies of the launcher's long-lived fds where a successor finds them.

Theory of operation. Everything the launcher starts that lives as long as the
VM (QEMU, emulators, spares, LSI remotes) goes through the current *host*
(:func:`host`). Two hosts exist:

- :class:`LocalHost`, the default: the launcher is the parent, as in
  ``asyncio.create_subprocess_exec``; holding fds is a no-op. Tests that start
  an emulator or QEMU directly use it without knowing.
- :class:`HolderHost`: the VM's holder (:mod:`launcher.holder`) is the parent.
  It spawns on request, keeps copies of named fds (PUT/DROP), reports exits,
  and outlives the launcher; a launcher that re-attaches adopts the children
  the holder reported (:meth:`HolderHost.adopt`).

Either way a child is a :class:`Child`: its pid, its tag, a future of its exit
status in asyncio's convention (an exit code, or ``-N`` for a death by signal
N) and a pidfd through which it is signalled, so a pid the kernel gave to
another process is never hit.

Holding fds (:meth:`HolderHost.hold`, :meth:`HolderHost.unhold`) is
fire-and-forget for the caller, who may be in the middle of a synchronous
state change, but strictly ordered: the fds are duplicated at once (the
caller may close its own right after) and one sender task passes the
requests to the holder in call order. A request the holder refuses is
logged, never raised: the VM runs on, only a re-attach would miss that fd.
:meth:`HolderHost.flush` waits until every queued request was answered.

When the connection to the holder ends, the holder is dead or dying, and its
death kills every child it spawned (their parent-death signal). The host
resolves :attr:`HolderHost.lost` at once, so that the supervisor can stop the
VM, and completes each live child's ``exited`` with ``-SIGKILL`` once its
pidfd says the process is gone (killing it through the pidfd if it outlives
the grace period: nothing the launcher started may run unsupervised).

Errors::

    OSError
     +-- SpawnFailed        the holder could not start the program (its message says why)
    LookupError
     +-- UnknownChild       adopt() of a pid the holder reported neither live nor ended
    launcher.holder.protocol.HolderError
     +-- client.HolderGone  spawn() when the holder is gone
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from launcher.holder import protocol as hp
from launcher.holder.client import HolderClient, HolderGone, RequestFailed

LOG = logging.getLogger("mplaunch")

DEVNULL = subprocess.DEVNULL
"""For `stdin`, `stdout`, `stderr` of :meth:`Host.spawn`: /dev/null (None is
the launcher's own fd)."""
LOST_GRACE_S = 5.0
"""After the holder's death, how long a child may take to die of its
parent-death signal before the launcher kills it through its pidfd."""
REMEMBERED_EXITS = 4096
"""Exits of pids no Child stands for, kept for a later adopt()."""


class SpawnFailed(OSError):
    """The holder could not start the program (not found, not executable,
    an fd it could not place); ``strerror`` is the holder's message."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class UnknownChild(LookupError):
    """adopt() of a pid that the holder reported neither live nor ended: its
    exit went to an earlier launcher, or it was never the holder's."""


UNKNOWN_STATUS = 255
"""asyncio's returncode for a status it could not know."""


def returncode(wait_status: int) -> int:
    """A raw wait status in asyncio's convention (code, or -signal); a status
    that is neither an exit nor a death by signal is :data:`UNKNOWN_STATUS`."""
    try:
        return os.waitstatus_to_exitcode(wait_status)
    except ValueError:
        return UNKNOWN_STATUS


class Child:
    """One long-lived child. `exited` completes with its status in asyncio's
    returncode convention (>= 0 an exit code, -N killed by signal N); it is
    a future, done at once for a child adopted after its end.

    `send_signal` goes through the pidfd when there is one, so a pid reused
    after the reaping is never hit; without a pidfd, through `fallback`
    (the holder's SIGNAL, which only reaches its live children) or not at
    all. Signalling a child that is gone is a no-op."""

    def __init__(self, pid: int, tag: str, exited: asyncio.Future[int], pidfd: int = -1,
                 fallback: Callable[[int, int], None] | None = None) -> None:
        self.pid = pid
        self.tag = tag
        self.exited = exited
        self.pidfd = pidfd
        self._fallback = fallback
        if pidfd >= 0:
            exited.add_done_callback(lambda _: self._close_pidfd())

    def __repr__(self) -> str:
        done = self.exited.done() and not self.exited.cancelled() \
            and self.exited.exception() is None
        state = f"status {self.exited.result()}" if done else "running"
        return f"<Child {self.tag} pid {self.pid} {state}>"

    def _close_pidfd(self) -> None:
        fd, self.pidfd = self.pidfd, -1
        if fd >= 0:
            os.close(fd)

    def send_signal(self, sig: int) -> None:
        if self.exited.done():
            return
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)
        elif self._fallback is not None:
            self._fallback(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Host(Protocol):
    """Where the VM's children come from (see the module's docstring)."""

    @property
    def lost(self) -> asyncio.Future[None]: ...

    async def spawn(self, tag: str, argv: Sequence[str], pass_fds: Sequence[int] = (),
                    stdin: int | None = None, stdout: int | None = None,
                    stderr: int | None = None, env: Mapping[str, str] | None = None,
                    session: bool = True) -> Child: ...

    def adopt(self, pid: int) -> Child: ...

    def hold(self, name: str, kind: str, fds: Sequence[int]) -> None: ...

    def unhold(self, name: str) -> None: ...

    async def flush(self) -> None: ...

    def children(self) -> tuple[hp.Child, ...]: ...

    @property
    def exits(self) -> tuple[hp.Exit, ...]: ...


# -- the launcher as the parent ----------------------------------------------

class LocalHost:
    """Children of the launcher itself (asyncio subprocesses); nothing is held,
    nothing can be adopted, and nothing is ever lost."""

    @property
    def lost(self) -> asyncio.Future[None]:
        """Never done (a new future each time: this host outlives event loops)."""
        return asyncio.get_running_loop().create_future()

    @property
    def exits(self) -> tuple[hp.Exit, ...]:
        return ()

    async def spawn(self, tag: str, argv: Sequence[str], pass_fds: Sequence[int] = (),
                    stdin: int | None = None, stdout: int | None = None,
                    stderr: int | None = None, env: Mapping[str, str] | None = None,
                    session: bool = True) -> Child:
        """`argv[0]` is searched on PATH; fds 0-2 are the launcher's unless
        given (an fd, or :data:`DEVNULL`); `pass_fds` keep their numbers;
        `env` None is the launcher's environment. `session` False keeps the
        child in the launcher's process group (a QEMU on the terminal);
        otherwise it gets a session of its own, as under the holder."""
        process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=tuple(pass_fds), stdin=stdin, stdout=stdout, stderr=stderr,
            env=None if env is None else dict(env), start_new_session=session)
        try:
            # The reaping thread waits for the child's exit, so the pid is still
            # this child's here, unless it ended within these microseconds.
            pidfd = os.pidfd_open(process.pid)
        except ProcessLookupError:
            pidfd = -1

        def fallback(_pid: int, sig: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

        return Child(process.pid, tag, asyncio.create_task(process.wait()), pidfd, fallback)

    def adopt(self, pid: int) -> Child:
        raise UnknownChild(f"pid {pid}: the launcher itself adopts no child")

    def hold(self, name: str, kind: str, fds: Sequence[int]) -> None:
        pass

    def unhold(self, name: str) -> None:
        pass

    async def flush(self) -> None:
        pass

    def children(self) -> tuple[hp.Child, ...]:
        return ()


# -- the holder as the parent ------------------------------------------------

class HolderHost:
    """Children of the VM's holder, through an attached :class:`HolderClient`.

    `welcome` is what the holder said at attach: its live children (for
    :meth:`adopt`) and the exits it recorded while no launcher was attached.
    Create it in the running event loop; it reads the client's EXIT events
    from then on."""

    def __init__(self, client: HolderClient, welcome: hp.Welcome) -> None:
        self.client = client
        self.welcome = welcome
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._live: dict[int, tuple[Child, asyncio.Future[int]]] = {}
        self._ended: dict[int, int] = {x.pid: returncode(x.status) for x in welcome.exits}
        self._reported = {c.pid for c in welcome.children}
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._closed = False
        self._shutting_down = False
        self._burying: set[asyncio.Task[None]] = set()
        self._events = asyncio.create_task(self._read_events(), name="holder events")
        self._sender = asyncio.create_task(self._send_loop(), name="holder requests")

    @property
    def exits(self) -> tuple[hp.Exit, ...]:
        return self.welcome.exits

    def children(self) -> tuple[hp.Child, ...]:
        return self.welcome.children

    # -- spawning and adopting

    async def spawn(self, tag: str, argv: Sequence[str], pass_fds: Sequence[int] = (),
                    stdin: int | None = None, stdout: int | None = None,
                    stderr: int | None = None, env: Mapping[str, str] | None = None,
                    session: bool = True) -> Child:
        """As :meth:`LocalHost.spawn`; the child is the holder's, in a session
        of its own whatever `session` says (the holder setsids every child).
        The fds go to the holder with the request and sit at the same numbers
        in the child. Raises :class:`SpawnFailed` (an OSError) if the holder
        could not start it, HolderGone if the holder is gone."""
        if self.lost.done():
            raise HolderGone("the holder is gone: no child can be started")
        path = argv[0] if argv[0].startswith("/") else shutil.which(argv[0])
        if path is None:
            raise FileNotFoundError(errno.ENOENT, "not found on PATH", argv[0])
        passed: list[int] = []
        placements: list[hp.Placement] = []

        def place(fd: int, target: int) -> None:
            if fd not in passed:
                passed.append(fd)
            placements.append(hp.Placement(target, passed.index(fd)))

        for fd in pass_fds:
            place(fd, fd)
        for target, given in ((0, stdin), (1, stdout), (2, stderr)):
            if given is None and _is_open(target):
                place(target, target)  # the launcher's own
            elif given is not None and given != DEVNULL:
                place(given, target)
        environ = dict(os.environ if env is None else env)
        if env is None:  # the launcher's: what the protocol cannot carry stays behind
            environ = {k: v for k, v in environ.items() if _carriable(k, v)}
        request = asyncio.ensure_future(
            self.client.spawn(tag, [path, *argv[1:]], environ, placements, passed))
        try:
            pid, pidfd = await asyncio.shield(request)
        except RequestFailed as e:
            raise SpawnFailed(str(e)) from None
        except asyncio.CancelledError:
            request.add_done_callback(_abandoned)  # what it starts runs for nobody
            raise
        return self._register(pid, tag, pidfd)

    def _register(self, pid: int, tag: str, pidfd: int) -> Child:
        done: asyncio.Future[int] = self._loop.create_future()
        if pid in self._ended:  # its exit came before this Child
            done.set_result(self._ended.pop(pid))
        child = Child(pid, tag, done, pidfd if not done.done() else _closed(pidfd),
                      self._signal_via_holder)
        if not done.done():
            self._live[pid] = (child, done)
        return child

    def adopt(self, pid: int) -> Child:
        """The Child for `pid`, which the holder reported at attach: live (its
        exit will come as an event), or ended (`exited` is done with the
        recorded status). Adopting a pid twice gives the same Child while it
        lives. Raises :class:`UnknownChild` for any other pid."""
        if pid in self._live:
            return self._live[pid][0]
        tag = next((c.tag for c in self.welcome.children if c.pid == pid), None)
        if tag is None:
            tag = next((x.tag for x in self.welcome.exits if x.pid == pid), None)
        if pid in self._ended:
            done: asyncio.Future[int] = self._loop.create_future()
            done.set_result(self._ended[pid])
            return Child(pid, tag or "unknown", done)
        if pid not in self._reported or tag is None:
            raise UnknownChild(f"pid {pid} is no child the holder reported")
        return self._register(pid, tag, _pidfd_of_child(pid, self.welcome.pid))

    def _signal_via_holder(self, pid: int, sig: int) -> None:
        self._queue.put_nowait(_Request("signal", f"pid {pid}", pid=pid, sig=sig))

    # -- holding fds

    def hold(self, name: str, kind: str, fds: Sequence[int]) -> None:
        """Have the holder keep copies of `fds` under `name` (a name it holds
        already is refused, and logged: unhold it first). The fds are
        duplicated now; the caller's stay the caller's."""
        copies: list[int] = []
        try:
            for fd in fds:
                copies.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
        except (OSError, ValueError) as e:  # ValueError: -1, an fd already closed
            LOG.error("cannot hold %s in the holder: fd %d: %s", name, fd,
                      getattr(e, "strerror", None) or e)
            for fd in copies:
                os.close(fd)
            return
        self._queue.put_nowait(_Request("put", name, kind, copies))

    def unhold(self, name: str) -> None:
        """Have the holder let go of `name` (after every earlier hold)."""
        self._queue.put_nowait(_Request("drop", name))

    async def flush(self) -> None:
        """Wait until the holder has answered every hold, unhold and signal
        queued so far (at once if the sender has stopped)."""
        if not self._sender.done():
            waiter = asyncio.create_task(self._queue.join())
            await asyncio.wait({waiter, self._sender}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def _send_loop(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._carry_out(job)
            except HolderGone as e:
                LOG.debug("holder: %s %s not sent: %s", job.what, job.name, e)
            except hp.HolderError as e:
                LOG.warning("holder: %s %s refused: %s", job.what, job.name, e)
            except Exception:  # logged: a caller never sees it
                LOG.exception("holder: %s %s failed", job.what, job.name)
            finally:
                job.close()
                self._queue.task_done()

    async def _carry_out(self, job: _Request) -> None:
        if self.lost.done():
            raise HolderGone("the holder is gone")
        if job.what == "put":
            await self.client.put(job.name, job.kind, job.fds)
        elif job.what == "drop":
            await self.client.drop(job.name)
        else:
            await self.client.signal(job.pid, job.sig)

    # -- exits and the holder's end

    async def _read_events(self) -> None:
        try:
            await self._take_exits()
        except Exception:  # never silently: the holder's end must still be seen
            LOG.exception("reading the holder's exit events failed")
        await self._ended_connection()

    async def _take_exits(self) -> None:
        async for event in self.client.events():
            status = returncode(event.status)
            entry = self._live.pop(event.pid, None)
            if entry is None:
                LOG.debug("holder: exit of pid %d (%s), which no Child stands for",
                          event.pid, event.tag)
                self._ended[event.pid] = status
                while len(self._ended) > REMEMBERED_EXITS:
                    del self._ended[next(iter(self._ended))]
            elif not entry[1].done():
                entry[1].set_result(status)

    async def _ended_connection(self) -> None:
        if self._closed:
            return
        if not self._shutting_down:
            if self.client.closed:  # the launcher closed it: a detach, not a death
                self.close()
                return
            LOG.error("the connection to the holder ended: its children die with it")
            if not self.lost.done():
                self.lost.set_result(None)
        for pid, (child, done) in list(self._live.items()):
            task = asyncio.create_task(self._bury(child, done), name=f"bury {pid}")
            self._burying.add(task)
            task.add_done_callback(self._burying.discard)

    async def _bury(self, child: Child, done: asyncio.Future[int]) -> None:
        """Complete `exited` of a child of a dead holder once it is gone."""
        try:
            if child.pidfd >= 0 and not await self._gone(child, LOST_GRACE_S):
                LOG.error("%s (pid %d) outlived the holder by %.0f s: killing it",
                          child.tag, child.pid, LOST_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
                if not await self._gone(child, None):
                    return
        finally:
            self._live.pop(child.pid, None)
        if not done.done():
            done.set_result(-signal.SIGKILL)

    async def _gone(self, child: Child, timeout: float | None) -> bool:
        """Wait until the pidfd is readable (the process ended); False at the timeout."""
        fd = child.pidfd
        readable: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(fd, _wake, readable)
        try:
            await asyncio.wait_for(readable, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._loop.remove_reader(fd)

    async def shutdown(self) -> None:
        """Have the holder kill every child and exit (after every queued
        request); the live children's `exited` complete with -SIGKILL as
        they die. :attr:`lost` stays pending: this end was asked for."""
        await self.flush()
        self._shutting_down = True
        with contextlib.suppress(HolderGone):  # gone already: the same end
            await self.client.shutdown()
        await asyncio.wait({self._events}, timeout=LOST_GRACE_S)
        if self._burying:
            await asyncio.wait(set(self._burying))
        await self._holder_gone(LOST_GRACE_S)

    async def _holder_gone(self, timeout: float) -> None:
        """Until the holder process itself has exited (its socket closes a
        moment before), so that whoever runs after us finds nothing of the VM
        still running; at most `timeout`."""
        try:
            fd = os.pidfd_open(self.welcome.pid)
        except ProcessLookupError:
            return
        readable: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(fd, _wake, readable)
        try:
            await asyncio.wait_for(readable, timeout)
        except TimeoutError:
            LOG.warning("the holder (pid %d) has not exited %.0f s after its shutdown",
                        self.welcome.pid, timeout)
        finally:
            self._loop.remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        """Detach from the holder (which keeps its children and fds; a new
        launcher may attach). Queued requests are dropped and the live
        children's `exited` cancelled: this host no longer sees them."""
        self._closed = True
        self._sender.cancel()
        self._events.cancel()
        for task in list(self._burying):
            task.cancel()
        while not self._queue.empty():
            self._queue.get_nowait().close()
            self._queue.task_done()
        for _child, done in self._live.values():
            done.cancel()
        self._live.clear()
        self.client.close()


def _abandoned(request: asyncio.Future[tuple[int, int]]) -> None:
    """A spawn whose caller was cancelled: kill what it started."""
    if request.cancelled() or request.exception() is not None:
        return
    pid, pidfd = request.result()
    LOG.debug("killing pid %d: its spawn was cancelled", pid)
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.close(pidfd)


@dataclass
class _Request:
    """One queued request to the holder; a put's fds are ours until sent."""
    what: str           # put, drop, signal
    name: str
    kind: str = ""
    fds: list[int] = field(default_factory=list)
    pid: int = 0
    sig: int = 0

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        return True
    except OSError:
        return False


def _carriable(key: str, value: str) -> bool:
    try:
        hp.Spawn("t", ("/t",), ((key, value),))
        return True
    except hp.ProtocolError:
        return False


def _closed(fd: int) -> int:
    if fd >= 0:
        os.close(fd)
    return -1


def _pidfd_of_child(pid: int, parent: int) -> int:
    """A pidfd for `pid` if, once opened, that pid is still `parent`'s child
    (so the pidfd is not of a process that got the pid after the reaping);
    -1 if not (it ended since: its exit event comes)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rpartition(b")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        ppid = -1
    if ppid != parent:
        os.close(pidfd)
        return -1
    return pidfd


# -- the current host ----------------------------------------------------------

_HOST: Host = LocalHost()


def install(new: Host | None) -> None:
    """Make `new` the host every spawn goes through (None: the launcher
    itself again)."""
    global _HOST
    _HOST = LocalHost() if new is None else new


def host() -> Host:
    """The current host: :class:`LocalHost` unless a holder was installed."""
    return _HOST
