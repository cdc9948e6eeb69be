"""The emulator process: one epoll loop serving every controller it was given.

Single-threaded on purpose: guest requests complete synchronously inside the
loop (preadv/pwritev straight into guest memory), so the only concurrency is
between controllers and queues, which the loop interleaves per wake-up.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import sys
from types import FrameType

from emulators.config import ConfigError, EmulatorConfig
from emulators.controller import ControllerLoop
from emulators.lockdown import LockdownError, LockdownMode, lockdown
from emulators.vhost_user.errors import RemoteProtocolError, SessionError
from launcher.statestore.layout import StateStore

LOG = logging.getLogger("emulator")
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_PROTOCOL = 3
EXIT_SANDBOX = 4

_SOCKET = -1


class Emulator:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.store = StateStore(config.state_fd) if config.state_fd >= 0 else None
        self.controllers = [
            ControllerLoop(c, config.first_start, self.store, i)
            for i, c in enumerate(config.controllers)
        ]
        self.selector = selectors.EpollSelector()
        self.stopping = False
        self._watched: dict[int, tuple[ControllerLoop, int]] = {}
        # A signal only sets a flag; without this pipe in the selector, select()
        # would resume after the handler and SIGTERM would wait out its timeout.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def _sync_watches(self) -> None:
        """Watch exactly the sockets and kick fds the controllers hold now."""
        want: dict[int, tuple[ControllerLoop, int]] = {}
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

    def run(self) -> int:
        try:
            self._loop()
        finally:
            # Also after a protocol error: a socket left to the garbage collector
            # is described in a ResourceWarning (getsockname), which seccomp kills.
            for c in self.controllers:
                c.close()
        return EXIT_OK

    def _loop(self) -> None:
        while not self.stopping and any(not c.closed for c in self.controllers):
            self._sync_watches()
            ready = self.selector.select(1.0)
            kicks = []
            for key, _ in ready:
                if key.data is None:
                    while _drain(self._wake_r):
                        pass
                    continue
                controller, index = key.data
                if index == _SOCKET:
                    controller.on_socket_readable()
                else:
                    kicks.append((controller, index))
            for controller, index in kicks:
                controller.on_kick(index)
            for controller in self.controllers:
                controller.serve_pending()

    def stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="emulator[%(process)d]: %(message)s"
    )
    if len(argv) not in (2, 3):
        LOG.error("usage: python -m emulators CONFIG_JSON [on|log|off] (started by mplaunch)")
        return EXIT_CONFIG
    try:
        config = EmulatorConfig.from_json(argv[1])
        mode = LockdownMode(argv[2] if len(argv) == 3 else "on")
        emulator = Emulator(config)
    except (ConfigError, OSError, ValueError) as e:
        LOG.error("%s", e)
        return EXIT_CONFIG
    signal.signal(signal.SIGTERM, emulator.stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.set_wakeup_fd(emulator._wake_w, warn_on_full_buffer=False)
    try:
        lockdown(mode)  # stage 2 of the sandbox: nothing from QEMU has been read yet
    except LockdownError as e:
        LOG.error("%s: %s", config.id, e)
        return EXIT_SANDBOX
    try:
        return emulator.run()
    except (RemoteProtocolError, SessionError) as e:
        LOG.error("%s: closing: %s", config.id, e)
        return EXIT_PROTOCOL
