"""Recovery: how long the guest's I/O stalls when its emulator is killed or hangs.

Theory of operation. `mplaunch SPEC` runs the test guest with one emulator,
one controller (one request queue) and one disk; the guest reads 4 KiB
blocks with O_DIRECT in a tight loop (busybox dd, one SCSI READ per block,
queue depth 1). The benchmark watches the request queue's used index in
the emulator's state store (launcher/statestore/layout.py: the file in the
run folder that every emulator of the slot maps and updates as it
publishes completions; a restarted emulator carries on in the same file),
sampling it every ~0.2 ms around each event. An advance of the used index
is a completion the guest is about to see.

Per event (SIGKILL, or SIGSTOP with `--mode hang`) it records:

- stall: from the kill (monotonic clock, just before `os.kill`) to the first
  advance of the used index after it;
- gap: the longest time between two consecutive advances in the window
  around the event (from 0.2 s before it to 0.2 s after the first advance),
  i.e. the longest guest I/O latency the event caused, including the part
  of the in-flight request that ran before the kill;
- for hangs, the detection delay: from SIGSTOP to mplaunch's "hung" line.

Events are spaced by more than `restart_window_s` (1 s here) so each
restart is the first in the policy's window and is not held back by the
restart backoff; `--gap-s` sets the spacing. Without a warm spare
(`--no-spare`) the spec's uid_range holds one uid, which leaves none for a
spare. With one (the default), the VM's only emulator has a hot standby
(launcher.slots): the standby takes over on its own on the death.

The guest's think time between two requests is a floor under the stall
with one reader: `--workload deep` runs several readers at once, so a
request is waiting at the kill. Results go to
bench/out/recovery-<mode>-<standby|nospare>[-deep].json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import random
import re
import select
import signal
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from launcher.standby import LIVENESS_ENV as STANDBY_LIVENESS_ENV  # noqa: E402
from launcher.statestore import layout  # noqa: E402
from tests.support.vm import DiskDef, Mplaunch, VmDef, shell_cmd  # noqa: E402

MiB = 1024 * 1024
REQUEST_QUEUE = 2  # queue 0 control, 1 event, 2 the first request queue
USED_WORD = 1  # emulators.virtio.state: word 1 is used_idx
POLL_S = 0.0002
WORKLOAD = ("while :; do dd if=/dev/sda of=/dev/null bs=4096 count=16384 iflag=direct "
            "2>/dev/null; done")
DEEP_READERS = 4
"""`--workload deep`: this many readers at once, each on its own 16 MiB of
the disk, so requests are in flight at the kill (the guest's think time
between two requests of one reader is no floor any more)."""
DEEP_WORKLOAD = " ".join(
    f"(while :; do dd if=/dev/sda of=/dev/null bs=4096 count=4096 skip={i * 4096} "
    "iflag=direct 2>/dev/null; done) &" for i in range(DEEP_READERS)) + " wait"
_STARTED = re.compile(r"emulator e0 (?:started|restarted) \(pid (\d+)")
_RESTARTED = re.compile(r"emulator e0 restarted \(pid (\d+)(?:, ([^)]+))?\) ([\d.]+) ms")
_HUNG = re.compile(r"emulator e0 hung: ")
_TOOK_OVER = re.compile(
    r"predecessor gone; serving \(seen at (\d+) ns, active at (\d+) ns(?:, by its ([\w ]+))?\)")


@dataclass
class Sample:
    stall_ms: float
    gap_ms: float
    gap_before_ms: float
    detect_ms: float | None
    via: str
    launcher_ms: float
    #: A standby's own times from the kill: it saw the death, it served again.
    seen_ms: float | None = None
    active_ms: float | None = None
    #: When this benchmark saw the old process's pidfd readable.
    dead_ms: float | None = None
    #: What told the standby: "liveness lock" or "pidfd".
    seen_by: str | None = None


class UsedIndex:
    """The request queue's used index, read from the mapped state store."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        shape = layout.Layout.read_header(memoryview(self._map)[: layout.HEADER_SIZE].tobytes())
        self._slot = shape.queue_offset(0, REQUEST_QUEUE)
        self._off = self._slot + 8 + 8 * USED_WORD

    def read(self) -> int:
        value: int = struct.unpack_from("<Q", self._map, self._off)[0]
        return value

    def ring(self) -> tuple[int, int, int]:
        """(1 once the ring's slot is vouched for, i.e. the ring started; the
        avail index taken so far; the used index): when a ring starts, takes
        its first request and completes it, for a finer split of a stall."""
        valid: int = struct.unpack_from("<I", self._map, self._slot)[0]
        avail, used = struct.unpack_from("<QQ", self._map, self._slot + 8)
        return valid, avail, used


def current_pid(m: Mplaunch) -> int:
    pids = [int(mm.group(1)) for line in m.stderr_lines if (mm := _STARTED.search(line))]
    return pids[-1]


def count(m: Mplaunch, rx: re.Pattern[str]) -> int:
    return sum(1 for line in m.stderr_lines if rx.search(line))


def wait_flowing(used: UsedIndex, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    first = used.read()
    while time.monotonic() < deadline:
        if used.read() >= first + 50:
            return
        time.sleep(0.05)
    raise RuntimeError("the guest's reads do not progress")


def one_event(m: Mplaunch, used: UsedIndex, mode: str) -> Sample:
    for _ in range(50):  # the log may not name the newest process yet
        pid = current_pid(m)
        restarts, hung = count(m, _RESTARTED), count(m, _HUNG)
        try:
            pidfd = os.pidfd_open(pid)
            break
        except ProcessLookupError:
            time.sleep(0.1)
    else:
        raise RuntimeError(f"emulator e0 (pid {pid}) is gone and nothing replaced it:\n{m.stderr}")
    try:
        return _measure(m, used, mode, pid, pidfd, restarts, hung)
    finally:
        os.close(pidfd)


def _measure(m: Mplaunch, used: UsedIndex, mode: str, pid: int, pidfd: int, restarts: int,
             hung: int) -> Sample:
    # Before the event: the guest's reads must be flowing (at least 5
    # completions in the last 0.2 s), so the stall measured is the event's.
    advances: list[float] = []
    last = used.read()
    give_up = time.monotonic() + 20
    while True:
        now = time.monotonic()
        value = used.read()
        if value != last:
            advances.append(now)
            last = value
        if len([t for t in advances if t > now - 0.2]) >= 5 and advances[0] < now - 0.2:
            break
        if now > give_up:
            raise RuntimeError("the guest's reads stopped")
        time.sleep(POLL_S)
    advances = [t for t in advances if t > time.monotonic() - 0.2]
    before = [b - a for a, b in zip(advances, advances[1:], strict=False)]
    took_over = count(m, _TOOK_OVER)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
    # The old process may complete a request or two between the kill and
    # its death: advances until its pidfd says it is gone are its own, or,
    # with a standby, until the standby saw the death (below): a standby
    # told by the liveness lock serves before the pidfd is readable.
    dead: float | None = None
    first_after: float | None = None
    detected: float | None = None
    deadline = killed + 30
    while time.monotonic() < deadline:
        now = time.monotonic()
        if dead is None and select.select([pidfd], [], [], 0)[0]:
            dead = now
        value = used.read()
        if value != last:
            advances.append(now)
            last = value
            if first_after is None and dead is not None:
                first_after = now
        if detected is None and mode == "hang" and count(m, _HUNG) > hung:
            detected = now
        if first_after is not None and now - first_after > 0.2 \
                and count(m, _RESTARTED) > restarts:
            break
        time.sleep(POLL_S)
    else:
        raise RuntimeError(f"no completion or no restart within 30 s of the event:\n{m.stderr}")
    assert first_after is not None
    gaps = [b - a for a, b in zip(advances, advances[1:], strict=False)]
    line = [ln for ln in m.stderr_lines if _RESTARTED.search(ln)][-1]
    mm = _RESTARTED.search(line)
    assert mm is not None
    seen_ms = active_ms = None
    seen_by = None
    standby = [t for ln in m.stderr_lines if (t := _TOOK_OVER.search(ln))][took_over:]
    if standby:
        seen_ms = (int(standby[0].group(1)) / 1e9 - killed) * 1e3
        active_ms = (int(standby[0].group(2)) / 1e9 - killed) * 1e3
        seen_by = standby[0].group(3)
        seen = int(standby[0].group(1)) / 1e9
        if dead is None or seen < dead:  # its first completion may come before the pidfd
            first_after = next((t for t in advances if t >= seen), first_after)
    return Sample(
        seen_ms=seen_ms, active_ms=active_ms, seen_by=seen_by,
        dead_ms=(dead - killed) * 1e3 if dead is not None else None,
        stall_ms=(first_after - killed) * 1e3,
        gap_ms=max(gaps) * 1e3,
        gap_before_ms=max(before) * 1e3 if before else float("nan"),
        detect_ms=(detected - killed) * 1e3 if detected is not None else None,
        via=mm.group(2) or "",
        launcher_ms=float(mm.group(3)),
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values), "min": min(values)}


def histogram(values: list[float], edges: list[float]) -> list[tuple[str, int]]:
    rows = []
    for low, high in zip([0.0, *edges], [*edges, float("inf")], strict=True):
        label = f"{low:g}-{high:g} ms" if high != float("inf") else f">= {low:g} ms"
        rows.append((label, sum(1 for v in values if low <= v < high)))
    return rows


def run(args: argparse.Namespace) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix="mpl-recovery-"))
    workload = DEEP_WORKLOAD if args.workload == "deep" else WORKLOAD
    vm = VmDef(folder, "recovery", workload="shell", extra_append=shell_cmd(workload))
    vm.emulators = {"e0": {"restart_burst": 1000, "restart_window_s": 1,
                           "heartbeat_ms": args.heartbeat_ms,
                           "hang_timeout_ms": args.hang_timeout_ms}}
    vm.controllers = {"scsi0": ("e0", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0, size=64 * MiB)]
    vm.vm_extra = {"uid_range": "64720-64720" if args.no_spare else "64720-64729"}
    if args.no_spare:  # the range's one uid is the emulator's: QEMU needs another
        vm.vm_extra["qemu_user"] = "nobody"
    rng = random.Random(args.seed)
    env = {**os.environ, STANDBY_LIVENESS_ENV: "0"} if args.pidfd_only else None
    m = Mplaunch(vm.write(), "-v", console=vm.console, env=env)
    samples: list[Sample] = []
    try:
        m.wait_stderr(r"QEMU started", 60)
        state = vm.run_dir / "state-e0.bin"
        used = UsedIndex(state)
        wait_flowing(used)
        for i in range(args.events):
            time.sleep(args.gap_s + rng.uniform(0, 0.3))
            sample = one_event(m, used, args.mode)
            samples.append(sample)
            if args.verbose:
                print(f"{i + 1}: {sample}", flush=True)
    finally:
        m.signal(signal.SIGTERM)
        m.wait(90)
    stalls = [s.stall_ms for s in samples]
    gaps = [s.gap_ms for s in samples]
    result: dict[str, object] = {
        "mode": args.mode, "spare": not args.no_spare, "events": len(samples),
        "liveness_lock": not args.pidfd_only,
        "workload": args.workload,
        "heartbeat_ms": args.heartbeat_ms, "hang_timeout_ms": args.hang_timeout_ms,
        "stall_ms": summary(stalls), "gap_ms": summary(gaps),
        "gap_before_ms": summary([s.gap_before_ms for s in samples]),
        "launcher_restart_ms": summary([s.launcher_ms for s in samples]),
        "standby_seen_ms": summary(seen) if (seen := [
            s.seen_ms for s in samples if s.seen_ms is not None]) else None,
        "standby_active_ms": summary(active) if (active := [
            s.active_ms for s in samples if s.active_ms is not None]) else None,
        "via": {v: sum(1 for s in samples if s.via == v) for v in {s.via for s in samples}},
        "standby_seen_by": {v: sum(1 for s in samples if s.seen_by == v)
                            for v in {s.seen_by for s in samples if s.seen_by}},
        "old_pidfd_readable_ms": summary(dead_ms) if (dead_ms := [
            s.dead_ms for s in samples if s.dead_ms is not None]) else None,
        "stall_histogram": histogram(stalls, [2, 5, 10, 20, 50, 100, 200, 500]),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "load": os.getloadavg()},
        "samples": [asdict(s) for s in samples],
    }
    detects = [s.detect_ms for s in samples if s.detect_ms is not None]
    if detects:
        result["detect_ms"] = summary(detects)
        result["detect_bound_ms"] = args.hang_timeout_ms + args.heartbeat_ms
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("kill", "hang"), default="kill")
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--no-spare", action="store_true",
                   help="no standby or warm spare (one uid only)")
    p.add_argument("--workload", choices=("qd1", "deep"), default="qd1",
                   help=f"qd1: one dd (one request at a time); deep: {DEEP_READERS} at once")
    p.add_argument("--heartbeat-ms", type=int, default=100)
    p.add_argument("--hang-timeout-ms", type=int, default=500)
    p.add_argument("--gap-s", type=float, default=1.2, help="pause between events")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pidfd-only", action="store_true",
                   help="the standby learns of the death from the pidfd alone, not from "
                        "the liveness lock (for comparison)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    name = f"recovery-{args.mode}-{'nospare' if args.no_spare else 'standby'}" + \
        ("-deep" if args.workload == "deep" else "") + \
        ("-pidfd" if args.pidfd_only else "") + ".json"
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    brief = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
