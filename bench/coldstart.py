"""Cold start: where the time goes when an emulator starts without a spare.

Theory of operation. Two measures, interleaved run by run:

- **stages**: one confined start is timed step by step. A child runs the
  jail's own code (:func:`launcher.sandbox.jail.run`, whose steps report
  through ``jail.TRACE``) on an emulator command, then the emulator's
  stage 2 (built, then loaded, as :mod:`emulators.lockdown` does), and
  writes each step's CLOCK_MONOTONIC time (system-wide, so comparable with
  the parent's) to a pipe. ``exec``: the child is a fresh ``python -I``,
  started as the holder starts it today (the time from the spawn to the
  first line of the script is the interpreter's start; importing the jail
  is next). ``fork``: the child is forked from a process that has loaded
  the template (:mod:`launcher.template`), as the holder forks it.
- **launcher**: :func:`launcher.emulators.start` of a warm spare, as the
  spare pool starts one, through a real holder (the VM's parent in
  production) and through the launcher itself (LocalHost, the path of the
  tests), timed from the call to its return (the confinement check passed:
  from here the launcher would replay the session) and to the spare's
  READY on its control socket.

Runs as root (the jail needs it). The spare's uid is taken outside the
default pool. Results go to bench/out/coldstart.json, medians printed.
"""

from __future__ import annotations

import os
import sys
import time

T_SCRIPT = time.monotonic()  # the interpreter has started, nothing of ours loaded
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
UID = 59970
"""The confined children's uid: outside the default pool (64000-64999)."""


def inner(fd: int, spawned: float, marks: list[tuple[str, float]]) -> None:
    """In the child: the jail's steps, then stage 2; marks to `fd`."""
    import json

    from launcher.sandbox import jail

    marks.append(("jail imported", time.monotonic()))
    jail.TRACE = lambda step: marks.append((step, time.monotonic()))
    spec = jail.JailSpec(UID, UID, (fd,), 1 << 32, new_root=True)
    jail.run(spec, [sys.executable, "-I", "-m", "emulators", "--spare", "9", "on"])
    from launcher.sandbox import profiles, seccomp

    stage2 = seccomp.build_allow_list(profiles.STAGE2_ALLOW, log_only=False)
    marks.append(("stage 2 built", time.monotonic()))
    seccomp.load(stage2)
    marks.append(("stage 2 loaded", time.monotonic()))
    os.write(fd, json.dumps({"spawned": spawned, "marks": marks}).encode())


if __name__ == "__main__" and sys.argv[1:2] == ["--inner"]:
    # The exec'd child: nothing more imported than the jail will import.
    inner(int(sys.argv[2]), float(sys.argv[3]), [("interpreter started", T_SCRIPT)])
    os._exit(0)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def stages_exec() -> dict[str, Any]:
    r, w = os.pipe()
    spawned = time.monotonic()
    child = subprocess.Popen([sys.executable, "-I", __file__, "--inner", str(w), str(spawned)],
                             pass_fds=(w,), env={}, stdin=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    child.wait()
    if child.returncode != 0 or not data:
        raise RuntimeError(f"the confined child failed (status {child.returncode})")
    return dict(json.loads(data))


def stages_fork() -> dict[str, Any]:
    """As the holder does it: fork the loaded template, run the jail in the child."""
    r, w = os.pipe()
    spawned = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(r)
            inner(w, spawned, [("forked", time.monotonic())])
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError("the forked child failed")
    return dict(json.loads(data))


def durations(run: dict[str, Any]) -> dict[str, float]:
    """Each step's time (ms) since the one before; "total" since the spawn."""
    out: dict[str, float] = {}
    last = run["spawned"]
    for name, t in run["marks"]:
        out[name] = (t - last) * 1000
        last = t
    out["total"] = (last - run["spawned"]) * 1000
    return out


def write_spec(folder: Path) -> Any:
    from launcher.spec import load_spec

    with open(folder / "a.img", "wb") as f:
        f.truncate(1 << 20)
    (folder / "vm.toml").write_text(f"""
[vm]
name = "coldstart"
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


async def launcher_start(spec: Any, host_name: str) -> dict[str, float]:
    """emulators.start of a spare (the spare pool's command), timed."""
    import dataclasses

    from emulators.config import EmulatorConfig
    from launcher import emulators
    from launcher.heartbeat.link import control_pair

    ours, theirs = control_pair()
    config = EmulatorConfig("spare", (), control_fd=theirs.fileno())
    emulator = dataclasses.replace(spec.emulators[0], id="spare")
    res = emulators.EmulatorResources.for_vm(spec, emulator, config, UID + 1, 1)
    command = [sys.executable, "-I", "-m", "emulators", "--spare", str(theirs.fileno()),
               spec.vm.sandbox.value]
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    try:
        proc = await emulators.start(res, command=command, quiet=True, tag="spare")
    finally:
        theirs.close()
    confined = time.monotonic()
    ours.setblocking(False)
    await loop.sock_recv(ours, 64)
    ready = time.monotonic()
    ours.close()
    await proc.stop()
    return {"confined": (confined - t0) * 1000, "ready": (ready - t0) * 1000}


async def launcher_runs(runs: int, folder: Path) -> dict[str, list[dict[str, float]]]:
    from launcher import children
    from launcher.holder.client import HolderClient, start_holder

    spec = write_spec(folder)
    holder = await start_holder(str(folder / "holder.sock"))
    client, attached = await HolderClient.connect(str(folder / "holder.sock"))
    held = children.HolderHost(client, attached.welcome)
    local = children.LocalHost()
    out: dict[str, list[dict[str, float]]] = {"holder": [], "local": []}
    try:
        for _ in range(runs):
            for name, host in (("holder", held), ("local", local)):
                children.install(host)
                out[name].append(await launcher_start(spec, name))
    finally:
        children.install(None)
        await held.shutdown()
        await holder.wait()
    return out


def median_table(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = list(rows[0])
    return {k: round(statistics.median(r[k] for r in rows), 2) for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time a confined emulator's cold start, step by "
                                "step (exec'd and forked from the template), and as the "
                                "launcher sees it (through the holder and without it).")
    p.add_argument("--runs", type=int, default=20, help="starts per variant (default 20)")
    p.add_argument("--out", type=Path,
                   default=Path(REPO) / "bench" / "out" / "coldstart.json")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("run as root: the jail changes uid and enters namespaces")
    from launcher import template

    template.load()
    gc.freeze()
    stages: dict[str, list[dict[str, float]]] = {"exec": [], "fork": []}
    for _ in range(args.runs):
        stages["exec"].append(durations(stages_exec()))
        stages["fork"].append(durations(stages_fork()))
    with tempfile.TemporaryDirectory(prefix="mpl-coldstart-") as folder:
        launcher = asyncio.run(launcher_runs(args.runs, Path(folder)))
    load = os.getloadavg()
    result = {
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "kernel": platform.release()},
        "load": load, "runs": args.runs,
        "stages": {k: median_table(v) for k, v in stages.items()},
        "launcher": {k: median_table(v) for k, v in launcher.items()},
        "samples": {"stages": stages, "launcher": launcher},
    }
    for kind, table in result["stages"].items():
        print(f"stages, {kind} (median ms of {args.runs}):")
        for k, v in table.items():
            print(f"  {k:24} {v:8.2f}")
    for kind, table in result["launcher"].items():
        print(f"emulators.start of a spare through {kind}: confined {table['confined']:.1f} ms, "
              f"READY {table['ready']:.1f} ms (median of {args.runs})")
    print(f"load {', '.join(f'{x:.2f}' for x in load)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
