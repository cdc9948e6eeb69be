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
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import sys
from types import FrameType

from emulators import __version__, faults
from emulators.config import ConfigError, EmulatorConfig, checked_lun
from emulators.control import ControlChannel
from emulators.controller import ControllerLoop
from emulators.limits import resize_problem
from emulators.lockdown import LockdownError, LockdownMode, lockdown
from emulators.scsi.lun import LogicalUnit
from emulators.vhost_user.errors import RemoteProtocolError, SessionError
from launcher.heartbeat import protocol as proto
from launcher.statestore.layout import VERSION as STORE_VERSION
from launcher.statestore.layout import StateStore, StateStoreError

LOG = logging.getLogger("emulator")
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_PROTOCOL = 3
EXIT_SANDBOX = 4

_SOCKET = -1
_WAKE = "wake"
_CONTROL = "control"
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
        self.controllers = [
            ControllerLoop(c, config.first_start, store, i)
            for i, c in enumerate(config.controllers)
        ]
        self.store = store
        self.config = config

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
        # not on every wake-up of the data path.
        dirty = True
        while self._alive():
            if dirty:
                self._sync_watches()
                dirty = False
            ready = self.selector.select(1.0)
            kicks = []
            control = False
            for key, _ in ready:
                if key.data == _WAKE:
                    while _drain(self._wake_r):
                        pass
                elif key.data == _CONTROL:
                    control = True
                else:
                    controller, index = key.data
                    if index == _SOCKET:
                        controller.on_socket_readable()
                        dirty = True
                    else:
                        kicks.append((controller, index))
            for controller, index in kicks:
                controller.on_kick(index)
            for controller in self.controllers:
                controller.serve_pending()
            if control:
                self._on_control()
                dirty = True
                for controller in self.controllers:  # events a command queued
                    controller.serve_pending()

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
        lockdown(mode)  # stage 2 of the sandbox: nothing from QEMU has been read yet
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
