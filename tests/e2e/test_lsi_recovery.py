"""A remote LSI process killed, frozen and restarted while the guest writes
and verifies blocks through it: what mplaunch's relay achieves, measured.

The guest (LSI flavour, TCG, polling) runs a loop of its own (below): one
random 4 KiB O_DIRECT write, then the same block read back and compared,
over and over, until the host leaves a stop token on the script disk. Each
acknowledged write goes into a ledger, printed at the end and compared with
the image file. A write or read that took a second or more is reported
(`MPL SLOW`, with how long), so the guest's own view of each stall is on
its console; its kernel's SCSI aborts and resets come as `MPL KLOG` lines.

The controller's state dies with its process: the commands in flight are
lost. The slot makes each new controller report a SCSI bus reset, and the
guest's driver starts the chip again and requeues them at once, instead of
finding out by a command timeout (Linux's 30 s, then 5 s for each abort and
device reset that cannot succeed). MPL_LSI_TIMEOUT sets the guest's SCSI
command timeout (default 30, Linux's own) to see the difference with
launcher.lsi.slot.ANNOUNCE_RESET off.

Asserted: the VM and its QEMU keep running through every event, a new
remote serves after each, the loop goes on, no block read back differs
from what was written, no I/O error, no command timed out (no abort), and
the image holds every acknowledged write. Printed (pytest -s): the restart
stall, the cold start, the guest's stalled operation, the time until the
guest's I/O had moved on by two progress reports, and its kernel's log.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.chaos import guest as chaos_guest
from tests.support.vm import DiskDef, Mplaunch, VmDef, lines_of, pids_alive, shell_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest"), pytest.mark.timeout(900)]

if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="the sandbox needs root (run the tests as root)"))

MiB = 1024 * 1024
DATA_SIZE = 16 * MiB
TIMEOUT_S = int(os.environ.get("MPL_LSI_TIMEOUT", "30"))
#: Longest a restart may keep the guest's loop from moving on: the SCSI
#: timeout and the error handler's steps (abort, device, bus, host reset),
#: each with its own timeout, under a loaded TCG.
RESUME_S = 60 + 6 * TIMEOUT_S
PROGRESS_EVERY = 10
#: With the reset announced, the guest's I/O has moved on well within this
#: (measured: 4-7 s under TCG, of which about 3 s is the driver's settle delay).
RESUMED_WITHIN_S = 20
BOOT_TIME_KLOG = re.compile(r"sym\d+: SCSI BUS has been reset|Power-on or device reset occurred")
RESTARTED = re.compile(r"emulator lsi-a restarted \(pid (\d+), cold start\) ([\d.]+) ms after")
ATTACHED = re.compile(r"emulator lsi-a: LSI remote pid (\d+) attached, (\d+) ms after its spawn")

_SCRIPT = r"""
con=/dev/console
say() { echo "MPL $*" >$con; }
up() { read u _ </proc/uptime; echo "${u%.*}${u#*.}"; }
for d in /sys/block/sd*; do echo @TMO@ >$d/device/timeout; done
sdisk=; data=
for d in /sys/block/sd*; do
    if [ "$(cat $d/size)" = @SSECTORS@ ]; then sdisk=${d##*/}
    elif [ "$(cat $d/ro)" = 0 ]; then data=${d##*/}; fi
done
[ -n "$sdisk" ] && [ -n "$data" ] || { say "ERROR disks not found"; exit 2; }
stopped() {
    dd if=/dev/$sdisk bs=4096 skip=@STOPBLOCK@ count=1 iflag=direct 2>/dev/null |
        head -c 32 | tr -d '\000' | grep -q '^MPLSTOP 1$'
}
total=$(($(cat /sys/block/$data/size) / 8))
size=$(($(cat /sys/block/$data/size) * 512))
RANDOM=@SEED@
: >/tmp/ledger
say "READY disk=$data timeout=$(cat /sys/block/$data/device/timeout)"
n=0; bad=0; errs=0
while :; do
    if [ $((n % @EVERY@)) = 0 ]; then
        say "PROGRESS n=$n at=$(up)"
        stopped && break
    fi
    n=$((n + 1))
    off=$((1 + (RANDOM * 32768 + RANDOM) % (total - 1)))
    dd if=/dev/urandom of=/tmp/blk bs=4096 count=1 2>/dev/null
    sum=$(md5sum </tmp/blk); sum=${sum%% *}
    t0=$(up)
    if dd if=/tmp/blk of=/dev/$data bs=4096 seek=$off count=1 oflag=direct conv=notrunc \
            2>/dev/null; then
        echo "$off $sum" >>/tmp/ledger; ok=1
    else
        errs=$((errs + 1)); ok=0; say "IOERR op=write n=$n at=$t0"
    fi
    t1=$(up)
    got=$(dd if=/dev/$data bs=4096 skip=$off count=1 iflag=direct 2>/dev/null | md5sum)
    t2=$(up)
    if [ $ok = 1 ] && [ "${got%% *}" != "$sum" ]; then
        bad=$((bad + 1)); say "MISMATCH n=$n off=$off at=$t1"
    fi
    [ $((t1 - t0)) -ge 100 ] && say "SLOW op=write n=$n cs=$((t1 - t0)) at=$t0"
    [ $((t2 - t1)) -ge 100 ] && say "SLOW op=read n=$n cs=$((t2 - t1)) at=$t1"
done
awk '{ last[$1] = $2 } END { for (o in last) print o, last[o] }' /tmp/ledger |
    while read -r off sum; do echo "MPL LEDGER size=$size off=$off md5=$sum"; done >$con
say "END ops=$n bad=$bad errs=$errs"
"""


def script(seed: int) -> str:
    values = {"@TMO@": TIMEOUT_S, "@SSECTORS@": chaos_guest.SCRIPT_DISK_SIZE // 512,
              "@STOPBLOCK@": chaos_guest.STOP_BLOCK, "@SEED@": seed, "@EVERY@": PROGRESS_EVERY}
    text = _SCRIPT
    for key, value in values.items():
        text = text.replace(key, str(value))
    return text.strip() + "\n"


def qmp(vm: VmDef, command: str, args: dict[str, Any] | None = None) -> Any:
    async def run() -> Any:
        client = QMPClient("test")
        await client.connect(str(vm.run_dir / "mplaunch.sock"))
        try:
            return await client.execute(command, args)
        finally:
            await client.disconnect()
    return asyncio.run(run())


class Watch:
    """The guest's PROGRESS lines and when the host saw each."""

    def __init__(self, m: Mplaunch, vm: VmDef) -> None:
        self.m, self.vm = m, vm
        self.seen: dict[int, float] = {}

    def poll(self) -> int:
        for fields in lines_of(self.vm.console, "PROGRESS"):
            self.seen.setdefault(int(fields["n"]), time.monotonic())
        return max(self.seen, default=-1)

    def until_progress(self, beyond: int, timeout: float, why: str) -> tuple[int, float]:
        """The first PROGRESS past op `beyond`, and when it was seen."""
        deadline = time.monotonic() + timeout
        while (n := self.poll()) <= beyond:
            assert self.m.proc.poll() is None, f"mplaunch ended {why}:\n{self.m.stderr}"
            assert time.monotonic() < deadline, (
                f"the guest's I/O did not move {why} within {timeout} s:\n{self.m.stderr}\n"
                + self.vm.console.read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        return n, self.seen[n]


def serving_pid(vm: VmDef, not_pid: int | None = None, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        [entry] = qmp(vm, "query-emulators")
        if entry["pid"] is not None and entry["pid"] != not_pid and pids_alive([entry["pid"]]):
            return int(entry["pid"])
        assert time.monotonic() < deadline, f"no new remote: {entry}"
        time.sleep(0.05)


def test_remote_killed_frozen_and_restarted_during_guest_io(tmp_path: Path) -> None:
    vm = VmDef(tmp_path, "lsi-recovery", workload="shell")
    vm.emulators = {"lsi-a": {"kind": "lsi", "heartbeat_ms": 100, "hang_timeout_ms": 1000,
                              "restart_burst": 100, "restart_window_s": 1}}
    vm.controllers = {"lsi0": ("lsi-a", 1)}
    vm.disks = [DiskDef("d0", "lsi0", 0, size=DATA_SIZE),
                DiskDef("script", "lsi0", 1, size=chaos_guest.SCRIPT_DISK_SIZE, readonly=True)]
    vm.vm_extra = {"uid_range": "64850-64859"}
    chaos_guest.script_image(vm.image("script"), script(seed=4242))
    vm.extra_append = shell_cmd(chaos_guest.loader())
    m = Mplaunch(vm.write(), console=vm.console)
    watch = Watch(m, vm)
    results: list[dict[str, Any]] = []
    try:
        m.wait_console(r"^MPL READY", timeout=240)
        qemu = int(m.wait_stderr(r"QEMU started \(pid (\d+)\)").group(1))  # not a remote
        n, _ = watch.until_progress(PROGRESS_EVERY, 120, "before the first event")

        events: list[tuple[str, Callable[[int], None]]] = [
            ("SIGKILL", lambda pid: os.kill(pid, signal.SIGKILL)),
            ("SIGSTOP", lambda pid: os.kill(pid, signal.SIGSTOP)),
            ("emulator-restart", lambda pid: qmp(vm, "emulator-restart", {"id": "lsi-a"})),
        ]
        for name, act in events:
            old = serving_pid(vm)
            restarts_before = len(RESTARTED.findall(m.stderr))
            n, _ = watch.until_progress(n, 60, f"before {name}")
            struck = time.monotonic()
            act(old)
            new = serving_pid(vm, not_pid=old)
            m.wait_stderr(rf"emulator lsi-a restarted \(pid {new}, cold start\)", timeout=30)
            stall_ms = float(RESTARTED.findall(m.stderr)[restarts_before][1])
            cold_ms = int([a for a in ATTACHED.findall(m.stderr) if int(a[0]) == new][0][1])
            # I/O resumed: two PROGRESS lines later than the one before the event.
            n1, _ = watch.until_progress(n, RESUME_S, f"after {name}")
            n, resumed = watch.until_progress(n1, RESUME_S, f"after {name}")
            assert pids_alive([qemu]) and not pids_alive([old]), name
            results.append({"event": name, "stall_ms": stall_ms, "cold_start_ms": cold_ms,
                            "io_resumed_s": round(resumed - struck, 1)})
        chaos_guest.stop_boot(vm.image("script"), 1)
        rc = m.wait(240)
    finally:
        if m.proc.poll() is None:
            m.kill_all()
    text = vm.console.read_text(errors="replace")
    assert rc == 0, m.stderr + text[-3000:]
    [end] = lines_of(vm.console, "END")
    slow = [f for f in lines_of(vm.console, "SLOW")]
    klog = [line for line in text.splitlines()
            if line.startswith("MPL KLOG") and not BOOT_TIME_KLOG.search(line)]
    print(f"\nlsi recovery (guest SCSI timeout {TIMEOUT_S} s): {results}")
    print(f"guest: {end}; slow operations: {slow}")
    print("guest kernel log:\n" + "\n".join(klog))
    assert end["bad"] == "0" and not lines_of(vm.console, "MISMATCH"), text[-3000:]
    assert end["errs"] == "0" and not lines_of(vm.console, "IOERR"), text[-3000:]
    assert not [line for line in klog if "ABORT" in line], klog
    assert all(r["io_resumed_s"] < RESUMED_WITHIN_S for r in results), results
    ledger = chaos_guest.ledger(text)
    assert ledger, "no ledger"
    assert chaos_guest.compare_images(ledger, [(DATA_SIZE, vm.image("d0"))]) == []
    assert [r["event"] for r in results] == ["SIGKILL", "SIGSTOP", "emulator-restart"]
    m.assert_nothing_left(vm.run_dir)


def test_remote_killed_at_random_moments_from_firmware_to_io(tmp_path: Path) -> None:
    """SIGKILL of the remote at random moments: while the firmware probes
    the controller, while the guest's driver starts, and during I/O. The
    guest still boots, sees its disks and runs its loop with nothing lost.
    MPL_LSI_SEED replays a run's moments (the seed is printed)."""
    import random

    seed = int(os.environ.get("MPL_LSI_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    print(f"\nMPL_LSI_SEED={seed}")
    vm = VmDef(tmp_path, "lsi-random", workload="shell")
    vm.emulators = {"lsi-a": {"kind": "lsi", "heartbeat_ms": 100, "hang_timeout_ms": 1000,
                              "restart_burst": 100, "restart_window_s": 1}}
    vm.controllers = {"lsi0": ("lsi-a", 1)}
    vm.disks = [DiskDef("d0", "lsi0", 0, size=DATA_SIZE),
                DiskDef("script", "lsi0", 1, size=chaos_guest.SCRIPT_DISK_SIZE, readonly=True)]
    vm.vm_extra = {"uid_range": "64860-64869"}
    chaos_guest.script_image(vm.image("script"), script(seed=seed % 30000))
    vm.extra_append = shell_cmd(chaos_guest.loader())
    m = Mplaunch(vm.write(), console=vm.console)
    watch = Watch(m, vm)
    kills: list[tuple[float, str]] = []
    try:
        m.wait_stderr(r"QEMU started", timeout=120)
        started = time.monotonic()
        # Early: the firmware and the driver's probe (the first seconds under TCG).
        for at in sorted(rng.uniform(0.2, 8.0) for _ in range(3)):
            time.sleep(max(0.0, started + at - time.monotonic()))
            pid = serving_pid(vm)
            os.kill(pid, signal.SIGKILL)
            kills.append((round(time.monotonic() - started, 1), "early"))
            serving_pid(vm, not_pid=pid)
        m.wait_console(r"^MPL READY", timeout=240)
        n, _ = watch.until_progress(0, 120, "after the early kills")
        for _ in range(3):
            time.sleep(rng.uniform(0.0, 3.0))
            pid = serving_pid(vm)
            os.kill(pid, signal.SIGKILL)
            kills.append((round(time.monotonic() - started, 1), "io"))
            serving_pid(vm, not_pid=pid)
            n, _ = watch.until_progress(n, RESUME_S, "after a kill during I/O")
        chaos_guest.stop_boot(vm.image("script"), 1)
        rc = m.wait(240)
    finally:
        if m.proc.poll() is None:
            m.kill_all()
    text = vm.console.read_text(errors="replace")
    print(f"kills (s after QEMU started): {kills}")
    print("guest: " + " ".join(f"{k}={v}" for k, v in lines_of(vm.console, "END")[0].items())
          if lines_of(vm.console, "END") else "guest: no END")
    print("\n".join(line for line in text.splitlines() if line.startswith("MPL KLOG")))
    assert rc == 0, m.stderr + text[-3000:]
    [end] = lines_of(vm.console, "END")
    assert end["bad"] == "0" and end["errs"] == "0", text[-3000:]
    assert chaos_guest.compare_images(chaos_guest.ledger(text),
                                      [(DATA_SIZE, vm.image("d0"))]) == []
    m.assert_nothing_left(vm.run_dir)
