"""The vhost-user subfolder of a run folder: who may reach the sockets of
``--backends-only``, and that nothing else of the folder opens up with it.

The access tests run a real process under a real host account (Debian's
``libvirt-qemu``, whose QEMU connects to the sockets) and one under
``nobody``, against a run folder filled by the code that fills it in
production: the state store, a keeper record, vm-state.json, the QMP and
management sockets and a real holder.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher import keeperrecord
from launcher.holder.client import HolderClient, start_holder
from launcher.libvirt import backend_socket
from launcher.management.server import bind_management_socket
from launcher.qemu import bind_qmp_listener
from launcher.runfolder import (
    FRONTEND_DIR_NAME,
    LOCK_NAME,
    MARKER_NAME,
    RunFolder,
    RunFolderForeign,
    frontend_socket_mode,
)
from launcher.statestore import layout
from launcher.vmstate import VmState

FRONTEND_ACCOUNT = "libvirt-qemu"  # Debian's libvirt runs QEMU as this user and group
OUTSIDER = "nobody"
#: The probes run under other uids, which cannot reach the project's venv.
HOST_PYTHON = "/usr/bin/python3"


def mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def bind_frontend_socket(run: RunFolder, cid: str, gid: int | None) -> socket.socket:
    """What the backend's listener does: bind in the subfolder, then the mode and group."""
    folder = run.frontend_dir(gid)
    path = backend_socket(run.path, cid)
    assert path.parent == folder
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, frontend_socket_mode(gid))
    if gid is not None:
        os.chown(path, -1, gid)
    sock.listen(1)
    return sock


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder every uid may traverse (pytest's own tmp folder is 0700)."""
    with tempfile.TemporaryDirectory(prefix="mplaunch-frontend-", dir="/tmp") as folder:
        os.chmod(folder, 0o755)
        yield Path(folder)


def test_without_a_group_the_subfolder_is_root_only_and_the_folder_unchanged(
        tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    with RunFolder.acquire(path, "vm1") as run:
        before = mode(path)
        folder = run.frontend_dir(None)
        assert folder == path / FRONTEND_DIR_NAME == backend_socket(path, "c0").parent
        assert (mode(folder), mode(path)) == (0o700, before) == (0o700, 0o700)
        assert os.lstat(folder).st_uid == os.geteuid()
        assert frontend_socket_mode(None) == 0o600
        with bind_frontend_socket(run, "c0", None):
            assert mode(backend_socket(path, "c0")) == 0o600
        assert run.frontend_dir(None) == folder  # idempotent: the socket stays
        assert os.listdir(folder) == ["c0.sock"]
    assert not path.exists()


def test_with_a_group_the_subfolder_is_the_groups_and_the_folder_traversable(
        tmp_path: Path) -> None:
    gid = grp.getgrnam("nogroup").gr_gid
    path = tmp_path / "vm1"
    with RunFolder.acquire(path, "vm1") as run:
        folder = run.frontend_dir(gid)
        st = os.lstat(folder)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), gid, 0o710)
        assert mode(path) == 0o711
        assert frontend_socket_mode(gid) == 0o660
        with bind_frontend_socket(run, "c0", gid):
            st = os.lstat(backend_socket(path, "c0"))
            assert stat.S_ISSOCK(st.st_mode)
            assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660)
            assert run.frontend_dir(gid) == folder  # idempotent
            assert (mode(folder), mode(path), os.listdir(folder)) == (0o710, 0o711, ["c0.sock"])
    assert not path.exists()


def test_the_management_group_keeps_its_folder_group_under_0711(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    with RunFolder.acquire(path, "vm1", group=1) as run:
        run.frontend_dir(grp.getgrnam("nogroup").gr_gid)
        st = os.lstat(path)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (1, 0o711)


def test_a_symlink_or_a_file_in_the_subfolders_place_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    path = tmp_path / "vm1"
    with RunFolder.acquire(path, "vm1") as run:
        (path / FRONTEND_DIR_NAME).symlink_to(target)
        with pytest.raises(RunFolderForeign, match="not a folder"):
            run.frontend_dir(grp.getgrnam("nogroup").gr_gid)
        assert (mode(target), mode(path)) == (0o755, 0o700)  # neither followed nor opened
    assert target.is_dir() and not path.exists()  # the symlink went, its target stayed


def test_a_subfolder_of_another_owner_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    with RunFolder.acquire(path, "vm1") as run:
        (path / FRONTEND_DIR_NAME).mkdir(mode=0o777)
        os.chown(path / FRONTEND_DIR_NAME, 65534, 65534)
        with pytest.raises(RunFolderForeign, match="belongs to uid 65534"):
            run.frontend_dir(None)


def test_cleanup_keeps_a_subfolder_holding_someone_elses_file(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    with RunFolder.acquire(path, "vm1") as run:
        folder = run.frontend_dir(None)
        (folder / "c0.sock").write_text("")
        (folder / ".c1.sock.1234").write_text("")
        (folder / "notes.txt").write_text("mine")
    assert os.listdir(path) == [FRONTEND_DIR_NAME]
    assert os.listdir(path / FRONTEND_DIR_NAME) == ["notes.txt"]


def test_an_adopted_folder_is_opened_for_the_group_and_given_back_its_mode(
        tmp_path: Path) -> None:
    path = tmp_path / "mine"
    path.mkdir()
    os.chmod(path, 0o750)
    with RunFolder.acquire(path, "vm1") as run:
        assert not run.made_folder
        run.frontend_dir(grp.getgrnam("nogroup").gr_gid)
        assert mode(path) == 0o751  # search for others added, nothing taken
    assert (os.listdir(path), mode(path)) == ([], 0o750)


def test_a_stale_folder_with_a_subfolder_is_cleaned_and_closed_again(tmp_path: Path) -> None:
    """An owner that died between opening the folder and removing it: the
    next start takes the folder back, subfolder, sockets, 0711 and all."""
    path = tmp_path / "vm1"
    gid = grp.getgrnam("nogroup").gr_gid
    code = (
        "import os, socket; from pathlib import Path; from launcher.runfolder import RunFolder;"
        f"r = RunFolder.acquire(Path({str(path)!r}), 'vm1'); f = r.frontend_dir({gid});"
        "s = socket.socket(socket.AF_UNIX); s.bind(str(f / 'c0.sock'));"
        "print('serving', flush=True); os.kill(os.getpid(), 9)")
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert dead.returncode == -signal.SIGKILL and dead.stdout == "serving\n", dead.stderr
    assert (mode(path), os.listdir(path / FRONTEND_DIR_NAME)) == (0o711, ["c0.sock"])
    with RunFolder.acquire(path, "vm1") as run:
        assert run.stale_cleaned
        assert sorted(os.listdir(path)) == [MARKER_NAME, LOCK_NAME]
        assert mode(path) == 0o700  # the dead owner's 0711 is gone with it
    assert not path.exists()


def test_re_adoption_through_the_holder_accepts_the_subfolder(tmp_path: Path) -> None:
    """A launcher that re-attaches adopts the folder (its lock fd back from the
    holder) as it is, and may ask for the subfolder again."""
    path = tmp_path / "vm1"
    gid = grp.getgrnam("nogroup").gr_gid
    first = RunFolder.acquire(path, "vm1")
    folder = first.frontend_dir(gid)
    (folder / "c0.sock").write_text("")
    lock = os.dup(first.lock_fd)  # the copy the holder keeps
    first.release_lock_only()
    assert (mode(path), os.listdir(folder)) == (0o711, ["c0.sock"])
    with RunFolder.adopt(path, "vm1", lock) as again:
        assert again.frontend_dir(gid) == folder
        assert (mode(path), mode(folder), os.listdir(folder)) == (0o711, 0o710, ["c0.sock"])
    assert not path.exists()


# --- who reaches what, as real accounts ----------------------------------------


def account(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"needs the host account {name!r} (Debian's libvirt-daemon-system makes "
                    "libvirt-qemu)")


def as_user(user: pwd.struct_passwd, code: str) -> str:
    """Run ``code`` under ``user`` with its groups, as QEMU under libvirt would."""
    if not os.access(HOST_PYTHON, os.X_OK):
        pytest.skip(f"needs {HOST_PYTHON} (the probes run as other uids, outside the venv)")
    groups = [g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem]
    done = subprocess.run([HOST_PYTHON, "-I", "-c", code], capture_output=True, text=True,
                          user=user.pw_uid, group=user.pw_gid, extra_groups=groups,
                          timeout=30, cwd="/")
    assert done.returncode == 0, done.stderr
    return done.stdout


PROBE = """
import os, socket
def probe(how, path):
    try:
        if how == "connect":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET if path.endswith("holder.sock")
                              else socket.SOCK_STREAM)
            s.connect(path)
            s.close()
        elif how == "list":
            os.listdir(path)
        else:
            os.close(os.open(path, os.O_RDONLY))
        return "ok"
    except OSError as e:
        return e.__class__.__name__
"""


def probe(user: pwd.struct_passwd, checks: list[tuple[str, Path]]) -> dict[tuple[str, str], str]:
    code = PROBE + "".join(f"print({how!r}, {str(path)!r}, probe({how!r}, {str(path)!r}))\n"
                           for how, path in checks)
    out: dict[tuple[str, str], str] = {}
    for line in as_user(user, code).splitlines():
        how, path, result = line.split(" ")
        out[(how, Path(path).name)] = result
    return out


def test_the_group_reaches_the_vhost_user_sockets_and_nothing_else(base: Path) -> None:
    asyncio.run(_group_reaches_the_sockets_only(base))


async def _group_reaches_the_sockets_only(base: Path) -> None:
    frontend = account(FRONTEND_ACCOUNT)
    outsider = account(OUTSIDER)
    gid = grp.getgrnam(FRONTEND_ACCOUNT).gr_gid
    path = base / "vm1"
    with RunFolder.acquire(path, "vm1", group=grp.getgrnam("daemon").gr_gid) as run:
        # Every entry mplaunch puts there, made by the code that makes it.
        os.close(layout.create(run.state_file("e0"), layout.Layout(1, 3, 1)))
        keeperrecord.write_atomically(run.keeper_record("e0", "c0"), b"record")
        VmState(spec_path="/x.toml", spec_text="", accel="tcg", started=1.0).save(
            run.vm_state_file)
        holder = await start_holder(str(run.holder_sock))
        qmp = bind_qmp_listener(run.qemu_sock)
        management = bind_management_socket(run.mplaunch_sock, group="daemon")
        vhost = bind_frontend_socket(run, "c0", gid)
        try:
            entries = sorted(os.listdir(path))
            assert entries == sorted([LOCK_NAME, MARKER_NAME, "state-e0.bin", "keeper-e0-c0.rec",
                                      "vm-state.json", "holder.sock", "qemu.sock",
                                      "mplaunch.sock", FRONTEND_DIR_NAME])
            for name in entries:  # root's, and closed to others
                st = os.lstat(path / name)
                assert st.st_uid == 0, name
                assert stat.S_IMODE(st.st_mode) & 0o007 == 0, (name, oct(st.st_mode))
                if name not in ("mplaunch.sock", FRONTEND_DIR_NAME):
                    assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (name, oct(st.st_mode))
            assert mode(path) == 0o711
            checks = [("connect", backend_socket(path, "c0")), ("list", path),
                      ("list", path / FRONTEND_DIR_NAME)]
            checks += [("connect", path / n) for n in ("qemu.sock", "mplaunch.sock",
                                                        "holder.sock")]
            checks += [("open", path / n) for n in ("state-e0.bin", "keeper-e0-c0.rec",
                                                     "vm-state.json", LOCK_NAME, MARKER_NAME)]
            seen = probe(frontend, checks)
            assert seen.pop(("connect", "c0.sock")) == "ok"
            assert set(seen.values()) == {"PermissionError"}, seen
            seen = probe(outsider, checks)
            assert set(seen.values()) == {"PermissionError"}, seen
        finally:
            vhost.close()
            qmp.close()
            management.close()
            client, _ = await HolderClient.connect(str(run.holder_sock))
            await client.shutdown()
            await asyncio.wait_for(holder.wait(), 5)
    assert not path.exists()
