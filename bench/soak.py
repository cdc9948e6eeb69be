"""Soak: the chaos workload for as long as asked, every event and its outcome.

Theory of operation. `mplaunch SPEC` runs the test guest with two emulators,
one controller each, and one writable disk on each (plus the read-only disk
that carries the guest's script). The guest writes random 4 KiB blocks with
O_DIRECT, reads them back and compares, round after round, on both disks,
for `--minutes` of I/O split over `--boots` boots (a reboot between them),
and keeps a ledger of what it wrote (tests/chaos/guest.py). Meanwhile the
chaos driver (tests/chaos/driver.py) fires events at random moments in
every phase of the guest (firmware, probe, I/O, reboot): SIGKILL and
SIGSTOP of emulators and of the waiting warm spare, kills and freezes of
the spare during a hand-over, and the spare-death sequence. Each event is
fired only after the previous one was handled, and its outcome recorded:
how long until the launcher had repaired it, by which path, and any
problem (not repaired in time, an old process left alive).

At the end: the guest's own verdict (rounds, blocks verified, mismatches,
SCSI errors or resets in its kernel log), the image files against the
ledger, launcher log lines no event explains, and whether anything of the
VM is left running. A progress line is printed every `--progress-s`.
The exit status is 0 only if there was no error of any kind.

    .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --minutes 2 --boots 1 --events 60   # 120 s, 60 events

The result goes to `--out` (JSON, default bench/out/soak.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.chaos import guest, verdict  # noqa: E402
from tests.chaos.driver import (  # noqa: E402
    _RESTARTED,
    Capabilities,
    Driver,
    Event,
    Fleet,
    Kind,
    Phase,
    phase_of,
)
from tests.chaos.vms import two_emulator_vm  # noqa: E402
from tests.support.vm import Mplaunch, VmDef, lines_of  # noqa: E402

MiB = 1024 * 1024
UIDS = "64740-64749"
COUNT = 8
#: No new guest line for this long while it works is a lost completion.
STALL_S = 60.0


def soak_vm(folder: Path, seconds_per_boot: int, boots: int, seed: int) -> VmDef:
    return two_emulator_vm(folder, "soak", UIDS,
                           guest.script(seconds_per_boot, COUNT, boots, 16 * MiB, seed))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"n": len(values), "median": round(statistics.median(values), 1),
            "p99": round(percentile(values, 0.99), 1), "max": round(max(values), 1)}


def handled_ms(event: Event) -> float | None:
    return (event.handled - event.fired) * 1e3 if event.handled else None


class Soak:
    """One run: the VM, the driver, the clock and what was seen."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.boots = args.boots
        self.io_seconds = max(10, round(args.minutes * 60))
        self.folder = Path(tempfile.mkdtemp(prefix="mpl-soak-"))
        self.vm = soak_vm(self.folder, max(5, self.io_seconds // self.boots), self.boots,
                          self.seed)
        caps = Capabilities.detect()
        allowed = set(caps.kinds())
        if args.kinds:
            wanted = {Kind(k) for k in args.kinds.split(",")}
            allowed &= wanted
        self.kinds = [k for k in Kind if k in allowed]
        self.caps = caps
        self.max_events = args.events or None
        # Mean pause between events: the I/O time shared out, or --gap-s.
        self.gap_s = args.gap_s if args.gap_s is not None else (
            self.io_seconds / self.max_events if self.max_events else 2.0)
        self.loads: list[float] = []
        self.started = 0.0

    def pick(self, driver: Driver) -> Kind:
        remaining = (self.max_events - len(driver.events)) if self.max_events else 1 << 30
        unused = [k for k in self.kinds if k not in {e.kind for e in driver.events}]
        if unused and remaining <= len(unused):
            return unused[0]
        weights = {Kind.KILL: 6, Kind.HANG: 3, Kind.KILL_SPARE: 2, Kind.HANG_SPARE: 2,
                   Kind.KILL_HANDOVER: 2, Kind.FREEZE_HANDOVER: 1, Kind.SPARE_DEATH: 1}
        return self.rng.choices(self.kinds, [weights[k] for k in self.kinds])[0]

    def progress(self, driver: Driver, boot: int, phase: Phase, final: bool = False) -> None:
        load = os.getloadavg()[0]
        self.loads.append(load)
        elapsed = time.monotonic() - self.started
        kinds = Counter(e.kind.value for e in driver.events)
        problems = sum(1 for e in driver.events if e.problem)
        took = [ms for e in driver.events if (ms := handled_ms(e)) is not None]
        med = f"{statistics.median(took):.0f} ms" if took else "-"
        print(f"soak {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d} boot {boot} "
              f"{phase.value}: {len(driver.events)} events "
              f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), "
              f"{problems} problems, handled median {med}, load {load:.2f}"
              + (" (end)" if final else ""), flush=True)

    def run(self) -> dict[str, Any]:
        args = self.args
        print(f"soak seed {self.seed}; {self.io_seconds} s of guest I/O over {self.boots} "
              f"boot(s); events {self.max_events or 'as many as fit'} (mean gap "
              f"{self.gap_s:.1f} s); kinds {', '.join(k.value for k in self.kinds)}; "
              f"{self.caps.why}", flush=True)
        m = Mplaunch(self.vm.write(), "-v", console=self.vm.console)
        driver = Driver(m, Fleet(m, list(self.vm.emulators)), self.rng, self.caps)
        self.started = time.monotonic()
        load_start = os.getloadavg()
        aborted = ""
        boot, phase = 1, Phase.FIRMWARE
        try:
            m.wait_stderr(r"QEMU started", timeout=120)
            next_at = time.monotonic() + self.rng.uniform(0, self.gap_s)
            next_progress = time.monotonic() + args.progress_s
            last_text, last_change = "", time.monotonic()
            while True:
                text = self.vm.console.read_text(errors="replace") \
                    if self.vm.console.exists() else ""
                now = time.monotonic()
                if text != last_text:
                    last_text, last_change = text, now
                boot, phase = phase_of(text)
                if len(lines_of(self.vm.console, "DONE")) >= self.boots:
                    break
                if m.proc.poll() is not None:
                    aborted = "mplaunch ended early"
                    break
                if now - last_change > STALL_S:
                    aborted = (f"guest silent for {now - last_change:.0f} s in boot {boot} "
                               f"{phase.value}: lost I/O?")
                    break
                limit = self.max_events is not None and len(driver.events) >= self.max_events
                if now >= next_at and not limit:
                    event = driver.fire(self.pick(driver), boot, phase)
                    if args.verbose or event.problem:
                        print(event.line(), flush=True)
                    next_at = time.monotonic() + self.rng.uniform(0, 2 * self.gap_s)
                if now >= next_progress:
                    self.progress(driver, boot, phase)
                    next_progress = now + args.progress_s
                time.sleep(0.03)
        except Exception as e:  # a broken driver or launcher: reported, not raised
            aborted = f"{type(e).__name__}: {e}"
        finally:
            m.descendants()
            m.signal(signal.SIGTERM)
            try:
                rc = m.wait(90)
            except AssertionError as e:
                rc, aborted = -1, aborted or str(e).splitlines()[0]
            log = self.args.out.with_suffix(".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(m.stderr + "\n")
        self.progress(driver, boot, phase, final=True)
        return self.report(m, driver, rc, aborted, load_start)

    def report(self, m: Mplaunch, driver: Driver, rc: int, aborted: str,
               load_start: tuple[float, float, float]) -> dict[str, Any]:
        console = self.vm.console.read_text(errors="replace") if self.vm.console.exists() else ""
        guest_v = verdict.check_guest(console, self.vm, self.boots, min_io_lines=2)
        left = verdict.left_running(m.seen_descendants)
        strays = verdict.stray_processes(UIDS)
        unexplained = driver.unexplained()
        restarts = [float(mm.group(4)) for line in driver.fleet.lines()
                    if (mm := _RESTARTED.search(line))]
        by_kind: dict[str, Any] = {}
        for kind in Kind:
            events = [e for e in driver.events if e.kind is kind]
            if not events:
                continue
            by_kind[kind.value] = {
                "events": len(events),
                "handled": sum(1 for e in events if e.handled and not e.problem),
                "problems": [e.line() for e in events if e.problem],
                "handled_ms": summary([ms for e in events
                                       if (ms := handled_ms(e)) is not None]),
                "via": dict(Counter(e.via or "-" for e in events)),
            }
        problems = [e.line() for e in driver.events if e.problem]
        errors = {
            "launcher_exit": rc,
            "aborted": aborted,
            "event_problems": len(problems),
            "unexplained_log_lines": unexplained,
            "guest_bad_blocks": guest_v.bad,
            "guest_scsi_errors": guest_v.scsi_errors,
            "guest_problems": guest_v.problems,
            "image_mismatches": [str(x) for x in guest_v.mismatches[:20]],
            "left_running": left + [f"uid process {p}" for p in strays],
            "run_folder_left": verdict.run_folder_left(self.vm.run_dir),
            "gave_up": any("give up" in line for line in driver.fleet.lines()),
        }
        failed = bool(rc != 0 or aborted or problems or unexplained or not guest_v.ok
                      or left or strays or errors["run_folder_left"] or errors["gave_up"])
        elapsed = time.monotonic() - self.started
        return {
            "ok": not failed,
            "command": "bench/soak.py " + " ".join(sys.argv[1:]),
            "seed": self.seed,
            "wall_s": round(elapsed, 1),
            "guest_io_s": self.io_seconds,
            "boots": self.boots,
            "events": len(driver.events),
            "events_asked": self.max_events,
            "kinds": by_kind,
            "by_phase": dict(Counter(f"boot{e.boot}/{e.phase.value}" for e in driver.events)),
            "restart_via": dict(Counter(e.via or "-" for e in driver.events
                                        if e.target != "spare")),
            "handled_ms": summary([ms for e in driver.events
                                   if (ms := handled_ms(e)) is not None]),
            "launcher_restart_ms": summary(restarts),
            "hang_detect_ms": summary([(e.detected - e.fired) * 1e3 for e in driver.events
                                       if e.detected]),
            "guest": {"rounds": guest_v.rounds, "blocks_verified": guest_v.verified,
                      "ledger_blocks": len(guest.ledger(console))},
            "errors": errors,
            "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                     "load_start": [round(x, 2) for x in load_start],
                     "load_end": [round(x, 2) for x in os.getloadavg()],
                     "load_1min_mean": round(statistics.mean(self.loads), 2)
                     if self.loads else None},
            "event_lines": [e.line() for e in driver.events],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="guest I/O time in all")
    p.add_argument("--boots", type=int, default=2, help="boots the I/O time is split over")
    p.add_argument("--events", type=int, default=0,
                   help="events to fire (default: as many as fit, one per --gap-s)")
    p.add_argument("--gap-s", type=float, default=None, help="mean pause between events")
    p.add_argument("--kinds", default="", help="comma list of kinds (default: all the "
                   "launcher can handle): " + ", ".join(k.value for k in Kind))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--progress-s", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "soak.json")
    p.add_argument("--verbose", action="store_true", help="print every event as it is handled")
    args = p.parse_args(argv)
    soak = Soak(args)
    result = soak.run()
    if result["ok"]:  # a failed run keeps its images and console for a look
        shutil.rmtree(soak.folder, ignore_errors=True)
    else:
        result["folder"] = str(soak.folder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    brief = {k: v for k, v in result.items() if k != "event_lines"}
    print(json.dumps(brief, indent=1))
    print(f"soak {'OK' if result['ok'] else 'FAILED'}: {result['events']} events, "
          f"result in {args.out}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
