"""The run folder: one live owner, stale ones cleaned, always removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.runfolder import LOCK_NAME, RunFolder, RunFolderBusy


def test_acquire_creates_and_release_removes(tmp_path: Path) -> None:
    path = tmp_path / "run" / "vm1"
    with RunFolder.acquire(path) as run:
        assert path.is_dir()
        assert (path / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert run.qemu_sock == path / "qemu.sock"
        assert not run.stale_cleaned
    assert not path.exists()


def test_a_live_owner_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    with RunFolder.acquire(path):
        with pytest.raises(RunFolderBusy, match="already running"):
            RunFolder.acquire(path)
        assert path.is_dir()


def test_a_live_owner_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    code = (
        "import sys, time; from pathlib import Path; from launcher.runfolder import RunFolder;"
        f"r = RunFolder.acquire(Path({str(path)!r})); print('held', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy) as info:
            RunFolder.acquire(path)
        assert str(holder.pid) in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its folder is now stale.
    (path / "leftover.sock").write_text("")
    with RunFolder.acquire(path) as run:
        assert run.stale_cleaned
        assert not (path / "leftover.sock").exists()
