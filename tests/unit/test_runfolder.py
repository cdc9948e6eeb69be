"""The run folder: one live owner, stale ones cleaned, and only what mplaunch made removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.migration.source import STATE_SENT_MARK
from launcher.runfolder import (
    LOCK_NAME,
    MARKER_NAME,
    Marker,
    RunFolder,
    RunFolderBusy,
    RunFolderForeign,
    foreign_problem,
)

REPO = Path(__file__).resolve().parents[2]


def test_acquire_creates_and_release_removes(tmp_path: Path) -> None:
    path = tmp_path / "run" / "vm1"
    with RunFolder.acquire(path, "vm1") as run:
        assert path.is_dir()
        assert (path / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert Marker.parse((path / MARKER_NAME).read_bytes()) == Marker("vm1", True)
        assert run.qemu_sock == path / "qemu.sock"
        assert not run.stale_cleaned
    assert not path.exists()


def test_a_live_owner_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    with RunFolder.acquire(path, "vm1"):
        with pytest.raises(RunFolderBusy, match="already running"):
            RunFolder.acquire(path, "vm1")
        assert path.is_dir()


def test_a_live_owner_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    code = (
        "import sys, time; from pathlib import Path; from launcher.runfolder import RunFolder;"
        f"r = RunFolder.acquire(Path({str(path)!r}), 'vm1'); print('held', flush=True); "
        "time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy) as info:
            RunFolder.acquire(path, "vm1")
        assert str(holder.pid) in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its folder is now stale. Only what
    # mplaunch makes there is removed; a file someone put there stays.
    (path / "leftover.sock").write_text("")
    (path / "state-e0.bin").write_text("")
    (path / STATE_SENT_MARK).write_text("")  # a source that died while migrating
    (path / "notes.txt").write_text("mine")
    with RunFolder.acquire(path, "vm1") as run:
        assert run.stale_cleaned
        assert not (path / "leftover.sock").exists()
        assert not (path / "state-e0.bin").exists()
        assert not (path / STATE_SENT_MARK).exists()
        assert (path / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(path)) == ["notes.txt"]


def test_a_folder_of_someone_elses_files_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "home"
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    (path / "qemu.sock").write_text("not a socket of ours")
    before = sorted(os.listdir(path))
    with pytest.raises(RunFolderForeign) as info:
        RunFolder.acquire(path, "vm1")
    assert "did not make" in str(info.value) and str(path) in str(info.value)
    assert sorted(os.listdir(path)) == before
    assert (path / "thesis.tex").read_text() == "years of work"


def test_the_run_folder_of_another_vm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with RunFolder.acquire(path, "vm1"), pytest.raises(RunFolderForeign, match='"vm1", not'):
        RunFolder.acquire(path, "vm2")


def test_an_empty_folder_is_adopted_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "mine"
    path.mkdir()
    with RunFolder.acquire(path, "vm1") as run:
        assert not run.made_folder
        (run.qemu_sock).write_text("")
    assert path.is_dir() and os.listdir(path) == []


def test_exit_cleanup_keeps_what_mplaunch_did_not_make(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with RunFolder.acquire(path, "vm1") as run:
        run.state_file("e0").write_text("")
        (path / "dropped-in.txt").write_text("someone's")
        (path / "sub.sock").mkdir()  # a folder by one of our names is not ours
    assert sorted(os.listdir(path)) == ["dropped-in.txt", "sub.sock"]


def test_a_symlinked_run_folder_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(RunFolderForeign, match="not a folder"):
        RunFolder.acquire(link, "vm1")
    assert os.listdir(target) == []


def test_foreign_problem(tmp_path: Path) -> None:
    assert foreign_problem(tmp_path / "missing", "vm1") is None
    assert foreign_problem(tmp_path, "vm1") is None  # empty
    (tmp_path / "a.txt").write_text("")
    problem = foreign_problem(tmp_path, "vm1")
    assert problem is not None and '"a.txt"' in problem and MARKER_NAME in problem


def _spec_with_run_dir(folder: Path, run_dir: Path) -> Path:
    spec = folder / "vm.toml"
    spec.write_text(f'[vm]\nname = "vm1"\nconsole = "none"\nrun_dir = "{run_dir}"\n')
    return spec


def test_check_and_start_refuse_a_folder_of_someone_elses_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("precious")
    spec = _spec_with_run_dir(tmp_path, home)
    expected = (f'{spec}: [vm] run_dir = "{home}": the folder holds files mplaunch did not '
                f'make ("keep.txt") and no {MARKER_NAME} marker; it was left untouched: name '
                "a new or an empty folder")
    assert main(["--check", str(spec)]) == 1
    assert capsys.readouterr().err.splitlines() == [expected]
    started = subprocess.run([sys.executable, "-m", "launcher", str(spec)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 1
    assert expected in started.stderr.splitlines()
    assert os.listdir(home) == ["keep.txt"] and (home / "keep.txt").read_text() == "precious"


def test_a_made_folder_lets_the_management_group_through(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with RunFolder.acquire(path, "vm1", group=1):
        st = path.stat()
        assert (st.st_gid, st.st_mode & 0o777) == (1, 0o710)
