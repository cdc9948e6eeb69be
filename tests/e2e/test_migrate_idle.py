"""Live migration between two real mplaunch instances on one host: an idle
guest moves, the source exits 0 with nothing left, and the guest goes on
answering at the destination (console ticks, then a disk read-back through
the destination's emulator). The write-verify runs across several
migrations, the fault cases and the benchmark are tests/e2e/test_migration.py
and bench/migration.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.vm import REPO, DiskDef, Mplaunch, VmDef, lines_of, shell_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("guest")]

TICKS = 60
GUEST = (
    f"i=0; while [ $i -lt {TICKS} ]; do i=$((i+1)); "
    "echo \"MPL TICK n=$i\" >/dev/console; sleep 1; done; "
    "dd if=/dev/urandom of=/tmp/p bs=4096 count=16 2>/dev/null; "
    "dd if=/tmp/p of=/dev/sda bs=4096 count=16 seek=64 2>/dev/null; sync; "
    "echo 3 >/proc/sys/vm/drop_caches; "
    "a=$(md5sum </tmp/p); b=$(dd if=/dev/sda bs=4096 count=16 skip=64 2>/dev/null | md5sum); "
    "[ \"$a\" = \"$b\" ] && echo verify=ok || echo verify=bad"
)


def destination_spec(source: VmDef, folder: Path, name: str) -> tuple[Path, Path]:
    """The source's spec with another name, run folder and console: the same
    image files (shared storage)."""
    folder.mkdir()
    console = folder / "console.log"
    text = source.spec_path.read_text()
    text = re.sub(r'(?m)^name = ".*"$', f'name = "{name}"', text, count=1)
    text = re.sub(r'(?m)^run_dir = ".*"$', f'run_dir = "{folder / "run"}"', text, count=1)
    text = re.sub(r'(?m)^console = ".*"$', f'console = "{console}"', text, count=1)
    spec = folder / "vm.toml"
    spec.write_text(text)
    return spec, console


def ticking_pair(tmp_path: Path, launchers: list[Mplaunch], name: str
                 ) -> tuple[VmDef, Mplaunch, Mplaunch, Path, str]:
    """A source whose guest ticks (512 MiB of RAM: a RAM copy long enough to
    act during), and a destination waiting on a unix: URI: (the source's VM,
    its mplaunch, the destination's, the destination's console, the URI)."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    vm = VmDef(src_dir, name, workload="shell", extra_append=shell_cmd(GUEST),
               disks=[DiskDef("d0", "scsi0", 0)], controllers={"scsi0": ("disk-proc", 1)},
               emulators={"disk-proc": {"kind": "scsi"}}, memory="512M")
    source = Mplaunch(vm.write(), console=vm.console)
    launchers.append(source)
    source.wait_console(r"^MPL TICK n=2$", 180)
    spec, console = destination_spec(vm, tmp_path / "dst", f"{name}-dst")
    uri = f"unix:{tmp_path / 'migrate.sock'}"
    dest = Mplaunch(spec, "--incoming", uri, console=console)
    launchers.append(dest)
    dest.wait_stderr("incoming migration: waiting on", 60)
    return vm, source, dest, console, uri


def ticks(console: Path) -> list[int]:
    return [int(f["n"]) for f in lines_of(console, "TICK")]


def test_an_idle_guest_moves_and_answers_at_the_destination(
        tmp_path: Path, launchers: list[Mplaunch]) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    vm = VmDef(src_dir, "mig-idle-src", workload="shell", extra_append=shell_cmd(GUEST),
               disks=[DiskDef("d0", "scsi0", 0)], controllers={"scsi0": ("disk-proc", 1)},
               emulators={"disk-proc": {"kind": "scsi"}})
    source = Mplaunch(vm.write(), console=vm.console)
    launchers.append(source)
    source.wait_console(r"^MPL TICK n=2$", 180)

    spec, console = destination_spec(vm, tmp_path / "dst", "mig-idle-dst")
    uri = f"unix:{tmp_path / 'migrate.sock'}"
    dest = Mplaunch(spec, "--incoming", uri, console=console)
    launchers.append(dest)
    dest.wait_stderr(r"incoming migration: waiting on " + re.escape(uri), 60)

    mpctl = subprocess.run(
        [sys.executable, "-m", "launcher.mpctl", "migrate", str(vm.run_dir / "mplaunch.sock"),
         uri], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert mpctl.returncode == 0, (f"{mpctl.stdout}\n{mpctl.stderr}\n--- source:\n"
                                   f"{source.stderr}\n--- destination:\n{dest.stderr}")
    assert "completed" in mpctl.stdout.splitlines()[-1]

    assert source.wait(60) == 0, source.stderr
    assert "migration to " + uri + ": completed" in source.stderr
    source.assert_nothing_left(vm.run_dir)
    last_at_source = max(ticks(vm.console))

    for line in ("source VM mig-idle-src accepted (1 disks, sizes match)",
                 "QEMU's stream arrived", "RAM and devices received",
                 "emulator disk-proc restarted from the source's state", "guest running"):
        assert "incoming migration: " + line in dest.stderr, dest.stderr
    # The guest goes on where it was: the next ticks, then its disk through the
    # destination's emulator, then it powers off and the destination exits 0.
    dest.wait_console(rf"^MPL TICK n={last_at_source + 1}$", 60)
    # The destination's launcher is now a plain one: it can be upgraded (exec'd
    # with the same arguments, --incoming included) and re-attaches.
    dest_sock = str(tmp_path / "dst" / "run" / "mplaunch.sock")
    upgrade = subprocess.run([sys.executable, "-m", "launcher.mpctl", "upgrade", dest_sock],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert upgrade.returncode == 0, (upgrade.stdout, upgrade.stderr, dest.stderr)
    dest.wait_stderr("the VM arrived already; re-attaching to it", 30)
    dest.wait_stderr(r"re-attached to VM mig-idle-dst", 30)
    dest.wait_console(rf"^MPL TICK n={last_at_source + 4}$", 60)
    dest.wait_console(r"^MPL DONE workload=shell rc=0", 180)
    assert ticks(console)[0] == last_at_source + 1
    assert "MPL OUT verify=ok" in console.read_text(), console.read_text()
    assert not lines_of(console, "BOOT")  # it did not boot again
    assert dest.wait(60) == 0, dest.stderr
    dest.assert_nothing_left(tmp_path / "dst" / "run")
    print(f"--- source:\n{source.stderr}\n--- destination:\n{dest.stderr}")  # with -s


def test_a_size_mismatch_is_refused_and_the_source_runs_on(
        tmp_path: Path, launchers: list[Mplaunch]) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    vm = VmDef(src_dir, "mig-size-src", workload="shell",
               extra_append=shell_cmd("sleep 600"), disks=[DiskDef("d0", "scsi0", 0)],
               controllers={"scsi0": ("disk-proc", 1)}, emulators={"disk-proc": {"kind": "scsi"}})
    source = Mplaunch(vm.write(), console=vm.console)
    launchers.append(source)
    source.wait_console(r"^MPL BOOT", 180)
    spec, console = destination_spec(vm, tmp_path / "dst", "mig-size-dst")
    other = tmp_path / "dst" / "d0.img"
    os_size = 16 * 1024 * 1024
    with open(other, "wb") as f:
        f.truncate(os_size)
    spec.write_text(spec.read_text().replace(str(vm.image("d0")), str(other)))
    uri = f"unix:{tmp_path / 'migrate.sock'}"
    dest = Mplaunch(spec, "--incoming", uri, console=console)
    launchers.append(dest)
    dest.wait_stderr("incoming migration: waiting on", 60)
    mpctl = subprocess.run(
        [sys.executable, "-m", "launcher.mpctl", "migrate", str(vm.run_dir / "mplaunch.sock"),
         uri], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert mpctl.returncode == 1
    want = f"disk d0: {os_size} bytes here, {8 * 1024 * 1024} at the source"
    assert want in mpctl.stderr, mpctl.stderr
    assert dest.wait(60) == 1
    assert want in dest.stderr
    dest.assert_nothing_left(tmp_path / "dst" / "run")
    assert source.proc.poll() is None  # runs on
    status = subprocess.run(
        [sys.executable, "-m", "launcher.mpctl", "--json", "status",
         str(vm.run_dir / "mplaunch.sock")], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert '"running": true' in status.stdout, status.stdout


def test_a_destination_whose_launcher_dies_before_its_guest_ran_leaves_nothing_running(
        tmp_path: Path, launchers: list[Mplaunch]) -> None:
    """Its holder would keep QEMU for a re-attaching launcher; a guest that
    never ran has nothing to keep, so the holder stops everything."""
    import signal
    import time

    import psutil

    vm = VmDef(tmp_path, "mig-tether-dst", disks=[DiskDef("d0", "scsi0", 0)],
               controllers={"scsi0": ("disk-proc", 1)}, emulators={"disk-proc": {"kind": "scsi"}})
    dest = Mplaunch(vm.write(), "--incoming", f"unix:{tmp_path / 'm.sock'}", console=vm.console)
    launchers.append(dest)
    dest.wait_stderr("incoming migration: waiting on", 60)
    qemu = dest.qemu_pid()
    everything = {p.pid for p in dest.descendants()}
    dest.signal(signal.SIGKILL)
    dest.proc.wait(10)
    deadline = time.monotonic() + 15
    alive = everything
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in everything if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.1)
    assert not alive, f"left running after the launcher died: {alive} (QEMU {qemu})"
    assert not vm.console.exists() or "MPL BOOT" not in vm.console.read_text()


def test_the_source_launcher_killed_mid_migration_leaves_the_guest_running_here(
        tmp_path: Path, launchers: list[Mplaunch]) -> None:
    """The state channel dies with the source's launcher: the destination
    exits 1 with its guest never run, and the source's guest (kept by its
    holder) runs on; the launcher run again re-attaches to it."""
    import json
    import signal

    vm, source, dest, console, uri = ticking_pair(tmp_path, launchers, "mig-srcdeath")
    sock = str(vm.run_dir / "mplaunch.sock")
    mpctl = subprocess.Popen([sys.executable, "-m", "launcher.mpctl", "migrate", sock, uri],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    source.wait_stderr(r"migration to .*: active", 60)
    source.signal(signal.SIGKILL)
    source.proc.wait(10)
    mpctl.communicate(timeout=60)
    assert mpctl.returncode == 1
    assert dest.wait(60) == 1, dest.stderr
    assert "the source closed the state channel before its state arrived" in dest.stderr
    assert not lines_of(console, "TICK")  # that guest never ran
    dest.assert_nothing_left(tmp_path / "dst" / "run")
    # Run again, the source's mplaunch attaches to its VM, whose guest runs on.
    again = Mplaunch(vm.spec_path, console=vm.console)
    launchers.append(again)
    again.wait_stderr("re-attached to VM mig-srcdeath", 60)
    status = subprocess.run([sys.executable, "-m", "launcher.mpctl", "--json", "status", sock],
                            capture_output=True, text=True, cwd=REPO, timeout=30)
    assert json.loads(status.stdout)["running"] is True, (status.stdout, again.stderr)
    last = max(ticks(vm.console))
    again.wait_console(rf"^MPL TICK n={last + 2}$", 60)
    again.signal(signal.SIGTERM)
    assert again.wait(60) == 0, again.stderr


def test_a_migration_cancelled_during_the_ram_copy_leaves_the_guest_running_here(
        tmp_path: Path, launchers: list[Mplaunch]) -> None:
    """`migrate_cancel` on mplaunch.sock while QEMU copies RAM: status and
    event `cancelled`, the source guest runs on, and the destination, whose
    guest never ran, exits 1 with nothing left."""
    import asyncio

    from qemu.qmp import QMPClient

    vm, source, dest, console, uri = ticking_pair(tmp_path, launchers, "mig-cancel")

    async def cancel() -> tuple[dict[str, object], list[str]]:
        client = QMPClient("test")
        await client.connect(str(vm.run_dir / "mplaunch.sock"))
        statuses: list[str] = []
        try:
            with client.listener("MIGRATION") as events:
                await client.execute("migrate", {"uri": uri})
                async with asyncio.timeout(60):
                    while (await client.execute("query-migrate")).get("phase") != "ram":
                        await asyncio.sleep(0.02)
                await client.execute("migrate_cancel")
                async with asyncio.timeout(60):
                    while not statuses or statuses[-1] not in ("cancelled", "failed",
                                                               "completed"):
                        statuses.append((await events.get())["data"]["status"])
            return await client.execute("query-migrate"), statuses
        finally:
            await client.disconnect()

    answer, statuses = asyncio.run(cancel())
    assert answer["status"] == "cancelled", (answer, statuses, source.stderr)
    assert statuses[-1] == "cancelled", statuses
    assert dest.wait(60) == 1, dest.stderr
    assert not lines_of(console, "TICK")  # that guest never ran
    dest.assert_nothing_left(tmp_path / "dst" / "run")
    assert source.proc.poll() is None
    last = max(ticks(vm.console))
    source.wait_console(rf"^MPL TICK n={last + 2}$", 60)  # runs on here
    assert "cancelled" in source.stderr
