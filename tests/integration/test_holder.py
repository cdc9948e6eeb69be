"""The holder with real processes: fds and children outlive a launcher's connection."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launcher.holder import protocol as p
from launcher.holder.client import HolderClient, Refused, RequestFailed, start_holder
from launcher.holder.wire import send
from launcher.sandbox.jail import UNLIMITED, JailSpec
from launcher.vmm import QEMU_VIEW
from tests.support.processes import alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the holder serves root only")

JAIL_UID = 59990  # outside the default uid pool (64000-64999); only a sleep runs under it
HOLDS_FD = "import os,time; os.write(5, b'child'); time.sleep(600)"


async def wait_gone(pids: list[int], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if alive(pid)]
        await asyncio.sleep(0.02)


def test_reattach_keeps_fds_children_and_exits(tmp_path: Path) -> None:
    asyncio.run(_reattach_keeps_fds_children_and_exits(tmp_path))


async def _reattach_keeps_fds_children_and_exits(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    mine, theirs = socket.socketpair()
    pipe_r, pipe_w = os.pipe()
    client, attached = await HolderClient.connect(path)
    assert attached.welcome.inventory == () and attached.welcome.children == ()
    await client.put("keeper", "socketpair", [theirs.fileno()])
    await client.put("pipe", "pipe", [pipe_r, pipe_w])
    theirs.close()
    os.close(pipe_r)
    os.close(pipe_w)
    sleeper, sleeper_fd = await client.spawn("sleeper", ["/bin/sleep", "600"])
    holder_of_fd, other_fd = await client.spawn(
        "fdholder", [sys.executable, "-c", HOLDS_FD], fds=[p.Placement(5, 0, "keeper")])
    assert mine.recv(16) == b"child"
    with pytest.raises(Refused, match="another launcher"):
        await HolderClient.connect(path)
    client.close()  # the launcher "dies": no goodbye
    os.kill(sleeper, signal.SIGKILL)  # ends while no launcher is attached
    await asyncio.sleep(0.3)

    client, attached = await HolderClient.connect(path)
    w = attached.welcome
    assert {e.name: e.nfds for e in w.inventory} == {"keeper": 1, "pipe": 2}
    assert [c.pid for c in w.children] == [holder_of_fd]
    assert [(x.pid, x.tag, os.waitstatus_to_exitcode(x.status)) for x in w.exits] == [
        (sleeper, "sleeper", -signal.SIGKILL)]
    keeper = attached.fds["keeper"][0]
    os.write(keeper, b"again")
    assert mine.recv(16) == b"again"
    pr, pw = attached.fds["pipe"]
    os.write(pw, b"through")
    assert os.read(pr, 16) == b"through"
    await client.signal(holder_of_fd, signal.SIGTERM)
    exit_event = await asyncio.wait_for(client.events().__anext__(), 5)
    assert exit_event.pid == holder_of_fd
    await client.drop("pipe")
    await client.shutdown()
    await asyncio.wait_for(holder.wait(), 5)
    assert not os.path.exists(path)
    for fd in (keeper, pr, pw, sleeper_fd, other_fd):
        os.close(fd)
    mine.close()


def test_sigkill_of_the_holder_kills_its_children(tmp_path: Path) -> None:
    asyncio.run(_sigkill_of_the_holder_kills_its_children(tmp_path))


async def _sigkill_of_the_holder_kills_its_children(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    client, _ = await HolderClient.connect(path)
    pids = [(await client.spawn(f"c{i}", ["/bin/sleep", "600"]))[0] for i in range(2)]
    idle = [sys.executable, "-c", "import time; time.sleep(600)"]
    pids.append((await client.spawn("py", idle))[0])
    kids = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()
    everyone = [int(k) for k in kids] + pids
    assert sorted(everyone) == sorted(pids + pids)
    holder.send_signal(signal.SIGKILL)
    await holder.wait()
    await wait_gone(everyone)
    client.close()


def test_an_orphan_that_comes_to_the_holder_is_killed(tmp_path: Path) -> None:
    asyncio.run(_an_orphan_that_comes_to_the_holder_is_killed(tmp_path))


async def _an_orphan_that_comes_to_the_holder_is_killed(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    client, _ = await HolderClient.connect(path)
    r, w = os.pipe()
    forker = [sys.executable, "-c",
              "import os,time\nif os.fork()==0: os.write(3, str(os.getpid()).encode()); "
              "time.sleep(600)\n"]
    await client.spawn("forker", forker, passed=[w], fds=[p.Placement(3, 0)])
    os.close(w)
    orphan = int(os.read(r, 16))
    os.close(r)
    await wait_gone([orphan])
    await client.shutdown()
    await holder.wait()


def test_version_mismatch_is_refused(tmp_path: Path) -> None:
    asyncio.run(_version_mismatch_is_refused(tmp_path))


async def _version_mismatch_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.send(p.encode(p.Hello(p.VERSION + 1)))
    answer = p.decode(s.recv(4096), 0)
    assert answer == p.Refused(f"holder speaks protocol version {p.VERSION}, "
                               f"launcher speaks {p.VERSION + 1}")
    assert s.recv(4096) == b""
    s.close()
    holder.send_signal(signal.SIGTERM)
    await holder.wait()
    assert not os.path.exists(path)


def test_fds_land_at_their_targets(tmp_path: Path) -> None:
    asyncio.run(_fds_land_at_their_targets(tmp_path))


async def _fds_land_at_their_targets(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    client, _ = await HolderClient.connect(path)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    await client.put("two", "pipes", [w2, w1])  # crossed on purpose
    os.close(w1)
    os.close(w2)
    writer = [sys.executable, "-c", "import os; os.write(3, b'three'); os.write(4, b'four'); "
              "os.write(0, b'zero')"]
    r0, w0 = os.pipe()
    pid, pidfd = await client.spawn("w", writer, passed=[w0], fds=[
        p.Placement(3, 1, "two"), p.Placement(4, 0, "two"), p.Placement(0, 0)])
    os.close(w0)
    assert (os.read(r1, 16), os.read(r2, 16), os.read(r0, 16)) == (b"three", b"four", b"zero")
    exit_event = await asyncio.wait_for(client.events().__anext__(), 5)
    assert (exit_event.pid, exit_event.status) == (pid, 0)
    for fd in (r0, r1, r2, pidfd):
        os.close(fd)
    await client.shutdown()
    await holder.wait()


def test_idle_holder_exits(tmp_path: Path) -> None:
    asyncio.run(_idle_holder_exits(tmp_path))


async def _idle_holder_exits(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path, idle_exit=0.2)
    assert await asyncio.wait_for(holder.wait(), 5) == 0
    assert not os.path.exists(path)


def test_a_jailed_child_dies_with_the_holder(tmp_path: Path) -> None:
    """The jail changes uid (which clears a parent-death signal) and sets
    SIGKILL again; it execs in place, so the holder is still the parent."""
    asyncio.run(_a_jailed_child_dies_with_the_holder(tmp_path))


async def _a_jailed_child_dies_with_the_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    client, _ = await HolderClient.connect(path)
    argv = JailSpec(JAIL_UID, JAIL_UID, (), UNLIMITED, nproc=1, view=QEMU_VIEW, dev=("null",),
                    no_spawn=True).argv(["/usr/bin/sleep", "600"])
    pid, pidfd = await client.spawn("jailed", argv, passed=[2], fds=[p.Placement(2, 0)])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/status").read_text().count(f"Uid:\t{JAIL_UID}\t") == 0:
        assert time.monotonic() < deadline and alive(pid)
        await asyncio.sleep(0.05)
    assert Path(f"/proc/{pid}/stat").read_text().split()[3] == str(holder.pid)
    holder.send_signal(signal.SIGKILL)
    await holder.wait()
    await wait_gone([pid])
    os.close(pidfd)
    client.close()


def test_bad_requests_fail_and_bad_peers_are_closed(tmp_path: Path) -> None:
    asyncio.run(_bad_requests_fail_and_bad_peers_are_closed(tmp_path))


async def _bad_requests_fail_and_bad_peers_are_closed(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    r, w = os.pipe()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw.connect(path)
    send(raw, p.Put("early", "pipe", 1), [r])  # a request before hello
    assert raw.recv(4096) == b""
    raw.close()
    client, attached = await HolderClient.connect(path)
    assert attached.welcome.inventory == ()  # nothing of the refused put was kept
    await client.put("pipe", "pipe", [r])
    with pytest.raises(RequestFailed, match="already held"):
        await client.put("pipe", "pipe", [w])
    with pytest.raises(RequestFailed, match="not held"):
        await client.drop("nothing")
    with pytest.raises(RequestFailed, match="not a live child"):
        await client.signal(1, signal.SIGTERM)
    with pytest.raises(RequestFailed, match="No such file"):
        await client.spawn("x", ["/nonexistent"])
    with pytest.raises(RequestFailed, match="holds no fd 3"):
        await client.spawn("x", ["/bin/true"], fds=[p.Placement(3, 3, "pipe")])
    await client.shutdown()
    await holder.wait()
    os.close(r)
    os.close(w)


def test_shutdown_leaves_nothing(tmp_path: Path) -> None:
    asyncio.run(_shutdown_leaves_nothing(tmp_path))


async def _shutdown_leaves_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    client, _ = await HolderClient.connect(path)
    pid, _fd = await client.spawn("s", ["/bin/sleep", "600"])
    await client.shutdown()
    await asyncio.wait_for(holder.wait(), 5)
    await wait_gone([pid, holder.pid])


def test_non_root_peer_is_refused(tmp_path: Path) -> None:
    asyncio.run(_non_root_peer_is_refused(tmp_path))


async def _non_root_peer_is_refused(tmp_path: Path) -> None:
    top = tempfile.mkdtemp(prefix="holder-")  # reachable by uid 65534
    os.chmod(top, 0o755)
    path = os.path.join(top, "holder.sock")
    holder = await start_holder(path)
    os.chmod(path, 0o666)  # let the kernel's check pass so the holder's is tested
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setresuid(65534, 65534, 65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(path)
            try:
                s.send(p.encode(p.Hello(p.VERSION)))
                answer = s.recv(4096)
            except OSError:  # closed before or while we spoke
                answer = b""
            os.write(w, b"eof" if answer == b"" else b"answered")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 16) == b"eof"
    os.waitpid(child, 0)
    os.close(r)
    client, _ = await HolderClient.connect(path)  # root still gets in
    await client.shutdown()
    await holder.wait()
    os.rmdir(top)
