"""The emulator process: one epoll loop serving every controller it was given.

Single-threaded on purpose: guest requests complete synchronously inside the
loop (preadv/pwritev straight into guest memory), so the only concurrency is
between controllers and queues, which the loop interleaves per wake-up. The
same loop answers mplaunch's heartbeat, so a stuck loop is a silent one.

Two ways to start:
- `python -m emulators CONFIG_JSON MODE`: the config names every fd, already
  inherited; the emulator locks down, builds its controllers (reading the
  state store its predecessor left), and serves.
- `python -m emulators --spare CONTROL_FD MODE`: a warm spare. It locks down
  with nothing to serve and waits; mplaunch later sends the config and its
  fds in one ASSIGN message, and the spare becomes the emulator it replaces
  without paying an interpreter start-up.

Hot standby. An ASSIGN whose config names a `predecessor_fd` (a pidfd of
the emulator serving the slot, a dup of the launcher's) makes the spare a
standby for that emulator: its controllers are built dormant
(emulators.controller) on sockets to which the session keepers forward
every vhost-user message once its exchange with the predecessor is
complete, so it holds the memory map and the session as they are, but
touches no ring, no call fd and no state store. The pidfd is watched in
the event loop: once it is readable the predecessor is dead (a SIGKILLed
process is readable only after its memory is gone, so it writes nothing
more), and the standby activates at once, in that same loop round, without
waiting for the launcher: LUN state and ring progress are read from the
store and the rings resume. The launcher, which sees the death a little
later, sends PROMOTE; the standby applies what its keepers sent so far
(still without answering) and from then on answers them as any occupant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import sys
import time
from types import FrameType

from emulators import __version__, faults
from emulators.config import ConfigError, EmulatorConfig, checked_lun
from emulators.control import ControlChannel
from emulators.controller import ControllerLoop
from emulators.limits import EXIT_PROTOCOL, resize_problem
from emulators.lockdown import LockdownError, LockdownMode, lockdown
from emulators.scsi.lun import LogicalUnit
from emulators.vhost_user.errors import RemoteProtocolError, SessionError
from launcher.heartbeat import protocol as proto
from launcher.statestore import liveness
from launcher.statestore.layout import VERSION as STORE_VERSION
from launcher.statestore.layout import StateStore, StateStoreError

LOG = logging.getLogger("emulator")
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_SANDBOX = 4

_SOCKET = -1
_WAKE = "wake"
_CONTROL = "control"
_PREDECESSOR = "predecessor"
#: Adaptive poll window after a served round, in µs (see _poll): off.
REQUEST_POLL_US = 0
#: Fault points before and after the answer to each control command.
_COMMAND_POINTS: dict[type[proto.Command], tuple[str, str]] = {
    proto.LunAdd: ("control.lun_add.before_reply", "control.lun_add.after_reply"),
    proto.LunRemove: ("control.lun_remove.before_reply", "control.lun_remove.after_reply"),
    proto.LunResizeCheck: ("control.lun_resize_check.before_reply",
                           "control.lun_resize_check.after_reply"),
    proto.LunResize: ("control.lun_resize.before_reply", "control.lun_resize.after_reply"),
}


class Emulator:
    def __init__(self, config: EmulatorConfig | None, control_fd: int = -1) -> None:
        self.config: EmulatorConfig | None = None
        self.store: StateStore | None = None
        self.controllers: list[ControllerLoop] = []
        self.selector = selectors.EpollSelector()
        self.stopping = False
        self._watched: dict[int, object] = {}
        #: The slot's liveness lock (held while serving) and, in a standby,
        #: the thread waiting on it (see `_on_death_watch`).
        self._liveness: liveness.LivenessLock | None = None
        self._death_watch: liveness.DeathWatch | None = None
        # A signal only sets a flag; without this pipe in the selector, select()
        # would resume after the handler and SIGTERM would wait out its timeout.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        if config is not None and config.control_fd >= 0:
            control_fd = config.control_fd
        self.control = ControlChannel(control_fd) if control_fd >= 0 else None
        if self.control is not None:
            self.selector.register(self.control.fileno(), selectors.EVENT_READ, _CONTROL)
        if config is not None:
            self.assign(config)

    @property
    def name(self) -> str:
        return self.config.id if self.config is not None else "spare"

    def assign(self, config: EmulatorConfig) -> None:
        """Build the controllers of `config` (at start, or when a spare is assigned).

        This reads the state store, which the previous emulator wrote and
        which is therefore untrusted input: :func:`main` calls it only once
        the process is locked down, in both ways to start.
        """
        store = StateStore(config.state_fd) if config.state_fd >= 0 else None
        standby = config.predecessor_fd >= 0
        self.controllers = [
            ControllerLoop(c, config.first_start, store, i, dormant=standby)
            for i, c in enumerate(config.controllers)
        ]
        self.store = store
        self.config = config
        if standby:
            self.selector.register(config.predecessor_fd, selectors.EVENT_READ, _PREDECESSOR)
        if config.liveness_fd >= 0:
            self._use_liveness(config.liveness_fd, standby)

    def _use_liveness(self, fd: int, standby: bool) -> None:
        """Map the slot's liveness page (`fd`, closed here) and, serving,
        hold its lock or, standing by, wait on it in a thread. Without it
        (it cannot be mapped, no thread may start) a standby has its pidfd,
        which is enough, only later."""
        assert self.config is not None
        self.config = dataclasses.replace(self.config, liveness_fd=-1)
        try:
            self._liveness = liveness.LivenessLock(fd)
            if standby:
                self._death_watch = liveness.DeathWatch(self._liveness, self._wake_w)
            else:
                self._hold_liveness()
        except (OSError, ValueError, RuntimeError) as e:
            LOG.warning("%s: no liveness lock (%s): a standby's takeover waits for the "
                        "pidfd", self.name, e)
        finally:
            os.close(fd)

    def _hold_liveness(self) -> None:
        """Take the slot's liveness lock in this, the main thread: the one
        that touches the rings and the store, so that the lock is let go only
        once that thread can run no more. Held until the process ends."""
        if self._liveness is None or self._liveness.held:
            return
        taken = self._liveness.take()
        if taken is not liveness.Taken.HELD:
            LOG.warning("%s: the liveness lock is %s: a standby will learn of this "
                        "emulator's end from its pidfd only", self.name, taken.value)

    def _on_death_watch(self) -> None:
        """News from the standby's waiting thread. The predecessor died: serve
        now (unless the pidfd said so first). It did not hold the lock: wait
        for the pidfd alone. Once the thread is done with the lock and this
        process serves, the lock is taken for the next standby."""
        watch = self._death_watch
        assert watch is not None and watch.outcome is not None and self.config is not None
        if self.config.predecessor_fd >= 0 and not watch.reported:
            watch.reported = True
            if watch.outcome is liveness.Outcome.DIED:
                self._predecessor_gone(watch.seen_ns, "liveness lock")
            else:
                LOG.info("%s: the predecessor's liveness lock: %s; waiting for its pidfd",
                         self.name, watch.outcome.value)
        if watch.done:
            self._death_watch = None
            if self.config.predecessor_fd < 0:
                self._hold_liveness()

    def _predecessor_gone(self, seen_ns: int = 0, seen_by: str = "pidfd") -> None:
        """The emulator this standby stood by for is dead: serve in its place
        now (the launcher's PROMOTE comes later). `seen_ns`: when its death
        was seen (the liveness lock's waiting thread's clock), by `seen_by`.
        Once only: the later of the two signals finds nothing to do."""
        assert self.config is not None
        seen_ns = seen_ns or time.monotonic_ns()
        fd = self.config.predecessor_fd
        if fd < 0:
            return
        self.selector.unregister(fd)
        os.close(fd)
        self.config = dataclasses.replace(self.config, predecessor_fd=-1)
        for c in self.controllers:
            # What the keepers sent before the death is the session as the
            # predecessor left it: apply all of it before serving, whichever
            # of the socket and the pidfd this loop round saw first.
            while not c.closed and c.on_socket_readable():
                pass
            c.activate()
        active_ns = time.monotonic_ns()
        for c in self.controllers:  # what waited for the takeover, before the log line
            c.serve_pending()
        # Monotonic times (host-wide) so a benchmark can place them.
        LOG.info("%s: predecessor gone; serving (seen at %d ns, active at %d ns, by its %s)",
                 self.name, seen_ns, active_ns, seen_by)
        if self._death_watch is None:  # else once the watch is done with the lock
            self._hold_liveness()

    def _on_promote(self, message: proto.Promote) -> None:
        """PROMOTE: only a standby whose predecessor is dead may be promoted."""
        assert self.control is not None
        if self.config is None or any(c.dormant for c in self.controllers):
            self.control.send(proto.Result(False, "not a standby whose predecessor ended",
                                           message.seq))
            return
        for c in self.controllers:
            c.promote()
        self.control.send(proto.Result(True, seq=message.seq))

    def ready(self) -> None:
        if self.control is not None:
            self.control.send(proto.Ready(os.getpid(), locked_down=True, version=__version__,
                                          store_version=STORE_VERSION))

    def _sync_watches(self) -> None:
        """Watch exactly the sockets and kick fds the controllers hold now."""
        want: dict[int, object] = {}
        for c in self.controllers:
            if c.closed:
                continue
            want[c.sock.fileno()] = (c, _SOCKET)
            for index, fd in c.kick_fds.items():
                want[fd] = (c, index)
        for fd in list(self._watched):
            if want.get(fd) != self._watched[fd]:
                self.selector.unregister(fd)
                del self._watched[fd]
        for fd, key in want.items():
            if fd not in self._watched:
                self.selector.register(fd, selectors.EVENT_READ, key)
                self._watched[fd] = key

    def _alive(self) -> bool:
        if self.stopping:
            return False
        if self.config is None:  # a spare waits as long as mplaunch is there
            return self.control is not None and not self.control.closed
        return any(not c.closed for c in self.controllers)

    def run(self) -> int:
        try:
            self._loop()
        finally:
            # Also after a protocol error: a socket left to the garbage collector
            # is described in a ResourceWarning (getsockname), which seccomp kills.
            for c in self.controllers:
                c.close()
            if self.control is not None:
                self.control.close()
        return EXIT_OK

    def _loop(self) -> None:
        # The watch set changes only when a control message was applied (a kick
        # fd set, a controller closed) or an assignment arrived: rebuild it then,
        # not on every wake-up of the data path. Whether to go on changes only
        # then too (or on a signal, which writes the wake pipe): a kick-only
        # round checks neither.
        dirty = True
        poll_ns = request_poll_ns()
        select = self.selector.select
        controllers = self.controllers
        while True:
            if dirty:
                if not self._alive():
                    return
                self._sync_watches()
                controllers = self.controllers
                dirty = False
            ready = select(1.0)
            if not ready:
                dirty = True  # once a second: look at _alive anyway
                continue
            kicked = False
            control = False
            for key, _ in ready:
                data = key.data
                if data == _WAKE:
                    while _drain(self._wake_r):
                        pass
                    dirty = True
                    if self._death_watch is not None and self._death_watch.outcome:
                        self._on_death_watch()
                elif data == _CONTROL:
                    control = True
                elif data == _PREDECESSOR:
                    self._predecessor_gone()
                    dirty = True
                else:
                    controller, index = data
                    if index == _SOCKET:
                        controller.on_socket_readable()
                        dirty = True
                    else:
                        # Read now, served below: after this round's control
                        # messages (emulators.controller).
                        controller.on_kick(index)
                        kicked = True
            for controller in controllers:
                controller.serve_pending()
            if control:
                self._on_control()
                dirty = True
                for controller in self.controllers:  # events a command queued
                    controller.serve_pending()
            elif kicked and poll_ns and not dirty:
                _poll(controllers, poll_ns)

    def _on_control(self) -> None:
        """Heartbeat and assignment. Answered after the round's requests were
        served, so a PONG reports the progress they made."""
        assert self.control is not None
        for message in self.control.receive():
            if isinstance(message, proto.Ping):
                faults.point("control.heartbeat.before_reply")
                self.control.send(proto.Pong(message.seq, message.sent_ns, self._progress()))
                faults.point("control.heartbeat.after_reply")
            elif isinstance(message, proto.Command):
                self._on_command(message)
            elif isinstance(message, proto.Assign):
                self._on_assign(message)
            elif isinstance(message, proto.Promote):
                self._on_promote(message)
            elif isinstance(message, proto.Shutdown):
                self.stopping = True
        if self.control.closed:
            LOG.info("%s: mplaunch closed the control channel", self.name)
            self.stopping = True

    def _on_assign(self, message: proto.Assign) -> None:
        assert self.control is not None
        if self.config is not None:
            for fd in message.fds:
                os.close(fd)
            self.control.send(proto.Assigned(False, "already assigned"))
            return
        try:
            config = EmulatorConfig.from_json(message.config).with_fds(list(message.fds))
            self.assign(config)
        except (ConfigError, StateStoreError, OSError, ValueError) as e:
            for fd in message.fds:
                os.close(fd)
            self.control.send(proto.Assigned(False, str(e) or type(e).__name__))
            self.stopping = True
            return
        faults.point("control.assign.before_reply")
        self.control.send(proto.Assigned(True))
        faults.point("control.assign.after_reply")

    def _on_command(self, command: proto.Command) -> None:
        """A LUN added, removed or resized while running: one RESULT each, with
        the command's seq. A LUN_ADD's fd is ours from the moment it arrived:
        unless a LUN holds it once the command is done, it is closed here."""
        assert self.control is not None
        before, after = _COMMAND_POINTS[type(command)]
        try:
            self._apply_command(command)
        except (ValueError, OSError) as e:
            if isinstance(command, proto.LunAdd):
                with contextlib.suppress(OSError):
                    os.close(command.fd)
            faults.point(before)
            self.control.send(proto.Result(False, f"{type(e).__name__}: {e}", command.seq))
            faults.point(after)
            return
        faults.point(before)
        self.control.send(proto.Result(True, seq=command.seq))
        faults.point(after)

    def _apply_command(self, command: proto.Command) -> None:
        """Carry ``command`` out, or raise ValueError/OSError having changed nothing."""
        controller = self._controller(command.controller)
        match command:
            case proto.LunAdd():
                controller.add_lun(checked_lun(
                    command.lun, command.disk_id, command.fd, command.readonly,
                    command.block_size,
                ))
            case proto.LunRemove():
                controller.remove_lun(command.lun)
            case proto.LunResizeCheck():
                unit = _unit(controller, command.lun)
                problem = resize_problem(
                    unit.num_blocks * unit.block_size, command.size, unit.block_size
                )
                if problem is not None:
                    raise ValueError(problem)
            case proto.LunResize():
                unit = _unit(controller, command.lun)
                held = unit.backend.size_bytes()
                if held != command.size:  # grown by someone else, or not at all
                    raise ValueError(f"the image holds {held} bytes, not {command.size}")
                controller.resize_lun(command.lun)

    def _controller(self, controller_id: str) -> ControllerLoop:
        for c in self.controllers:
            if c.config.id == controller_id and not c.closed:
                return c
        raise ValueError(f"no controller {controller_id!r} here")

    def _progress(self) -> tuple[proto.QueueProgress, ...]:
        out = []
        for ci, c in enumerate(self.controllers):
            if c.closed:
                continue
            for ring, completed, in_flight in c.progress():
                out.append(proto.QueueProgress(ci, ring, completed, in_flight))
        return tuple(out)

    def stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True


def _unit(controller: ControllerLoop, lun: int) -> LogicalUnit:
    unit = controller.target.scsi.luns.get(lun)
    if unit is None:
        raise ValueError(f"no LUN {lun} on {controller.config.id}")
    return unit


def request_poll_ns() -> int:
    """The adaptive poll of :func:`_poll`, in ns: 0 (off) unless the
    interpreter was started with ``-X mplaunch_poll_us=N`` (the bench does)."""
    value = sys._xoptions.get("mplaunch_poll_us", REQUEST_POLL_US)
    try:
        return max(0, int(value)) * 1000
    except (TypeError, ValueError):
        return 0


def _poll(controllers: list[ControllerLoop], poll_ns: int) -> None:
    """After a round that served kicked rings, look at their avail rings for
    up to ``poll_ns`` before sleeping in epoll, and serve what arrives.

    A request that arrives within the window is served without the sleep
    and wake-up of a kick (which the guest may still send: its eventfd is
    read in the next round, which then finds nothing new, or more). It
    costs CPU while it waits: worth it only on a host with a CPU to spare
    (QEMU's poll-max-ns is the same idea), hence off by default. One
    window per round, ending at the first work found: control messages
    and the heartbeat wait no longer than that.
    """
    deadline = time.monotonic_ns() + poll_ns
    while time.monotonic_ns() < deadline:
        for controller in controllers:
            if controller.poll_rings():
                return


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


USAGE = (
    "usage: python -m emulators CONFIG_JSON [on|log|off]\n"
    "       python -m emulators --spare CONTROL_FD [on|log|off]   (both started by mplaunch)"
)


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="emulator[%(process)d]: %(message)s"
    )
    args = argv[1:]
    spare = bool(args) and args[0] == "--spare"
    if spare:
        args = args[1:]
    if len(args) not in (1, 2):
        LOG.error("%s", USAGE)
        return EXIT_CONFIG
    config: EmulatorConfig | None = None
    try:
        mode = LockdownMode(args[1] if len(args) == 2 else "on")
        if spare:
            emulator = Emulator(None, control_fd=int(args[0]))
        else:
            # The config is mplaunch's own command line; the fds it names are
            # not looked into until the lockdown below.
            config = EmulatorConfig.from_json(args[0])
            emulator = Emulator(None, control_fd=config.control_fd)
    except (ConfigError, OSError, ValueError) as e:
        LOG.error("%s", e)
        return EXIT_CONFIG
    signal.signal(signal.SIGTERM, emulator.stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.set_wakeup_fd(emulator._wake_w, warn_on_full_buffer=False)
    try:
        # Stage 2 of the sandbox: nothing from QEMU has been read yet. A spare
        # may become a hot standby, which waits in a thread of its own.
        lockdown(mode, standby_thread=spare)
    except LockdownError as e:
        LOG.error("%s: %s", emulator.name, e)
        return EXIT_SANDBOX
    if config is not None:
        # Built only now, as a spare's assignment is: the state store holds
        # what the previous (possibly compromised) emulator wrote, and is
        # parsed under the allow list, never before it.
        try:
            emulator.assign(config)
        except (ConfigError, StateStoreError, OSError, ValueError) as e:
            LOG.error("%s: %s", config.id, e)
            return EXIT_CONFIG
    emulator.ready()
    try:
        return emulator.run()
    except (RemoteProtocolError, SessionError) as e:
        LOG.error("%s: closing: %s", emulator.name, e)
        return EXIT_PROTOCOL
    except proto.ControlProtocolError as e:
        LOG.error("%s: control channel: %s", emulator.name, e)
        return EXIT_PROTOCOL
