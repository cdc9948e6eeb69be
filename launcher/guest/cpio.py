"""A writer for the "newc" cpio format the Linux kernel unpacks as an initramfs.

Theory of operation: an initramfs is a list of entries (directories, regular
files, symlinks, device nodes), each a 110-byte ASCII header, the NUL-ended
name and the data, both padded to 4 bytes, closed by an entry named
``TRAILER!!!`` (see the kernel's Documentation/driver-api/early-userspace/
buffer-format.rst). Writing it here instead of calling a cpio tool keeps the
image reproducible: inode numbers are assigned in order, owners are root and
every timestamp is the same fixed value, so identical inputs give identical
bytes. Device nodes can be written without privileges because they are only
descriptions until the kernel unpacks them.
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CpioEntry", "EntryKind", "MAGIC", "TRAILER", "write_newc"]

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_FIELDS = 13
HEADER_SIZE = len(MAGIC) + 8 * _HEADER_FIELDS  # 110 bytes


class EntryKind(enum.Enum):
    """The file types an initramfs needs."""

    DIRECTORY = stat.S_IFDIR
    FILE = stat.S_IFREG
    SYMLINK = stat.S_IFLNK
    CHAR_DEVICE = stat.S_IFCHR


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member.

    ``name`` is relative (no leading slash), as the kernel expects.
    ``data`` is the file content, or the link target for a symlink.
    ``rdev`` is (major, minor) for device nodes.
    """

    name: str
    kind: EntryKind
    perm: int = 0o755
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith("/") or "\0" in self.name:
            raise ValueError(f"bad cpio entry name {self.name!r}")
        if self.name == TRAILER:
            raise ValueError("entry name collides with the trailer")
        if not 0 <= self.perm <= 0o7777:
            raise ValueError(f"bad permission bits {self.perm:#o} for {self.name}")
        if self.kind is EntryKind.SYMLINK and not self.data:
            raise ValueError(f"symlink {self.name} has no target")
        if self.kind in (EntryKind.DIRECTORY, EntryKind.CHAR_DEVICE) and self.data:
            raise ValueError(f"{self.kind.name.lower()} {self.name} cannot carry data")
        if len(self.data) > 0xFFFFFFFF:
            raise ValueError(f"{self.name} is too large for newc (4 GiB limit)")


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(entry_ino: int, name: str, mode: int, nlink: int, data: bytes,
            rdev: tuple[int, int], mtime: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (
        entry_ino, mode, 0, 0, nlink, mtime, len(data),
        0, 0,  # devmajor/devminor of the file system holding the file: irrelevant
        rdev[0], rdev[1], len(encoded), 0,  # checksum is 0 in the "070701" variant
    )
    header = MAGIC + b"".join(b"%08X" % value for value in fields)
    return header + encoded + _pad4(HEADER_SIZE + len(encoded)) + data + _pad4(len(data))


def write_newc(entries: Iterable[CpioEntry], *, mtime: int = 0) -> bytes:
    """Serialise ``entries`` (in the given order) as an uncompressed newc archive.

    Parents must come before their children: the kernel creates entries in
    archive order and does not make missing directories. Duplicate names are
    refused because the kernel would silently keep only one of them.
    """
    chunks: list[bytes] = []
    seen: set[str] = set()
    for ino, entry in enumerate(entries, start=1):
        if entry.name in seen:
            raise ValueError(f"duplicate cpio entry {entry.name}")
        parent = entry.name.rpartition("/")[0]
        if parent and parent not in seen:
            raise ValueError(f"{entry.name} comes before its directory {parent}")
        seen.add(entry.name)
        nlink = 2 if entry.kind is EntryKind.DIRECTORY else 1
        mode = entry.kind.value | entry.perm
        chunks.append(_member(ino, entry.name, mode, nlink, entry.data, entry.rdev, mtime))
    chunks.append(_member(0, TRAILER, 0, 1, b"", (0, 0), 0))
    return b"".join(chunks)
