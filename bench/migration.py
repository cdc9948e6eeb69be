"""Live migration: how long each migration takes, QEMU's downtime, and the guest's I/O stall.

Theory of operation. One VM migrates back and forth N times between two
`mplaunch` on this host (tests/support/migration.py: sides A and B, their own
VM names, run folders and uid ranges, the same image files), the guest
writing and verifying the whole time: the chaos guest's write-verify workload
(random 4 KiB O_DIRECT writes read back and compared, round after round, with
its ledger, tests/chaos/guest.py) and, unless `--no-reader`, a verifying
reader in the background (tests/support/migration.py READER: dd after dd of
eight 4 KiB O_DIRECT reads, one request at a time, each checked against a
known pattern) so that completions come every few milliseconds and the stall
is measured finely.

Guest-visible progress is read as bench/recovery.py reads it: the request
queue's used index in the emulator's state store (the file in the run folder
that the emulator updates as it publishes completions), sampled about every
millisecond on both sides. An advance is a completion the guest is about to
see. At the destination the store starts at 0, and once its rings run holds
the index the source stopped at: only a value other than those two is a
completion there.

Per migration:

- total: from the `migrate` command to the source's `MIGRATION` event
  `completed` (the destination answered that its guest runs; the event's
  own timestamp);
- QEMU's downtime (ms): QEMU's own, from its stop to its completion; then
  how long the guest was paused in all (mplaunch's `query-migrate`
  "downtime" once completed: QEMU's plus the hand-over) and the hand-over
  alone ("handover-ms": the emulators' state moved, the destination's
  emulators restarted from it, its QEMU `cont`ed, "running" answered);
- stall: from the last completion at the source to the first completion at
  the destination (host monotonic clock), the I/O pause the guest sees;
- gap: the largest gap between two consecutive completions in the window from
  2 s before the switch to 2 s after it (the stall, unless the RAM phase
  slowed I/O more); gap during the RAM phase and gap before (the 2 s before
  the `migrate` command, the workload's own floor) beside it;
- the load average, and QEMU's RAM figures.

JSON to bench/out/migration.json. The guest's verdict over the whole run
(no mismatch, no SCSI error, the image holds what it last wrote) is recorded
too: a benchmark of a migration that corrupts is worth nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.recovery import UsedIndex  # noqa: E402
from launcher.statestore.layout import StateStoreError  # noqa: E402
from tests.support.migration import (  # noqa: E402
    FINAL,
    RUNNING,
    MonitorError,
    Pair,
    Side,
    boot,
    downtime_ms,
    free_tcp_uri,
    migrate,
    start_incoming,
    wait_rounds,
)
from tests.support.vm import Mplaunch  # noqa: E402

UIDS = ("64900-64909", "64910-64919")  # no test's VM uses these
SAMPLE_S = 0.001
WINDOW_S = 2.0


class Sampler(threading.Thread):
    """Samples the used index of every state store it is told to watch and
    keeps, per store, the (time, value) of every change."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="used-index sampler")
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        self._maps: dict[str, UsedIndex] = {}
        self._last: dict[str, tuple[int, int, int]] = {}
        self.changes: dict[str, list[tuple[float, int]]] = {}
        #: (time, ring started, avail index taken, used index) at every change
        self.rings: dict[str, list[tuple[float, int, int, int]]] = {}
        self._done = threading.Event()

    def watch(self, label: str, path: Path) -> None:
        with self._lock:
            self._paths[label] = path
            self.changes.setdefault(label, [])
            self.rings.setdefault(label, [])

    def forget(self, label: str) -> None:
        with self._lock:
            self._paths.pop(label, None)
            self._maps.pop(label, None)

    def run(self) -> None:
        while not self._done.is_set():
            now = time.monotonic()
            with self._lock:
                for label, path in self._paths.items():
                    used = self._maps.get(label)
                    if used is None:
                        with contextlib.suppress(OSError, StateStoreError, ValueError):
                            self._maps[label] = used = UsedIndex(path)
                        if used is None:
                            continue
                    ring = used.ring()
                    last = self._last.get(label)
                    if last != ring:
                        self._last[label] = ring
                        self.rings[label].append((now, *ring))
                        if last is None or last[2] != ring[2]:
                            self.changes[label].append((now, ring[2]))
            time.sleep(SAMPLE_S)

    def stop(self) -> None:
        self._done.set()
        self.join(5)

    def copy(self, label: str) -> list[tuple[float, int]]:
        with self._lock:
            return list(self.changes.get(label, []))

    def ring_copy(self, label: str) -> list[tuple[float, int, int, int]]:
        with self._lock:
            return list(self.rings.get(label, []))


def ring_steps(rings: list[tuple[float, int, int, int]], after: float, stopped_at: int
               ) -> tuple[float | None, float | None]:
    """When the destination's request ring started (its slot vouched for)
    and when it took its first request (an avail index other than 0 and the
    one the source stopped at), after `after`."""
    started = next((t for t, valid, _, _ in rings if t >= after and valid == 1), None)
    taken = next((t for t, _, avail, _ in rings
                  if t >= after and avail not in (0, stopped_at)), None)
    return started, taken


def completions(source: list[tuple[float, int]], dest: list[tuple[float, int]]
                ) -> tuple[list[float], list[float]]:
    """Times of completions at the source, and at the destination (where the
    store's 0 and the index the source stopped at are no completion)."""
    src = [t for t, _ in source[1:]]  # the first sample is where it stood, not an advance
    stopped_at = source[-1][1] if source else 0
    dst = [t for t, v in dest if v not in (0, stopped_at)]
    return src, dst


def largest_gap(times: list[float], start: float, end: float) -> float | None:
    inside = [t for t in times if start <= t <= end]
    gaps = [b - a for a, b in zip(inside, inside[1:], strict=False)]
    return max(gaps) if gaps else None


@dataclass
class Sample:
    hop: int
    uri: str
    total_s: float
    source_exit_s: float
    downtime_ms: float | None
    paused_ms: float | None
    handover_ms: float | None
    stall_ms: float | None
    #: The stall split at the source's "completed" (the destination said
    #: "running"): before it, and from it to the first completion there.
    stall_before_running_ms: float | None
    stall_after_running_ms: float | None
    #: From the source's "completed" to the destination's request ring
    #: starting (negative: before it), and to that ring taking its first
    #: request; the first completion follows (stall_after_running_ms).
    ring_start_after_running_ms: float | None
    first_taken_after_running_ms: float | None
    gap_ms: float | None
    gap_ram_ms: float | None
    gap_before_ms: float | None
    ram_transferred_mib: float | None
    statuses: list[str]
    load: tuple[float, float, float]


def first_after(sampler: Sampler, label: str, stopped_at: int, after: float,
                timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, v in sampler.copy(label):
            if t >= after and v not in (0, stopped_at):
                return t
        time.sleep(0.05)
    return None


def one_migration(pair: Pair, source: Side, hop: int, uri: str, sampler: Sampler,
                  launchers: list[Mplaunch], timeout: float) -> tuple[Side, Sample]:
    dest = start_incoming(pair, hop, uri, launchers)
    here, there = f"hop{hop - 1}", f"hop{hop}"
    sampler.watch(there, dest.vm.run_dir / "state-e0.bin")
    source.snapshot()
    mon = source.connect()
    mark = len(mon.events)
    wall = time.time()
    started = time.monotonic()
    migrate(source, uri)
    final, answers = wait_final(source, mark, timeout)
    done = _event_time(final) - wall + started
    if final["data"]["status"] != "completed":
        raise RuntimeError(f"migration {hop}: {final['data']}\n"
                           f"source:\n{source.launcher.stderr[-3000:]}\n"
                           f"destination:\n{dest.launcher.stderr[-3000:]}")
    # Only answers of this migration: from its first "active" one on.
    ours = answers[next((i for i, a in enumerate(answers) if a.get("status") == "active"),
                        len(answers)):]
    figures = pause_figures(source.launcher.stderr, ours)
    ram: dict[str, Any] = {}
    for answer in ours:
        if isinstance(answer.get("ram"), dict):
            ram.update(answer["ram"])
    rc = source.launcher.wait(60)
    exited = time.monotonic()
    if rc != 0:
        raise RuntimeError(f"the source mplaunch exited {rc}:\n{source.launcher.stderr}")
    dest.launcher.wait_stderr(RUNNING, 30)
    src_changes = sampler.copy(here)
    stopped_at = src_changes[-1][1] if src_changes else 0
    resumed = first_after(sampler, there, stopped_at, started, 30)
    time.sleep(WINDOW_S)  # completions after the switch, for the gap
    src, dst = completions(src_changes, sampler.copy(there))
    sampler.forget(here)
    switch = max((t for t in src if t <= (resumed or exited)), default=None)
    stall = (resumed - switch) * 1e3 if resumed is not None and switch is not None else None
    ring_started, taken = ring_steps(sampler.ring_copy(there), started, stopped_at)
    merged = sorted(src + dst)
    gap = gap_ram = None
    if switch is not None:
        gap = largest_gap(merged, switch - WINDOW_S, switch + WINDOW_S)
        gap_ram = largest_gap(src, started, switch)
    before = largest_gap(src, started - WINDOW_S, started)
    transferred = ram.get("transferred")
    sample = Sample(
        hop=hop, uri=uri.split(":")[0], total_s=done - started, source_exit_s=exited - started,
        downtime_ms=figures[0], paused_ms=figures[1], handover_ms=figures[2],
        stall_ms=stall,
        stall_before_running_ms=(done - switch) * 1e3 if switch is not None else None,
        stall_after_running_ms=(resumed - done) * 1e3 if resumed is not None else None,
        ring_start_after_running_ms=(ring_started - done) * 1e3
        if ring_started is not None else None,
        first_taken_after_running_ms=(taken - done) * 1e3 if taken is not None else None,
        gap_ms=gap * 1e3 if gap is not None else None,
        gap_ram_ms=gap_ram * 1e3 if gap_ram is not None else None,
        gap_before_ms=before * 1e3 if before is not None else None,
        ram_transferred_mib=transferred / 2**20 if isinstance(transferred, int) else None,
        statuses=[str(e["data"]["status"]) for e in mon.events[mark:]
                  if e.get("event") == "MIGRATION"],
        load=os.getloadavg())
    return dest, sample


def wait_final(source: Side, mark: int, timeout: float
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll query-migrate every 20 ms (for QEMU's figures) until a MIGRATION
    event after `mark` says the migration ended: that event (its timestamp is
    mplaunch's), and every query-migrate answer on the way."""
    mon = source.connect()
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        gone = False
        try:
            answers.append(mon.execute("query-migrate"))
        except MonitorError:
            raise
        except Exception:  # the source stopped and closed its socket
            gone = True
            mon.drain()
        ends = [e for e in mon.events[mark:] if e.get("event") == "MIGRATION"
                and e.get("data", {}).get("status") in FINAL]
        if ends:
            with contextlib.suppress(Exception):  # the final answer, while the socket is open
                answers.append(mon.execute("query-migrate"))
            return ends[0], answers
        if gone or time.monotonic() > deadline:
            why = "socket closed" if gone else "timeout"
            raise RuntimeError(f"no final MIGRATION event ({why}): {mon.events[mark:]}\n"
                               f"{source.launcher.stderr[-3000:]}")
        time.sleep(0.02)


def _event_time(event: dict[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


_PAUSED = re.compile(r"completed; .*\(paused for (\d+) ms: QEMU's downtime (\d+|\?) ms, "
                     r"then (\d+) ms to hand the state over")


def pause_figures(stderr: str, answers: list[dict[str, Any]]
                  ) -> tuple[float | None, float | None, float | None]:
    """(QEMU's downtime, how long the guest was paused, the hand-over), in
    ms: from the source's "completed" line, else from the completed
    query-migrate answer if one was read ('downtime' is QEMU's plus
    'handover-ms')."""
    found = _PAUSED.findall(stderr)
    if found:  # QEMU's own figure, not a difference of rounded ones
        paused, qemu, handover = found[-1]
        return (None if qemu == "?" else float(qemu)), float(paused), float(handover)
    for answer in reversed(answers):
        if answer.get("status") == "completed" and "handover-ms" in answer:
            handover = float(answer["handover-ms"])
            total = downtime_ms(answer)
            return (round(total - handover) if total is not None else None, total, handover)
    return None, None, None


def summary(values: list[float | None]) -> dict[str, float] | None:
    have = [v for v in values if v is not None]
    if not have:
        return None
    return {"median": statistics.median(have), "max": max(have), "min": min(have),
            "n": len(have)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="mpl-migration-"))
    pair = Pair(folder, "migbench", UIDS, count=args.count, memory=args.memory,
                reader=not args.no_reader)
    launchers: list[Mplaunch] = []
    samples: list[Sample] = []
    sampler = Sampler()
    sampler.start()
    load_start = os.getloadavg()
    verdict: dict[str, Any] = {"folder": str(folder)}  # the consoles stay there
    hop = 0
    try:
        side = boot(pair, launchers, rounds=2)
        sampler.watch("hop0", side.vm.run_dir / "state-e0.bin")
        for hop in range(1, args.migrations + 1):
            time.sleep(args.gap_s)
            uri = free_tcp_uri() if args.uri == "tcp" else pair.unix_uri(hop)
            source = side
            side, sample = one_migration(pair, side, hop, uri, sampler, launchers,
                                         args.timeout)
            samples.append(sample)
            if args.verbose:
                print(f"{hop}: {sample}", flush=True)
            wait_rounds(side, 1, 60, source=source)
        pair.stop()
        side.launcher.wait_console(r"^MPL DONE workload=shell", timeout=90)
        rc = side.launcher.wait(60)
        v = pair.verdict()
        verdict.update({"ok": v.ok and rc == 0, "last_exit": rc, "rounds": v.rounds,
                        "verified": v.verified, "reader_reads": pair.reader_reads(),
                        "bad": v.bad, "scsi_errors": v.scsi_errors, "problems": v.problems,
                        "mismatches": len(v.mismatches)})
    except (AssertionError, RuntimeError) as e:  # recorded: what was measured still counts
        print(f"migration {hop} failed: {e}", file=sys.stderr, flush=True)
        verdict.update({"ok": False, "failed_at": hop, "error": str(e)[-6000:]})
    finally:
        sampler.stop()
        for m in launchers:
            if m.proc.poll() is None:
                m.signal(signal.SIGTERM)
                with contextlib.suppress(AssertionError):
                    m.wait(60)
        pair.cleanup()
    return {
        "migrations": len(samples), "memory": args.memory, "count": args.count,
        "reader": not args.no_reader, "uri": args.uri,
        "total_s": summary([s.total_s for s in samples]),
        "downtime_ms": summary([s.downtime_ms for s in samples]),
        "paused_ms": summary([s.paused_ms for s in samples]),
        "handover_ms": summary([s.handover_ms for s in samples]),
        "stall_ms": summary([s.stall_ms for s in samples]),
        "stall_before_running_ms": summary([s.stall_before_running_ms for s in samples]),
        "stall_after_running_ms": summary([s.stall_after_running_ms for s in samples]),
        "ring_start_after_running_ms": summary([s.ring_start_after_running_ms
                                                for s in samples]),
        "first_taken_after_running_ms": summary([s.first_taken_after_running_ms
                                                 for s in samples]),
        "gap_ms": summary([s.gap_ms for s in samples]),
        "gap_ram_ms": summary([s.gap_ram_ms for s in samples]),
        "gap_before_ms": summary([s.gap_before_ms for s in samples]),
        "guest": verdict,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_start": load_start, "load_end": os.getloadavg()},
        "samples": [asdict(s) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--migrations", type=int, default=5, help="back and forth (default 5)")
    p.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    p.add_argument("--count", type=int, default=8,
                   help="blocks written and verified per round (default 8)")
    p.add_argument("--uri", choices=("unix", "tcp"), default="unix",
                   help="unix:PATH or tcp:127.0.0.1:PORT (default unix)")
    p.add_argument("--no-reader", action="store_true",
                   help="no background reader: progress from the write-verify rounds only")
    p.add_argument("--gap-s", type=float, default=2.0, help="pause between migrations")
    p.add_argument("--timeout", type=float, default=180, help="per migration, seconds")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "migration.json")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0 if result["guest"].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
