"""The VM's run folder: the one place that says whether an instance is alive.

A folder per VM holds the management sockets and the state store files. The
lock file inside it is held (flock) for the whole life of the mplaunch that
owns the VM, so "is an instance alive" is answered by the kernel, not by a
pid that may have been reused.

mplaunch only ever removes what it made. A run folder carries a marker file
of its own (``.mplaunch-run``, naming the VM and whether mplaunch made the
folder itself). The rules:

- a missing folder is made (and removed again at exit);
- an existing empty folder is adopted: its contents are removed at exit,
  the folder stays;
- an existing folder with the marker of the same VM and no live owner is
  stale: the files mplaunch makes there (see ``OWN_PATTERNS``) are removed,
  nothing else;
- any other non-empty folder is refused (``RunFolderForeign``) and left
  untouched, as is a folder another live mplaunch holds (``RunFolderBusy``).

Cleanup never follows a symlink: it unlinks entries whose names mplaunch
uses, relative to a descriptor of the folder itself. It goes one level down
in one place only: the ``vhost-user`` subfolder (``frontend_dir``), where
it unlinks the sockets and then removes the subfolder if it is empty.

Who may enter. Everything mplaunch puts in the run folder itself is 0600
root (the management socket 0660 root:management_group), so the folder's
own mode is the only gate that ever opens: 0700 by default, 0710 for a
management group. The vhost-user sockets a QEMU started by someone else
connects to live one level down; with a front-end group (``[vm]
frontend_group``) that subfolder is root:GROUP 0710, each socket 0660, and
the run folder becomes 0711: traversable by anyone, listable by no one, and
every entry in it still closed to others. A member of the group reaches the
sockets (a front-end's power, which the session keeper's admission checks)
and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

LOCK_NAME = "mplaunch.lock"
MARKER_NAME = ".mplaunch-run"
HOLDER_SOCK_NAME = "holder.sock"
VM_STATE_NAME = "vm-state.json"
#: Every name mplaunch gives an entry of a run folder; cleanup removes only these.
OWN_PATTERNS = (LOCK_NAME, MARKER_NAME,
                "*.sock",  # mplaunch.sock, qemu.sock, holder.sock, the emulators'
                ".*.sock.[0-9]*",  # a socket bound under its temporary name
                "state-*.bin",
                VM_STATE_NAME, f".{VM_STATE_NAME}.tmp[0-9]*",  # written as .NAME.tmpPID
                "keeper-*.rec", ".keeper-*.rec.tmp[0-9]*",  # the same (keeperrecord)
                "migration-state-sent")  # launcher.migration.source.STATE_SENT_MARK
#: The subfolder holding the vhost-user sockets (launcher.libvirt.backend_socket).
FRONTEND_DIR_NAME = "vhost-user"
#: What cleanup unlinks inside it: a socket, or one bound under a temporary name.
FRONTEND_OWN_PATTERNS = ("*.sock", ".*.sock.[0-9]*")
#: The run folder when a front-end group must pass through it: anyone may
#: traverse it to the vhost-user subfolder, no one but root may list it.
RUN_DIR_MODE_FRONTEND = 0o711
#: A run folder mplaunch made: root only, or entered by the management group.
RUN_DIR_MODE_PRIVATE = 0o700
RUN_DIR_MODE_MANAGEMENT = 0o710
#: The vhost-user subfolder: root:GROUP 0710 with a front-end group, else 0700.
FRONTEND_DIR_MODE_GROUP = 0o710
FRONTEND_DIR_MODE_ROOT = 0o700
#: A vhost-user socket: root:GROUP 0660 with a front-end group, else 0600.
FRONTEND_SOCKET_MODE_GROUP = 0o660
FRONTEND_SOCKET_MODE_ROOT = 0o600
_MARKER_HEAD = "mplaunch run folder"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def frontend_socket_mode(gid: int | None) -> int:
    """The mode to give a vhost-user socket (and ``gid`` its group, if not None)."""
    return FRONTEND_SOCKET_MODE_ROOT if gid is None else FRONTEND_SOCKET_MODE_GROUP


class RunFolderError(Exception):
    """The run folder cannot be used; ``path`` is the folder, ``problem`` says why."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class RunFolderBusy(RunFolderError):
    """Another live mplaunch owns this VM's run folder; no restart can help."""

    def __init__(self, path: Path, owner: str) -> None:
        super().__init__(path, f"the VM is already running (mplaunch pid {owner or '?'} holds it)")
        self.owner = owner


class RunFolderForeign(RunFolderError):
    """The folder holds files mplaunch did not make: it is left untouched."""


@dataclass(frozen=True, slots=True)
class Marker:
    """What the marker file says: the VM, and whether mplaunch made the folder."""

    vm: str
    made_folder: bool

    def render(self) -> bytes:
        made = "yes" if self.made_folder else "no"
        return f"{_MARKER_HEAD}\nvm = {self.vm}\nmade_folder = {made}\n".encode()

    @classmethod
    def parse(cls, data: bytes) -> Marker | None:
        """The marker in ``data``, or None if it is not one mplaunch wrote."""
        lines = data.decode("utf-8", "replace").splitlines()
        if len(lines) != 3 or lines[0] != _MARKER_HEAD:
            return None
        fields = dict(line.partition(" = ")[::2] for line in lines[1:])
        if not fields.get("vm") or fields.get("made_folder") not in ("yes", "no"):
            return None
        return cls(fields["vm"], fields["made_folder"] == "yes")


def is_own(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWN_PATTERNS)


def foreign_problem(path: Path, vm: str) -> str | None:
    """Why mplaunch must not use the existing folder ``path`` for VM ``vm``, or None.

    None also when the folder does not exist (mplaunch will make it). Used by
    the spec check (``mplaunch --check``) and again, race-free, at start."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            return "exists and is not a folder"
        return f"cannot be read: {e.strerror}"
    try:
        return _foreign(fd, vm)
    finally:
        os.close(fd)


def _foreign(dir_fd: int, vm: str) -> str | None:
    names = sorted(os.listdir(dir_fd))
    if not names:
        return None
    marker = _read_marker(dir_fd)
    if marker is None:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        return (f"the folder holds files mplaunch did not make (\"{names[0]}\"{more}) and no "
                f"{MARKER_NAME} marker; it was left untouched: name a new or an empty folder")
    if marker.vm != vm:
        return (f"the folder is the run folder of VM \"{marker.vm}\", not \"{vm}\"; it was "
                "left untouched")
    return None


def _read_marker(dir_fd: int) -> Marker | None:
    try:
        fd = os.open(MARKER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return Marker.parse(os.read(fd, 4096))
    finally:
        os.close(fd)


def _write_marker(dir_fd: int, marker: Marker) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(MARKER_NAME, flags, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, marker.render())
    finally:
        os.close(fd)


def _remove_own(dir_fd: int, keep: tuple[str, ...]) -> None:
    """Unlink the entries mplaunch makes, except ``keep``; the vhost-user
    subfolder is emptied of its sockets and removed; nothing else recursed into."""
    for name in os.listdir(dir_fd):
        if name == FRONTEND_DIR_NAME:
            _remove_frontend_dir(dir_fd)
        elif is_own(name) and name not in keep:
            with contextlib.suppress(OSError):  # a folder by that name is not ours
                os.unlink(name, dir_fd=dir_fd)


def _remove_frontend_dir(dir_fd: int) -> None:
    """Unlink the sockets in the vhost-user subfolder, then remove it if that
    left it empty (someone else's file there keeps it, and the run folder)."""
    try:
        sub = os.open(FRONTEND_DIR_NAME, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError:  # a file or a symlink by that name: unlinked like any own name
        with contextlib.suppress(OSError):
            os.unlink(FRONTEND_DIR_NAME, dir_fd=dir_fd)
        return
    try:
        for name in os.listdir(sub):
            if any(fnmatch.fnmatchcase(name, p) for p in FRONTEND_OWN_PATTERNS):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=sub)
    finally:
        os.close(sub)
    with contextlib.suppress(OSError):
        os.rmdir(FRONTEND_DIR_NAME, dir_fd=dir_fd)


@dataclass
class RunFolder:
    """An acquired run folder; release() removes what mplaunch made in it."""

    path: Path
    vm: str = ""
    made_folder: bool = True
    stale_cleaned: bool = False
    _lock_fd: int = field(default=-1, repr=False)
    _dir_fd: int = field(default=-1, repr=False)
    #: The mode of an adopted folder before ``frontend_dir`` widened it, put
    #: back by ``release``; None if this RunFolder did not change it.
    _mode_found: int | None = field(default=None, repr=False)

    @property
    def mplaunch_sock(self) -> Path:
        return self.path / "mplaunch.sock"

    @property
    def qemu_sock(self) -> Path:
        return self.path / "qemu.sock"

    def state_file(self, emulator_id: str) -> Path:
        return self.path / f"state-{emulator_id}.bin"

    @property
    def holder_sock(self) -> Path:
        """The VM's holder listens here (launcher.holder)."""
        return self.path / HOLDER_SOCK_NAME

    @property
    def vm_state_file(self) -> Path:
        """What a re-attaching launcher reads (launcher.vmstate)."""
        return self.path / VM_STATE_NAME

    def keeper_record(self, emulator_id: str, controller_id: str) -> Path:
        """A session keeper's record (launcher.keeperrecord). Spec ids are
        [a-z0-9-], so the name is one file's, never a path."""
        return self.path / f"keeper-{emulator_id}-{controller_id}.rec"

    def frontend_dir(self, gid: int | None) -> Path:
        """The vhost-user subfolder, made if missing (idempotent; call it
        with the same ``gid`` each time): the sockets of ``--backends-only``
        are bound in it, with ``frontend_socket_mode(gid)`` and group ``gid``.

        With ``gid`` (the resolved ``[vm] frontend_group``): the subfolder is
        root:gid mode 0710 and the run folder becomes 0711 (a folder mplaunch
        adopted gets search permission for group and others added instead,
        its mode put back by ``release``). Without: the subfolder is 0700,
        the run folder unchanged. Everything goes through the folder's
        descriptor: a symlink in the subfolder's place is refused
        (RunFolderForeign), never followed; so is a subfolder not owned by
        mplaunch's uid. The subfolder is locked down before the run folder
        opens up."""
        if self._dir_fd < 0:
            raise RunFolderError(self.path, "the run folder was released")
        where = self.path / FRONTEND_DIR_NAME
        with contextlib.suppress(FileExistsError):
            os.mkdir(FRONTEND_DIR_NAME, FRONTEND_DIR_MODE_ROOT, dir_fd=self._dir_fd)
        try:
            sub = os.open(FRONTEND_DIR_NAME, _DIR_FLAGS, dir_fd=self._dir_fd)
        except OSError as e:
            raise RunFolderForeign(where, "exists and is not a folder" if e.errno in (
                errno.ENOTDIR, errno.ELOOP) else f"cannot be opened: {e.strerror}") from None
        try:
            owner = os.fstat(sub).st_uid
            if owner != os.geteuid():
                raise RunFolderForeign(where, f"belongs to uid {owner}, not to mplaunch's "
                                              f"uid {os.geteuid()}; it was left untouched")
            os.fchmod(sub, FRONTEND_DIR_MODE_ROOT)  # closed while its group changes
            os.fchown(sub, -1, os.getegid() if gid is None else gid)
            if gid is not None:
                os.fchmod(sub, FRONTEND_DIR_MODE_GROUP)
        finally:
            os.close(sub)
        if gid is not None:
            mode = os.fstat(self._dir_fd).st_mode & 0o7777
            wanted = RUN_DIR_MODE_FRONTEND if self.made_folder else mode | 0o011
            if wanted != mode:
                if not self.made_folder and self._mode_found is None:
                    self._mode_found = mode
                os.fchmod(self._dir_fd, wanted)
        return where

    @property
    def lock_fd(self) -> int:
        """The fd whose flock holds the folder (the holder keeps a copy of it)."""
        return self._lock_fd

    @classmethod
    def adopt(cls, path: Path, vm: str, lock_fd: int) -> RunFolder:
        """The folder of a running VM whose lock `lock_fd` holds: a copy of
        `lock_fd` handed back by the VM's holder (flock belongs to the open
        file, not to a process, so this fd is the lock, and `acquire` would
        find the folder busy). Takes `lock_fd`, closed if it raises
        RunFolderForeign: the marker does not name `vm`, or `lock_fd` is not
        the folder's lock file, or not the open file that holds the lock
        (the folder is then left as it is). `release` then removes what
        mplaunch made, as after `acquire`."""
        try:
            dir_fd = os.open(path, _DIR_FLAGS)
        except OSError as e:
            os.close(lock_fd)
            raise RunFolderForeign(path, f"cannot be opened: {e.strerror}") from None
        try:
            marker = _read_marker(dir_fd)
            if marker is None or marker.vm != vm:
                raise RunFolderForeign(path, "its marker does not name VM " + repr(vm))
            if not _is_lock_file(dir_fd, lock_fd):
                raise RunFolderForeign(path, f"the fd handed back is not its {LOCK_NAME}")
            try:  # the holder of the lock takes it again at once; anyone else cannot
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RunFolderForeign(path, "the fd handed back does not hold its lock "
                                             f"(mplaunch pid {_owner(path) or '?'} does)") from None
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(lock_fd)
            os.close(dir_fd)
            raise
        return cls(path, vm, marker.made_folder, False, lock_fd, dir_fd)

    def release_lock_only(self) -> None:
        """Let go of the folder and remove nothing (a launcher that hands the
        VM on, or gives up on it, while its holder still runs)."""
        for fd in (self._lock_fd, self._dir_fd):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = self._dir_fd = -1

    @classmethod
    def acquire(cls, path: Path, vm: str, group: int | None = None) -> RunFolder:
        """Make, adopt or reclaim the run folder of VM ``vm``; RunFolderError if not.

        ``group``: the management socket's group, let through a folder mplaunch
        made (mode 0710); a folder it adopted keeps the owner's choice. A
        folder mplaunch made, found stale, gets that mode again (0700 without
        a group), whatever its dead owner had opened."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        for _ in range(5):
            made = True
            try:
                path.mkdir(mode=RUN_DIR_MODE_PRIVATE)
            except FileExistsError:
                made = False
            try:
                dir_fd = os.open(path, _DIR_FLAGS)
            except FileNotFoundError:
                continue  # removed by an owner that just ended
            except OSError as e:
                raise RunFolderForeign(path, "exists and is not a folder" if e.errno in (
                    errno.ENOTDIR, errno.ELOOP) else f"cannot be opened: {e.strerror}") from None
            try:
                run = cls._claim(path, vm, dir_fd, made)
            except FileNotFoundError:
                run = None  # the folder went away with an owner that just ended
            except BaseException:
                os.close(dir_fd)
                raise
            if run is not None:
                if run.made_folder:  # also undoes a dead owner's frontend_dir (0711)
                    try:
                        if group is not None:
                            os.fchown(dir_fd, -1, group)
                        os.fchmod(dir_fd, RUN_DIR_MODE_MANAGEMENT if group is not None
                                  else RUN_DIR_MODE_PRIVATE)
                    except BaseException:
                        run.release()
                        raise
                return run
            os.close(dir_fd)
        raise RunFolderBusy(path, _owner(path))

    @classmethod
    def _claim(cls, path: Path, vm: str, dir_fd: int, made: bool) -> RunFolder | None:
        """Lock the folder open as ``dir_fd``; None if it changed under us (try again)."""
        found = None if made else _read_marker(dir_fd)
        marker = Marker(vm, made) if made else found
        if not made:
            problem = _foreign(dir_fd, vm)
            if problem is not None:
                if os.listdir(dir_fd) == [LOCK_NAME]:
                    return None  # an owner between its marker and its lock going away
                raise RunFolderForeign(path, problem)
        if marker is None:  # an empty folder someone else made: adopt it
            marker = Marker(vm, made_folder=False)
            _write_marker(dir_fd, marker)
        elif made:
            _write_marker(dir_fd, marker)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        lock = os.open(LOCK_NAME, flags, 0o600, dir_fd=dir_fd)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise RunFolderBusy(path, _owner(path)) from None
        if not _is_lock_file(dir_fd, lock):
            os.close(lock)  # the owner ended and unlinked it meanwhile
            return None
        stale = found is not None  # a marker without a live owner: one that died
        if not made:
            _remove_own(dir_fd, keep=(LOCK_NAME, MARKER_NAME))
            if _read_marker(dir_fd) != marker:  # gone with the owner that just ended
                _write_marker(dir_fd, marker)
        os.ftruncate(lock, 0)
        os.write(lock, f"{os.getpid()}\n".encode())
        return cls(path, vm, marker.made_folder, stale, lock, dir_fd)

    def release(self) -> None:
        """Remove what mplaunch made (the folder too if it made it), then drop
        the lock; anything else that is in the folder stays, and so does the folder."""
        if self._lock_fd < 0:
            return
        _remove_own(self._dir_fd, keep=(LOCK_NAME, MARKER_NAME))
        if self._mode_found is not None and not self.made_folder:
            with contextlib.suppress(OSError):
                os.fchmod(self._dir_fd, self._mode_found)
            self._mode_found = None
        for name in (MARKER_NAME, LOCK_NAME):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dir_fd)
        if self.made_folder:
            with contextlib.suppress(OSError):  # not empty: someone else's files stay
                os.rmdir(self.path)
        os.close(self._lock_fd)
        os.close(self._dir_fd)
        self._lock_fd = self._dir_fd = -1

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _is_lock_file(dir_fd: int, fd: int) -> bool:
    """Whether `fd` is the file the folder's lock name stands for now (an
    owner that ended may have unlinked it since it was opened)."""
    try:
        linked = os.stat(LOCK_NAME, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino)


def _owner(path: Path) -> str:
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
