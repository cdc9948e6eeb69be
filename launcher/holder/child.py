"""What a child of the holder does between fork and exec.

The holder is single-threaded, so Python may run here (no lock can be held
by a thread that fork() left behind).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def setup(parent: int, sources: list[tuple[int, int]], report: int) -> int:
    """In the forked child: die with the holder, own session, each source fd
    at its target number, everything else closed (0-2 on /dev/null unless
    placed). Returns where the `report` fd (close-on-exec) now is."""
    if _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() != parent:  # the holder died before the line above
        os._exit(127)
    os.setsid()
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    # First every fd above every target, so no dup2 below overwrites a source.
    high = max([t for _, t in sources] + [2]) + 1
    moved = [(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high), t) for fd, t in sources]
    report = fcntl.fcntl(report, fcntl.F_DUPFD_CLOEXEC, high)
    for fd, target in moved:
        os.dup2(fd, target, inheritable=True)
    wanted = {t for _, t in sources} | {report}
    for fd in range(3):
        if fd not in wanted:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
            os.close(null)
    start = 3
    for fd in sorted(wanted):
        if fd >= start:
            os.closerange(start, fd)
            start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))
    return report
