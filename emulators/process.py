"""The emulator process: one epoll loop serving every controller it was given.

Single-threaded on purpose: guest requests complete synchronously inside the
loop (preadv/pwritev straight into guest memory), so the only concurrency is
between controllers and queues, which the loop interleaves per wake-up.
"""

from __future__ import annotations

import logging
import selectors
import signal
import sys
from types import FrameType

from emulators.config import ConfigError, EmulatorConfig
from emulators.controller import ControllerLoop
from emulators.vhost_user.errors import RemoteProtocolError, SessionError

LOG = logging.getLogger("emulator")
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_PROTOCOL = 3

_SOCKET = -1


class Emulator:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.controllers = [ControllerLoop(c, config.first_start) for c in config.controllers]
        self.selector = selectors.EpollSelector()
        self.stopping = False
        self._watched: dict[int, tuple[ControllerLoop, int]] = {}

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
        while not self.stopping and any(not c.closed for c in self.controllers):
            self._sync_watches()
            ready = self.selector.select(1.0)
            kicks = []
            for key, _ in ready:
                controller, index = key.data
                if index == _SOCKET:
                    controller.on_socket_readable()
                else:
                    kicks.append((controller, index))
            for controller, index in kicks:
                controller.on_kick(index)
            for controller in self.controllers:
                controller.serve_pending()
        for c in self.controllers:
            c.close()
        return EXIT_OK

    def stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="emulator[%(process)d]: %(message)s"
    )
    if len(argv) != 2:
        LOG.error("usage: python -m emulators CONFIG_JSON (started by mplaunch)")
        return EXIT_CONFIG
    try:
        config = EmulatorConfig.from_json(argv[1])
        emulator = Emulator(config)
    except (ConfigError, OSError, ValueError) as e:
        LOG.error("%s", e)
        return EXIT_CONFIG
    signal.signal(signal.SIGTERM, emulator.stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return emulator.run()
    except (RemoteProtocolError, SessionError) as e:
        LOG.error("%s: closing: %s", config.id, e)
        return EXIT_PROTOCOL
