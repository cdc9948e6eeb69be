"""launcher.children with a real holder: spawn, signal, exits, adoption after
a re-connect, the holder's death, fds held in order; and the same calls on the
launcher itself (LocalHost)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import children, emulators
from launcher.holder.client import HolderClient, HolderGone, start_holder
from launcher.sandbox.jail import EXIT_ORPHANED, UNLIMITED, JailSpec
from launcher.spec import Spec, load_spec
from launcher.vmm import QEMU_VIEW
from tests.support.processes import alive

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="the holder serves root only")]

JAIL_UID = 59991  # outside the default uid pool (64000-64999); only a sleep runs under it


async def attach(path: str) -> children.HolderHost:
    client, attached = await HolderClient.connect(path)
    for fds in attached.fds.values():
        for fd in fds:
            os.close(fd)
    return children.HolderHost(client, attached.welcome)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


async def wait_gone(pid: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still runs"
        await asyncio.sleep(0.02)


def test_spawn_signal_and_exits(tmp_path: Path) -> None:
    asyncio.run(_spawn_signal_and_exits(tmp_path))


async def _spawn_signal_and_exits(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    host = await attach(path)
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
        extra_r, extra_w = os.pipe2(os.O_CLOEXEC)
        # fd `extra_w` at its own number, stdout on the pipe, an exit code of its own
        script = f"import os; os.write({extra_w}, b'extra'); print('out', flush=True); exit(3)"
        child = await host.spawn("writer", [sys.executable, "-c", script], pass_fds=[extra_w],
                                 stdout=w, stdin=children.DEVNULL, env={})
        os.close(w)
        os.close(extra_w)
        assert await asyncio.wait_for(child.exited, 10) == 3
        assert os.read(r, 100) == b"out\n" and os.read(extra_r, 100) == b"extra"
        os.close(r)
        os.close(extra_r)

        sleeper = await host.spawn("sleeper", ["sleep", "600"])  # searched on PATH
        assert sleeper.tag == "sleeper" and sleeper.pidfd >= 0
        assert parent_of(sleeper.pid) == holder.pid
        sleeper.send_signal(signal.SIGTERM)  # through the pidfd
        assert await asyncio.wait_for(sleeper.exited, 10) == -signal.SIGTERM
        assert sleeper.pidfd == -1  # closed with the exit
        sleeper.send_signal(signal.SIGTERM)  # gone: nothing happens
        sleeper.kill()

        with pytest.raises(children.SpawnFailed, match="spawn /nonexistent"):
            await host.spawn("nothing", ["/nonexistent/program"])
        with pytest.raises(FileNotFoundError):
            await host.spawn("nothing", ["no-such-program-anywhere"])
        assert not host.lost.done()
    finally:
        await host.shutdown()
        await holder.wait()


def test_a_jailed_child_through_the_holder(tmp_path: Path) -> None:
    asyncio.run(_a_jailed_child_through_the_holder(tmp_path))


async def _a_jailed_child_through_the_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    host = await attach(path)
    try:
        argv = JailSpec(JAIL_UID, JAIL_UID, (), UNLIMITED, nproc=1, view=QEMU_VIEW,
                        dev=("null",), no_spawn=True).argv(["/usr/bin/sleep", "600"])
        child = await host.spawn("jailed", argv, stderr=2)
        deadline = time.monotonic() + 10
        while f"Uid:\t{JAIL_UID}\t" not in Path(f"/proc/{child.pid}/status").read_text():
            assert time.monotonic() < deadline and alive(child.pid)
            await asyncio.sleep(0.05)
        assert parent_of(child.pid) == holder.pid  # the jail execs in place
        child.kill()
        assert await asyncio.wait_for(child.exited, 10) == -signal.SIGKILL
    finally:
        await host.shutdown()
        await holder.wait()


def write_spec(folder: Path) -> Spec:
    with open(folder / "a.img", "wb") as f:
        f.truncate(1 << 20)
    (folder / "vm.toml").write_text("""
[vm]
name = "held"
memory = "64M"
run_dir = "run"
uid_range = "64820-64829"

[[emulator]]
id = "e0"

[[controller]]
id = "c0"
emulator = "e0"

[[disk]]
id = "a"
controller = "c0"
lun = 0
image = "a.img"
""")
    return load_spec(str(folder / "vm.toml"))


def test_an_emulator_through_the_holder_is_adopted_after_a_reconnect(tmp_path: Path) -> None:
    """emulators.start with the holder installed: the emulator is the
    holder's child, confined; a new launcher adopts it with the output pipe
    the holder kept, and its later exit reaches the new host."""
    asyncio.run(_an_emulator_through_the_holder(tmp_path))


async def _an_emulator_through_the_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    spec = write_spec(tmp_path)
    host = await attach(path)
    children.install(host)
    res = emulators.prepare(spec, spec.emulators[0])
    try:
        proc = await emulators.start(res)
        assert parent_of(proc.pid) == holder.pid and proc.output_fd >= 0
        host.hold("occ:e0", "occupant", [proc.output_fd])
        await host.flush()
        assert [(c.pid, c.tag) for c in host.children()] == []  # as reported at attach
        host.close()  # the launcher goes, and its relay with it
        assert proc.relay is not None
        proc.relay.cancel()
        await asyncio.sleep(0.2)
        assert alive(proc.pid)

        client, attached = await HolderClient.connect(path)
        assert [(c.pid, c.tag) for c in attached.welcome.children] == [(proc.pid, "emulator:e0")]
        assert list(attached.fds) == ["occ:e0"]
        host = children.HolderHost(client, attached.welcome)
        children.install(host)
        assert [c.tag for c in host.children()] == ["emulator:e0"]
        adopted = emulators.EmulatorProcess.adopt("e0", host.adopt(proc.pid),
                                                  attached.fds["occ:e0"][0])
        assert adopted.pid == proc.pid and adopted.output_fd >= 0
        assert host.adopt(proc.pid) is adopted.child  # one Child per live pid
        status = await asyncio.wait_for(adopted.stop(), 20)
        assert status in (0, -signal.SIGTERM), status
        assert not alive(proc.pid)
        assert adopted.relay is not None and adopted.relay.done() and adopted.output_fd == -1
    finally:
        children.install(None)
        res.close()
        await host.shutdown()
        await holder.wait()


def test_adopt_after_a_reconnect(tmp_path: Path) -> None:
    asyncio.run(_adopt_after_a_reconnect(tmp_path))


async def _adopt_after_a_reconnect(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    host = await attach(path)
    try:
        lives = await host.spawn("lives", ["/bin/sleep", "600"])
        ends = await host.spawn("ends", ["/bin/sleep", "600"])
        host.close()  # detach: the children stay the holder's
        assert lives.exited.cancelled()  # this host no longer sees them
        pidfd = os.pidfd_open(ends.pid)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # ends while nobody is attached
        os.close(pidfd)
        await wait_gone(ends.pid)
        await asyncio.sleep(0.1)  # the holder reaps and records it

        host = await attach(path)
        assert [(c.pid, c.tag) for c in host.children()] == [(lives.pid, "lives")]
        assert [(x.pid, x.tag) for x in host.exits] == [(ends.pid, "ends")]
        for _ in range(2):  # as often as asked
            ended = host.adopt(ends.pid)
            assert ended.exited.done() and ended.exited.result() == -signal.SIGKILL
        with pytest.raises(children.UnknownChild):
            host.adopt(1)
        adopted = host.adopt(lives.pid)
        assert adopted.tag == "lives" and adopted.pidfd >= 0 and not adopted.exited.done()
        adopted.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(adopted.exited, 10) == -signal.SIGTERM
    finally:
        await host.shutdown()
        await holder.wait()


def test_the_holder_s_death_ends_every_child(tmp_path: Path) -> None:
    asyncio.run(_the_holder_s_death_ends_every_child(tmp_path))


async def _the_holder_s_death_ends_every_child(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    host = await attach(path)
    plain = await host.spawn("plain", ["/bin/sleep", "600"])
    argv = JailSpec(JAIL_UID, JAIL_UID, (), UNLIMITED, nproc=1, view=QEMU_VIEW,
                    dev=("null",), no_spawn=True).argv(["/usr/bin/sleep", "600"])
    jailed = await host.spawn("jailed", argv)
    deadline = time.monotonic() + 10
    while f"Uid:\t{JAIL_UID}\t" not in Path(f"/proc/{jailed.pid}/status").read_text():
        assert time.monotonic() < deadline and alive(jailed.pid)
        await asyncio.sleep(0.05)
    holder.send_signal(signal.SIGKILL)
    await holder.wait()
    await asyncio.wait_for(asyncio.shield(host.lost), 5)
    for child in (plain, jailed):
        assert await asyncio.wait_for(child.exited, children.LOST_GRACE_S + 5) == -signal.SIGKILL
        assert not alive(child.pid)
    with pytest.raises(HolderGone):
        await host.spawn("late", ["/bin/sleep", "1"])
    host.hold("late", "pipe", [0])  # logged, not raised
    await host.flush()
    host.close()


def test_holds_reach_the_holder_in_call_order(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    asyncio.run(_holds_reach_the_holder_in_call_order(tmp_path))
    assert "already held" in caplog.text  # a refused hold is logged


async def _holds_reach_the_holder_in_call_order(tmp_path: Path) -> None:
    logging.getLogger("mplaunch").setLevel(logging.INFO)
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    host = await attach(path)
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
        mine, theirs = socket.socketpair()
        host.hold("a", "first", [r])
        host.unhold("a")
        host.hold("a", "second", [r, w])
        host.hold("b", "socket", [theirs.fileno()])
        host.unhold("b")
        host.hold("c", "socket", [theirs.fileno()])
        host.hold("c", "again", [r])  # refused by the holder: c is held
        os.close(r)  # the host duplicated them when asked
        os.close(w)
        theirs.close()
        await host.flush()
        host.close()

        client, attached = await HolderClient.connect(path)
        inventory = [(e.name, e.kind, e.nfds) for e in attached.welcome.inventory]
        assert inventory == [("a", "second", 2), ("c", "socket", 1)]
        held_r, held_w = attached.fds["a"]
        os.write(held_w, b"ok")
        assert os.read(held_r, 2) == b"ok"
        with socket.socket(fileno=attached.fds["c"][0]) as c:
            c.send(b"c")
            assert mine.recv(1) == b"c"
        os.close(held_r)
        os.close(held_w)
        mine.close()
        host = children.HolderHost(client, attached.welcome)
    finally:
        await host.shutdown()
        await holder.wait()


def test_the_launcher_itself_as_the_host() -> None:
    asyncio.run(_the_launcher_itself_as_the_host())


async def _the_launcher_itself_as_the_host() -> None:
    host = children.host()
    assert isinstance(host, children.LocalHost)
    child = await host.spawn("sleeper", ["sleep", "600"], stdin=children.DEVNULL)
    assert parent_of(child.pid) == os.getpid() and child.pidfd >= 0
    host.hold("ignored", "pipe", [0])
    host.unhold("ignored")
    await host.flush()
    child.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(child.exited, 10) == -signal.SIGTERM
    child.kill()  # gone: nothing happens
    assert not host.lost.done() and host.children() == () and host.exits == ()
    with pytest.raises(children.UnknownChild):
        host.adopt(child.pid)


BECOME = """
import os, sys
from launcher.sandbox.jail import become
become({uid}, {uid}, 1, os.getppid() if sys.argv[1] == "own" else int(sys.argv[1]))
sys.exit(0)
"""


@pytest.mark.parametrize(("parent", "status"), [("own", 0), ("1", EXIT_ORPHANED)])
def test_the_jail_leaves_when_its_parent_is_not_the_one_it_started_under(
        parent: str, status: int) -> None:
    """After its uid change the jail sets the parent-death signal again; a
    parent other than the one it started under (it died in between: the
    signal will never come) ends it at once."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", BECOME.format(uid=JAIL_UID), parent],
                          cwd=root, timeout=30)
    assert done.returncode == status


def holder_children(holder_pid: int) -> set[int]:
    found: set[int] = set()
    for tid in os.listdir(f"/proc/{holder_pid}/task"):
        found.update(int(x) for x in
                     Path(f"/proc/{holder_pid}/task/{tid}/children").read_text().split())
    return found


def test_a_cancelled_spawn_leaves_nothing_running(tmp_path: Path) -> None:
    asyncio.run(_a_cancelled_spawn_leaves_nothing_running(tmp_path))


async def _a_cancelled_spawn_leaves_nothing_running(tmp_path: Path) -> None:
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    host = await attach(path)
    try:
        for _ in range(3):  # the request is on its way when the caller goes
            spawning = asyncio.create_task(host.spawn("cancelled", ["/bin/sleep", "600"]))
            await asyncio.sleep(0.001)
            spawning.cancel()
            with pytest.raises(asyncio.CancelledError):
                await spawning
        # The next request gets its own answer, not a cancelled one's.
        child = await host.spawn("next", ["/bin/sleep", "600"])
        assert child.tag == "next"
        deadline = time.monotonic() + 5
        while holder_children(holder.pid) != {child.pid}:
            assert time.monotonic() < deadline, holder_children(holder.pid)
            await asyncio.sleep(0.02)
        assert Path(f"/proc/{child.pid}/cmdline").read_bytes().split(b"\0")[1] == b"600"
    finally:
        await host.shutdown()
        await holder.wait()
