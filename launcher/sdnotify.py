"""systemd's readiness protocol (sd_notify), for ``Type=notify`` services.

Under systemd, ``$NOTIFY_SOCKET`` names a datagram socket: a path, or an
abstract name written with a leading ``@``. Each datagram is newline-separated
``KEY=VALUE`` lines: ``READY=1`` once the guest is up, ``STATUS=...`` for
``systemctl status``, ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC``
microseconds when ``WatchdogSec=`` is set, ``STOPPING=1`` when shutting down.
Not under systemd (no ``$NOTIFY_SOCKET``), every call does nothing, so the
launcher calls these unconditionally.

Sending never blocks and never raises: a service manager that went away must
not stop the VM. The variables are read once, at construction, and
``strip_environment`` removes them so children (QEMU) do not talk to systemd
in mplaunch's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

LOG = logging.getLogger("mplaunch")

NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address ``$NOTIFY_SOCKET`` names, or None if unusable.

    ``@name`` is the abstract socket ``\\0name``; other values must be absolute
    paths (systemd only ever gives these two forms).
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_period(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is asked for.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, so one late
    ping is not fatal. ``$WATCHDOG_PID``, when set, must be our pid (the
    variables may have been inherited from a parent that is the real service).
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid)):
        return None
    return int(usec) / 2 / 1_000_000


class SdNotifier:
    """Sends sd_notify datagrams; a no-op when ``address`` is None."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog_period = watchdog if address is not None else None
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> SdNotifier:
        env = os.environ if env is None else env
        return cls(notify_address(env.get("NOTIFY_SOCKET")), watchdog_period(env))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it was sent.

        Keys are upper-cased (``ready=1`` sends READY=1). Newlines in a value
        would start a new field, so they become spaces.
        """
        if self._sock is None or self.address is None:
            return False
        lines = [f"{key.upper()}={str(value).replace(chr(10), ' ')}"
                 for key, value in fields.items()]
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            LOG.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    async def run_watchdog(self) -> None:
        """Ping every ``watchdog_period`` seconds until cancelled; returns at
        once when there is no watchdog. Run it as a task of the supervisor's
        event loop: if that loop stalls, the pings stop and systemd acts."""
        period = self.watchdog_period
        if period is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def strip_environment(env: MutableMapping[str, str] | None = None) -> None:
    """Remove the sd_notify variables so child processes do not inherit them."""
    env = os.environ if env is None else env
    for name in NOTIFY_VARS:
        with contextlib.suppress(KeyError):
            del env[name]
