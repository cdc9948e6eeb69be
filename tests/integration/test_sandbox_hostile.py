"""Proof that a taken-over emulator gains nothing, and that mplaunch checks
before it trusts.

Each hostile action runs in a real emulator process of a real VM spec,
started by :func:`launcher.emulators.start` through the jail, checked by
:func:`launcher.sandbox.check.wait_confined`, locked down with the product's
profile; only its program is the test payload (test_sandbox_payload.py).
A second, ordinary emulator of the same VM is the neighbour it attacks.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher import emulators
from launcher.sandbox import check
from launcher.sandbox.jail import EXIT_JAIL
from launcher.spec import Spec, load_spec

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="the sandbox needs root (run the tests as root)"))

PAYLOAD = Path(__file__).with_name("test_sandbox_payload.py")
KILLED = -signal.SIGSYS


def write_spec(folder: Path, sandbox: str = "on") -> Spec:
    for name in ("a.img", "b.img"):
        with open(folder / name, "wb") as f:
            f.truncate(1 << 20)
    (folder / "vm.toml").write_text(f"""
[vm]
name = "hostile"
memory = "64M"
run_dir = "run"
sandbox = "{sandbox}"
uid_range = "64100-64199"

[[emulator]]
id = "victim"

[[emulator]]
id = "hostile"

[[controller]]
id = "c0"
emulator = "victim"

[[controller]]
id = "c1"
emulator = "hostile"

[[disk]]
id = "a"
controller = "c0"
lun = 0
image = "a.img"

[[disk]]
id = "b"
controller = "c1"
lun = 0
image = "b.img"
""")
    return load_spec(str(folder / "vm.toml"))


@dataclass
class Vm:
    folder: Path
    spec: Spec
    victim: emulators.EmulatorProcess
    victim_res: emulators.EmulatorResources

    async def hostile(self, action: str, target: str = "", mode: str = "on") -> int:
        """Start the payload as the VM's second emulator; return its wait status."""
        res = emulators.prepare(self.spec, self.spec.emulators[1])
        try:
            command = [sys.executable, "-I", str(PAYLOAD), res.config.to_json(), mode, action,
                       target]
            proc = await emulators.start(res, command=command)
            res.close_emulator_side()
            res.qemu_ends["c1"].send(b"!")  # the first byte: the payload acts now
            return await asyncio.wait_for(proc.exited, 20)
        finally:
            res.close()


@pytest.fixture
def stand_in() -> Iterator[subprocess.Popen[bytes]]:
    """A process that plays QEMU for ptrace (root-owned, like QEMU's launcher side)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def hostile(tmp_path: Path, action: str, target: str = "", mode: str = "on",
            target_victim: bool = False) -> tuple[int, Vm]:
    async def go() -> tuple[int, Vm]:
        spec = write_spec(tmp_path)
        res = emulators.prepare(spec, spec.emulators[0])
        victim = await emulators.start(res)
        res.close_emulator_side()
        vm = Vm(tmp_path, spec, victim, res)
        try:
            t = str(victim.pid) if target_victim else target
            status = await vm.hostile(action, t, mode)
            assert not victim.exited.done(), "the victim must survive"
            return status, vm
        finally:
            await victim.stop()
            res.close()
    return asyncio.run(go())


# -- after lockdown: every attempt is refused, and how

@pytest.mark.parametrize(("action", "target", "expected"), [
    ("open", "/etc/passwd", 100 + errno.EACCES),
    ("openat", "/etc/passwd", 100 + errno.EACCES),
    ("socket_inet", "", KILLED),
    ("socket_unix", "", KILLED),
    ("execve", "", KILLED),
    ("fork", "", KILLED),
    ("clone", "", KILLED),
    ("clone3", "", KILLED),
    ("setuid", "", KILLED),
    ("mount", "", KILLED),
    ("mmap_exec", "", KILLED),
    ("mprotect_exec", "", KILLED),
])
def test_after_lockdown_the_action_is_refused(tmp_path: Path, action: str, target: str,
                                              expected: int) -> None:
    status, _ = hostile(tmp_path, action, target)
    assert status == expected


def test_the_payload_itself_runs_to_the_end_when_harmless(tmp_path: Path) -> None:
    status, _ = hostile(tmp_path, "noop")
    assert status == 0


def test_another_disk_image_cannot_be_opened(tmp_path: Path) -> None:
    status, _ = hostile(tmp_path, "openat", str(tmp_path / "a.img"))
    assert status == 100 + errno.EACCES
    status, _ = hostile(tmp_path, "open", str(tmp_path / "a.img"))
    assert status == 100 + errno.EACCES


def test_qemus_qmp_socket_cannot_be_reached(tmp_path: Path) -> None:
    qmp = tmp_path / "qemu.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(qmp))
    listener.listen()
    try:
        status, _ = hostile(tmp_path, "connect", str(qmp))
        assert status == KILLED
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_qemu_cannot_be_ptraced(tmp_path: Path, stand_in: subprocess.Popen[bytes]) -> None:
    status, _ = hostile(tmp_path, "ptrace", str(stand_in.pid))
    assert status == KILLED
    assert stand_in.poll() is None
    assert "TracerPid:\t0" in Path(f"/proc/{stand_in.pid}/status").read_text()


@pytest.mark.parametrize("action", ["kill", "ptrace", "process_vm_readv"])
def test_another_emulator_cannot_be_touched(tmp_path: Path, action: str) -> None:
    status, _ = hostile(tmp_path, action, target_victim=True)  # asserts the victim lives
    assert status == KILLED


def test_the_launcher_cannot_be_signalled(tmp_path: Path) -> None:
    status, _ = hostile(tmp_path, "kill", str(os.getpid()))
    assert status == KILLED  # and this test process is still here to say so


def test_another_emulators_memory_and_fds_cannot_be_read_through_proc(tmp_path: Path) -> None:
    async def go() -> list[int]:
        spec = write_spec(tmp_path)
        res = emulators.prepare(spec, spec.emulators[0])
        victim = await emulators.start(res)
        res.close_emulator_side()
        vm = Vm(tmp_path, spec, victim, res)
        try:
            fd = res.config.controllers[0].luns[0].fd
            return [await vm.hostile("openat", f"/proc/{victim.pid}/mem"),
                    await vm.hostile("openat", f"/proc/{victim.pid}/fd/{fd}"),
                    await vm.hostile("open", f"/proc/{victim.pid}/environ")]
        finally:
            await victim.stop()
            res.close()
    assert asyncio.run(go()) == [100 + errno.EACCES] * 3


def test_no_host_path_resolves_even_through_a_stat_the_filter_lets_through(
        tmp_path: Path) -> None:
    """newfstatat with AT_EMPTY_PATH passes stage 2 (glibc's fstat), but the
    kernel still resolves a non-empty path: under the empty root it finds
    nothing, whatever the file's owner or mode."""
    async def go() -> list[int]:
        spec = write_spec(tmp_path)
        res = emulators.prepare(spec, spec.emulators[0])
        victim = await emulators.start(res)
        res.close_emulator_side()
        vm = Vm(tmp_path, spec, victim, res)
        targets = [sys.executable, "/etc/passwd", str(tmp_path / "a.img"), str(PAYLOAD),
                   f"/proc/{victim.pid}/status", "/dev/null", "/run/mplaunch", "."]
        try:
            return [await vm.hostile("stat_path", t) for t in targets[:-1]] + [
                await vm.hostile("stat_path", targets[-1])]
        finally:
            await victim.stop()
            res.close()
    statuses = asyncio.run(go())
    assert statuses[:-1] == [100 + errno.ENOENT] * 7
    assert statuses[-1] == 0  # "." is the empty root itself: a tmpfs, no host file


def test_a_confined_emulator_holds_no_heavy_module_of_the_jail(tmp_path: Path) -> None:
    """The emulator runs in the jail's interpreter: the jail imports nothing
    that would bring child processes or temporary files into it."""
    status, _ = hostile(tmp_path, "heavy_modules")
    assert status == 0


def test_an_emulators_fds_0_to_2_are_never_a_file_the_launcher_writes(
        tmp_path: Path) -> None:
    """Even when the launcher's own stdout and stderr are a regular file (a log),
    the emulator gets /dev/null and a pipe the launcher reads and prefixes."""
    log = tmp_path / "mplaunch.log"

    async def go() -> tuple[list[str], int]:
        spec = write_spec(tmp_path)
        res = emulators.prepare(spec, spec.emulators[0])
        proc = await emulators.start(res)
        res.close_emulator_side()
        try:
            assert os.listdir(f"/proc/{proc.pid}/root") == []  # its root: empty
            return [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in (0, 1, 2)], proc.pid
        finally:
            await proc.stop()
            res.close()

    saved = [os.dup(1), os.dup(2)]
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        links, pid = asyncio.run(go())
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
    assert links[0] == "/dev/null"
    assert links[1].startswith("pipe:[") and links[2] == links[1]
    assert str(log) not in links


def test_an_emulators_output_reaches_the_log_prefixed(tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    async def go() -> None:
        spec = write_spec(tmp_path)
        res = emulators.prepare(spec, spec.emulators[0])
        res.uid = 0  # the jail refuses, and says so on its stderr
        try:
            with pytest.raises(check.ConfinementFailed):
                await emulators.start(res)
            await asyncio.sleep(0.2)  # the relay's last lines
        finally:
            res.close()
    asyncio.run(go())
    err = capfd.readouterr().err
    assert any(line.startswith("[victim ") and "mplaunch-jail: cannot apply the sandbox" in line
               for line in err.splitlines()), err


def test_log_mode_lets_a_violation_through_and_on_mode_kills_it(tmp_path: Path) -> None:
    status, _ = hostile(tmp_path, "getppid", mode="log")
    assert status == 0
    status, _ = hostile(tmp_path, "getppid", mode="on")
    assert status == KILLED


def test_log_mode_still_refuses_what_stage_1_denies(tmp_path: Path) -> None:
    status, _ = hostile(tmp_path, "socket_inet", mode="log")
    assert status == 100 + errno.EAFNOSUPPORT
    status, _ = hostile(tmp_path, "execve", mode="log")
    assert status == 100 + errno.EPERM


# -- the jail alone (before lockdown): the uid and capability layers hold by themselves

async def jail_only(tmp_path: Path, action: str, target: str) -> int:
    spec = write_spec(tmp_path)
    victim_res = emulators.prepare(spec, spec.emulators[0])
    victim = await emulators.start(victim_res)
    victim_res.close_emulator_side()
    res = emulators.prepare(spec, spec.emulators[1])
    try:
        t = target.format(victim=victim.pid)
        command = [sys.executable, "-I", str(PAYLOAD), res.config.to_json(), "jail-only",
                   action, t]
        argv = emulators.jail_spec(res).argv(command)
        proc = await asyncio.create_subprocess_exec(
            *argv, pass_fds=res.config.all_fds(), env={}, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL)
        res.close_emulator_side()
        res.qemu_ends["c1"].send(b"!")
        status = await asyncio.wait_for(proc.wait(), 20)
        assert not victim.exited.done()
        return status
    finally:
        await victim.stop()
        victim_res.close()
        res.close()


@pytest.mark.parametrize(("action", "target", "expected"), [
    ("kill0", "{victim}", 100 + errno.EPERM),       # another uid: no signals
    ("kill", "{victim}", 100 + errno.EPERM),
    ("ptrace", "{victim}", 100 + errno.EPERM),      # stage 1 and the uid
    ("openat", "/proc/{victim}/mem", 100 + errno.ENOENT),  # no /proc in its root
    ("setuid", "", 100 + errno.EPERM),            # no capabilities
    ("fork", "", 100 + errno.EAGAIN),             # RLIMIT_NPROC 0
    ("socket_inet", "", 100 + errno.EAFNOSUPPORT),  # stage 1
    ("execve", "", 100 + errno.EPERM),            # stage 1
    ("openat", "/etc/shadow", 100 + errno.ENOENT),  # its root is empty
    ("openat", str(PAYLOAD), 100 + errno.ENOENT),   # even its own program
    ("stat_path", sys.executable, 100 + errno.ENOENT),
])
def test_before_lockdown_the_jail_alone_refuses(tmp_path: Path, action: str, target: str,
                                                expected: int) -> None:
    assert asyncio.run(jail_only(tmp_path, action, target)) == expected


# -- check before trust

def test_two_emulators_of_a_vm_are_confined_with_distinct_uids(tmp_path: Path) -> None:
    async def go() -> None:
        spec = write_spec(tmp_path)
        started = []
        try:
            for index, emulator in enumerate(spec.emulators):
                res = emulators.prepare(spec, emulator)
                started.append((await emulators.start(res), res))
                res.close_emulator_side()
                assert res.uid == 64100 + index
            statuses = [check.parse_status(Path(f"/proc/{p.pid}/status").read_text())
                        for p, _ in started]
            for (p, res), status in zip(started, statuses, strict=True):
                assert check.judge(status, check.Expected(res.uid, res.uid)) == []
                assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
                assert status["CapEff"] == status["CapBnd"] == "0000000000000000"
                assert check.namespace_problems(p.pid) == []
            assert statuses[0]["Uid"] != statuses[1]["Uid"]
            nets = {os.readlink(f"/proc/{p.pid}/ns/net") for p, _ in started}
            assert len(nets) == 2 and os.readlink("/proc/self/ns/net") not in nets
            # The wrong expectation is caught: the check reads, it does not assume.
            p, res = started[0]
            with pytest.raises(check.ConfinementFailed, match="Uid"):
                await check.wait_confined("x", p.pid, check.Expected(res.uid + 1, res.uid),
                                          p.exited, timeout=1)
        finally:
            for p, res in started:
                await p.stop()
                res.close()
    asyncio.run(go())


def test_an_emulator_that_never_locks_down_is_killed_and_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "CONFINE_TIMEOUT", 1.5)

    async def go() -> None:
        spec = write_spec(tmp_path)
        res = emulators.prepare(spec, spec.emulators[1])
        try:
            command = [sys.executable, "-I", str(PAYLOAD), res.config.to_json(), "jail-only",
                       "noop"]
            with pytest.raises(check.ConfinementFailed, match="no lockdown within 1.5 s"):
                await emulators.start(res, command=command)
        finally:
            res.close()
        assert not [p for p in _children() if "test_sandbox_payload" in " ".join(p)]
    asyncio.run(go())


def test_a_jail_that_cannot_apply_the_sandbox_fails_closed(tmp_path: Path) -> None:
    async def go() -> None:
        spec = write_spec(tmp_path)
        res = emulators.prepare(spec, spec.emulators[0])
        res.uid = 0  # the jail refuses to run an emulator as root
        try:
            with pytest.raises(check.ConfinementFailed,
                               match=f"exited before locking itself down .status {EXIT_JAIL}"):
                await emulators.start(res)
        finally:
            res.close()
    asyncio.run(go())


def _children() -> list[list[str]]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                    out.append(Path(f"/proc/{pid}/cmdline").read_text().split("\0"))
            except (OSError, ValueError, IndexError):
                continue
    return out
