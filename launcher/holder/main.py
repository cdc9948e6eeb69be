"""The holder's loop: one selector over the socket, connections and a signal pipe.

Single-threaded, so fork() is safe and the child's setup (parent-death signal,
fd placement) runs in Python between fork and exec. Every message is decoded
by :mod:`launcher.holder.protocol`; a connection that breaks it is closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from launcher import template
from launcher.holder import protocol as p
from launcher.holder.child import setup as child_setup
from launcher.holder.wire import recv, send
from launcher.holdnames import TETHER

LOG = logging.getLogger("mplaunch.holder")
PR_SET_PDEATHSIG = 1  # cleared for the holder itself: the launcher may die
PR_SET_CHILD_SUBREAPER = 36
#: With no launcher attached and no child for this long, the holder exits.
IDLE_EXIT_S = 60.0
#: A launcher that does not take a message for this long is dropped.
SEND_TIMEOUT_S = 5.0
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")


@dataclass
class Holder:
    listener: socket.socket
    started: float = field(default_factory=time.time)
    held: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    children: dict[int, p.Child] = field(default_factory=dict)
    pending: list[p.Exit] = field(default_factory=list)
    attached: socket.socket | None = None
    idle_since: float = field(default_factory=time.monotonic)
    done: bool = False

    # -- connections --------------------------------------------------------

    def accept(self, sel: selectors.BaseSelector) -> None:
        conn, _ = self.listener.accept()
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", cred)
        if uid != 0:
            LOG.warning("holder: refused a connection from pid %d uid %d (root only)", pid, uid)
            conn.close()
            return
        conn.settimeout(SEND_TIMEOUT_S)  # a stalled launcher must not stall reaping
        sel.register(conn, selectors.EVENT_READ, "conn")

    def close(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        sel.unregister(conn)
        conn.close()
        if conn is self.attached:
            self.attached = None
            self.idle_since = time.monotonic()
            LOG.info("holder: launcher detached")
            if any(kind == TETHER for kind, _ in self.held.values()):
                LOG.warning("holder: the launcher went while the VM was tied to it "
                            "(an incoming migration whose guest never ran): stopping it")
                self.done = True

    def readable(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            got = recv(conn)
            if got is None:
                return self.close(sel, conn)
            data, fds = got
            msg = p.decode(data, len(fds))
            taken, fds = fds, []
            reply, out = self.handle(conn, msg, taken)  # closes or keeps `taken`, always
        except (p.ProtocolError, OSError) as e:
            LOG.warning("holder: closing a connection: %s", e)
            for fd in fds:
                os.close(fd)
            return self.close(sel, conn)
        try:
            if reply is not None:
                send(conn, reply, out)
        except OSError as e:
            LOG.warning("holder: closing a connection: %s", e)
            self.close(sel, conn)
        finally:
            for fd in out if isinstance(reply, p.Spawned) else []:
                os.close(fd)
        if isinstance(reply, p.Refused):
            self.close(sel, conn)

    def handle(self, conn: socket.socket, msg: p.Message,
               fds: list[int]) -> tuple[p.Message | None, list[int]]:
        if conn is not self.attached or not isinstance(msg, (p.Put, p.Spawn)):
            for fd in fds:  # fds that no request here takes
                os.close(fd)
        if conn is not self.attached:
            if not isinstance(msg, p.Hello):
                raise p.ProtocolError(f"{msg.TYPE} before hello")
            return self.hello(conn, msg), []
        if isinstance(msg, p.Put):
            if msg.name in self.held:
                for fd in fds:
                    os.close(fd)
                return p.Failed(f"{msg.name} is already held"), []
            self.held[msg.name] = (msg.kind, fds)
            return p.Ok(), []
        if isinstance(msg, p.Drop):
            kind_fds = self.held.pop(msg.name, None)
            if kind_fds is None:
                return p.Failed(f"{msg.name} is not held"), []
            for fd in kind_fds[1]:
                os.close(fd)
            return p.Ok(), []
        if isinstance(msg, p.Spawn):
            try:
                pid = self.spawn(msg, fds)
            except (OSError, p.HolderError) as e:
                return p.Failed(f"spawn {msg.argv[0]}: {e}"), []
            finally:
                for fd in fds:
                    os.close(fd)
            return p.Spawned(pid), [os.pidfd_open(pid)]
        if isinstance(msg, p.Signal):
            if msg.pid not in self.children:
                return p.Failed(f"pid {msg.pid} is not a live child of the holder"), []
            try:
                os.kill(msg.pid, msg.sig)
            except OSError as e:
                return p.Failed(f"signal {msg.sig} to pid {msg.pid}: {e.strerror}"), []
            return p.Ok(), []
        if isinstance(msg, p.Shutdown):
            LOG.info("holder: shutdown asked by the launcher")
            self.done = True
            return p.Ok(), []
        raise p.ProtocolError(f"{msg.TYPE} is not a request")

    def hello(self, conn: socket.socket, msg: p.Hello) -> p.Message | None:
        if msg.version != p.VERSION:
            return p.Refused(f"holder speaks protocol version {p.VERSION}, "
                             f"launcher speaks {msg.version}")
        if self.attached is not None:
            return p.Refused("another launcher is attached to this holder")
        inventory = tuple(p.Entry(n, k, len(f)) for n, (k, f) in self.held.items())
        welcome = p.Welcome(p.VERSION, os.getpid(), self.started, inventory,
                            tuple(self.children.values()), tuple(self.pending))
        send(conn, welcome)
        for name, (_kind, fds) in self.held.items():
            send(conn, p.Handover(name, len(fds)), fds)
        self.pending.clear()
        self.attached = conn
        LOG.info("holder: launcher attached (%d held, %d children)",
                 len(inventory), len(self.children))
        return None

    # -- children -----------------------------------------------------------

    def spawn(self, msg: p.Spawn, passed: list[int]) -> int:
        sources: list[tuple[int, int]] = []
        for pl in msg.fds:
            if pl.name is None:
                fd = passed[pl.index]
            else:
                _kind, fds = self.held.get(pl.name, ("", []))
                if pl.index >= len(fds):
                    raise p.HolderError(f"{pl.name} holds no fd {pl.index}")
                fd = fds[pl.index]
            sources.append((fd, pl.target))
        forked = template.jailed_emulator(msg.argv)  # run from loaded code, no exec
        rd, wr = os.pipe2(os.O_CLOEXEC)
        me = os.getpid()
        if forked:
            template.before_fork()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child; it only ever leaves by exec or _exit)
            try:
                os.close(rd)
                wr = child_setup(me, sources, wr)
                if forked:
                    os.close(wr)  # set up: the holder may answer now
                    template.run_jail(msg.argv, dict(msg.env))
                os.execve(msg.argv[0], list(msg.argv), dict(msg.env))
            except BaseException as e:  # noqa: BLE001 (report anything, then leave)
                with contextlib.suppress(OSError):
                    os.write(wr, str(e).encode()[:512])
            os._exit(127)
        os.close(wr)
        with os.fdopen(rd, "rb") as r:
            why = r.read()
        if why:
            os.waitpid(pid, 0)
            raise p.HolderError(why.decode(errors="replace"))
        self.children[pid] = p.Child(pid, msg.tag, time.time())
        LOG.info("holder: started %s pid %d (%s)", msg.tag, pid,
                 "forked from the template" if forked else "exec")
        return pid

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                LOG.info("holder: reaped orphan pid %d (status %#x)", pid, status)
                continue
            event = p.Exit(pid, child.tag, status & 0xFFFF, time.time())
            LOG.info("holder: %s pid %d ended (status %#x)", child.tag, pid, status)
            try:
                if self.attached is None:
                    raise OSError(errno.ENOTCONN, "no launcher")
                send(self.attached, event)
            except OSError:
                self.pending.append(event)
                del self.pending[:-p.MAX_ENTRIES]
            if not self.children:
                self.idle_since = time.monotonic()

    def kill_orphans(self) -> None:
        """A process that came to us as subreaper has nobody to supervise it:
        SIGKILL it (the jail lets no confined child fork, so this is rare)."""
        for pid in _my_children() - set(self.children):
            LOG.warning("holder: killing pid %d, an orphan nobody supervises", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """SIGKILL every child (and every orphan that came to us), reap them all."""
        while True:
            for pid in _my_children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.reap()
        self.reap()


def _my_children() -> set[int]:
    found: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            found.update(int(x) for x in f.read().split())
    return found


def serve(path: str, idle_exit: float = IDLE_EXIT_S) -> int:
    """Run the holder until told to stop, or idle; returns the exit code."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, 0)
    template.load()  # before the socket exists: a launcher never waits behind it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Bound under a temporary name and renamed once listening: a launcher that
    # sees the path can connect.
    temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    old = os.umask(0o177)
    try:
        listener.bind(temp)
    finally:
        os.umask(old)
    os.chmod(temp, 0o600)
    listener.listen(4)
    os.rename(temp, path)
    listener.setblocking(False)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    holder = Holder(listener)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listen")
    sel.register(wake_r, selectors.EVENT_READ, "signal")
    LOG.info("holder: pid %d listening on %s", os.getpid(), path)
    try:
        while not holder.done:
            for key, _ in sel.select(timeout=1.0):
                if key.data == "listen":
                    holder.accept(sel)
                elif key.data == "signal":
                    got = os.read(wake_r, 64)
                    if {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} & set(got):
                        LOG.info("holder: stopped by a signal")
                        holder.done = True
                    holder.reap()
                else:
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    holder.readable(sel, conn)
            holder.kill_orphans()
            if (holder.attached is None and not holder.children
                    and time.monotonic() - holder.idle_since > idle_exit):
                LOG.info("holder: no launcher and no child for %.0f s, exiting", idle_exit)
                holder.done = True
    finally:
        holder.kill_all()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        for conn in [k.fileobj for k in sel.get_map().values() if k.data == "conn"]:
            assert isinstance(conn, socket.socket)
            conn.close()
    return 0


def main(argv: list[str]) -> int:
    # Its lifecycle lines are for debugging; what needs attention is a warning.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    if len(argv) not in (1, 2):
        print("usage: python -I -m launcher.holder SOCKET_PATH [IDLE_EXIT_S]", file=sys.stderr)
        return 2
    return serve(argv[0], float(argv[1]) if len(argv) == 2 else IDLE_EXIT_S)
