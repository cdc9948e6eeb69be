"""The VM's run folder: the one place that says whether an instance is alive.

A folder per VM holds the management sockets and the state store files. The
lock file inside it is held (flock) for the whole life of the mplaunch that
owns the VM, so "is an instance alive" is answered by the kernel, not by a
pid that may have been reused: a folder whose lock can be taken is stale and
is cleaned; one whose lock is held is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

LOCK_NAME = "mplaunch.lock"


class RunFolderBusy(Exception):
    """Another live mplaunch owns this VM's run folder; no restart can help."""

    def __init__(self, path: Path, owner: str) -> None:
        super().__init__(path, owner)
        self.path = path
        self.owner = owner

    def __str__(self) -> str:
        return f"{self.path}: the VM is already running (mplaunch pid {self.owner or '?'} holds it)"


@dataclass
class RunFolder:
    """An acquired run folder; release() removes it."""

    path: Path
    stale_cleaned: bool = False
    _lock_fd: int = field(default=-1, repr=False)

    @property
    def mplaunch_sock(self) -> Path:
        return self.path / "mplaunch.sock"

    @property
    def qemu_sock(self) -> Path:
        return self.path / "qemu.sock"

    def state_file(self, emulator_id: str) -> Path:
        return self.path / f"state-{emulator_id}.bin"

    @classmethod
    def acquire(cls, path: Path) -> RunFolder:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        stale = False
        for _ in range(3):
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                if _held_by_other(path):
                    raise RunFolderBusy(path, _owner(path)) from None
                shutil.rmtree(path, ignore_errors=True)
                stale = True
                continue
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunFolderBusy(path, _owner(path)) from None
            os.write(fd, f"{os.getpid()}\n".encode())
            return cls(path, stale, fd)
        raise RunFolderBusy(path, _owner(path))

    def release(self) -> None:
        """Remove the folder, then drop the lock, so nobody sees a half-removed live one."""
        if self._lock_fd < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _held_by_other(path: Path) -> bool:
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


def _owner(path: Path) -> str:
    try:
        return (path / LOCK_NAME).read_text().strip()
    except OSError:
        return ""
