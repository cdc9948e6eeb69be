"""The dirty log: which guest pages the back-end wrote, for live migration.

Theory of operation
-------------------
While a VM migrates, QEMU copies guest RAM to the destination and copies
again every page written since; it cannot see the back-end's writes, so the
back-end marks them in a bitmap QEMU gives it (vhost-user spec, "Migration";
SET_LOG_BASE with VHOST_USER_PROTOCOL_F_LOG_SHMFD): one bit per 4 KiB page
of guest physical address space, page ``p`` being bit ``p % 64`` of the
little-endian 64-bit word ``p // 64``.  QEMU reads the log by fetching and
clearing whole words atomically, and the one log is shared by every vhost
device of the VM: two emulators (or a controller's several rings) may set
bits of one word at the same moment.  A read-modify-write in Python (read
the word, OR, write it back) would then lose a bit set in between, by QEMU's
clear or by a neighbour, and a page written by the guest's disk read would
reach the destination stale.  So every mark is one atomic OR.

Why libatomic: Python has no atomic memory operation on a buffer.  GCC's
runtime library exports ``__atomic_fetch_or_8``, a ``lock or`` on x86-64
(the same instruction QEMU's own log writers use), callable through ctypes.
libatomic.so.1 (Debian package libatomic1, which scripts/setup installs) is
loaded when this module is imported: before the emulator's seccomp filter
and before its jail hides the file system, since neither dlopen nor the
open it makes is possible later.  If it cannot be loaded the import still
succeeds, and mapping a log fails with a clear error.

Word alignment: the log's offset in its file must be a multiple of 8 (the
session refuses others), so every word is 8-byte aligned in the mapping and
the locked instruction never splits a cache line.

Order (what makes the log exact): a page is marked after the write to it,
never before, so a fetch-and-clear by QEMU in between cannot lose it: the
device-writable buffers of a chain after the request wrote them and before
its used element is published, and the used ring after its element and
index were written.

Bounds: a page beyond the log's size is the front-end's error (its log is
too small for its own memory map); it is not marked, nothing outside the
log is ever written, and ``mark`` says False so the caller can report it.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable, Iterable

from emulators.virtio.errors import VirtioError
from emulators.virtio.memory import buffer_address

__all__ = [
    "LOG_PAGE_SIZE",
    "DirtyLog",
    "DirtyLogError",
    "add_range",
    "atomics_available",
]

LOG_PAGE_SIZE = 0x1000
"""VHOST_LOG_PAGE: one bit of the log covers this many bytes of guest memory."""
_PAGE_SHIFT = 12
_WORD_BITS = 64
_SEQ_CST = 5  # __ATOMIC_SEQ_CST

FetchOr = Callable[[int, int, int], int]


def _load_fetch_or() -> FetchOr | None:
    try:
        lib = ctypes.CDLL("libatomic.so.1")
        fn = lib.__atomic_fetch_or_8
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int)
    fn.restype = ctypes.c_uint64
    return fn


# Resolved once at import: a locked-down emulator can neither open nor map a library.
_FETCH_OR = _load_fetch_or()


def atomics_available() -> bool:
    """Whether this process can mark a shared log (libatomic was loaded)."""
    return _FETCH_OR is not None


class DirtyLogError(VirtioError, ValueError):
    """The dirty log the front-end gave cannot be mapped or used."""


def add_range(masks: dict[int, int], gpa: int, length: int, words: int) -> bool:
    """Add the pages of ``[gpa, gpa + length)`` to ``masks`` (word -> bits).

    False, and nothing added, when a page lies beyond a log of ``words``
    64-bit words (or the range is not a range); an empty range adds nothing.
    """
    if length <= 0:
        return length == 0
    if gpa < 0:
        return False
    first = gpa >> _PAGE_SHIFT
    last = (gpa + length - 1) >> _PAGE_SHIFT
    if last >= words * _WORD_BITS:
        return False
    word, bit = divmod(first, _WORD_BITS)
    last_word, last_bit = divmod(last, _WORD_BITS)
    if word == last_word:
        masks[word] = masks.get(word, 0) | (((2 << (last_bit - bit)) - 1) << bit)
        return True
    masks[word] = masks.get(word, 0) | ((~0 << bit) & 0xFFFF_FFFF_FFFF_FFFF)
    for middle in range(word + 1, last_word):
        masks[middle] = 0xFFFF_FFFF_FFFF_FFFF
    masks[last_word] = masks.get(last_word, 0) | ((2 << last_bit) - 1)
    return True


class DirtyLog:
    """One front-end's dirty log, mapped; see the module docstring.

    Build it with :meth:`from_fd` (the SET_LOG_BASE fd) or over any writable
    buffer (tests); either way marks are atomic ORs on the buffer's memory.
    Not thread-safe in itself (one owner loop); the memory it marks may be
    shared with any number of other processes.
    """

    __slots__ = ("size", "words", "_buffer", "_map", "_base", "_fetch_or")

    def __init__(
        self,
        buffer: bytearray | memoryview | mmap.mmap,
        size: int,
        *,
        _map: mmap.mmap | None = None,
        _fetch_or: FetchOr | None = None,
    ) -> None:
        fetch_or = _fetch_or if _fetch_or is not None else _FETCH_OR
        if fetch_or is None:
            raise DirtyLogError("libatomic.so.1 could not be loaded: no atomic OR to mark "
                                "a shared log with")
        if size <= 0 or size % 8:
            raise DirtyLogError(f"log of {size} bytes: not a positive multiple of 8")
        view = memoryview(buffer).cast("B")
        if view.readonly or len(view) < size:
            view.release()
            raise DirtyLogError(f"log buffer of {len(view)} bytes, {size} needed and writable")
        base = buffer_address(view)
        if base % 8:
            view.release()
            raise DirtyLogError("log buffer is not 8-byte aligned")
        self.size = size
        self.words = size // 8
        self._buffer = view
        self._map = _map
        self._base = base
        self._fetch_or = fetch_or

    @classmethod
    def from_fd(cls, fd: int, size: int, offset: int) -> DirtyLog:
        """Map ``size`` bytes at ``offset`` of ``fd`` shared and writable.

        The fd stays the caller's (mmap keeps its own duplicate). Any failure
        (a bad fd, a file too short for the range, an offset the kernel
        refuses, the address-space limit) is a :class:`DirtyLogError`.
        """
        if _FETCH_OR is None:
            raise DirtyLogError("libatomic.so.1 could not be loaded: no atomic OR to mark "
                                "a shared log with")
        if offset < 0 or offset % 8 or size <= 0 or size % 8:
            raise DirtyLogError(f"log of {size:#x} bytes at offset {offset:#x}: size and "
                                "offset must be multiples of 8, size positive")
        skip = offset % mmap.ALLOCATIONGRANULARITY
        try:
            m = mmap.mmap(fd, size + skip, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - skip)
        except (OSError, ValueError, OverflowError) as exc:
            raise DirtyLogError(f"cannot map the log ({size:#x} bytes at offset "
                                f"{offset:#x}): {exc}") from None
        view = memoryview(m)[skip:skip + size]
        try:
            return cls(view, size, _map=m)
        except BaseException:
            view.release()
            m.close()
            raise
        finally:
            view.release()  # the instance holds its own cast of it

    @property
    def closed(self) -> bool:
        return self._base == 0

    def add(self, masks: dict[int, int], gpa: int, length: int) -> bool:
        """:func:`add_range` for this log."""
        return add_range(masks, gpa, length, self.words)

    def commit(self, masks: dict[int, int]) -> None:
        """Set the bits of ``masks`` (from :meth:`add`), one atomic OR per word.

        Nothing happens once the log is closed: the address would be stale.
        """
        base = self._base
        if not base:
            return
        fetch_or = self._fetch_or
        for word, mask in masks.items():
            fetch_or(base + 8 * word, mask, _SEQ_CST)

    def mark(self, gpa: int, length: int) -> bool:
        """Mark the pages of one range now; False (nothing marked) if beyond the log."""
        masks: dict[int, int] = {}
        if not self.add(masks, gpa, length):
            return False
        self.commit(masks)
        return True

    def mark_all(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Mark several ranges; False if one of them (not marked) was beyond the log."""
        masks: dict[int, int] = {}
        ok = True
        for gpa, length in ranges:
            ok = self.add(masks, gpa, length) and ok
        self.commit(masks)
        return ok

    def word(self, index: int) -> int:
        """The log's word ``index`` as it is now (tests, diagnostics)."""
        if self.closed or not 0 <= index < self.words:
            raise IndexError(f"word {index} of a log of {self.words}")
        return int.from_bytes(self._buffer[8 * index:8 * index + 8], "little")

    def close(self) -> None:
        """Stop marking and unmap the log (if this object mapped it)."""
        if self.closed:
            return
        self._base = 0
        self._buffer.release()
        if self._map is not None:
            self._map.close()
            self._map = None
