"""fio matrix: fio inside the bench guest, through mplaunch's emulator and
through QEMU's in-process virtio-scsi, case by case.

Theory of operation: the bench flavour of the guest (``build/guest-bench``,
the test guest plus the host's fio) boots with the fio workload of
launcher/guest/init.sh, which runs one job file and prints fio's JSON on
the console. The job file holds every case of the matrix as one job, run
one after the other (``stonewall``), each with a ramp time that is not
measured, so one boot measures the whole matrix. Two kinds of boot, on the
same raw image (pre-filled with random data), the same kernel, initrd and
command line, ``-machine q35 -accel tcg -cpu max -smp 1``, the same RAM
size on a memfd backend (bench.guest_throughput's machinery does both):

- "emulator": ``mplaunch SPEC``, one emulator, one vhost-user-scsi-pci
  controller with one queue, one disk;
- "in-process": QEMU run directly with ``virtio-scsi-pci`` + ``scsi-hd``,
  ``cache=writeback,aio=threads`` (the emulator goes through the host's page
  cache and reports WCE=1, so this is the like-for-like drive).

Boots alternate (emulator, in-process, emulator, ...) for ``--pairs``
pairs, so a drift of the host's speed touches both alike; the load average
after each boot is kept with its numbers. Per case and kind the result
holds the median over boots of IOPS, MB/s (10**6 bytes/s) and completion
latency percentiles (fio's clat: submission to completion, as the guest
sees it), and per case the ratios emulator/in-process (latency:
in-process/emulator, so above 1 is the emulator doing better everywhere).
fio's usr+sys CPU of each job is kept too: under TCG the guest's one vCPU is
often what limits both kinds.

The pure part (job file, parsing fio's JSON, medians and ratios) is
separate from the boots so tests drive it without a VM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.guest_throughput import (  # noqa: E402
    BenchError,
    guest_boot,
    in_process_argv,
    machine,
    make_image,
    run_emulator,
    run_in_process,
)
from launcher.guest import Workload, fio_output, kernel_append, reports  # noqa: E402

MiB = 1024 * 1024
EMULATOR = "emulator"
IN_PROCESS = "in-process"
KINDS = (EMULATOR, IN_PROCESS)
GUEST_FLAVOUR = "bench"
WORKLOAD = "fio"
READS = frozenset({"read", "randread"})
WRITES = frozenset({"write", "randwrite"})
#: fio's percentile keys for the latencies kept (its default list has them).
PERCENTILES = {"lat_p50_us": "50.000000", "lat_p99_us": "99.000000",
               "lat_p99_9_us": "99.900000"}


@dataclass(frozen=True, slots=True)
class Case:
    """One cell of the matrix: a fio job."""

    rw: str
    bs: int
    iodepth: int

    def __post_init__(self) -> None:
        if self.rw not in READS | WRITES:
            raise ValueError(f"unknown rw {self.rw!r}")
        if self.bs <= 0 or self.bs % 512 or self.iodepth < 1:
            raise ValueError(f"bad case bs={self.bs} iodepth={self.iodepth}")

    @property
    def name(self) -> str:
        """As in the result file: "4k randread QD1", "1m write QD4"."""
        size = f"{self.bs // MiB}m" if self.bs % MiB == 0 else f"{self.bs // 1024}k"
        return f"{size} {self.rw} QD{self.iodepth}"

    @property
    def job(self) -> str:
        """The fio job (section) name: the case name without blanks."""
        return self.name.replace(" ", "-").lower()

    @property
    def direction(self) -> str:
        """The section of fio's JSON that holds this job's numbers."""
        return "read" if self.rw in READS else "write"


CASES: tuple[Case, ...] = (
    Case("randread", 4096, 1),
    Case("randread", 4096, 32),
    Case("randwrite", 4096, 1),
    Case("randwrite", 4096, 32),
    Case("read", 65536, 1),
    Case("write", 65536, 1),
    Case("read", MiB, 4),
    Case("write", MiB, 4),
)


def job_file(cases: Sequence[Case], runtime: int, ramp: int, engine: str) -> str:
    """The fio job file the guest runs: every case, one after the other."""
    lines = ["[global]", "filename=/dev/sda", "direct=1", f"ioengine={engine}",
             "time_based=1", f"runtime={runtime}", f"ramp_time={ramp}", "stonewall"]
    for case in cases:
        lines += [f"[{case.job}]", f"rw={case.rw}", f"bs={case.bs}",
                  f"iodepth={case.iodepth}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Sample:
    """One case in one boot, as fio reported it."""

    case: str
    kind: str
    pair: int
    iops: float
    mb_s: float
    lat_p50_us: float
    lat_p99_us: float
    lat_p99_9_us: float
    #: fio's usr+sys CPU for the job, percent of the guest's one vCPU.
    guest_cpu_pct: float
    load_1m: float


def parse_fio(text: str, cases: Sequence[Case], kind: str, pair: int,
              load_1m: float) -> list[Sample]:
    """One sample per case from fio's JSON output; a case missing, a job
    that reports an error or that did no I/O is a :class:`BenchError`."""
    try:
        doc = json.loads(text)
        jobs = {str(job["jobname"]): job for job in doc["jobs"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{kind} pair {pair}: fio's output is not its JSON: {exc}") from exc
    samples = []
    for case in cases:
        job = jobs.get(case.job)
        if job is None:
            raise BenchError(f"{kind} pair {pair}: no job {case.job} in fio's output")
        if job.get("error"):
            raise BenchError(f"{kind} pair {pair}: job {case.job} error {job['error']}")
        side = job[case.direction]
        if not side.get("total_ios"):
            raise BenchError(f"{kind} pair {pair}: job {case.job} did no I/O")
        percentiles = side["clat_ns"].get("percentile", {})
        lat = {key: round(float(percentiles.get(pct, 0)) / 1000, 1)
               for key, pct in PERCENTILES.items()}
        samples.append(Sample(
            case=case.name, kind=kind, pair=pair, iops=round(float(side["iops"]), 1),
            mb_s=round(float(side["bw_bytes"]) / 1e6, 2), **lat,
            guest_cpu_pct=round(float(job.get("usr_cpu", 0)) + float(job.get("sys_cpu", 0)), 1),
            load_1m=load_1m))
    return samples


_SAMPLE_KEYS = ("iops", "mb_s", "lat_p50_us", "lat_p99_us", "lat_p99_9_us", "guest_cpu_pct")


def _median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 2) if values else 0.0


def _ratio(top: float, bottom: float) -> float:
    return round(top / bottom, 3) if bottom else 0.0


def summarize(samples: Sequence[Sample], cases: Sequence[Case]) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """The result file's "cases" (medians per case and kind, every sample
    kept) and "ratios" (per case: iops and mb_s emulator/in-process, latency
    in-process/emulator, all from the medians; ``paired_iops`` is the median
    of the per-pair ratios, the two boots of a pair having run back to back)."""
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    for case in cases:
        medians: dict[str, dict[str, float]] = {}
        for kind in KINDS:
            mine = [s for s in samples if s.case == case.name and s.kind == kind]
            if not mine:
                continue
            medians[kind] = {key: _median([getattr(s, key) for s in mine])
                             for key in _SAMPLE_KEYS}
            rows.append({
                "case": case.name, "rw": case.rw, "bs": case.bs, "iodepth": case.iodepth,
                "kind": kind, **medians[kind],
                "samples": [{key: value for key, value in asdict(s).items()
                             if key not in ("case", "kind")} for s in mine],
            })
        if len(medians) == len(KINDS):
            emu, inp = medians[EMULATOR], medians[IN_PROCESS]
            by_pair = {(s.kind, s.pair): s.iops for s in samples if s.case == case.name}
            paired = [by_pair[(EMULATOR, p)] / by_pair[(IN_PROCESS, p)]
                      for kind, p in by_pair if kind == EMULATOR
                      and by_pair.get((IN_PROCESS, p))]
            ratios.append({
                "case": case.name,
                "iops": _ratio(emu["iops"], inp["iops"]),
                "mb_s": _ratio(emu["mb_s"], inp["mb_s"]),
                "lat_p50": _ratio(inp["lat_p50_us"], emu["lat_p50_us"]),
                "lat_p99": _ratio(inp["lat_p99_us"], emu["lat_p99_us"]),
                "paired_iops": round(statistics.median(paired), 3) if paired else 0.0,
            })
    return rows, ratios


# ---- the boots ---------------------------------------------------------------

@dataclass
class Boot:
    """One boot: which kind, which pair, how long, the host's load after it."""

    kind: str
    pair: int
    wall_s: float
    load_1m: float
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


@dataclass
class Setup:
    """Everything both kinds of boot share."""

    work: Path
    image: Path
    memory: str
    append_extra: str
    kernel: Path
    initrd: Path
    append: str


def prepare(work: Path, image_mib: int, memory: str, job: str) -> Setup:
    """The image (random data) and the kernel, initrd and command line both
    kinds boot with (the bench guest is built here if it is not current)."""
    folder = work / "vm"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "d0.img"
    if not image.exists() or image.stat().st_size != image_mib * MiB:
        make_image(image, image_mib * MiB)
    fio_word = next(w for w in kernel_append(Workload.FIO, fio_job=job, base="").split()
                    if w.startswith("mpl.fio="))
    kernel, initrd, append = guest_boot(work / "reference", memory, fio_word, GUEST_FLAVOUR,
                                        WORKLOAD)
    return Setup(work, image, memory, fio_word, kernel, initrd, append)


def boot_once(setup: Setup, kind: str, pair: int, cases: Sequence[Case],
              cache: str = "writeback") -> tuple[Boot, list[Sample]]:
    """Boot one kind once and read the matrix it measured."""
    started = time.monotonic()
    if kind == EMULATOR:
        console, booted, cpu = run_emulator(setup.image.parent, setup.image, setup.memory,
                                            setup.append_extra, GUEST_FLAVOUR,
                                            workload=WORKLOAD)
        if booted != setup.append:
            raise BenchError(f"the emulator boot had {booted!r}, not {setup.append!r}")
    elif kind == IN_PROCESS:
        console = setup.work / "in-process-console.log"
        console.unlink(missing_ok=True)
        argv = in_process_argv(setup.kernel, setup.initrd, setup.append, setup.memory,
                               setup.image, console, cache)
        cpu = run_in_process(argv, setup.work / "in-process-stderr.log")
    else:
        raise ValueError(f"unknown kind {kind!r}")
    load = round(os.getloadavg()[0], 2)
    text = console.read_text(errors="replace")
    try:
        out = fio_output(reports(text.splitlines()))
    except ValueError as exc:
        raise BenchError(f"{kind} pair {pair}: {exc}\n{text[-3000:]}") from exc
    if out.rc != 0:
        raise BenchError(f"{kind} pair {pair}: fio exited {out.rc}: {list(out.messages)}")
    samples = parse_fio(out.json_text, cases, kind, pair, load)
    boot = Boot(kind, pair, round(time.monotonic() - started, 1), load, cpu,
                list(out.messages))
    return boot, samples


def in_process_command(setup: Setup, cache: str) -> list[str]:
    return in_process_argv(setup.kernel, setup.initrd, setup.append, setup.memory,
                           setup.image, setup.work / "in-process-console.log", cache)


# ---- command line ------------------------------------------------------------

def select_cases(spec: str) -> tuple[Case, ...]:
    """``all`` or a comma-separated list of job names (``4k-randread-qd1``)."""
    if spec == "all":
        return CASES
    by_job = {case.job: case for case in CASES}
    wanted = [name.strip().lower() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_job]
    if unknown or not wanted:
        raise ValueError(f"unknown cases {unknown}; known: {', '.join(by_job)}")
    return tuple(by_job[name] for name in wanted)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--pairs", type=int, default=3,
                   help="emulator + in-process boot pairs, interleaved (default 3)")
    p.add_argument("--runtime", type=int, default=5, help="seconds measured per case (default 5)")
    p.add_argument("--ramp", type=int, default=2,
                   help="seconds per case before measuring (default 2)")
    p.add_argument("--engine", default="io_uring", choices=("io_uring", "libaio"),
                   help="fio's ioengine in the guest (default io_uring)")
    p.add_argument("--cases", default="all",
                   help="'all' or job names, comma-separated: "
                   + ", ".join(case.job for case in CASES))
    p.add_argument("--image-mib", type=int, default=512, help="image size (default 512)")
    p.add_argument("--memory", default="512M", help="guest memory (default 512M)")
    p.add_argument("--cache", default="writeback", choices=("writeback", "none"),
                   help="cache mode of the in-process drive (default writeback)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out",
                   help="folder of fio_matrix.json (default bench/out)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the image goes (default a temporary folder, removed after)")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.runtime < 1 or args.ramp < 0:
        p.error("--pairs and --runtime must be at least 1, --ramp at least 0")
    try:
        cases = select_cases(args.cases)
    except ValueError as exc:
        p.error(f"--cases: {exc}")
    if shutil.which("qemu-system-x86_64") is None:
        p.error("qemu-system-x86_64 is not installed")

    started = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mpl-fio-"))
    work.mkdir(parents=True, exist_ok=True)
    job = job_file(cases, args.runtime, args.ramp, args.engine)
    boots: list[Boot] = []
    samples: list[Sample] = []
    try:
        setup = prepare(work, args.image_mib, args.memory, job)
        for pair in range(1, args.pairs + 1):
            for kind in KINDS:
                boot, found = boot_once(setup, kind, pair, cases, args.cache)
                boots.append(boot)
                samples.extend(found)
                _progress(boot, found)
        in_process = in_process_command(setup, args.cache)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    rows, ratios = summarize(samples, cases)
    report = {
        "benchmark": "fio_matrix",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "bench.fio_matrix",
                             *(sys.argv[1:] if argv is None else argv)]),
        "host": machine(),
        "parameters": {"pairs": args.pairs, "runtime_s": args.runtime, "ramp_s": args.ramp,
                       "engine": args.engine, "image_mib": args.image_mib,
                       "memory": args.memory, "guest": GUEST_FLAVOUR,
                       "in_process_drive": f"cache={args.cache},aio=threads",
                       "job_file": job,
                       "append_without_job": " ".join(
                           w for w in setup.append.split() if not w.startswith("mpl.fio="))},
        "load_1m": [b.load_1m for b in boots],
        "cases": rows,
        "ratios": ratios,
        "boots": [asdict(b) for b in boots],
        "in_process_argv": in_process,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "fio_matrix.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, ratios))
    print(f"\nload average (1 min) per boot: {', '.join(f'{b.load_1m:.2f}' for b in boots)}")
    print(f"written {out} ({report['total_seconds']} s)")
    return 0


def table(rows: Sequence[Mapping[str, Any]], ratios: Sequence[Mapping[str, Any]]) -> str:
    """Both kinds' medians and the ratios, one line per case."""
    by = {(row["case"], row["kind"]): row for row in rows}
    head = (f"{'case':<18} {'emu IOPS':>9} {'inp IOPS':>9} {'emu MB/s':>9} {'inp MB/s':>9} "
            f"{'emu p50':>8} {'inp p50':>8} {'emu p99':>8} {'inp p99':>8} "
            f"{'iops':>6} {'paired':>6} {'p50':>6} {'vcpu%':>9}")
    lines = [head, "(latencies in us; ratios emulator/in-process, p50 in-process/emulator; "
             "vcpu% = fio's guest CPU emu/inp)"]
    for ratio in ratios:
        emu, inp = by[(ratio["case"], EMULATOR)], by[(ratio["case"], IN_PROCESS)]
        lines.append(
            f"{ratio['case']:<18} {emu['iops']:>9.0f} {inp['iops']:>9.0f} {emu['mb_s']:>9.1f} "
            f"{inp['mb_s']:>9.1f} {emu['lat_p50_us']:>8.0f} {inp['lat_p50_us']:>8.0f} "
            f"{emu['lat_p99_us']:>8.0f} {inp['lat_p99_us']:>8.0f} {ratio['iops']:>6.2f} "
            f"{ratio['paired_iops']:>6.2f} {ratio['lat_p50']:>6.2f} "
            f"{emu['guest_cpu_pct']:>4.0f}/{inp['guest_cpu_pct']:<4.0f}")
    return "\n".join(lines)


def _progress(boot: Boot, samples: Sequence[Sample]) -> None:
    cells = "; ".join(f"{s.case} {s.iops:.0f} IOPS" for s in samples)
    cpu = " ".join(f"{k}={v:.1f}" for k, v in sorted(boot.cpu_seconds.items()))
    print(f"{boot.kind:>10} pair {boot.pair}: {cells}  [{boot.wall_s:.0f} s wall; cpu s {cpu}; "
          f"load {boot.load_1m:.2f}]", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
