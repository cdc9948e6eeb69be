"""Run mplaunch on a spec as a user would, and read what the guest said.

Every end-to-end test goes through this: it writes a spec in a temporary
folder, starts `python -m launcher SPEC` as a child, follows its stderr and
the guest's console file, and afterwards proves that nothing is left behind
(no child process, no run folder).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "build" / "guest"
LSI_GUEST_DIR = REPO / "build" / "guest-lsi"
#: What a guest of an lsi emulator needs under TCG (launcher.spec.LSI_POLLING_APPEND).
LSI_POLLING = "irqpoll nolapic noapic"
MPL_LINE = re.compile(r"^MPL (\w+)(?: (.*))?$")


def need_qemu() -> str | None:
    """Why an end-to-end test cannot run here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (scripts/setup installs qemu-system-x86)"
    return None


def ensure_guest_built(flavour: str = "cloud") -> tuple[Path, Path]:
    """Kernel and initrd of a guest flavour: ``cloud`` (the default), ``lsi``
    (Debian's standard kernel, whose initramfs also loads sym53c8xx) or
    ``bench`` (the cloud guest with fio)."""
    from launcher.guest.builder import FLAVOURS, ensure_guest

    folder = REPO / "build" / FLAVOURS[flavour].folder
    image = ensure_guest(folder, flavour=FLAVOURS[flavour])
    return image.kernel, image.initrd


def ensure_lsi_guest_built() -> tuple[Path, Path]:
    """Kernel and initrd of the guest that can drive an LSI53C895A."""
    return ensure_guest_built("lsi")


@dataclass
class DiskDef:
    id: str
    controller: str
    lun: int
    size: int = 8 * 1024 * 1024
    readonly: bool = False
    block_size: int = 512


@dataclass
class VmDef:
    """A VM for a test; `write()` renders it as TOML next to its images."""

    folder: Path
    name: str
    workload: str = "boot"
    extra_append: str = ""
    disks: list[DiskDef] = field(default_factory=list)
    # controller id -> (emulator id, queues)
    controllers: dict[str, tuple[str, int]] = field(default_factory=dict)
    emulators: dict[str, dict[str, object]] = field(default_factory=dict)
    memory: str = "256M"
    vm_extra: dict[str, object] = field(default_factory=dict)
    #: The guest flavour; None: "lsi" if an emulator is of kind "lsi", else "cloud".
    guest: str | None = None

    @property
    def has_lsi(self) -> bool:
        return any(fields.get("kind") == "lsi" for fields in self.emulators.values())

    @property
    def spec_path(self) -> Path:
        return self.folder / "vm.toml"

    @property
    def console(self) -> Path:
        return self.folder / "console.log"

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    def image(self, disk_id: str) -> Path:
        return self.folder / f"{disk_id}.img"

    def write(self) -> Path:
        kernel, initrd = ensure_guest_built(self.guest or ("lsi" if self.has_lsi else "cloud"))
        append = f"console=ttyS0 quiet panic=-1 mitigations=off mpl.workload={self.workload}"
        if self.disks:
            append += f" mpl.disks={len(self.disks)}"
        if self.extra_append:
            append += " " + self.extra_append
        if self.has_lsi and "irqpoll" not in append.split():
            append += " " + LSI_POLLING  # TCG: the proxy's interrupts never arrive
        lines = [
            "[vm]",
            f'name = "{self.name}"',
            f'memory = "{self.memory}"',
            'accel = "tcg"',
            f'kernel = "{kernel}"',
            f'initrd = "{initrd}"',
            f'append = "{append}"',
            f'console = "{self.console}"',
            f'run_dir = "{self.run_dir}"',
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in self.vm_extra.items()]
        for emu_id, fields in self.emulators.items():
            lines += ["", "[[emulator]]", f'id = "{emu_id}"']
            lines += [f"{k} = {_toml(v)}" for k, v in fields.items()]
        for ctl_id, (emu_id, queues) in self.controllers.items():
            lines += ["", "[[controller]]", f'id = "{ctl_id}"', f'emulator = "{emu_id}"']
            if self.emulators.get(emu_id, {}).get("kind") != "lsi":  # an LSI has no queues
                lines.append(f"queues = {queues}")
        for d in self.disks:
            path = self.image(d.id)
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(d.size)
            lines += ["", "[[disk]]", f'id = "{d.id}"', f'controller = "{d.controller}"',
                      f"lun = {d.lun}", f'image = "{path}"', f"readonly = {_toml(d.readonly)}",
                      f"block_size = {d.block_size}"]
        self.spec_path.write_text("\n".join(lines) + "\n")
        return self.spec_path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return f'"{value}"'


def shell_cmd(command: str) -> str:
    return "mpl.cmd=" + base64.b64encode(command.encode()).decode()


class Mplaunch:
    """A running `mplaunch SPEC` child, with its stderr collected in a thread."""

    def __init__(self, spec: Path, *args: str, console: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.console = console
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", *args, str(spec)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO, env=env,
        )
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.seen_descendants: set[int] = set()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def descendants(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen_descendants.update(p.pid for p in found)
        return found

    def qemu_pid(self) -> int:
        for p in self.descendants():
            try:
                if "qemu-system" in p.name():
                    return p.pid
            except psutil.NoSuchProcess:
                continue
        raise AssertionError("no QEMU child")

    def wait_stderr(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.descendants()
            for line in list(self.stderr_lines):
                if m := rx.search(line):
                    return m
            if self.proc.poll() is not None:
                self._reader.join(2)
                for line in self.stderr_lines:
                    if m := rx.search(line):
                        return m
                raise AssertionError(f"mplaunch exited before /{pattern}/:\n{self.stderr}")
            time.sleep(0.05)
        raise AssertionError(f"no /{pattern}/ on mplaunch's stderr in {timeout} s:\n{self.stderr}")

    def wait_console(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        assert self.console is not None
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.descendants()
            text = self.console.read_text(errors="replace") if self.console.exists() else ""
            if m := rx.search(text):
                return m
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mplaunch exited before /{pattern}/ on the console:\n{self.stderr}\n{text}")
            time.sleep(0.1)
        raise AssertionError(f"no /{pattern}/ on the console in {timeout} s:\n{self.stderr}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 180) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"mplaunch did not exit in {timeout} s:\n{self.stderr}") from None
        self._reader.join(5)
        return rc

    def kill_all(self) -> None:
        for p in self.descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.kill()
        self.proc.wait()

    def assert_nothing_left(self, run_dir: Path) -> None:
        """No process mplaunch ever started is alive, and its run folder is gone."""
        alive = []
        for pid in self.seen_descendants:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                continue
        assert not alive, f"left running: {alive}"
        assert not run_dir.exists(), f"run folder {run_dir} left behind: {os.listdir(run_dir)}"


def mpl_lines(console: Path) -> list[tuple[str, dict[str, str], str]]:
    """The guest's report lines: (kind, key=value fields, raw rest)."""
    out = []
    text = console.read_text(errors="replace") if console.exists() else ""
    for line in text.splitlines():
        m = MPL_LINE.match(line.strip())
        if m:
            rest = m.group(2) or ""
            fields = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
            out.append((m.group(1), fields, rest))
    return out


def lines_of(console: Path, kind: str) -> list[dict[str, str]]:
    return [f for k, f, _ in mpl_lines(console) if k == kind]


def run_to_end(vm: VmDef, timeout: float = 240, args: Sequence[str] = ()) -> tuple[int, Mplaunch]:
    m = Mplaunch(vm.write(), *args, console=vm.console)
    rc = m.wait(timeout)
    return rc, m


def stop_launchers(launchers: Iterable[Mplaunch]) -> None:
    """Kill every mplaunch of `launchers` still running and whatever they were
    seen to start (a test's end, or a test that starts over)."""
    launchers = list(launchers)
    for m in launchers:
        if m.proc.poll() is None:
            m.kill_all()
    for m in launchers:
        for pid in pids_alive(m.seen_descendants):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def pids_alive(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
