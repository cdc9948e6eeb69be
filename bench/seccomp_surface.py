"""How many system calls a running process's seccomp filters let through.

Reads every filter stacked on the process back from the kernel
(``PTRACE_SEIZE``, ``PTRACE_INTERRUPT``, then ``PTRACE_SECCOMP_GET_FILTER``
for index 0, 1, ... until ENOENT; root only, the process is stopped for a
moment and let go), evaluates them with :mod:`bench.cbpf` for every x86-64
system call number libseccomp knows, all arguments zero, and reports how
many every filter together allows, what each filter alone allows, and
which answers depend on the arguments (the filter read one: ``clone``, for
instance, is allowed for a new thread and refused for a new process).

    .venv/bin/python -m bench.seccomp_surface PID [--json] [--list]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import cbpf

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
WALL = 0x40000000
MAX_NR = 512
"""Every x86-64 syscall number lies below this (Linux 6.x ends near 460)."""

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class SurfaceError(Exception):
    """The filters could not be read."""


def _ptrace(request: int, pid: int, addr: int = 0, data: int | None = None) -> int:
    result = _libc.ptrace(request, pid, ctypes.c_void_p(addr), ctypes.c_void_p(data))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def read_filters(pid: int) -> list[list[cbpf.Insn]]:
    """The process's filters in the order they were installed, oldest first:
    the kernel's index 0 is the first filter (ptrace(2) says the newest,
    kernel/seccomp.c ``get_nth_filter`` counts from the oldest)."""
    try:
        _ptrace(PTRACE_SEIZE, pid)
    except OSError as e:
        raise SurfaceError(f"cannot trace pid {pid}: {e.strerror} (root needed)") from None
    try:
        _ptrace(PTRACE_INTERRUPT, pid)
        os.waitpid(pid, WALL)
        filters = []
        for index in range(64):
            try:
                count = _ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    break
                raise SurfaceError(f"cannot read filter {index}: {e.strerror}") from None
            buf = ctypes.create_string_buffer(count * 8)
            _ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, ctypes.addressof(buf))
            filters.append(cbpf.decode(buf.raw))
        return filters
    finally:
        _ptrace(PTRACE_DETACH, pid)


def syscall_names() -> dict[int, str]:
    """x86-64 numbers libseccomp can name: the system calls there are."""
    from launcher.sandbox.seccomp import pyseccomp

    arch = pyseccomp.system_arch()
    names = {}
    for nr in range(MAX_NR):
        try:
            name = pyseccomp.resolve_syscall(arch, nr)
        except (ValueError, OSError):
            continue
        if name:
            names[nr] = name.decode() if isinstance(name, bytes) else str(name)
    return names


@dataclass
class Surface:
    """What the stack of filters answers, call by call (all arguments zero)."""

    filters: int
    per_filter_allowed: list[int]
    allowed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    depends_on_args: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"filters": self.filters, "per_filter_allowed": self.per_filter_allowed,
                "allowed_count": len(self.allowed), "allowed": self.allowed,
                "refused": self.refused, "depends_on_args": self.depends_on_args}


def surface(filters: Sequence[Sequence[cbpf.Insn]], names: dict[int, str]) -> Surface:
    """Pure: the answers of `filters` for every named syscall."""
    result = Surface(len(filters), [0] * len(filters))
    for nr, name in sorted(names.items()):
        data = cbpf.seccomp_data(nr)
        for i, program in enumerate(filters):
            if cbpf.run(program, data).allows:
                result.per_filter_allowed[i] += 1
        verdict = cbpf.run_stack(filters, data)
        if verdict.allows:
            result.allowed.append(name)
        else:
            result.refused[name] = str(verdict)
        if verdict.reads_args:
            result.depends_on_args.append(name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("--json", action="store_true", help="the whole result as JSON")
    parser.add_argument("--list", action="store_true", help="name every allowed syscall")
    args = parser.parse_args(argv)
    try:
        filters = read_filters(args.pid)
    except SurfaceError as e:
        print(f"seccomp_surface: {e}", file=sys.stderr)
        return 1
    names = syscall_names()
    result = surface(filters, names)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    print(f"pid {args.pid}: {result.filters} filters, {len(names)} x86-64 syscalls")
    print(f"allowed by every filter together (arguments zero): {len(result.allowed)}")
    print(f"allowed by each filter alone, oldest first: {result.per_filter_allowed}")
    print(f"answer depends on arguments: {' '.join(result.depends_on_args) or '-'}")
    if args.list:
        print("allowed:", " ".join(result.allowed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
