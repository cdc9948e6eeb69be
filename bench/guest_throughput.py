"""Guest throughput: mplaunch's Python emulator against QEMU's own virtio-scsi.

Theory of operation: one raw image, pre-filled with random data, is served
to the same test guest (same kernel, initrd, command line, memory, memfd
backend, TCG) in two ways:

- "emulator": ``mplaunch SPEC`` with one emulator, one vhost-user-scsi-pci
  controller with one queue, one disk;
- "in-process": QEMU run directly with ``virtio-scsi-pci`` + ``scsi-hd`` on
  the same image, ``cache=writeback,aio=threads``. The emulator goes
  through the host page cache with synchronous preadv/pwritev and reports
  WCE=1, so QEMU's writeback cache mode (page cache, write cache on) with
  its thread-pool I/O is the like-for-like comparison; cache=none would
  measure O_DIRECT on the host instead.

In the guest (the shell workload of launcher/guest/init.sh) busybox dd moves
COUNT blocks of 64 KiB with O_DIRECT, so the guest's page cache plays no
part and every block is one SCSI command: a read of the first COUNT blocks
and a write of zeros to the COUNT blocks after them (the read area keeps
its random data). The time is taken inside the guest from /proc/uptime
(10 ms resolution; COUNT is chosen so one dd lasts seconds). The guest's
/sys/block/sda/stat is read around every dd so the number of commands the
disk saw is recorded and can be compared across the two runs.

The two kinds of boot are interleaved (emulator, in-process, emulator, ...)
so a drift of the host's speed affects both alike. MB/s is 10**6 bytes/s.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from tests.support.vm import DiskDef, Mplaunch, VmDef, mpl_lines  # noqa: E402

MiB = 1024 * 1024
BLOCK = 64 * 1024
EMULATOR = "emulator"
IN_PROCESS = "in-process"
OPS = ("read", "write")
BOOT_TIMEOUT = 300.0
WARMUP_BLOCKS = 512

# The guest side. $N is the block count; each dd is bracketed by the uptime
# and by the disk's I/O counters. dd's own chatter goes to a file and is
# shown only when dd fails.
GUEST_SCRIPT = """\
N={count}
R={rounds}
dev=/dev/sda
stat() {{ echo $(cat /sys/block/sda/stat) | tr ' ' ,; }}
up() {{ cut -d' ' -f1 /proc/uptime; }}
echo "THRUINFO max_sectors_kb=$(cat /sys/block/sda/queue/max_sectors_kb)" \
  "max_hw_sectors_kb=$(cat /sys/block/sda/queue/max_hw_sectors_kb)" \
  "nr_requests=$(cat /sys/block/sda/queue/nr_requests)" \
  "size=$(($(cat /sys/block/sda/size) * 512))"
# Warm-up, not measured: TCG translates the guest's I/O path on first use.
dd if=$dev of=/dev/null bs=64k count={warmup} iflag=direct 2>/dev/null
dd if=/dev/zero of=$dev bs=64k count={warmup} seek=$N oflag=direct conv=notrunc 2>/dev/null
r=0
rc=0
while [ $r -lt $R ]; do
  r=$((r + 1))
  for op in read write; do
    s0=$(stat); t0=$(up)
    if [ $op = read ]; then
      dd if=$dev of=/dev/null bs=64k count=$N iflag=direct 2>/tmp/dd.err
    else
      dd if=/dev/zero of=$dev bs=64k count=$N seek=$N oflag=direct conv=notrunc 2>/tmp/dd.err
    fi
    ddrc=$?
    t1=$(up); s1=$(stat)
    [ $ddrc = 0 ] || {{ rc=1; cat /tmp/dd.err; }}
    echo "THRU op=$op round=$r rc=$ddrc blocks=$N t0=$t0 t1=$t1 stat0=$s0 stat1=$s1"
  done
done
exit $rc
"""


@dataclass(frozen=True, slots=True)
class Sample:
    """One dd inside the guest, as the guest reported it."""

    kind: str
    boot: int
    op: str
    round: int
    rc: int
    bytes: int
    seconds: float
    commands: int  # reads or writes the disk completed during the dd

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


@dataclass
class BootResult:
    kind: str
    boot: int
    wall_seconds: float
    samples: list[Sample] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    # CPU seconds (user + system) of each process of the boot, by role; a
    # diagnostic of where the host's time went, boot included.
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)


class CpuWatch:
    """Polls the CPU time of a process tree until it ends (the last value
    read before a process exits is what is kept)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, tuple[str, float]] = {}

    def poll(self) -> None:
        try:
            procs = [psutil.Process(self.root)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    self.seen[proc.pid] = (_role(proc.cmdline()), times.user + times.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, seconds in self.seen.values():
            out[role] = round(out.get(role, 0.0) + seconds, 2)
        return out


def _role(cmdline: Sequence[str]) -> str:
    text = " ".join(cmdline)
    if "qemu-system" in text:
        return "qemu"
    if "-m emulators" in text:
        return "emulator"
    if "-m launcher" in text:
        return "mplaunch"
    return "other"


def wait_watching(proc: subprocess.Popen[str], timeout: float) -> tuple[int, dict[str, float]]:
    """Wait for `proc`, polling its tree's CPU time every 100 ms."""
    watch = CpuWatch(proc.pid)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        watch.poll()
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise BenchError(f"pid {proc.pid} did not finish within {timeout:.0f} s")
        time.sleep(0.1)
    return proc.returncode, watch.by_role()


class BenchError(Exception):
    """A boot did not produce the measurements it should have."""


def make_image(path: Path, size: int) -> None:
    """A raw image of `size` bytes of random data (so reads move real bytes)."""
    chunk = 4 * MiB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def guest_command(count: int, rounds: int) -> str:
    return GUEST_SCRIPT.format(count=count, rounds=rounds, warmup=min(WARMUP_BLOCKS, count))


def parse_console(kind: str, boot: int, console: Path) -> tuple[list[Sample], dict[str, str]]:
    """The THRU lines the guest printed (through MPL OUT), as samples."""
    samples: list[Sample] = []
    info: dict[str, str] = {}
    shell_rc: str | None = None
    for line_kind, fields, rest in mpl_lines(console):
        if line_kind == "SHELL":
            shell_rc = fields.get("rc")
        if line_kind != "OUT":
            continue
        words = rest.split()
        if not words:
            continue
        kv = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        if words[0] == "THRUINFO":
            info = kv
        elif words[0] == "THRU":
            op = kv["op"]
            column = 0 if op == "read" else 4  # /sys/block/X/stat: reads, ..., writes, ...
            s0 = [int(x) for x in kv["stat0"].split(",")]
            s1 = [int(x) for x in kv["stat1"].split(",")]
            samples.append(Sample(
                kind=kind, boot=boot, op=op, round=int(kv["round"]), rc=int(kv["rc"]),
                bytes=int(kv["blocks"]) * BLOCK,
                seconds=round(float(kv["t1"]) - float(kv["t0"]), 2),
                commands=s1[column] - s0[column],
            ))
    if shell_rc != "0" or not samples or any(s.rc != 0 for s in samples):
        raise BenchError(f"{kind} boot {boot}: guest shell rc={shell_rc}, "
                         f"{len(samples)} samples:\n{console.read_text(errors='replace')[-3000:]}")
    return samples, info


def run_emulator(
    folder: Path, image: Path, memory: str, append_extra: str
) -> tuple[Path, str, dict[str, float]]:
    """Boot through mplaunch; returns the console file, the kernel command
    line and the CPU seconds by role."""
    vm = VmDef(folder, "thru-bench", workload="shell", extra_append=append_extra, memory=memory)
    vm.emulators = {"emu0": {}}
    vm.controllers = {"scsi0": ("emu0", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0, size=image.stat().st_size)]
    if vm.image("d0") != image:
        raise BenchError(f"the image must be {vm.image('d0')}")
    spec = vm.write()
    append = str(tomllib.loads(spec.read_text())["vm"]["append"])
    m = Mplaunch(spec, console=vm.console)
    try:
        rc, cpu = wait_watching(m.proc, BOOT_TIMEOUT)
    except BenchError:
        m.kill_all()
        raise
    m.wait(10)
    if rc != 0:
        raise BenchError(f"mplaunch exited {rc}:\n{m.stderr}")
    return vm.console, append, cpu


def in_process_argv(
    kernel: Path, initrd: Path, append: str, memory: str, image: Path, console: Path, cache: str
) -> list[str]:
    """QEMU's own virtio-scsi, otherwise the machine mplaunch builds (launcher/vmm.py)."""
    return [
        "qemu-system-x86_64",
        "-name", "guest=thru-bench-inproc",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1",
        "-m", memory,
        "-object", f"memory-backend-memfd,id=ram0,size={memory},share=on",
        "-numa", "node,memdev=ram0",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
        "-device", "virtio-scsi-pci,id=s0",
        "-drive", f"file={image},format=raw,if=none,id=d0,cache={cache},aio=threads",
        "-device", "scsi-hd,drive=d0,bus=s0.0",
    ]


def run_in_process(argv: Sequence[str], log: Path) -> dict[str, float]:
    """Boot QEMU directly; returns the CPU seconds by role."""
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, text=True)
        rc, cpu = wait_watching(proc, BOOT_TIMEOUT)
    if rc != 0:
        raise BenchError(f"QEMU exited {rc}: {log.read_text(errors='replace')[-2000:]}")
    return cpu


def kernel_and_initrd(folder: Path) -> tuple[Path, Path]:
    """The kernel and initrd the emulator run booted (from its spec)."""
    spec = tomllib.loads((folder / "vm.toml").read_text())
    return Path(spec["vm"]["kernel"]), Path(spec["vm"]["initrd"])


def median_mbps(samples: Sequence[Sample], kind: str, op: str) -> float:
    values = [s.mb_per_s for s in samples if s.kind == kind and s.op == op]
    return statistics.median(values) if values else 0.0


def paired_ratio(samples: Sequence[Sample], op: str) -> float:
    """Median over boots of emulator/in-process for the same boot number and
    round: the two boots of a pair ran back to back, so host load that comes
    and goes cancels better than in the ratio of medians."""
    emu = {(s.boot, s.round): s.mb_per_s for s in samples if s.kind == EMULATOR and s.op == op}
    inp = {(s.boot, s.round): s.mb_per_s for s in samples if s.kind == IN_PROCESS and s.op == op}
    ratios = [emu[k] / inp[k] for k in emu if k in inp and inp[k] > 0]
    return statistics.median(ratios) if ratios else 0.0


def machine() -> dict[str, object]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                          check=False).stdout.splitlines()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu[0] if qemu else "",
        "accel": "tcg",
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--image-mib", type=int, default=512, help="image size (default 512)")
    p.add_argument("--count", type=int, default=4096,
                   help="64 KiB blocks per dd (default 4096 = 256 MiB); at most half the image")
    p.add_argument("--boots", type=int, default=3,
                   help="boots of each kind, interleaved (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="read+write rounds per boot (default 1)")
    p.add_argument("--memory", default="512M", help="guest memory (default 512M)")
    p.add_argument("--cache", default="writeback", choices=("writeback", "none"),
                   help="cache mode of the in-process drive (default writeback)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out",
                   help="folder of guest_throughput.json, the result (default bench/out)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the image goes (default a temporary folder, removed after)")
    args = p.parse_args(argv)
    if args.boots < 1 or args.rounds < 1 or args.count < 1:
        p.error("--boots, --rounds and --count must be at least 1")
    if args.count * 2 * BLOCK > args.image_mib * MiB:
        p.error("--count: the read and the write area (2 x count x 64 KiB) must fit the image")
    if shutil.which("qemu-system-x86_64") is None:
        p.error("qemu-system-x86_64 is not installed")

    started = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mpl-thru-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "vm"
    folder.mkdir(exist_ok=True)
    image = folder / "d0.img"
    results: list[BootResult] = []
    try:
        make_image(image, args.image_mib * MiB)
        command = guest_command(args.count, args.rounds)
        append_extra = "mpl.cmd=" + base64.b64encode(command.encode()).decode()
        for boot in range(1, args.boots + 1):
            t = time.monotonic()
            console, append, cpu = run_emulator(folder, image, args.memory, append_extra)
            samples, info = parse_console(EMULATOR, boot, console)
            results.append(BootResult(EMULATOR, boot, time.monotonic() - t, samples, info, cpu,
                                      os.getloadavg()))
            _progress(results[-1])

            kernel, initrd = kernel_and_initrd(folder)
            console = work / "inproc-console.log"
            argv_b = in_process_argv(kernel, initrd, append, args.memory, image, console,
                                     args.cache)
            t = time.monotonic()
            cpu = run_in_process(argv_b, work / "inproc-stderr.log")
            samples, info = parse_console(IN_PROCESS, boot, console)
            results.append(BootResult(IN_PROCESS, boot, time.monotonic() - t, samples, info, cpu,
                                      os.getloadavg()))
            _progress(results[-1])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    samples = [s for r in results for s in r.samples]
    summary: dict[str, dict[str, float]] = {}
    for op in OPS:
        emu = median_mbps(samples, EMULATOR, op)
        inp = median_mbps(samples, IN_PROCESS, op)
        summary[op] = {"emulator_mb_s": round(emu, 1), "in_process_mb_s": round(inp, 1),
                       "ratio": round(emu / inp, 3) if inp else 0.0,
                       "median_paired_ratio": round(paired_ratio(samples, op), 3)}
    report = {
        "benchmark": "guest_throughput",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "bench.guest_throughput",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "parameters": {"image_mib": args.image_mib, "count": args.count, "block": BLOCK,
                       "boots": args.boots, "rounds": args.rounds, "memory": args.memory,
                       "in_process_drive": f"cache={args.cache},aio=threads"},
        "summary": summary,
        "boots": [asdict(r) for r in results],
        "in_process_argv": argv_b,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "guest_throughput.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    _table(summary, samples, results)
    print(f"\nwritten {out} ({report['total_seconds']} s)")
    return 0


def _progress(r: BootResult) -> None:
    parts = [f"{s.op} {s.mb_per_s:.1f} MB/s ({s.seconds:.2f} s, {s.commands} cmds)"
             for s in r.samples]
    cpu = " ".join(f"{k}={v:.1f}" for k, v in sorted(r.cpu_seconds.items()))
    print(f"{r.kind:>10} boot {r.boot}: {'; '.join(parts)}  [{r.wall_seconds:.0f} s wall; "
          f"cpu s {cpu}; load {r.loadavg[0]:.1f}]", file=sys.stderr, flush=True)


def _table(summary: dict[str, dict[str, float]], samples: Sequence[Sample],
           results: Sequence[BootResult]) -> None:
    print(f"{'op':<6} {'emulator MB/s':>14} {'in-process MB/s':>16} {'ratio':>7} {'paired':>7}"
          "   samples")
    for op, row in summary.items():
        emu = ", ".join(f"{s.mb_per_s:.0f}" for s in samples if s.op == op and s.kind == EMULATOR)
        inp = ", ".join(f"{s.mb_per_s:.0f}" for s in samples
                        if s.op == op and s.kind == IN_PROCESS)
        print(f"{op:<6} {row['emulator_mb_s']:>14.1f} {row['in_process_mb_s']:>16.1f} "
              f"{row['ratio']:>7.3f} {row['median_paired_ratio']:>7.3f}"
              f"   emu [{emu}] in-proc [{inp}]")
    infos = {r.kind: r.info for r in results if r.info}
    for kind, info in infos.items():
        print(f"guest queue limits ({kind}): " + " ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    sys.exit(main())
