"""Which host files management may hand to a guest as disks.

Theory of operation. ``disk-add`` runs in the privileged launcher on a
path a management client chose, so the path is not trusted: it could name
``/etc/shadow``, a symlink into ``/root``, or the host's system disk. The
spec says what is allowed, the way libvirt's storage pools do: regular
files under ``[vm] image_dirs``, and block devices only if ``[vm] devices``
lists them.

The check is made on what was opened, not on the path: the image is first
opened ``O_PATH | O_NOFOLLOW`` (no side effect, even for a device; a symlink
as the last component opens the link itself and is refused), its type is
read with fstat and its real path from ``/proc/self/fd/N``; only if both
pass is that same inode reopened for I/O through the fd, and the new fd is
checked to be the same file. A rename or a new symlink between the check
and the open cannot change which file is used.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

RULE_DIRS = "image_dirs"
RULE_DEVICES = "devices"
RULE_SYMLINK = "no-symlink"
RULE_TYPE = "file-type"


class ImageRefused(Exception):
    """An image management may not use; ``rule`` names the rule it breaks."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(rule, message)
        self.rule = rule
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (rule: {self.rule})"


def _fd_path(fd: int) -> Path:
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    """Folders (real paths) images may come from, and block devices that are allowed."""

    dirs: tuple[Path, ...]
    devices: tuple[Path, ...] = ()

    def _device_ids(self) -> set[int]:
        ids = set()
        for device in self.devices:
            try:
                st = os.stat(device)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                ids.add(st.st_rdev)
        return ids

    def check(self, fd: int, shown: str) -> os.stat_result:
        """Check the file open as ``fd`` (any mode, O_PATH too); ImageRefused if
        not allowed. ``shown`` is how the caller named it, for the message."""
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise ImageRefused(RULE_SYMLINK, f"image '{shown}' is a symlink; name the image "
                               "itself (a symlink is never followed)")
        real = _fd_path(fd)
        if stat.S_ISREG(st.st_mode):
            if not any(real.is_relative_to(d) for d in self.dirs):
                allowed = ", ".join(str(d) for d in self.dirs) or "none"
                raise ImageRefused(RULE_DIRS, f"image '{shown}' is {real}, outside the "
                                   f"folders [vm] image_dirs allows ({allowed})")
            return st
        if stat.S_ISBLK(st.st_mode):
            if st.st_rdev not in self._device_ids():
                raise ImageRefused(RULE_DEVICES, f"image '{shown}' is the block device {real}, "
                                   "which [vm] devices does not list")
            return st
        raise ImageRefused(RULE_TYPE, f"image '{shown}' is not a regular file or a block device")

    def open(self, image: str, readonly: bool) -> tuple[int, os.stat_result]:
        """Open ``image`` for a disk if the rules allow it: (fd, its stat).
        ImageRefused naming the rule, or OSError, if not."""
        probe = os.open(image, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = self.check(probe, image)
            flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
            fd = os.open(f"/proc/self/fd/{probe}", flags)
        finally:
            os.close(probe)
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):  # cannot happen: say so
            os.close(fd)
            raise ImageRefused(RULE_TYPE, f"image '{image}' changed while it was opened")
        return fd, opened


def default_dirs(spec_folder: Path, images: Iterable[Path]) -> tuple[Path, ...]:
    """The spec's own folder and the folder of each image file, real paths, no repeats."""
    out: list[Path] = []
    for folder in (spec_folder, *(p.parent for p in images)):
        real = folder.resolve()
        if real not in out:
            out.append(real)
    return tuple(out)
