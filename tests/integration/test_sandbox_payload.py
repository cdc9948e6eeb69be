"""A hostile emulator: run as a script inside the real sandbox, never by mplaunch.

``python -I test_sandbox_payload.py CONFIG_JSON MODE ACTION [TARGET]`` sets
up exactly as the emulator does (config, controllers, selector), applies
the same lockdown (unless MODE is ``jail-only``), then waits for one byte
on its first controller socket, the way the first vhost-user message would
arrive, and attempts ACTION, as a guest that took the emulator over would.

Exit status: 0 the action worked; 100 + errno it was refused with that
errno; killed by SIGSYS when the seccomp filter killed it. pytest collects
nothing here (no tests); test_sandbox_hostile.py drives it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import selectors
import socket
import struct
import sys
from collections.abc import Callable

SYS_OPEN = 2
SYS_CLONE = 56
SYS_CLONE3 = 435
SYS_GETPPID = 110
SYS_NEWFSTATAT = 262
HEAVY = ("subprocess", "tempfile", "shutil", "ctypes.util", "asyncio", "argparse")
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
PTRACE_ATTACH = 16
SIGCHLD = 17
CLONE_VM = 0x100
CLONE_SIGHAND = 0x800
CLONE_THREAD = 0x10000
CLONE_NEWNET = 0x40000000


def main(argv: list[str]) -> int:
    from emulators.config import EmulatorConfig
    from emulators.lockdown import LockdownMode, lockdown
    from emulators.process import Emulator

    config = EmulatorConfig.from_json(argv[1])
    mode, action = argv[2], argv[3]
    target = argv[4] if len(argv) > 4 else ""
    emulator = Emulator(config)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    page = mmap.mmap(-1, mmap.PAGESIZE)
    page_addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    sock_fd = config.controllers[0].socket_fd

    def sockaddr_un(path: str) -> bytes:
        return struct.pack("H", socket.AF_UNIX) + path.encode() + b"\0"

    def syscall(result: int) -> None:
        if result < 0:
            raise OSError(ctypes.get_errno(), "refused")

    def target_pid() -> int:
        return int(target)

    actions: dict[str, Callable[[], object]] = {
        "noop": lambda: None,
        # The jail runs the emulator in its own interpreter: what it loaded stays.
        "heavy_modules": lambda: syscall(-1) if set(HEAVY) & set(sys.modules) else None,
        "getppid": lambda: syscall(libc.syscall(SYS_GETPPID)),
        "open": lambda: syscall(libc.syscall(SYS_OPEN, target.encode(), os.O_RDONLY)),
        "openat": lambda: os.open(target, os.O_RDONLY),
        # What glibc's fstat looks like to the filter (AT_EMPTY_PATH, let through),
        # but with a path: the kernel resolves it.
        "stat_path": lambda: syscall(libc.syscall(SYS_NEWFSTATAT, AT_FDCWD, target.encode(),
                                                  ctypes.create_string_buffer(256),
                                                  AT_EMPTY_PATH)),
        "socket_inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        "socket_unix": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "connect": lambda: syscall(libc.connect(sock_fd, sockaddr_un(target),
                                                len(sockaddr_un(target)))),
        "execve": lambda: os.execv("/bin/sh", ["sh", "-c", "true"]),
        "fork": lambda: os.fork(),
        "clone": lambda: syscall(libc.syscall(SYS_CLONE, SIGCHLD, 0, 0, 0, 0)),
        "clone3": lambda: syscall(libc.syscall(SYS_CLONE3, 0, 0)),
        # A thread's flags, and a new network namespace.
        "clone_thread_newnet": lambda: syscall(libc.syscall(
            SYS_CLONE, CLONE_VM | CLONE_SIGHAND | CLONE_THREAD | CLONE_NEWNET, 0, 0, 0, 0)),
        "ptrace": lambda: syscall(libc.ptrace(PTRACE_ATTACH, target_pid(), 0, 0)),
        "kill": lambda: os.kill(target_pid(), 9),
        "kill0": lambda: os.kill(target_pid(), 0),
        "setuid": lambda: os.setuid(0),
        "mount": lambda: syscall(libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)),
        "mmap_exec": lambda: mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_EXEC),
        "mprotect_exec": lambda: syscall(libc.mprotect(ctypes.c_void_p(page_addr),
                                                       mmap.PAGESIZE, 5)),
        "process_vm_readv": lambda: syscall(libc.process_vm_readv(target_pid(), None, 0,
                                                                  None, 0, 0)),
    }
    if action in ("thread", "two_threads"):  # a liveness page, made before the lockdown
        from launcher.statestore import liveness
        lock = liveness.LivenessLock(liveness.create())
        wake_r, wake_w = os.pipe()

        def threads(count: int) -> None:
            if count > 1:
                lock.take()  # held: each waiting thread stays
            try:
                watches = [liveness.DeathWatch(lock, wake_w) for _ in range(count)]
            except RuntimeError:  # the thread could not be made (RLIMIT_NPROC)
                raise OSError(errno.EAGAIN, "no thread") from None
            while not watches[0].done:
                os.read(wake_r, 1)
            if watches[0].outcome is not liveness.Outcome.FREE:
                syscall(-1)

        actions["thread"] = lambda: threads(1)
        actions["two_threads"] = lambda: threads(2)
    run = actions[action]
    if mode == "spare":  # a warm spare's stage 2: it may make a standby's thread
        lockdown(LockdownMode.ON, standby_thread=True)
    elif mode != "jail-only":
        lockdown(LockdownMode(mode))
    # The go signal: the first byte from the other side, waited for as the loop would.
    emulator.selector.register(sock_fd, selectors.EVENT_READ)
    emulator.selector.select()
    try:
        run()
    except OSError as e:
        os._exit(100 + (e.errno or 0))
    del emulator
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
