"""Every seccomp profile of mplaunch, in one place, each syscall with its reason.

Theory of operation: an emulator is confined by two filters, stacked.

Stage 1 (:data:`STAGE1_DENY`) is loaded by the jail just before it execs
the emulator. It is a deny list: the interpreter still has to start and
import its modules, which needs a broad and version-dependent set of calls,
but nothing in that start ever needs to execute a program, trace, mount,
reach a network or load kernel code, so those are refused from the first
instruction of the new program on.

Stage 2 (:data:`STAGE2_ALLOW`) is loaded by the emulator itself, after its
imports and set-up and before it reads one byte from QEMU or the guest. It
is an allow list; anything not on it kills the process (logged by the
kernel), or is only logged when the VM's spec says ``sandbox = "log"``.
A few calls are refused with an errno instead of a kill (``refuse``): they
are what a late lazy import or a traceback's source lookup does, and a
clean error there is better than a kill in the middle of an error report;
the kernel still performs none of them.

The kernel evaluates every stacked filter and the strictest answer wins,
so stage 1's refusals hold in ``log`` mode too.

This module is data only and imports nothing heavy: the emulator imports it
before its lockdown.
"""

from __future__ import annotations

import enum
import errno
import socket
from dataclasses import dataclass
from signal import SIGKILL

# x86_64 values the profiles compare arguments against.
PROT_EXEC = 0x4
AT_EMPTY_PATH = 0x1000
F_DUPFD_CLOEXEC = 1030
F_GETFD = 1
F_SETFD = 2
F_GETFL = 3
F_SETFL = 4
FIONBIO = 0x5421
FIOCLEX = 0x5451
TCGETS = 0x5401
INT_MASK = 0xFFFFFFFF


class Cmp(enum.Enum):
    """How an argument is compared; MASKED_EQ means (arg & mask) == value."""

    EQ = "eq"
    NE = "ne"
    MASKED_EQ = "masked_eq"


@dataclass(frozen=True, slots=True)
class ArgCheck:
    index: int
    cmp: Cmp
    value: int
    mask: int = INT_MASK


@dataclass(frozen=True, slots=True)
class Rule:
    """One syscall (or one argument case of it) and why a profile names it.

    In an allow list a rule allows, unless ``refuse`` gives the errno to
    answer instead. In a deny list a rule refuses with ``refuse`` (EPERM by
    default). ``when`` narrows the rule to calls whose arguments all match.
    """

    syscall: str
    reason: str
    when: tuple[ArgCheck, ...] = ()
    refuse: int | None = None


def _eq(index: int, value: int) -> ArgCheck:
    return ArgCheck(index, Cmp.MASKED_EQ, value, INT_MASK)


def _no_exec(index: int) -> ArgCheck:
    return ArgCheck(index, Cmp.MASKED_EQ, 0, PROT_EXEC)


STAGE2_ALLOW: tuple[Rule, ...] = (
    # The event loop.
    Rule("epoll_wait", "the loop waits on the sockets and kick eventfds"),
    Rule("epoll_pwait", "the same wait, as some libc versions issue it"),
    Rule("epoll_ctl", "kick eventfds are watched and unwatched as rings start and stop"),
    Rule("read", "kick eventfds are drained; nothing else is open to read"),
    Rule("write", "call eventfds are signalled; log lines go to the inherited stderr"),
    Rule("recvmsg", "vhost-user messages arrive with their fds (SCM_RIGHTS)"),
    Rule("recvfrom", "plain reads of the vhost-user socket"),
    Rule("sendmsg", "vhost-user replies on the connected socketpair"),
    Rule("sendto", "replies with socket.send(): connected only, no address",
         when=(ArgCheck(4, Cmp.EQ, 0),)),
    Rule("getsockname", "repr() of a socket, in a log line or at exit"),
    Rule("close", "fds of a replaced ring or memory table are released"),
    Rule("fcntl", "mmap() of a memory region duplicates its fd", when=(_eq(1, F_DUPFD_CLOEXEC),)),
    Rule("fcntl", "file status flags are read", when=(_eq(1, F_GETFL),)),
    Rule("fcntl", "received fds are made non-blocking", when=(_eq(1, F_SETFL),)),
    Rule("fcntl", "close-on-exec flags are read", when=(_eq(1, F_GETFD),)),
    Rule("fcntl", "close-on-exec flags are set", when=(_eq(1, F_SETFD),)),
    Rule("ioctl", "a socket is switched to non-blocking", when=(_eq(1, FIONBIO),)),
    Rule("ioctl", "a received fd is marked close-on-exec", when=(_eq(1, FIOCLEX),)),
    # Disk I/O on the fds the launcher opened.
    Rule("pread64", "reads of the disk images and the state store"),
    Rule("pwrite64", "writes of the disk images and the state store"),
    Rule("preadv2", "guest reads straight into guest memory (os.preadv)"),
    Rule("pwritev2", "guest writes straight from guest memory (os.pwritev)"),
    Rule("fdatasync", "FUA and SYNCHRONIZE CACHE"),
    Rule("fsync", "a flush where fdatasync is not enough (the state store)"),
    Rule("fallocate", "UNMAP and WRITE SAME punch holes"),
    Rule("lseek", "the size of a disk image, at resize"),
    Rule("fstat", "the size and type of a passed fd"),
    Rule("newfstatat", "fstat() as glibc issues it: an fd and an empty path",
         when=(_eq(3, AT_EMPTY_PATH),)),
    # Memory.
    Rule("mmap", "guest RAM regions and the allocator; never executable", when=(_no_exec(2),)),
    Rule("mprotect", "the allocator's guard pages; never executable", when=(_no_exec(2),)),
    Rule("munmap", "a replaced memory table is unmapped"),
    Rule("mremap", "the allocator grows large buffers in place"),
    Rule("madvise", "the allocator returns freed memory"),
    Rule("brk", "the allocator's heap"),
    # The process itself.
    Rule("futex", "the interpreter's own locks"),
    Rule("rt_sigreturn", "return from the SIGTERM handler"),
    Rule("rt_sigaction", "the interpreter restores its signal handlers at exit"),
    Rule("rt_sigprocmask", "the interpreter masks signals around critical sections"),
    Rule("getpid", "log lines carry the process id"),
    Rule("clock_gettime", "timeouts, when the vDSO falls back to the kernel"),
    Rule("restart_syscall", "a wait interrupted by a signal resumes"),
    Rule("exit_group", "the emulator exits"),
    Rule("exit", "the last thread exits"),
    # Refused without a kill: what a late import or a traceback attempts.
    Rule("openat", "no file is ever opened after set-up", refuse=errno.EACCES),
    Rule("open", "no file is ever opened after set-up", refuse=errno.EACCES),
    Rule("newfstatat", "path lookups of a late import fail cleanly",
         when=(ArgCheck(3, Cmp.MASKED_EQ, 0, AT_EMPTY_PATH),), refuse=errno.EACCES),
    Rule("stat", "path lookups of a late import fail cleanly", refuse=errno.EACCES),
    Rule("lstat", "path lookups of a late import fail cleanly", refuse=errno.EACCES),
    Rule("getcwd", "a late import asks where it is", refuse=errno.EACCES),
)
"""The emulator after lockdown. Not listed, and so killed: socket, connect,
execve, fork, clone, clone3, ptrace, kill, tgkill, setuid, mount, and every
other call."""


CLONE_THREAD = 0x00010000
CLONE_NEW_NAMESPACES = 0x7E020000
"""CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID and NEWNET."""

STANDBY_THREAD: tuple[Rule, ...] = (
    Rule("clone", "the standby's one waiting thread; only a thread of this process (no "
         "new process, no new namespace)", when=(ArgCheck(
             0, Cmp.MASKED_EQ, CLONE_THREAD, CLONE_THREAD | CLONE_NEW_NAMESPACES),)),
    Rule("clone3", "its flags are behind a pointer no filter can read; ENOSYS makes "
         "glibc fall back to clone, whose flags are checked", refuse=errno.ENOSYS),
    Rule("set_robust_list", "a new thread registers its robust futex list (glibc)"),
    Rule("rseq", "a new thread registers its restartable sequences area (glibc)"),
    Rule("gettid", "a new thread learns its id (glibc and the interpreter)"),
)
"""Added to stage 2 in a warm spare only: it may become a hot standby,
which waits for its predecessor's liveness lock in a thread of its own
(launcher.statestore.liveness); an emulator started with its config never
makes a thread and keeps :data:`STAGE2_ALLOW` alone. The jail lets a spare's
uid have :data:`launcher.sandbox.jail.SPARE_NPROC` tasks: that thread and
no more."""


def fault_kill(pid: int) -> Rule:
    """Added to stage 2 only in a process a test armed with a fault point
    (:mod:`emulators.faults`): it may SIGKILL itself, and nothing else."""
    return Rule("kill", "an armed fault point kills this process (tests only)",
                when=(_eq(0, pid), _eq(1, SIGKILL)))


STAGE1_DENY: tuple[Rule, ...] = (
    Rule("execveat", "only the jail's own exec runs a program"),
    Rule("ptrace", "no debugging of any process"),
    Rule("process_vm_readv", "no reading of another process's memory"),
    Rule("process_vm_writev", "no writing of another process's memory"),
    Rule("kcmp", "no probing of other processes' resources"),
    Rule("pidfd_getfd", "no stealing of another process's fds"),
    Rule("socket", "no network: only AF_UNIX, and stage 2 removes even that",
         when=(ArgCheck(0, Cmp.NE, socket.AF_UNIX),), refuse=errno.EAFNOSUPPORT),
    Rule("mount", "the file system view is fixed by the jail"),
    Rule("umount2", "the file system view is fixed by the jail"),
    Rule("pivot_root", "the file system view is fixed by the jail"),
    Rule("chroot", "the file system view is fixed by the jail"),
    Rule("open_tree", "the file system view is fixed by the jail"),
    Rule("move_mount", "the file system view is fixed by the jail"),
    Rule("fsopen", "the file system view is fixed by the jail"),
    Rule("fsmount", "the file system view is fixed by the jail"),
    Rule("fsconfig", "the file system view is fixed by the jail"),
    Rule("fspick", "the file system view is fixed by the jail"),
    Rule("mount_setattr", "the file system view is fixed by the jail"),
    Rule("unshare", "the namespaces are fixed by the jail"),
    Rule("setns", "the namespaces are fixed by the jail"),
    Rule("open_by_handle_at", "no path-less access to files outside the view"),
    Rule("name_to_handle_at", "no path-less access to files outside the view"),
    Rule("bpf", "no kernel programs"),
    Rule("perf_event_open", "no kernel tracing or side channels"),
    Rule("userfaultfd", "no stalling of the kernel on page faults (an exploit primitive)"),
    Rule("io_uring_setup", "no second path around the syscall filter"),
    Rule("io_uring_enter", "no second path around the syscall filter"),
    Rule("io_uring_register", "no second path around the syscall filter"),
    Rule("keyctl", "no kernel keyrings"),
    Rule("add_key", "no kernel keyrings"),
    Rule("request_key", "no kernel keyrings"),
    Rule("init_module", "no kernel modules"),
    Rule("finit_module", "no kernel modules"),
    Rule("delete_module", "no kernel modules"),
    Rule("kexec_load", "no new kernel"),
    Rule("kexec_file_load", "no new kernel"),
    Rule("reboot", "no host power control"),
    Rule("swapon", "no host memory management"),
    Rule("swapoff", "no host memory management"),
    Rule("acct", "no host accounting"),
    Rule("quotactl", "no host quotas"),
    Rule("syslog", "no reading of the kernel log"),
    Rule("settimeofday", "no host clock changes"),
    Rule("clock_settime", "no host clock changes"),
    Rule("clock_adjtime", "no host clock changes"),
    Rule("adjtimex", "no host clock changes"),
    Rule("sethostname", "no host identity changes"),
    Rule("setdomainname", "no host identity changes"),
    Rule("iopl", "no port I/O"),
    Rule("ioperm", "no port I/O"),
    Rule("setuid", "the uid is fixed by the jail"),
    Rule("setgid", "the gid is fixed by the jail"),
    Rule("setreuid", "the uid is fixed by the jail"),
    Rule("setregid", "the gid is fixed by the jail"),
    Rule("setresuid", "the uid is fixed by the jail"),
    Rule("setresgid", "the gid is fixed by the jail"),
    Rule("setgroups", "the groups are fixed by the jail"),
    Rule("setfsuid", "the uid is fixed by the jail"),
    Rule("setfsgid", "the gid is fixed by the jail"),
    Rule("personality", "no turning off of address space randomization"),
)
"""Refused (EPERM unless said otherwise) from the emulator's exec on. execve
itself is refused too, except for the one call the jail makes; see
:func:`stage1_deny`."""


def stage1_deny(exec_path_address: int) -> tuple[Rule, ...]:
    """The deny list loaded at exec: :data:`STAGE1_DENY`, and execve refused
    unless its path is the buffer at ``exec_path_address``. The jail's own
    exec passes exactly that pointer, and the new program's address space
    no longer has it (stage 2 then forbids execve outright)."""
    return (*STAGE1_DENY, Rule("execve", "only the jail's exec",
                               (ArgCheck(0, Cmp.NE, exec_path_address),)))


NO_SPAWN: tuple[Rule, ...] = (
    Rule("fork", "no new process: the program runs threads only"),
    Rule("vfork", "no new process: the program runs threads only"),
    Rule("clone", "a new thread shares the process; a clone without CLONE_THREAD "
         "is a new process", when=(ArgCheck(0, Cmp.MASKED_EQ, 0, CLONE_THREAD),)),
    Rule("clone3", "its flags are behind a pointer no filter can read; ENOSYS makes "
         "glibc fall back to clone, whose flags are checked", refuse=errno.ENOSYS),
)
"""Added to stage 1 for a program exec'd to run threads but never another
process (QEMU's remote LSI process, ``JailSpec.no_spawn``): whatever the
program's own filter says, it makes no child, so it can exec nothing even
if its own filter had a hole (and execve is refused by stage 1 anyway)."""


def stage1_no_spawn(exec_path_address: int) -> tuple[Rule, ...]:
    """:func:`stage1_deny` with :data:`NO_SPAWN`: still one filter."""
    return (*stage1_deny(exec_path_address), *NO_SPAWN)


def allowed_syscalls(profile: tuple[Rule, ...] = STAGE2_ALLOW) -> list[str]:
    """The distinct syscalls a profile lets through (in some argument case)."""
    seen: dict[str, None] = {}
    for rule in profile:
        if rule.refuse is None:
            seen.setdefault(rule.syscall, None)
    return list(seen)


STAGE2_MAX = 40
"""The allow list is kept under this many syscalls; a test holds it there."""
