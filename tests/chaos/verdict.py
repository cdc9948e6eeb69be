"""What a chaos run must prove afterwards, shared by the chaos tests and the
soak benchmark: the guest saw no error, the images hold what it wrote, and
nothing of the VM is left running."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.chaos import guest
from tests.support.vm import VmDef

#: The one unit attention each LUN's first probe sees; anything else in the
#: guest's kernel log (an error, abort, reset or timeout) is a finding.
POWER_ON = re.compile(r"(sd \d+:\d+:\d+:\d+): Power-on or device reset occurred")


def boots_of(console: str) -> list[str]:
    """The console split at each "MPL BOOT" line (the text before the first dropped)."""
    return ["MPL BOOT" + part for part in console.split("MPL BOOT")[1:]]


@dataclass
class GuestVerdict:
    """The guest's side of a run, boot by boot."""

    boots: int = 0
    rounds: int = 0
    verified: int = 0  # blocks read back and compared
    bad: int = 0  # read-back mismatches or failed writes, as the guest counted them
    scsi_errors: list[str] = field(default_factory=list)  # kernel log lines
    problems: list[str] = field(default_factory=list)  # everything else that is wrong
    mismatches: list[guest.Mismatch] = field(default_factory=list)  # image vs ledger

    @property
    def ok(self) -> bool:
        return not (self.bad or self.scsi_errors or self.problems or self.mismatches)


def check_guest(console: str, vm: VmDef, boots: int, min_io_lines: int = 4) -> GuestVerdict:
    """Read the guest's report of its first `boots` boots and compare the images."""
    verdict = GuestVerdict()
    found = boots_of(console)
    verdict.boots = len(found)
    if len(found) < boots:
        verdict.problems.append(f"{len(found)} boots seen, {boots} expected")
    luns = len(vm.disks)
    for number, text in enumerate(found[:boots], 1):
        if f"MPL COUNTED boot={number}" not in text:
            verdict.problems.append(f"boot {number}: not counted")
        if "MPL DONE workload=shell rc=0" not in text:
            verdict.problems.append(f"boot {number}: no clean MPL DONE")
        for line in re.findall(r"^MPL (?:ERROR|WARN).*$", text, re.M):
            verdict.problems.append(f"boot {number}: {line}")
        io = [line for line in text.splitlines() if line.startswith("MPL IO ")]
        if len(io) < min_io_lines:
            verdict.problems.append(f"boot {number}: only {len(io)} IO lines")
        for line in io:
            m = re.search(r" round=(\d+) ok=(\d+) bad=(\d+)$", line)
            if m is None:
                verdict.problems.append(f"boot {number}: odd line {line!r}")
                continue
            verdict.verified += int(m.group(2))
            verdict.bad += int(m.group(3))
        rounds = re.search(r"^MPL ROUNDS boot=\d+ rounds=(\d+)", text, re.M)
        verdict.rounds += int(rounds.group(1)) if rounds else 0
        klog = [line for line in text.splitlines() if line.startswith("MPL KLOG")]
        power_on = [mm.group(1) for line in klog if (mm := POWER_ON.search(line))]
        verdict.scsi_errors += [f"boot {number}: {line}" for line in klog
                                if not POWER_ON.search(line)]
        if not len(power_on) == len(set(power_on)) <= luns:
            verdict.scsi_errors.append(f"boot {number}: repeated power-on: {power_on}")
    entries = guest.ledger(console)
    writable = [(d.size, vm.image(d.id)) for d in vm.disks if not d.readonly]
    if not entries:
        verdict.problems.append("no ledger: the guest wrote nothing it could report")
    verdict.mismatches = guest.compare_images(entries, writable)
    return verdict


def stray_processes(uid_range: str) -> list[int]:
    """Processes still running with one of the VM's emulator uids."""
    first, last = (int(x) for x in uid_range.split("-"))
    return [p.pid for p in psutil.process_iter(["uids"])
            if p.info["uids"] and first <= p.info["uids"].real <= last]


def left_running(pids: set[int]) -> list[str]:
    """Of the processes mplaunch ever started, those still alive."""
    alive = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return alive


def run_folder_left(path: Path) -> bool:
    return path.exists()
