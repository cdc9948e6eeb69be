"""Guest throughput: mplaunch's Python emulator against QEMU's own virtio-scsi,
and QEMU's LSI53C895A in a remote process (kind "lsi") against in-process.

Theory of operation: one raw image, pre-filled with random data, is served
to the same test guest (same kernel, initrd, command line, memory, memfd
backend, TCG) in the ways ``--kinds`` names (default: the first two):

- "emulator": ``mplaunch SPEC`` with one emulator, one vhost-user-scsi-pci
  controller with one queue, one disk;
- "in-process": QEMU run directly with ``virtio-scsi-pci`` + ``scsi-hd`` on
  the same image, ``cache=writeback,aio=threads``. The emulator goes
  through the host page cache with synchronous preadv/pwritev and reports
  WCE=1, so QEMU's writeback cache mode (page cache, write cache on) with
  its thread-pool I/O is the like-for-like comparison; cache=none would
  measure O_DIRECT on the host instead;
- "lsi-remote": ``mplaunch SPEC`` with one emulator of kind "lsi" (QEMU's
  x-remote process, reached through x-pci-proxy-dev and mplaunch's relay),
  one controller, the disk on target 0;
- "lsi-in-process": QEMU run directly with ``lsi53c895a`` + ``scsi-hd`` on
  the same image, the drive as for "in-process".

A run with an LSI kind boots every kind with the LSI flavour of the test
guest (Debian's standard kernel, which has sym53c8xx) and the polling
command line (``irqpoll nolapic noapic``: under TCG the proxy's interrupts
never reach the guest), so all kinds of one run share kernel and command
line. Such a run writes ``guest_throughput-<kinds>.json``, leaving the
default run's ``guest_throughput.json`` (which bench.plot draws) alone.

In the guest (the shell workload of launcher/guest/init.sh) busybox dd moves
COUNT blocks of 64 KiB with O_DIRECT, so the guest's page cache plays no
part and every block is one SCSI command: a read of the first COUNT blocks
and a write of zeros to the COUNT blocks after them (the read area keeps
its random data). The time is taken inside the guest from /proc/uptime
(10 ms resolution; COUNT is chosen so one dd lasts seconds). The guest's
/sys/block/sda/stat is read around every dd so the number of commands the
disk saw is recorded and can be compared across the two runs.

The kinds of boot are interleaved (emulator, in-process, emulator, ...) so
a drift of the host's speed affects all alike; the load average after each
boot is recorded with it. MB/s is 10**6 bytes/s.
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

from launcher.guest.builder import FLAVOURS, ensure_guest  # noqa: E402
from tests.support.vm import LSI_POLLING, DiskDef, Mplaunch, VmDef, mpl_lines  # noqa: E402

MiB = 1024 * 1024
BLOCK = 64 * 1024
EMULATOR = "emulator"
IN_PROCESS = "in-process"
LSI_REMOTE = "lsi-remote"
LSI_IN_PROCESS = "lsi-in-process"
KINDS = (EMULATOR, IN_PROCESS, LSI_REMOTE, LSI_IN_PROCESS)
DEFAULT_KINDS = (EMULATOR, IN_PROCESS)
LSI_KINDS = (LSI_REMOTE, LSI_IN_PROCESS)
#: Kinds whose boot goes through mplaunch; the others run QEMU directly.
THROUGH_MPLAUNCH = (EMULATOR, LSI_REMOTE)
#: The comparisons the summary makes: (name, kind, the kind it is divided by).
RATIOS = (("ratio", EMULATOR, IN_PROCESS), ("lsi_ratio", LSI_REMOTE, LSI_IN_PROCESS),
          ("lsi_remote_vs_emulator", LSI_REMOTE, EMULATOR))
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
    if "qemu-system" in text and "x-remote" in text:
        return "lsi-remote"
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


def bench_vm(folder: Path, image: Path, memory: str, append_extra: str, guest: str,
             lsi: bool = False, workload: str = "shell") -> VmDef:
    """The VM of an mplaunch boot: one emulator (of kind "lsi" if `lsi`),
    one controller, the image as disk d0 at LUN (or target) 0."""
    vm = VmDef(folder, "thru-bench", workload=workload, extra_append=append_extra,
               memory=memory, guest=guest)
    vm.emulators = {"emu0": {"kind": "lsi"} if lsi else {}}
    vm.controllers = {"scsi0": ("emu0", 1)}
    vm.disks = [DiskDef("d0", "scsi0", 0, size=image.stat().st_size)]
    return vm


def write_spec(vm: VmDef) -> Path:
    """``vm.write()`` for any flavour of the guest. tests.support.vm knows
    the folders of the cloud and lsi flavours only; a VM of another flavour
    (the bench guest with fio) is written as a cloud one, then pointed at
    its own flavour's kernel and initrd, built if needed."""
    try:
        return vm.write()
    except KeyError:
        flavour = FLAVOURS.get(vm.guest or "")
        if flavour is None:
            raise
    built = ensure_guest(REPO / "build" / flavour.folder, flavour=flavour)
    vm.guest = "cloud"
    try:
        spec = vm.write()
    finally:
        vm.guest = flavour.name
    lines = [f'kernel = "{built.kernel}"' if line.startswith("kernel = ")
             else f'initrd = "{built.initrd}"' if line.startswith("initrd = ") else line
             for line in spec.read_text().splitlines()]
    spec.write_text("\n".join(lines) + "\n")
    return spec


def run_emulator(
    folder: Path, image: Path, memory: str, append_extra: str, guest: str = "cloud",
    lsi: bool = False, workload: str = "shell",
) -> tuple[Path, str, dict[str, float]]:
    """Boot through mplaunch; returns the console file, the kernel command
    line and the CPU seconds by role."""
    vm = bench_vm(folder, image, memory, append_extra, guest, lsi, workload)
    if vm.image("d0") != image:
        raise BenchError(f"the image must be {vm.image('d0')}")
    spec = write_spec(vm)
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
    kernel: Path, initrd: Path, append: str, memory: str, image: Path, console: Path, cache: str,
    lsi: bool = False,
) -> list[str]:
    """QEMU's own virtio-scsi (or LSI53C895A), otherwise the machine mplaunch
    builds (launcher/vmm.py)."""
    controller = ["-device", "lsi53c895a,id=s0"] if lsi else ["-device", "virtio-scsi-pci,id=s0"]
    disk = "scsi-hd,drive=d0,bus=s0.0" + (",scsi-id=0" if lsi else "")
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
        *controller,
        "-drive", f"file={image},format=raw,if=none,id=d0,cache={cache},aio=threads",
        "-device", disk,
    ]


def run_in_process(argv: Sequence[str], log: Path) -> dict[str, float]:
    """Boot QEMU directly; returns the CPU seconds by role."""
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, text=True)
        rc, cpu = wait_watching(proc, BOOT_TIMEOUT)
    if rc != 0:
        raise BenchError(f"QEMU exited {rc}: {log.read_text(errors='replace')[-2000:]}")
    return cpu


def guest_boot(folder: Path, memory: str, append_extra: str,
               guest: str, workload: str = "shell") -> tuple[Path, Path, str]:
    """Kernel, initrd and command line every kind of the run boots with: the
    ones an mplaunch boot would get, read from a spec written (not run) in
    `folder`, so the in-process kinds need no mplaunch boot before them."""
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "d0.img"
    image.touch()
    vm = bench_vm(folder, image, memory, append_extra, guest, workload=workload)
    spec = tomllib.loads(write_spec(vm).read_text())["vm"]
    return Path(spec["kernel"]), Path(spec["initrd"]), str(spec["append"])


def median_mbps(samples: Sequence[Sample], kind: str, op: str) -> float:
    values = [s.mb_per_s for s in samples if s.kind == kind and s.op == op]
    return statistics.median(values) if values else 0.0


def paired_ratio(samples: Sequence[Sample], op: str, kind: str = EMULATOR,
                 base: str = IN_PROCESS) -> float:
    """Median over boots of kind/base (emulator/in-process) for the same
    boot number and round: the boots of a pair ran back to back, so host
    load that comes and goes cancels better than in the ratio of medians."""
    emu = {(s.boot, s.round): s.mb_per_s for s in samples if s.kind == kind and s.op == op}
    inp = {(s.boot, s.round): s.mb_per_s for s in samples if s.kind == base and s.op == op}
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
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help=f"comma-separated kinds of boot, interleaved in this order, from "
                   f"{', '.join(KINDS)} (default {','.join(DEFAULT_KINDS)}); with an lsi kind "
                   "every kind boots the LSI guest with the polling command line")
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
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
        p.error(f"--kinds: distinct names from {', '.join(KINDS)}")
    lsi_run = any(k in LSI_KINDS for k in kinds)
    guest = "lsi" if lsi_run else "cloud"

    started = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mpl-thru-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "vm"
    folder.mkdir(exist_ok=True)
    image = folder / "d0.img"
    results: list[BootResult] = []
    in_process_argvs: dict[str, list[str]] = {}
    try:
        make_image(image, args.image_mib * MiB)
        command = guest_command(args.count, args.rounds)
        append_extra = "mpl.cmd=" + base64.b64encode(command.encode()).decode()
        if lsi_run:  # the same command line for every kind of the run
            append_extra = f"{LSI_POLLING} {append_extra}"
        kernel, initrd, append = guest_boot(work / "reference", args.memory, append_extra, guest)
        for boot in range(1, args.boots + 1):
            for kind in kinds:
                t = time.monotonic()
                lsi = kind in LSI_KINDS
                if kind in THROUGH_MPLAUNCH:
                    console, booted_append, cpu = run_emulator(
                        folder, image, args.memory, append_extra, guest, lsi)
                    if booted_append != append:
                        raise BenchError(f"{kind} booted with {booted_append!r}, not {append!r}")
                else:
                    console = work / f"{kind}-console.log"
                    argv_b = in_process_argv(kernel, initrd, append, args.memory, image,
                                             console, args.cache, lsi)
                    in_process_argvs[kind] = argv_b
                    cpu = run_in_process(argv_b, work / f"{kind}-stderr.log")
                samples, info = parse_console(kind, boot, console)
                results.append(BootResult(kind, boot, time.monotonic() - t, samples, info, cpu,
                                          os.getloadavg()))
                _progress(results[-1])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    samples = [s for r in results for s in r.samples]
    summary = summarize(samples, kinds)
    report = {
        "benchmark": "guest_throughput",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "bench.guest_throughput",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "parameters": {"image_mib": args.image_mib, "count": args.count, "block": BLOCK,
                       "boots": args.boots, "rounds": args.rounds, "memory": args.memory,
                       "in_process_drive": f"cache={args.cache},aio=threads",
                       "kinds": list(kinds), "guest": guest, "append_without_cmd":
                       " ".join(w for w in append.split() if not w.startswith("mpl.cmd="))},
        "summary": summary,
        "boots": [asdict(r) for r in results],
        "total_seconds": round(time.monotonic() - started, 1),
    }
    for kind, argv_b in in_process_argvs.items():
        report[f"{kind.replace('-', '_')}_argv"] = argv_b
    args.out.mkdir(parents=True, exist_ok=True)
    name = ("guest_throughput.json" if set(kinds) == set(DEFAULT_KINDS)
            else f"guest_throughput-{'-'.join(kinds)}.json")
    out = args.out / name
    out.write_text(json.dumps(report, indent=2) + "\n")
    _table(summary, samples, results, kinds)
    print(f"\nwritten {out} ({report['total_seconds']} s)")
    return 0


def summarize(samples: Sequence[Sample], kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per op: the median MB/s of each kind (``<kind>_mb_s``), and each
    comparison of :data:`RATIOS` whose two kinds ran: ratio of medians and
    median of the paired ratios (``median_paired_<name>``)."""
    summary: dict[str, dict[str, float]] = {}
    for op in OPS:
        row = {f"{k.replace('-', '_')}_mb_s": round(median_mbps(samples, k, op), 1)
               for k in kinds}
        for name, kind, base in RATIOS:
            if kind in kinds and base in kinds:
                top, bottom = median_mbps(samples, kind, op), median_mbps(samples, base, op)
                row[name] = round(top / bottom, 3) if bottom else 0.0
                row[f"median_paired_{name}"] = round(paired_ratio(samples, op, kind, base), 3)
        summary[op] = row
    return summary


def _progress(r: BootResult) -> None:
    parts = [f"{s.op} {s.mb_per_s:.1f} MB/s ({s.seconds:.2f} s, {s.commands} cmds)"
             for s in r.samples]
    cpu = " ".join(f"{k}={v:.1f}" for k, v in sorted(r.cpu_seconds.items()))
    print(f"{r.kind:>10} boot {r.boot}: {'; '.join(parts)}  [{r.wall_seconds:.0f} s wall; "
          f"cpu s {cpu}; load {r.loadavg[0]:.1f}]", file=sys.stderr, flush=True)


def _table(summary: dict[str, dict[str, float]], samples: Sequence[Sample],
           results: Sequence[BootResult], kinds: Sequence[str] = DEFAULT_KINDS) -> None:
    ratios = [name for name, kind, base in RATIOS if kind in kinds and base in kinds]
    print(f"{'op':<6} " + " ".join(f"{k + ' MB/s':>20}" for k in kinds)
          + "".join(f" {n:>10} {'paired':>7}" for n in ratios))
    for op, row in summary.items():
        print(f"{op:<6} " + " ".join(f"{row[k.replace('-', '_') + '_mb_s']:>20.1f}" for k in kinds)
              + "".join(f" {row[n]:>10.3f} {row['median_paired_' + n]:>7.3f}" for n in ratios))
    for kind in kinds:
        values = {op: ", ".join(f"{s.mb_per_s:.0f}" for s in samples
                                if s.op == op and s.kind == kind) for op in OPS}
        loads = ", ".join(f"{r.loadavg[0]:.1f}" for r in results if r.kind == kind)
        print(f"  {kind}: " + "; ".join(f"{op} [{v}]" for op, v in values.items())
              + f"; load [{loads}]")
    infos = {r.kind: r.info for r in results if r.info}
    for kind, info in infos.items():
        print(f"guest queue limits ({kind}): " + " ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    sys.exit(main())
