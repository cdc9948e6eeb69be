"""The liveness lock of a slot: how a hot standby learns of its predecessor's
death before the kernel has torn the dead process's memory down.

Theory of operation. A pidfd becomes readable only at the end of a
process's exit, after its address space is gone (for an emulator with guest
RAM mapped, milliseconds after the SIGKILL). A robust futex is released
earlier in that same exit: when a thread ends, the kernel walks the list of
robust mutexes it holds (set_robust_list(2)) and marks each one's owner
dead (FUTEX_OWNER_DIED), waking one waiter, before it drops the memory.

So each slot that keeps a standby has one page of its own (a memfd the
launcher makes: :func:`create`, passed to each of the slot's emulators like
its other fds) holding one process-shared robust pthread mutex. The serving
emulator takes it (:meth:`LivenessLock.take`) in its main thread, the one
that touches rings and the state store, before it serves, and holds it
until it dies. Its standby waits for it in a thread of its own
(:class:`DeathWatch`): a lock that returns EOWNERDEAD means the owner thread
is in its exit and will never run user code again. The watch makes the lock
consistent and lets it go at once, and the standby's main thread takes it
when it serves, so that the next standby can wait on the same page. A
watch that gets the lock without EOWNERDEAD learnt nothing (the serving
emulator does not hold it: an older one, or one started by a launcher
that re-attached with a fresh page) and gives it back at once.

It is only ever a faster signal: the pidfd stays the standby's safety net.
A SIGSTOPped emulator keeps the lock, as it keeps its pidfd unreadable. The
page is writable by every emulator of the slot; one that was taken over
can fake its own death this way, as it could already write the guest's
memory and disks it serves: nothing it did not have.

This module is a leaf both sides import (standard library only): the
emulator before its lockdown, with libc's symbols resolved at import.
The mutex's layout is glibc's own; only its ``__kind`` word is checked
(:meth:`LivenessLock.sound`), against a mutex made here with the same
attributes, so that a page some emulator scribbled over is not used.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import enum
import errno
import mmap
import os
import time

LIVENESS_PAGE = 4096
"""The size of the memfd; the mutex is at its start."""
MUTEX_BYTES = 40
"""sizeof(pthread_mutex_t) on x86_64 glibc."""
MUTEX_KIND_OFFSET = 16
"""Where glibc keeps the mutex's kind (type, robust, process-shared bits)."""
WATCH_STACK = 256 * 1024
"""The waiting thread's stack: it runs one C call and a few lines of Python."""
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_M_ARENA_MAX = -8
"""mallopt(3): at most this many malloc arenas. One: a new thread would
otherwise reserve a 64 MiB arena of its own (the emulator's RLIMIT_AS)."""

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_mutex_init = _libc.pthread_mutex_init
_lock = _libc.pthread_mutex_lock
_trylock = _libc.pthread_mutex_trylock
_unlock = _libc.pthread_mutex_unlock
_consistent = _libc.pthread_mutex_consistent
_mallopt = _libc.mallopt
for _f in (_mutex_init, _lock, _trylock, _unlock, _consistent):
    _f.restype = ctypes.c_int
    _f.argtypes = [ctypes.c_void_p] if _f is not _mutex_init else [ctypes.c_void_p,
                                                                    ctypes.c_void_p]


def _attributes() -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 bytes; room to spare
    for call, value in ((_libc.pthread_mutexattr_init, None),
                        (_libc.pthread_mutexattr_setpshared, _PTHREAD_PROCESS_SHARED),
                        (_libc.pthread_mutexattr_setrobust, _PTHREAD_MUTEX_ROBUST)):
        result = call(attr) if value is None else call(attr, value)
        if result != 0:
            raise OSError(result, os.strerror(result))
    return attr


def _expected_kind() -> int:
    reference = ctypes.create_string_buffer(MUTEX_BYTES)
    if _mutex_init(ctypes.addressof(reference), _attributes()) != 0:
        raise OSError(errno.EINVAL, "cannot make a robust process-shared mutex")
    return int.from_bytes(reference.raw[MUTEX_KIND_OFFSET:MUTEX_KIND_OFFSET + 4], "little")


EXPECTED_KIND = _expected_kind()


def create() -> int:
    """A new liveness page (the launcher's): a memfd holding a fresh, free
    robust process-shared mutex. The caller owns the fd."""
    fd = os.memfd_create("mplaunch-liveness", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, LIVENESS_PAGE)
        with mmap.mmap(fd, LIVENESS_PAGE, mmap.MAP_SHARED) as page:
            result = _mutex_init(ctypes.addressof(ctypes.c_char.from_buffer(page)),
                                 _attributes())
        if result != 0:
            raise OSError(result, os.strerror(result))
    except BaseException:
        os.close(fd)
        raise
    return fd


class Taken(enum.Enum):
    """What :meth:`LivenessLock.take` found."""

    HELD = "held"
    """Ours now (it was free, or its owner had died)."""
    BUSY = "held by a live thread"
    BROKEN = "not usable"


class Outcome(enum.Enum):
    """What a :class:`DeathWatch` learnt."""

    DIED = "its owner died"
    FREE = "nobody held it"
    BROKEN = "not usable"


class LivenessLock:
    """One process's mapping of a liveness page (`fd` stays the caller's).
    Keep it for as long as a thread may hold the lock through it: glibc
    links a held robust mutex into its thread's list, inside the page."""

    def __init__(self, fd: int) -> None:
        if os.fstat(fd).st_size < LIVENESS_PAGE:
            raise ValueError("the liveness page is too small")
        self._page = mmap.mmap(fd, LIVENESS_PAGE, mmap.MAP_SHARED)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self.held = False

    def sound(self) -> bool:
        """Whether the page still holds a robust process-shared mutex."""
        kind = int.from_bytes(self._page[MUTEX_KIND_OFFSET:MUTEX_KIND_OFFSET + 4], "little")
        return kind == EXPECTED_KIND

    def take(self) -> Taken:
        """Take the lock in the calling thread without waiting; it stays held
        until that thread ends. An owner that died leaves it to us."""
        if not self.sound():
            return Taken.BROKEN
        result = _trylock(self.address)
        if result == errno.EOWNERDEAD:
            result = _consistent(self.address)
        if result == 0:
            self.held = True
            return Taken.HELD
        return Taken.BUSY if result == errno.EBUSY else Taken.BROKEN

    def wait(self) -> Outcome:
        """Block (GIL released) until the holder lets the lock go or dies;
        the lock is then the calling thread's, or not (BROKEN), until
        :meth:`release`. The standby's waiting thread only."""
        if not self.sound():
            return Outcome.BROKEN
        result = _lock(self.address)
        if result == errno.EOWNERDEAD:
            return Outcome.DIED
        return Outcome.FREE if result == 0 else Outcome.BROKEN

    def release(self, outcome: Outcome) -> None:
        """Leave the lock free again after :meth:`wait` returned `outcome`
        (consistent first if its owner had died)."""
        if outcome is Outcome.DIED:
            _consistent(self.address)
        if outcome is not Outcome.BROKEN:
            _unlock(self.address)


class DeathWatch:
    """A thread that waits on `lock`. When the wait returns it records the
    outcome and the time and wakes the event loop (one byte to `wake_fd`,
    its wake pipe) at once; then it leaves the lock free and wakes the loop
    again, `done`: from then on it touches the lock no more, and the loop's
    thread may take it. Started at once."""

    def __init__(self, lock: LivenessLock, wake_fd: int) -> None:
        self.lock = lock
        self.outcome: Outcome | None = None
        self.seen_ns = 0
        self.done = False
        #: Set by the loop once it acted on `outcome`.
        self.reported = False
        self._wake_fd = wake_fd
        _mallopt(_M_ARENA_MAX, 1)
        previous = _thread.stack_size(WATCH_STACK)
        try:
            _thread.start_new_thread(self._run, ())
        finally:
            _thread.stack_size(previous)

    def _run(self) -> None:
        outcome = self.lock.wait()
        self.seen_ns = time.monotonic_ns()
        self.outcome = outcome
        self._wake()  # first: the takeover needs nothing more from this thread
        self.lock.release(outcome)
        self.done = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe wakes the loop anyway
            os.write(self._wake_fd, b"\0")
