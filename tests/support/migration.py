"""Live migration between two mplaunch on one host, as the end-to-end tests
and bench/migration.py drive it.

Theory of operation. A VM is run alternately by two "sides", A and B: each
side has its own VM name, run folder and uid range, and both open the SAME
image files (one host: shared storage is exact). The guest runs the chaos
guest's write-verify workload (tests/chaos/guest.py): random 4 KiB O_DIRECT
writes read back and compared, an `MPL IO` line per round, a ledger of every
write printed at the end, and a stop token the host writes into the script
disk to end the I/O. The guest's console is a file per hop (QEMU truncates
its console file when it starts, and each destination QEMU is a new one), so
the guest's whole story is the hop consoles in order: `Pair.console_text`.

A hop: `start_incoming` runs `mplaunch --incoming URI SPEC` for the other
side and waits for its "incoming migration: waiting on" line; `migrate`
sends `migrate` to the source's mplaunch.sock; `follow` polls `query-migrate`
(and collects `MIGRATION` events) until a final status. Afterwards
`assert_side_gone` proves that nothing of the side that stopped runs on: no
process it was seen to have (launcher, holder, QEMU, emulators, spares),
none naming its run folder or its QEMU name, none under its uid range, and
no run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.chaos import guest
from tests.chaos.verdict import GuestVerdict, check_guest, stray_processes
from tests.support.reattach import below, holder_pid, vm_processes, wait_gone
from tests.support.vm import REPO, DiskDef, Mplaunch, VmDef, lines_of, shell_cmd

MiB = 1024 * 1024
DATA_DISK_SIZE = 16 * MiB
#: Statuses after which a migration does not change any more.
FINAL = frozenset({"completed", "failed", "cancelled"})
#: A destination's progress lines (docs/management.md, "Progress lines").
WAITING = r"incoming migration: waiting on "
RUNNING = r"incoming migration: guest running"
RESTARTED = r"emulator e0 restarted \(pid (\d+)"
#: The reader's pattern: 4 KiB blocks of the script disk past the 64 KiB the
#: guest's loader reads, each block's bytes its own.
PATTERN_FIRST = 16
PATTERN_BLOCKS = 8
#: A verifying reader in the background of the write-verify workload: the
#: pattern blocks, read with O_DIRECT into each new dd's fresh (zeroed)
#: buffer, compared with what the host wrote there; one `MPL IO name=reader`
#: line per 50 reads (at once on a mismatch). A read that completed just
#: before a switch and whose data the destination did not get (a DMA write
#: into guest RAM missing from the dirty log) shows as a mismatch. It ends
#: with the host's stop token (checked every 5 reads, and before reporting a
#: mismatch), so that a read cut short by the power-off that follows the
#: workload is no mismatch.
READER = r"""
(rdisk=$(for d in /sys/block/sd*; do [ "$(cat $d/size)" = @SECTORS@ ] && echo ${d##*/}; done)
 told() {
     dd if=/dev/$rdisk bs=4096 skip=@STOPBLOCK@ count=1 iflag=direct 2>/dev/null |
         head -c 32 | tr -d '\000' | grep -q '^MPLSTOP 1$'
 }
 n=0; ok=0; bad=0; i=0
 while :; do
     got=$(dd if=/dev/$rdisk bs=4096 skip=@FIRST@ count=@BLOCKS@ iflag=direct 2>/dev/null | md5sum)
     if [ "${got%% *}" = @WANT@ ]; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
     i=$((i + 1))
     if [ $bad -gt 0 ] || [ $((i % 5)) = 0 ]; then told && break; fi
     if [ $((ok + bad)) -ge 50 ] || [ $bad -gt 0 ]; then
         n=$((n + 1)); echo "MPL IO name=reader round=$n ok=$ok bad=$bad" >/dev/console
         ok=0; bad=0
     fi
 done
 [ $ok = 0 ] || echo "MPL IO name=reader round=$((n + 1)) ok=$ok bad=0" >/dev/console) &
"""
POLICY: dict[str, object] = {"kind": "scsi", "restart_burst": 1000, "restart_window_s": 1,
                             "heartbeat_ms": 200, "hang_timeout_ms": 3000}


def pattern() -> bytes:
    """The reader's blocks: each 4 KiB its own text, none of it zero."""
    return b"".join((f"mplaunch migration pattern, block {i}; ".encode() * 120)[:guest.BLOCK]
                    for i in range(PATTERN_BLOCKS))


def reader_prelude() -> str:
    """`READER` for the script disk `Pair` writes."""
    values = {"@SECTORS@": guest.SCRIPT_DISK_SIZE // 512, "@FIRST@": PATTERN_FIRST,
              "@STOPBLOCK@": guest.STOP_BLOCK,
              "@BLOCKS@": PATTERN_BLOCKS, "@WANT@": hashlib.md5(pattern()).hexdigest()}
    text = READER
    for key, value in values.items():
        text = text.replace(key, str(value))
    return text.lstrip()


def need_migration() -> str | None:
    """Why live migration cannot be tried here, or None: mplaunch must take
    `--incoming` (what the destination runs)."""
    done = subprocess.run([sys.executable, "-m", "launcher", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    if "--incoming" not in done.stdout + done.stderr:
        return "mplaunch has no --incoming option (live migration is not built)"
    return None


@dataclass
class SideVm(VmDef):
    """A `VmDef` whose images, run folder and console are where the pair says,
    not inside its own folder: both sides open the same images."""

    images: Path = Path()
    run_folder: Path = Path()
    console_file: Path = Path()

    def image(self, disk_id: str) -> Path:
        return self.images / f"{disk_id}.img"

    @property
    def run_dir(self) -> Path:
        return self.run_folder

    @property
    def console(self) -> Path:
        return self.console_file

    @property
    def sock(self) -> Path:
        return self.run_folder / "mplaunch.sock"


class Pair:
    """The two sides of one VM that migrates back and forth: hop 0 is the
    first boot on side A, hop n runs on side A for even n, B for odd n.

    `uid_ranges` are A's and B's (each side leases its emulators' uids from
    its own, so that `stray_processes` can tell the sides apart)."""

    def __init__(self, root: Path, name: str, uid_ranges: tuple[str, str], *,
                 count: int = 8, seed: int = 1, memory: str = "256M",
                 reader: bool = True) -> None:
        self.root = root
        self.name = name
        self.uid_ranges = uid_ranges
        self.memory = memory
        self.images = root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        # 0 seconds: the I/O runs until `stop` (at most guest.MAX_SECONDS).
        script = self.images / "script.img"
        guest.script_image(script, (reader_prelude() if reader else "")
                           + guest.script(0, count, 1, DATA_DISK_SIZE, seed))
        with open(script, "r+b") as f:
            f.seek(PATTERN_FIRST * guest.BLOCK)
            f.write(pattern())
        # unix: socket paths must stay short; the test's folder may not be.
        self.sockets = Path(tempfile.mkdtemp(prefix="mplm-", dir="/tmp"))
        self.hops: dict[int, SideVm] = {}

    def vm(self, hop: int, side: str | None = None) -> SideVm:
        """The spec of hop `hop` (written by `SideVm.write`), on side `side`
        ("a" or "b"; by default A for even hops, B for odd ones)."""
        side = side or "ab"[hop % 2]
        folder = self.root / f"hop{hop}"
        folder.mkdir(exist_ok=True)
        vm = SideVm(folder, f"{self.name}-{side}", workload="shell", memory=self.memory,
                    images=self.images, run_folder=self.root / f"run-{side}",
                    console_file=folder / "console.log")
        vm.emulators = {"e0": dict(POLICY)}
        vm.controllers = {"scsi0": ("e0", 1)}
        vm.disks = [DiskDef("d0", "scsi0", 0, size=DATA_DISK_SIZE),
                    DiskDef("script", "scsi0", 1, size=guest.SCRIPT_DISK_SIZE, readonly=True)]
        vm.vm_extra = {"uid_range": self.uid_ranges["ab".index(side)]}
        vm.extra_append = shell_cmd(guest.loader())
        self.hops[hop] = vm
        return vm

    def unix_uri(self, hop: int) -> str:
        return f"unix:{self.sockets / f'hop{hop}.sock'}"

    def stop(self) -> None:
        """Tell the guest to end its I/O after the current round."""
        guest.stop_boot(self.images / "script.img", 1)

    def console_text(self) -> str:
        """The guest's console over every hop, in order."""
        return "".join(vm.console.read_text(errors="replace")
                       for _, vm in sorted(self.hops.items()) if vm.console.exists())

    def reader_reads(self) -> int:
        """How many reads the background reader checked, over every hop."""
        return sum(int(m.group(1)) for m in re.finditer(
            r"^MPL IO name=reader round=\d+ ok=(\d+) bad=\d+$", self.console_text(), re.M))

    def verdict(self) -> GuestVerdict:
        """The chaos verdict over the whole run: no mismatch, no SCSI error, a
        clean end, and the image holds what the guest last wrote."""
        return check_guest(self.console_text(), self.hops[max(self.hops)], boots=1)

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            for p in self.sockets.iterdir():
                p.unlink()
            self.sockets.rmdir()


def free_tcp_uri() -> str:
    """A tcp: URI on the loopback with a port free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp:127.0.0.1:{s.getsockname()[1]}"


class MonitorError(Exception):
    """A command answered with an error: `error` is QMP's error object."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class Monitor:
    """One QMP connection to an mplaunch.sock (QEMU's own client library, as
    mpctl), keeping every event it brings."""

    def __init__(self, sock: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {sock} within {timeout} s")
            time.sleep(0.05)
        self._qmp = QEMUMonitorProtocol(str(sock))
        self._qmp.connect()
        self._qmp.settimeout(timeout)
        self.events: list[dict[str, Any]] = []
        self.closed = False

    def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        reply = self._qmp.cmd_raw(command, args)
        self.pull()
        if "error" in reply:
            raise MonitorError(command, reply["error"])
        return reply["return"]

    def pull(self) -> None:
        """Take the events that arrived so far (also after the peer closed)."""
        with contextlib.suppress(Exception):
            self.events += self._qmp.get_events(wait=False)

    def drain(self, wait: float = 0.3) -> None:
        """Take the events that arrive within `wait` s of each other: the
        client reads its socket only while it is called, so the last events
        of a peer that went away are still unread in its buffer."""
        self.pull()
        while True:
            try:
                event = self._qmp.pull_event(wait=wait)
            except Exception:  # asyncio's TimeoutError, or the connection's end
                return
            if event is None:
                return
            self.events.append(event)

    def migration_events(self) -> list[str]:
        self.drain()
        return [e.get("data", {}).get("status", "?") for e in self.events
                if e.get("event") == "MIGRATION"]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self._qmp.close()


@dataclass
class Side:
    """A running mplaunch of one hop: the launcher, its spec, its monitor, and
    every pid it was seen to run (for `assert_side_gone`)."""

    vm: SideVm
    launcher: Mplaunch
    uid_range: str
    monitor: Monitor | None = None
    seen: set[int] = field(default_factory=set)

    def connect(self) -> Monitor:
        if self.monitor is None:
            self.monitor = Monitor(self.vm.sock)
        return self.monitor

    def snapshot(self) -> set[int]:
        """Record every process below the launcher and below its holder now."""
        self.seen |= {p.pid for p in self.launcher.descendants()}
        with contextlib.suppress(AssertionError):
            self.seen |= below(holder_pid(self.launcher))
        return self.seen

    def emulator_pid(self) -> int:
        found = {e["id"]: e for e in self.connect().execute("query-emulators")}
        return int(found["e0"]["pid"])

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


def boot(pair: Pair, launchers: list[Mplaunch], rounds: int = 1,
         timeout: float = 150) -> Side:
    """Hop 0: the first boot on side A, its guest past `rounds` I/O rounds."""
    vm = pair.vm(0)
    m = Mplaunch(vm.write(), console=vm.console)
    launchers.append(m)
    side = Side(vm, m, str(vm.vm_extra["uid_range"]))
    wait_rounds(side, rounds, timeout)
    side.snapshot()
    return side


def start_incoming(pair: Pair, hop: int, uri: str, launchers: list[Mplaunch],
                   timeout: float = 60, side: str | None = None) -> Side:
    """`mplaunch --incoming URI` for hop `hop` (see `Pair.vm`), waiting on its URI."""
    vm = pair.vm(hop, side)
    m = Mplaunch(vm.write(), "--incoming", uri, console=vm.console)
    launchers.append(m)
    m.wait_stderr(WAITING, timeout)
    incoming = Side(vm, m, str(vm.vm_extra["uid_range"]))
    incoming.snapshot()
    return incoming


def io_lines(side: Side, reader: bool = False) -> list[dict[str, str]]:
    """The side's `MPL IO` lines: write-verify rounds (or the reader's)."""
    return [r for r in lines_of(side.vm.console, "IO") if (r.get("name") == "reader") == reader]


def wait_rounds(side: Side, more: int, timeout: float, since: int | None = None,
                source: Side | None = None) -> int:
    """Wait until the side's console shows `more` I/O rounds beyond `since`
    (default: those it shows now), all verified; the count reached. A
    failure shows the `source`'s log too (the side the guest came from)."""
    start = len(io_lines(side)) if since is None else since
    deadline = time.monotonic() + timeout
    while True:
        lines = io_lines(side)
        bad = [r for r in lines + io_lines(side, reader=True) if r.get("bad") != "0"]
        assert not bad, f"{side.vm.name}: the guest counted mismatches: {bad}"
        if len(lines) >= start + more:
            return len(lines)
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{side.vm.name}: {len(lines) - start} of {more} I/O rounds in {timeout} s "
                f"(no I/O progress)\nconsole tail:\n{_tail(side.vm.console)}\n"
                f"mplaunch:\n{side.launcher.stderr[-3000:]}"
                + (f"\nthe source's mplaunch:\n{source.launcher.stderr[-3000:]}"
                   if source is not None else ""))
        if side.launcher.proc.poll() is not None:
            raise AssertionError(f"{side.vm.name}: mplaunch exited "
                                 f"({side.launcher.proc.returncode}) while waiting for I/O:\n"
                                 f"{side.launcher.stderr[-3000:]}")
        time.sleep(0.1)


def _tail(path: Path, lines: int = 15) -> str:
    """The console's last lines but the reader's, and any kernel message
    (an oops, a SCSI error printed at the console's log level) before them."""
    text = path.read_text(errors="replace") if path.exists() else "(no console file)"
    kept = [line for line in text.splitlines() if "name=reader" not in line]
    kernel = [line for line in kept[:-lines] if line.startswith("[")][:40]
    return "\n".join(kernel + kept[-lines:])


def migrate(source: Side, uri: str) -> None:
    """Start the migration (the command returns at once)."""
    assert source.connect().execute("migrate", {"uri": uri}) == {}


@dataclass
class Followed:
    """What `follow` saw of one migration on the source."""

    status: str  # the last status seen (from query-migrate, or a MIGRATION event)
    answers: list[dict[str, Any]]  # every query-migrate answer, in order
    times: list[float]  # monotonic time of each answer
    statuses: list[str]  # the distinct statuses seen, in order
    gone: bool = False  # the source's socket closed before a final status was read

    @property
    def last(self) -> dict[str, Any]:
        return self.answers[-1] if self.answers else {}

    def first_time(self, status: str) -> float | None:
        for answer, at in zip(self.answers, self.times, strict=True):
            if answer.get("status") == status:
                return at
        return None


def follow(side: Side, until: frozenset[str] = FINAL, timeout: float = 120,
           period: float = 0.05,
           each: Callable[[dict[str, Any]], None] | None = None) -> Followed:
    """Poll the side's `query-migrate` until its status is in `until`. If the
    source's socket closes first (it stops once its guest runs elsewhere),
    the last MIGRATION event it sent stands for the status."""
    mon = side.connect()
    seen = Followed("none", [], [], [])
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = mon.execute("query-migrate")
        except MonitorError:
            raise
        except Exception:  # the socket closed under us
            seen.gone = True
            events = mon.migration_events()
            if events:
                seen.status = events[-1]
                if not seen.statuses or seen.statuses[-1] != seen.status:
                    seen.statuses.append(seen.status)
            return seen
        seen.answers.append(answer)
        seen.times.append(time.monotonic())
        seen.status = str(answer.get("status"))
        if not seen.statuses or seen.statuses[-1] != seen.status:
            seen.statuses.append(seen.status)
        if each is not None:
            each(answer)
        if seen.status in until:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"migration still {seen.status} after {timeout} s: {answer}\n"
                                 f"source:\n{side.launcher.stderr[-3000:]}")
        time.sleep(period)


def assert_side_gone(side: Side, timeout: float = 20) -> None:
    """Nothing of the side runs on: no pid it was seen to have, no process
    naming its run folder or QEMU name, none under its uid range; no run
    folder."""
    side.close()
    seen = sorted(side.seen | side.launcher.seen_descendants | {side.launcher.proc.pid})
    assert wait_gone(seen, timeout) == [], f"{side.vm.name}: left running: {wait_gone(seen, 0)}"
    assert vm_processes(side.vm, side.launcher, pids=side.seen) == []
    assert stray_processes(side.uid_range) == [], \
        f"{side.vm.name}: processes under its uids {side.uid_range}"
    deadline = time.monotonic() + timeout
    while side.vm.run_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not side.vm.run_dir.exists(), \
        f"{side.vm.name}: run folder left: {sorted(p.name for p in side.vm.run_dir.iterdir())}"


def console_has_guest(side: Side) -> bool:
    """Whether the guest said anything on this side's console (a destination
    whose migration failed must never have run it)."""
    path = side.vm.console
    return path.exists() and bool(re.search(r"^MPL ", path.read_text(errors="replace"), re.M))


def downtime_ms(answer: dict[str, Any]) -> float | None:
    """QEMU's reported downtime in a query-migrate answer: at the top level
    (as QEMU puts it) or inside "ram" (where mplaunch carries QEMU's figures)."""
    for where in (answer, answer.get("ram") or {}):
        value = where.get("downtime") if isinstance(where, dict) else None
        if isinstance(value, int | float):
            return float(value)
    return None


@contextlib.contextmanager
def closing(*sides: Side) -> Iterator[None]:
    try:
        yield
    finally:
        for s in sides:
            s.close()
