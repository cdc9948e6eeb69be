"""The holder as the emulators' fork-server template (launcher/template.py).

A spare started through the holder is forked from it (it shares the
holder's heap mapping, which an exec'd process never does) and ends up as an
exec'd one does: the same command line shown, the same confinement, fds,
signal dispositions and environment; a template whose source files changed
is not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulators.config import EmulatorConfig
from launcher import children, emulators
from launcher.heartbeat.link import control_pair
from launcher.holder.client import HolderClient, start_holder
from launcher.spec import Spec, load_spec

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="the holder and the jail need root")]

UID = 59960  # outside the default uid pool (64000-64999)


def write_spec(folder: Path) -> Spec:
    with open(folder / "a.img", "wb") as f:
        f.truncate(1 << 20)
    (folder / "vm.toml").write_text(f"""
[vm]
name = "tmpl"
memory = "64M"
run_dir = "run"
uid_range = "{UID}-{UID + 9}"

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


def heap_start(pid: int) -> str:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.endswith("[heap]"):
            return line.split("-")[0]
    return ""


@contextlib.contextmanager
def holder_like_signals() -> Iterator[None]:
    """The reference spare is exec'd from this process, so it would inherit
    the signals this test run ignores (`nohup` ignores SIGHUP, a background
    job SIGQUIT); the holder's children do not, as the holder handles or
    defaults those. Default them while the reference starts."""
    saved = {}
    for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        if signal.getsignal(sig) == signal.SIG_IGN:
            saved[sig] = signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        out[name] = value.strip()
    return out


def fd_kinds(pid: int) -> list[str]:
    kinds = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        kinds.append(f"{fd}:{target.split(':')[0]}")
    return kinds


async def start_spare(spec: Spec, uid: int) -> tuple[emulators.EmulatorProcess, dict[str, object]]:
    ours, theirs = control_pair()
    config = EmulatorConfig("spare", (), control_fd=theirs.fileno())
    emulator = dataclasses.replace(spec.emulators[0], id="spare")
    res = emulators.EmulatorResources.for_vm(spec, emulator, config, uid, 1)
    command = [sys.executable, "-I", "-m", "emulators", "--spare", str(theirs.fileno()), "on"]
    try:
        proc = await emulators.start(res, command=command, quiet=True, tag="spare")
    finally:
        theirs.close()
    ours.setblocking(False)
    ready = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(ours, 64), 10)
    st = status(proc.pid)
    seen: dict[str, object] = {
        "ready": bool(ready), "cmdline": Path(f"/proc/{proc.pid}/cmdline").read_bytes(),
        "heap": heap_start(proc.pid), "fds": fd_kinds(proc.pid),
        "status": {k: st[k] for k in ("Uid", "Gid", "Groups", "CapEff", "CapBnd", "NoNewPrivs",
                                      "Seccomp", "Seccomp_filters", "SigIgn", "SigBlk",
                                      "SigCgt")},
        "root": os.listdir(f"/proc/{proc.pid}/root/"),
    }
    ours.close()
    return proc, seen


def test_a_spare_forked_from_the_holder_is_what_an_exec_gives(tmp_path: Path) -> None:
    asyncio.run(_forked_like_exec(tmp_path))


async def _forked_like_exec(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    path = str(tmp_path / "holder.sock")
    holder = await start_holder(path)
    client, attached = await HolderClient.connect(path)
    host = children.HolderHost(client, attached.welcome)
    procs = []
    try:
        children.install(host)
        forked, via_holder = await start_spare(spec, UID + 1)
        procs.append(forked)
        children.install(None)
        with holder_like_signals():
            execd, via_exec = await start_spare(spec, UID + 2)
        procs.append(execd)
        assert via_holder["heap"] == heap_start(holder.pid) != ""  # forked, not exec'd
        assert via_exec["heap"] != heap_start(os.getpid())
        assert via_holder["ready"] and via_exec["ready"]
        for name in ("cmdline", "status"):
            a, b = via_holder[name], via_exec[name]
            if name == "cmdline":
                assert isinstance(a, bytes) and isinstance(b, bytes)
                a, b = a.replace(str(UID + 1).encode(), b"U"), b.replace(str(UID + 2).encode(),
                                                                         b"U")
                assert b"launcher.sandbox.jail" in a and b"--spare" in a
            else:
                assert isinstance(a, dict) and isinstance(b, dict)
                a = {k: v for k, v in a.items() if k not in ("Uid", "Gid")}
                b = {k: v for k, v in b.items() if k not in ("Uid", "Gid")}
            assert a == b, name
        assert via_holder["status"]["Uid"].split() == [str(UID + 1)] * 4  # type: ignore[index]
        assert via_holder["fds"] == via_exec["fds"]  # none of the holder's fds
        assert via_holder["root"] == via_exec["root"] == []
    finally:
        children.install(None)
        for proc in procs:
            await proc.stop()
        await host.shutdown()
        await holder.wait()


CHANGED_SOURCE = """
import sys
from launcher import template
assert template.load()
import emulators.process as before
argv = [sys.executable, "-I", "-m", "launcher.sandbox.jail", "--uid", "1",
        "--new-root", "--", sys.executable, "-I", "-m", "emulators", "X", "on"]
assert template.jailed_emulator(argv)
assert not template.jailed_emulator([*argv[:6], *argv[7:]])  # no --new-root
assert not template.jailed_emulator(["/bin/true", *argv[1:]])
assert not template.jailed_emulator([*argv[:8], "-I", "/tmp/payload.py"])  # a script execs
path = sys.argv[1]
with open(path, "w") as f:
    f.write("x = 1\\n")
template._sources[path] = (0, 0)  # as if it had changed since the load
assert template.jailed_emulator(argv)  # loaded again, so still forked
assert path not in template._sources
assert sys.modules["emulators.process"] is not before  # the installed code now
print("ok")
"""


def test_a_changed_source_file_reloads_the_template(tmp_path: Path) -> None:
    """An upgrade that installs new code: the template drops its modules and
    imports them again from the files before the next fork (in a process of
    its own: the reload replaces modules)."""
    out = subprocess.run([sys.executable, "-I", "-c", CHANGED_SOURCE, str(tmp_path / "m.py")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
