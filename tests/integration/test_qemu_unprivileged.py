"""QEMU started as mplaunch starts it (:meth:`launcher.qemu.Qemu.launch`):
under a uid of its own, with no capabilities, no_new_privs and its own
namespaces, reading the kernel, initrd and console only through the fds
mplaunch opened, and checked from outside before it is trusted."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from launcher.qemu import Qemu, bind_qmp_listener
from launcher.sandbox import check
from launcher.spec import Accel, Spec, parse_spec
from launcher.uidpool import HostUids
from tests.support.vm import ensure_guest_built, need_qemu

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="QEMU's jail needs root (run the tests as root)"))

UID_RANGE = (64300, 64309)


@pytest.fixture(scope="module")
def guest() -> tuple[Path, Path]:
    missing = need_qemu()
    if missing:
        pytest.skip(missing)
    return ensure_guest_built()


def make_spec(tmp_path: Path, guest: tuple[Path, Path], **vm: object) -> Spec:
    """A VM with no emulators: a kernel and initrd readable by root only."""
    kernel, initrd = guest
    for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img")):
        shutil.copyfile(src, tmp_path / name)
        os.chmod(tmp_path / name, 0o600)
    os.chmod(tmp_path, 0o700)  # nothing under it is reachable by another uid
    data: dict[str, dict[str, object]] = {"vm": {
        "name": "qemu-unpriv", "memory": "128M", "accel": "tcg",
        "kernel": "vmlinuz", "initrd": "initrd.img",
        "append": "console=ttyS0 panic=-1", "console": "console.log",
        "run_dir": "run", "uid_range": f"{UID_RANGE[0]}-{UID_RANGE[1]}", **vm}}
    data["vm"] = {k: v for k, v in data["vm"].items() if v is not None}  # None: left out
    return parse_spec(data, tmp_path / "vm.toml")


def run_qemu(tmp_path: Path, spec: Spec,
             body: Callable[[Qemu], Awaitable[None]]) -> None:
    async def go() -> None:
        run = tmp_path / "run"
        run.mkdir()
        listener = bind_qmp_listener(run / "qemu.sock")
        try:
            qemu = await Qemu.launch(spec, Accel.TCG, listener.fileno(), {}, run / "qemu.sock")
        finally:
            listener.close()
        try:
            await body(qemu)
        finally:
            await qemu.stop()
    asyncio.run(go())


def test_qemu_runs_unprivileged_and_boots_from_files_it_cannot_open(
        tmp_path: Path, guest: tuple[Path, Path]) -> None:
    spec = make_spec(tmp_path, guest)
    seen: dict[str, object] = {}

    async def body(qemu: Qemu) -> None:
        status = check.parse_status(Path(f"/proc/{qemu.pid}/status").read_text())
        uid = int(status["Uid"].split()[0])
        seen["uid"] = uid
        assert UID_RANGE[0] <= uid <= UID_RANGE[1]
        assert check.judge(status, check.Expected(uid, uid, check.QEMU_STAGES)) == [], status
        assert status["CapEff"] == "0000000000000000" and status["NoNewPrivs"] == "1"
        assert check.namespace_problems(qemu.pid) == []
        assert HostUids(*UID_RANGE).holder(uid) is not None  # leased host-wide
        links = {os.readlink(f"/proc/{qemu.pid}/fd/{fd}")
                 for fd in os.listdir(f"/proc/{qemu.pid}/fd")}
        assert not [link for link in links if link.startswith(str(tmp_path / "vmlinuz"))]
        assert os.readlink(f"/proc/{qemu.pid}/fd/2").startswith("pipe:[")
        # Its view of the host: /usr and the links to it, read-only, and the
        # loader's cache; its own /proc; a /dev of four nodes.
        root = Path(f"/proc/{qemu.pid}/root")
        assert sorted(os.listdir(root)) == ["bin", "dev", "etc", "lib", "lib64", "proc",
                                            "sbin", "usr"] or not Path("/lib64").exists()
        assert os.listdir(root / "etc") == ["ld.so.cache"]
        assert sorted(os.listdir(root / "dev")) == ["null", "random", "urandom", "zero"]
        assert not (root / "tmp").exists() and not (root / "work").exists()
        await qemu.connect()
        assert (await qemu.execute("query-status"))["status"] == "running"
        # The guest's kernel, read by QEMU from a root-only file through a
        # sealed copy, writes to a console file QEMU could not have opened.
        deadline = time.monotonic() + 120
        console = tmp_path / "console.log"
        while b"Linux version" not in console.read_bytes():
            assert time.monotonic() < deadline, console.read_bytes()[-2000:]
            await asyncio.sleep(0.5)

    run_qemu(tmp_path, spec, body)
    assert HostUids(*UID_RANGE).holder(int(str(seen["uid"]))) is None  # released once reaped


def test_a_fixed_qemu_user_is_used(tmp_path: Path, guest: tuple[Path, Path]) -> None:
    spec = make_spec(tmp_path, guest, qemu_user="nobody", kernel=None, initrd=None,
                     append=None, console="none")

    async def body(qemu: Qemu) -> None:
        status = check.parse_status(Path(f"/proc/{qemu.pid}/status").read_text())
        assert status["Uid"].split() == ["65534"] * 4
        assert status["CapEff"] == "0000000000000000"

    run_qemu(tmp_path, spec, body)


def test_qemu_that_is_not_confined_as_required_is_killed_and_refused(
        tmp_path: Path, guest: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The check reads the kernel's word: asking for a filter QEMU never loads
    fails closed, QEMU killed and reaped, its uid given back."""
    monkeypatch.setattr(check, "QEMU_STAGES", 3)
    monkeypatch.setattr(check, "CONFINE_TIMEOUT", 3.0)
    spec = make_spec(tmp_path, guest)

    async def body(qemu: Qemu) -> None:
        raise AssertionError("QEMU must not be handed over")

    with pytest.raises(check.ConfinementFailed, match=r"QEMU \(pid \d+\) is not confined"):
        run_qemu(tmp_path, spec, body)
    holders = [HostUids(*UID_RANGE).holder(u) for u in range(UID_RANGE[0], UID_RANGE[1] + 1)]
    assert holders == [None] * len(holders)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_our_qemu(int(p))]


def _is_our_qemu(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return b"qemu-unpriv" in cmdline and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()
