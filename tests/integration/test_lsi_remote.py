"""The remote LSI process as mplaunch starts it (:class:`launcher.lsi.remote.
RemoteProcess`): QEMU's x-remote machine through the jail, checked from
outside like the Python emulator (tests/e2e/test_sandbox_e2e.py), its
monitor answering, its LSI53C895A answering over the mpqemu link, and
nothing left once it is killed or stopped. Also: the no-spawn stage 1 in a
real process refuses every way to a new process and lets threads be."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from launcher.lsi.remote import (
    HeartbeatLost,
    RemoteDisk,
    RemoteFailed,
    RemoteProcess,
    RemoteStartError,
)
from launcher.mpqemu import codec
from launcher.sandbox import check
from launcher.uidpool import HostUids
from launcher.vmm import QEMU_VIEW
from tests.support.vm import need_qemu

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="the jail needs root (run the tests as root)"))

UID_RANGE = (64860, 64869)
MEMORY = 256 << 20
LSI_VENDOR = 0x1000
LSI53C895A_DEVICE = 0x0012


@pytest.fixture(autouse=True)
def qemu_present() -> None:
    missing = need_qemu()
    if missing:
        pytest.skip(missing)


def run_remote(tmp_path: Path, body: Callable[[RemoteProcess], Awaitable[None]],
               readonly_too: bool = False) -> tuple[int, int]:
    """Start a remote on a scratch image (target 0; a read-only one on
    target 3 too), run `body`, stop it; (pid, uid) it had."""
    images = []
    for name, target, readonly in [("d0.img", 0, False)] + (
            [("d3.img", 3, True)] if readonly_too else []):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(16 << 20)
        os.chmod(path, 0o600)  # the remote's uid could not open it itself
        images.append(RemoteDisk.open(str(path), target, readonly))
    lease = HostUids(*UID_RANGE).take("test/lsi-remote")
    assert lease is not None

    async def go() -> tuple[int, int]:
        remote = await RemoteProcess.start("lsi1", images, lease.uid, lease.uid, MEMORY)
        try:
            await body(remote)
        finally:
            await remote.stop()
        return remote.pid, remote.uid

    try:
        return asyncio.run(go())
    finally:
        lease.release()
        for disk in images:
            disk.close()


def assert_gone(pid: int, uid: int) -> None:
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    left = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"]
            and p.info["uids"].real == uid]
    assert left == []


async def config_read(sock: socket.socket, addr: int, length: int) -> int:
    """One PCI config read over the link, through the mpqemu codec."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    await loop.sock_sendall(sock, codec.encode(codec.PciConfigRead(addr, 0, length)))
    decoder = codec.Decoder(codec.Role.REPLIES, os.close)
    while True:
        message = decoder.next_message(reply_to=codec.Command.PCI_CFGREAD)
        if isinstance(message, codec.Ret):
            assert message.value is not None
            return message.value
        assert message is codec.NEED_DATA, message
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
        decoder.receive_data(data)


async def hmp(remote: RemoteProcess, line: str) -> str:
    out = await remote.qmp.execute("human-monitor-command", {"command-line": line})
    assert isinstance(out, str)
    return out


def test_the_remote_is_confined_serves_and_leaves_nothing(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    async def body(remote: RemoteProcess) -> None:
        pid, uid = remote.pid, remote.uid
        assert UID_RANGE[0] <= uid <= UID_RANGE[1]
        status = check.parse_status(Path(f"/proc/{pid}/status").read_text())
        assert check.judge(status, check.Expected(uid, uid, check.QEMU_STAGES)) == [], status
        assert status["CapEff"] == "0000000000000000" and status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2" and int(status["Seccomp_filters"]) == 2
        assert check.namespace_problems(pid) == []
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        # No host path: its root holds only QEMU's view, /proc and a small /dev.
        root = Path(f"/proc/{pid}/root")
        top = {"/" + p.split("/")[1] for p in QEMU_VIEW if os.path.lexists(p)}
        assert {"/" + n for n in os.listdir(root)} == top | {"/proc", "/dev"}
        assert sorted(os.listdir(root / "dev")) == ["null", "random", "urandom", "zero"]
        assert not (root / "tmp").exists() and not (root / str(tmp_path).lstrip("/")).exists()
        # Its fds: the images (by fd set), the two sockets, its own eventfds; stderr a pipe.
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        files = {x for x in links if x.startswith("/")}
        assert files <= {"/dev/null", str(tmp_path / "d0.img"), str(tmp_path / "d3.img")}
        assert os.readlink(f"/proc/{pid}/fd/2").startswith("pipe:[")
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert "Max processes             128" in limits
        # The monitor answers; the controller answers over the link.
        assert await remote.ping(5.0) > 0
        assert await config_read(remote.link, 0, 2) == LSI_VENDOR
        assert await config_read(remote.link, 2, 2) == LSI53C895A_DEVICE
        block = await remote.qmp.execute("query-block")
        assert isinstance(block, list)
        blocks = {b["inserted"]["node-name"]: b["inserted"]["ro"] for b in block}
        assert blocks == {"t0": False, "t3": True}
        # Block I/O on the image's fds, through QEMU's I/O worker threads
        # (new threads: clones with CLONE_THREAD, which the no-spawn stage 1 allows).
        for line in ('qemu-io -d scsi-t0 "aio_write -P 0xab 0 64k"',
                     'qemu-io -d scsi-t0 "aio_write -P 0xcd 64k 64k"',
                     'qemu-io -d scsi-t0 "aio_flush"'):
            assert await hmp(remote, line) == ""
        assert "read-only" in await hmp(remote, 'qemu-io -d scsi-t3 "write 0 4k"')
        with open(tmp_path / "d0.img", "rb") as f:
            assert f.read(128 << 10) == b"\xab" * (64 << 10) + b"\xcd" * (64 << 10)
        names = [(task / "comm").read_text().strip()
                 for task in Path(f"/proc/{pid}/task").iterdir()]
        assert "worker" in names, names  # QEMU's thread pool (debug-threads=on names it)
        assert await remote.ping(5.0) > 0
        # kill(): it ends at once, reaped.
        remote.kill()
        status_code = await asyncio.wait_for(remote.exited, 10)
        assert status_code == -signal.SIGKILL
        seen["gone"] = (pid, uid)

    pid, uid = run_remote(tmp_path, body, readonly_too=True)
    assert seen["gone"] == (pid, uid)
    assert_gone(pid, uid)
    assert HostUids(*UID_RANGE).holder(uid) is None


def test_stop_quits_through_the_monitor(tmp_path: Path) -> None:
    async def body(remote: RemoteProcess) -> None:
        assert await remote.ping(5.0) > 0
        assert await remote.stop() == 0  # quit over QMP: a clean exit
        assert remote.link.fileno() == -1 and remote.monitor.fileno() == -1

    pid, uid = run_remote(tmp_path, body)
    assert_gone(pid, uid)


NO_SPAWN_PROBE = r"""
import ctypes, errno, os, subprocess, threading
from launcher.sandbox import profiles, seccomp
seccomp.load(seccomp.build_deny_list(profiles.stage1_no_spawn(0)))
libc = ctypes.CDLL("libc.so.6", use_errno=True)
out = []
t = threading.Thread(target=lambda: out.append("thread"))
t.start(); t.join()
for what, call in (("fork", os.fork), ("subprocess", lambda: subprocess.run(["/bin/true"]))):
    try:
        call()
        out.append(what + " allowed")
    except OSError as e:
        out.append(f"{what} {errno.errorcode[e.errno]}")
for name, nr in (("vfork", 58), ("clone3", 435), ("ptrace", 101)):
    r = libc.syscall(nr, 0, 0, 0)
    out.append(f"{name} {errno.errorcode[ctypes.get_errno()] if r < 0 else 'allowed'}")
print(" ".join(out))
"""


def test_no_spawn_refuses_every_new_process_but_not_threads() -> None:
    """The filter alone, in an unprivileged-looking process (its own no_new_privs)."""
    done = subprocess.run([sys.executable, "-c", NO_SPAWN_PROBE], capture_output=True,
                          text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["thread", "fork", "EPERM", "subprocess", "EPERM",
                                   "vfork", "EPERM", "clone3", "ENOSYS", "ptrace", "EPERM"]


def test_a_frozen_remote_is_hung_and_answers_again_once_thawed(tmp_path: Path) -> None:
    async def body(remote: RemoteProcess) -> None:
        os.kill(remote.pid, signal.SIGSTOP)
        try:
            with pytest.raises(HeartbeatLost) as lost:
                await remote.ping(0.3)
            assert lost.value.hung and str(remote.pid) in str(lost.value)
        finally:
            os.kill(remote.pid, signal.SIGCONT)
        # The late answer to the abandoned ping is dropped; the next one counts.
        assert await remote.ping(5.0) > 0
        assert await remote.ping(5.0) > 0
        remote.kill()
        await remote.exited
        with pytest.raises(HeartbeatLost) as broken:
            await remote.ping(1.0)
        assert not broken.value.hung

    pid, uid = run_remote(tmp_path, body)
    assert_gone(pid, uid)


def test_a_remote_that_cannot_start_leaves_nothing(tmp_path: Path) -> None:
    """An "image" that is a folder: QEMU exits during its start-up. An fd
    that is not open, or no QEMU at all: nothing is even spawned."""
    lease = HostUids(*UID_RANGE).take("test/lsi-remote")
    assert lease is not None
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    async def go() -> None:
        with pytest.raises((RemoteFailed, check.SandboxError)) as failed:
            await RemoteProcess.start("lsi1", [RemoteDisk(0, folder)], lease.uid, lease.uid,
                                      MEMORY)
        assert "start-up" in str(failed.value) or "locking itself down" in str(failed.value)
        with pytest.raises(RemoteStartError, match="Bad file descriptor"):
            await RemoteProcess.start("lsi1", [RemoteDisk(0, 900)], lease.uid, lease.uid,
                                      MEMORY)
        with pytest.raises(RemoteStartError, match="not found"):
            await RemoteProcess.start("lsi1", [], lease.uid, lease.uid, MEMORY,
                                      binary="no-such-qemu")

    try:
        asyncio.run(go())
        left = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"]
                and p.info["uids"].real == lease.uid]
        assert left == []
    finally:
        os.close(folder)
        lease.release()
