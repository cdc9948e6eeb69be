"""sd_notify over a real datagram socket, as systemd would receive it."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.sdnotify import (
    SdNotifier,
    notify_address,
    strip_environment,
    watchdog_period,
)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_watchdog_stopping_reach_the_socket(
        listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("guest up")
    assert received(sock) == ["READY=1", "STATUS=guest up"]
    assert notifier.status("emulator disk-proc restarted\n(1 of 5)")
    assert received(sock) == ["STATUS=emulator disk-proc restarted (1 of 5)"]
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert received(sock) == ["STOPPING=1"]
    notifier.close()
    assert not notifier.watchdog()


def test_abstract_socket_names() -> None:
    name = f"mplaunch-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert notify_address("@" + name) == b"\0" + name.encode()
        notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert received(sock) == ["READY=1"]
    finally:
        sock.close()


def test_no_systemd_means_no_op() -> None:
    notifier = SdNotifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog()
    assert notifier.watchdog_period is None
    assert notify_address("relative/path") is None
    assert notify_address("") is None


def test_a_vanished_manager_does_not_raise(tmp_path: Path) -> None:
    notifier = SdNotifier(str(tmp_path / "gone"))
    assert notifier.enabled
    assert notifier.ready() is False


def test_watchdog_period_is_half_the_interval_and_respects_the_pid() -> None:
    assert watchdog_period({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) \
        == 15.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_period({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_period({}) is None


def test_run_watchdog_pings_at_the_period(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SdNotifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert notifier.watchdog_period == 0.01

    async def main() -> None:
        task = asyncio.create_task(notifier.run_watchdog())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    sock.setblocking(False)
    pings = 0
    while True:
        try:
            assert sock.recv(64) == b"WATCHDOG=1"
        except BlockingIOError:
            break
        pings += 1
    assert 3 <= pings <= 15


def test_run_watchdog_returns_when_not_asked_for() -> None:
    asyncio.run(asyncio.wait_for(SdNotifier(None).run_watchdog(), 1))


def test_strip_environment() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
    strip_environment(env)
    assert env == {"PATH": "/bin"}
