"""Footprint: what supervising one VM costs its host, in memory, processes, threads and fds.

Theory of operation. The test guest (build/guest) runs on a spec of K
emulators, each with one controller (one request queue) and one 64 MiB
disk, in two modes:

- ``full``: ``mplaunch SPEC`` starts the VM's QEMU itself;
- ``backends``: ``mplaunch --backends-only SPEC`` serves the emulators on
  sockets in the run folder and this script starts QEMU with the arguments
  mplaunch prints (launcher.libvirt.backend_qemu_argv), the shape of a host
  where libvirt, Nova or KubeVirt runs QEMU.

The guest writes and reads 4 MiB on each disk with O_DIRECT (so each
emulator has served real requests and holds its buffers), prints a marker
on its console and then sleeps: the VM is up, serving and idle. Once every
emulator and the warm spare are present, and SETTLE_S later, every process
of the VM is read:

- memory from /proc/PID/smaps_rollup: RSS, PSS (each shared page divided
  among the processes that map it), USS (Private_Clean + Private_Dirty: what
  the host gets back when the process ends) and Pss_Shmem (the part of PSS
  in shared memory: for an emulator, mostly guest memory it maps and QEMU
  maps too, which is the guest's RAM, not the emulator's);
- threads (/proc/PID/status) and open fds (/proc/PID/fd).

The roles: the launcher (the ``mplaunch`` process this script started),
its holder (the child running ``launcher.holder``, which is also the
template every emulator and spare is forked from: launcher/template.py;
those children show the jail's command line, as an exec'd one did), each emulator (the
pids the management socket's ``query-emulators`` lists), the warm spare
(``emulators --spare``) and QEMU. "Supervision per VM" sums every process
but QEMU: QEMU is the VMM a host runs anyway, and is reported apart. RSS
sums count shared pages once per process that maps them; PSS and USS sums
do not.

Runs repeat ``--runs`` times, the modes and emulator counts interleaved so
that a change in the host's load does not fall on one configuration; the
1-minute load average is recorded beside every sample. The cost of one more
emulator is the slope of the median supervision cost between the smallest
and the largest emulator count. Results go to bench/out/footprint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from launcher.libvirt import backend_qemu_argv  # noqa: E402
from launcher.spec import load_spec  # noqa: E402
from tests.support.vm import DiskDef, Mplaunch, VmDef, shell_cmd  # noqa: E402

MiB = 1024 * 1024
DISK_SIZE = 64 * MiB
SETTLE_S = 3.0
BOOT_TIMEOUT_S = 240.0
READY = "FOOTPRINT-READY"
# Each disk: 4 MiB written then read back with O_DIRECT, then idle.
WORKLOAD = ("rc=0; for d in /dev/sd?; do "
            "dd if=/dev/urandom of=$d bs=65536 count=64 oflag=direct 2>/dev/null || rc=1; "
            "dd if=$d of=/dev/null bs=65536 count=64 iflag=direct 2>/dev/null || rc=1; "
            f"done; echo {READY} rc=$rc >/dev/console; sleep 100000")
#: smaps_rollup fields kept, in KiB.
FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Shared_Clean", "Shared_Dirty",
          "Private_Clean", "Private_Dirty", "Swap")
MODES = ("full", "backends")
TARGET_PSS_KIB = 25 * 1024
"""The design's bound on supervision per VM with one emulator (PSS)."""


@dataclass
class Proc:
    """One process of the VM as read once."""

    role: str
    pid: int
    rss_kib: int
    pss_kib: int
    uss_kib: int
    pss_shmem_kib: int
    threads: int
    fds: int
    rollup: dict[str, int]


@dataclass
class Sample:
    """Every process of one VM at one moment, and the load beside it."""

    mode: str
    emulators: int
    run: int
    load_1m: float
    load: tuple[float, float, float]
    boot_s: float
    procs: list[Proc] = field(default_factory=list)

    def supervision(self) -> dict[str, int]:
        """Sums over every process but QEMU."""
        ours = [p for p in self.procs if p.role != "qemu"]
        return {"processes": len(ours), "threads": sum(p.threads for p in ours),
                "fds": sum(p.fds for p in ours), "pss_kib": sum(p.pss_kib for p in ours),
                "uss_kib": sum(p.uss_kib for p in ours), "rss_kib": sum(p.rss_kib for p in ours),
                "pss_shmem_kib": sum(p.pss_shmem_kib for p in ours)}


def read_rollup(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                values[name] = int(rest.split()[0])
    return values


def read_proc(role: str, pid: int) -> Proc:
    rollup = read_rollup(pid)
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return Proc(role, pid, rss_kib=rollup["Rss"], pss_kib=rollup["Pss"],
                uss_kib=rollup["Private_Clean"] + rollup["Private_Dirty"],
                pss_shmem_kib=rollup.get("Pss_Shmem", 0), threads=threads,
                fds=len(os.listdir(f"/proc/{pid}/fd")), rollup=rollup)


def query_emulators(sock: Path) -> dict[str, int]:
    """Emulator id -> pid, from the management socket (docs/management.md)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        stream = s.makefile("rwb")
        json.loads(stream.readline())  # the greeting
        reply: dict[str, Any] = {}
        for command in ("qmp_capabilities", "query-emulators"):
            stream.write(json.dumps({"execute": command}).encode() + b"\n")
            stream.flush()
            while True:  # events may come before the answer
                reply = json.loads(stream.readline())
                if "return" in reply or "error" in reply:
                    break
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")
    return {e["id"]: e["pid"] for e in reply["return"] if e["pid"] is not None}


def roles(m: Mplaunch, emulators: dict[str, int], qemu_pid: int | None) -> dict[int, str]:
    """Every process of the VM, by pid, named by its role."""
    named: dict[int, str] = {m.proc.pid: "launcher"}
    by_pid = {pid: f"emulator:{eid}" for eid, pid in emulators.items()}
    for p in m.descendants():
        try:
            cmdline = p.cmdline()
            name = p.name()
        except psutil.NoSuchProcess:
            continue
        if p.pid in by_pid:
            named[p.pid] = by_pid[p.pid]
        elif "launcher.holder" in cmdline:
            named[p.pid] = "holder"
        elif "--spare" in cmdline:
            named[p.pid] = "spare"
        elif name.startswith("qemu-system"):
            named[p.pid] = "qemu"
        else:
            named[p.pid] = "other:" + " ".join(cmdline)[:60]
    if qemu_pid is not None:
        named[qemu_pid] = "qemu"
    return named


def build_vm(folder: Path, count: int) -> VmDef:
    vm = VmDef(folder, f"footprint{count}", workload="shell", extra_append=shell_cmd(WORKLOAD))
    vm.emulators = {f"e{i}": {} for i in range(count)}
    vm.controllers = {f"scsi{i}": (f"e{i}", 1) for i in range(count)}
    vm.disks = [DiskDef(f"d{i}", f"scsi{i}", 0, size=DISK_SIZE) for i in range(count)]
    return vm


def wait_for(what: str, check: Any, timeout: float, m: Mplaunch) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if m.proc.poll() is not None:
            raise RuntimeError(f"mplaunch exited while waiting for {what}:\n{m.stderr}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} in {timeout:.0f} s:\n{m.stderr}")
        time.sleep(0.2)


def one_run(mode: str, count: int, run: int) -> Sample:
    folder = Path(tempfile.mkdtemp(prefix="mpl-footprint-"))
    vm = build_vm(folder, count)
    spec_path = vm.write()
    qemu: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    m = Mplaunch(spec_path, *(["--backends-only"] if mode == "backends" else []),
                 console=vm.console)
    try:
        if mode == "backends":
            for i in range(count):
                m.wait_stderr(rf"controller scsi{i} waits for QEMU", 60)
            qemu = subprocess.Popen(backend_qemu_argv(load_spec(spec_path)),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        else:
            m.wait_stderr(r"QEMU started", 60)
        io_rc = m.wait_console(rf"{READY} rc=(\d+)", BOOT_TIMEOUT_S).group(1)
        if io_rc != "0":
            raise RuntimeError(f"the guest's reads and writes failed:\n{m.stderr}")
        boot_s = time.monotonic() - started
        sock = vm.run_dir / "mplaunch.sock"
        emulators: dict[str, int] = {}

        def complete() -> bool:
            nonlocal emulators
            emulators = query_emulators(sock)
            found = roles(m, emulators, qemu.pid if qemu else None).values()
            return len(emulators) == count and "spare" in found and "qemu" in found

        wait_for("emulators, spare and QEMU", complete, 60, m)
        time.sleep(SETTLE_S)
        emulators = query_emulators(sock)
        named = roles(m, emulators, qemu.pid if qemu else None)
        load = os.getloadavg()
        sample = Sample(mode, count, run, load[0], load, boot_s)
        for pid, role in sorted(named.items(), key=lambda item: item[1]):
            sample.procs.append(read_proc(role, pid))
        return sample
    finally:
        if qemu is not None:
            qemu.terminate()
            try:
                qemu.wait(30)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait()
        m.signal(signal.SIGTERM)
        m.wait(90)
        time.sleep(0.2)
        try:
            m.assert_nothing_left(vm.run_dir)
        except AssertionError as e:
            print(f"warning: {e}", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)


def median_of(samples: list[Sample], pick: Any) -> float:
    return float(statistics.median(pick(s) for s in samples))


def role_kind(role: str) -> str:
    return "emulator" if role.startswith("emulator:") else role


def summarise(samples: list[Sample]) -> list[dict[str, Any]]:
    """Per mode and emulator count: the median of each role (emulators
    summed) and of the supervision sums, and the load seen."""
    rows = []
    keys = sorted({(s.mode, s.emulators) for s in samples}, key=lambda k: (MODES.index(k[0]),
                                                                            k[1]))
    for mode, count in keys:
        group = [s for s in samples if (s.mode, s.emulators) == (mode, count)]
        per_role: dict[str, dict[str, float]] = {}
        for kind in ("launcher", "holder", "emulator", "spare", "qemu"):
            def total(s: Sample, attr: str, kind: str = kind) -> int:
                return sum(getattr(p, attr) for p in s.procs if role_kind(p.role) == kind)
            per_role[kind] = {attr: median_of(group, lambda s, a=attr: total(s, a))
                              for attr in ("pss_kib", "uss_kib", "rss_kib", "pss_shmem_kib",
                                           "threads", "fds")}
        supervision = {k: median_of(group, lambda s, k=k: s.supervision()[k])
                       for k in group[0].supervision()}
        rows.append({"mode": mode, "emulators": count, "runs": len(group),
                     "load_1m": [s.load_1m for s in group],
                     "boot_s": median_of(group, lambda s: s.boot_s),
                     "roles": per_role, "supervision": supervision})
    return rows


def per_emulator(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mode: what one more emulator adds to the supervision sums."""
    slopes: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["emulators"])
        if len(mine) < 2:
            continue
        low, high = mine[0], mine[-1]
        span = high["emulators"] - low["emulators"]
        slopes[mode] = {k: (high["supervision"][k] - low["supervision"][k]) / span
                        for k in low["supervision"]}
    return slopes


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def print_table(rows: list[dict[str, Any]], slopes: dict[str, dict[str, float]]) -> None:
    print("medians; MiB; emulator columns sum every emulator of the VM")
    head = (f"{'mode':9} {'emu':>3} {'role':10} {'PSS':>7} {'USS':>7} {'RSS':>7} "
            f"{'shmem':>6} {'thr':>4} {'fds':>4}")
    print(head)
    for r in rows:
        for kind, v in r["roles"].items():
            if not v["rss_kib"]:
                continue
            print(f"{r['mode']:9} {r['emulators']:>3} {kind:10} {mib(v['pss_kib']):>7} "
                  f"{mib(v['uss_kib']):>7} {mib(v['rss_kib']):>7} {mib(v['pss_shmem_kib']):>6} "
                  f"{v['threads']:>4.0f} {v['fds']:>4.0f}")
        s = r["supervision"]
        print(f"{r['mode']:9} {r['emulators']:>3} {'SUPERVISION':10} {mib(s['pss_kib']):>7} "
              f"{mib(s['uss_kib']):>7} {mib(s['rss_kib']):>7} {mib(s['pss_shmem_kib']):>6} "
              f"{s['threads']:>4.0f} {s['fds']:>4.0f}   processes {s['processes']:.0f}, "
              f"load {', '.join(f'{x:.2f}' for x in r['load_1m'])}, "
              f"boot {r['boot_s']:.1f} s")
    print()
    for r in rows:
        s = r["supervision"]
        print(f"SUPERVISION PER VM, {r['mode']}, {r['emulators']} emulator(s): "
              f"PSS {mib(s['pss_kib'])} MiB (USS {mib(s['uss_kib'])} MiB) in "
              f"{s['processes']:.0f} processes; target with 1 emulator: "
              f"{TARGET_PSS_KIB / 1024:.0f} MiB PSS")
    for mode, d in slopes.items():
        print(f"one more emulator ({mode}): PSS +{mib(d['pss_kib'])} MiB, "
              f"USS +{mib(d['uss_kib'])} MiB, +{d['processes']:.0f} process, "
              f"+{d['threads']:.1f} threads, +{d['fds']:.1f} fds")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Measure what supervising one VM costs the host: PSS, USS and RSS "
        "(/proc/PID/smaps_rollup), threads and open fds of mplaunch, its holder, each emulator "
        "and the warm spare (QEMU apart), once the test guest is up, serving and idle; for "
        "`mplaunch SPEC` (mode full) and `mplaunch --backends-only SPEC` with a QEMU started "
        "beside it (mode backends). Prints a table of medians and writes every sample to "
        "bench/out/footprint.json.",
        epilog="Details: the module docstring of bench/footprint.py and docs/benchmarks.md.")
    p.add_argument("--runs", type=int, default=3, help="samples per mode and count (default 3)")
    p.add_argument("--emulators", default="1,2,4",
                   help="emulator counts, comma-separated (default 1,2,4)")
    p.add_argument("--modes", default=",".join(MODES), help="full, backends or both (default)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "footprint.json")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.emulators.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    samples: list[Sample] = []
    for run in range(args.runs):
        for count in counts:
            for mode in modes:
                s = one_run(mode, count, run)
                samples.append(s)
                sup = s.supervision()
                print(f"run {run + 1} {mode} {count} emulator(s): supervision PSS "
                      f"{mib(sup['pss_kib'])} MiB, USS {mib(sup['uss_kib'])} MiB, "
                      f"{sup['processes']} processes, load {s.load_1m:.2f}", flush=True)
    rows = summarise(samples)
    slopes = per_emulator(rows)
    print_table(rows, slopes)
    result = {
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "kernel": platform.release(),
                 "memory_total_kib": psutil.virtual_memory().total // 1024},
        "guest_memory": "256M", "disk_size": DISK_SIZE, "settle_s": SETTLE_S,
        "summary": rows, "per_extra_emulator": slopes,
        "samples": [asdict(s) for s in samples],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
