"""Block backends: where a logical unit's blocks live.

The emulator opens nothing; it is handed one fd per disk. :class:`FdBackend`
moves data between that fd and the guest's memoryviews with
``os.preadv``/``os.pwritev`` and no intermediate copy. A write is handed to
the kernel before its completion is reported, so a crash of the emulator
loses no acknowledged data; FUA and SYNCHRONIZE CACHE mean fdatasync.

Errors surface as :class:`BackendError` with a :class:`BackendFailure`
kind; the command layer maps each kind to a sense (short read inside the
disk and EIO on read: MEDIUM ERROR / UNRECOVERED READ ERROR; write
failures: MEDIUM ERROR / WRITE ERROR; ENOSPC/EDQUOT: DATA PROTECT / SPACE
ALLOCATION FAILED WRITE PROTECT).

Discard punches holes with ``fallocate(PUNCH_HOLE | KEEP_SIZE)``, called
through ctypes because the os module offers no fallocate with a mode. The
libc function is resolved when the backend is built, before the sandbox
forbids loading anything. Where punching is impossible (a block device, a
filesystem without hole support) discard writes zeroes instead, so a
discarded range always reads back as zeroes (LBPRZ holds).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
from collections.abc import Callable, Sequence
from typing import Protocol

from emulators.limits import BLOCK_SIZES

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_IOV_MAX = 1024
"""Linux's UIO_MAXIOV: preadv/pwritev take at most this many buffers."""

_ZERO_CHUNK = 1 << 20


class BackendFailure(enum.Enum):
    """What went wrong, as far as the guest needs to know."""

    READ = "read"
    WRITE = "write"
    NO_SPACE = "no-space"
    READ_ONLY = "read-only"


class BackendError(Exception):
    """An I/O on the disk fd failed; ``kind`` picks the sense, ``offset`` says where."""

    def __init__(self, kind: BackendFailure, offset: int, detail: str) -> None:
        super().__init__(f"{kind.value} failed at byte {offset}: {detail}")
        self.kind = kind
        self.offset = offset
        self.detail = detail


class BlockBackend(Protocol):
    """What a logical unit needs from its storage."""

    @property
    def block_size(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    def size_bytes(self) -> int: ...

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int: ...

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of ``bufs`` after a short transfer."""
    while bufs and n >= bufs[0].nbytes:
        n -= bufs[0].nbytes
        bufs = bufs[1:]
    if n and bufs:
        bufs = [bufs[0][n:], *bufs[1:]]
    return bufs


def _resolve_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


# Resolved once at import: a locked-down emulator may not look symbols up later.
_FALLOCATE = _resolve_fallocate()


class FdBackend:
    """A disk image or block device behind an fd that was handed to us."""

    def __init__(self, fd: int, block_size: int = 512, readonly: bool = False) -> None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {BLOCK_SIZES}, not {block_size}")
        st = os.fstat(fd)
        self._fd = fd
        self._block_size = block_size
        self._readonly = readonly
        self._regular = stat.S_ISREG(st.st_mode)
        self._fallocate = _FALLOCATE if self._regular else None
        self._zeroes = memoryview(bytes(_ZERO_CHUNK))

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def readonly(self) -> bool:
        return self._readonly

    def size_bytes(self) -> int:
        """Current size; lseek(SEEK_END) works for files and block devices alike."""
        return os.lseek(self._fd, 0, os.SEEK_END)

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Fill ``bufs`` from ``offset``; EOF before they are full is an error.

        The caller has range-checked against the capacity, so EOF here means
        the file shrank under us: the guest sees a medium error, not zeroes.
        """
        want = 0
        for b in bufs:
            want += b.nbytes
        if len(bufs) <= _IOV_MAX:
            try:
                n = os.preadv(self._fd, bufs, offset)
            except OSError as e:
                raise BackendError(BackendFailure.READ, offset, os.strerror(e.errno or 0)) from e
            if n == want:
                return n
        else:
            n = 0
        done = n
        rest = _advance(list(bufs), n)
        while rest:
            try:
                n = os.preadv(self._fd, rest[:_IOV_MAX], offset + done)
            except OSError as e:
                raise BackendError(
                    BackendFailure.READ, offset + done, os.strerror(e.errno or 0)
                ) from e
            if n == 0:
                raise BackendError(BackendFailure.READ, offset + done, "end of file")
            done += n
            rest = _advance(rest, n)
        return done

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Write all of ``bufs`` at ``offset``, looping over short writes."""
        if self._readonly:
            raise BackendError(BackendFailure.READ_ONLY, offset, "backend is read-only")
        done = 0
        rest = list(bufs)
        while rest:
            try:
                n = os.pwritev(self._fd, rest[:_IOV_MAX], offset + done)
            except OSError as e:
                raise self._write_error(e, offset + done) from e
            if n == 0:
                raise BackendError(BackendFailure.WRITE, offset + done, "wrote nothing")
            done += n
            rest = _advance(rest, n)
        return done

    def flush(self) -> None:
        """fdatasync: what FUA, SYNCHRONIZE CACHE and WCE=0 ask for."""
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise self._write_error(e, 0) from e

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeroes afterwards."""
        if self._readonly:
            raise BackendError(BackendFailure.READ_ONLY, offset, "backend is read-only")
        if length <= 0:
            return
        if self._fallocate is not None:
            rc = self._fallocate(
                self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length
            )
            if rc == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM):
                raise self._write_error(OSError(err, os.strerror(err)), offset)
            self._fallocate = None  # not supported here: zero-fill from now on
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write ``length`` zero bytes at ``offset``, one bounded chunk at a time."""
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.writev(offset, [self._zeroes[:n]])
            offset += n

    @staticmethod
    def _write_error(e: OSError, offset: int) -> BackendError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return BackendError(BackendFailure.NO_SPACE, offset, os.strerror(e.errno))
        if e.errno in (errno.EROFS, errno.EBADF):
            return BackendError(BackendFailure.READ_ONLY, offset, os.strerror(e.errno))
        return BackendError(BackendFailure.WRITE, offset, os.strerror(e.errno or 0))
