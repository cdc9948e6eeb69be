"""Turning the profiles of :mod:`launcher.sandbox.profiles` into loaded filters.

libseccomp (through pyseccomp) compiles the rules to BPF for the native
architecture only; a syscall made through another ABI (i386, x32) hits the
filter's bad-architecture action, which kills. Loading a filter also sets
no_new_privs, which the jail has set already.
"""

from __future__ import annotations

import ctypes.util
import errno
from collections.abc import Callable, Iterable
from typing import Any

from launcher.sandbox.profiles import STAGE1_DENY, STAGE2_ALLOW, ArgCheck, Cmp, Rule

SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> Any:
    """pyseccomp looks its libraries up with ctypes.util.find_library, which
    runs ldconfig in a child process: impossible in the jail (no new
    processes, no exec). It is given the sonames instead, which dlopen
    resolves by itself."""
    original: Callable[[str], str | None] = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return SONAMES.get(name) or original(name)

    setattr(ctypes.util, "find_library", find_library)  # noqa: B010
    try:
        import pyseccomp
    finally:
        setattr(ctypes.util, "find_library", original)  # noqa: B010
    return pyseccomp


pyseccomp = _import_pyseccomp()

_CMP = {Cmp.EQ: pyseccomp.EQ, Cmp.NE: pyseccomp.NE, Cmp.MASKED_EQ: pyseccomp.MASKED_EQ}


class FilterError(Exception):
    """A profile could not be compiled or loaded; the process must not go on."""


def _args(checks: Iterable[ArgCheck]) -> list[Any]:
    out = []
    for c in checks:
        if c.cmp is Cmp.MASKED_EQ:
            out.append(pyseccomp.Arg(c.index, pyseccomp.MASKED_EQ, c.mask, c.value))
        else:
            out.append(pyseccomp.Arg(c.index, _CMP[c.cmp], c.value))
    return out


def _add(filt: Any, action: int, rule: Rule) -> None:
    try:
        filt.add_rule(action, rule.syscall, *_args(rule.when))
    except (OSError, ValueError, RuntimeError) as e:
        raise FilterError(f"seccomp rule for {rule.syscall}: {e}") from None


def build_stage2(log_only: bool, extra: tuple[Rule, ...] = ()) -> Any:
    """The emulator's allow list (and ``extra`` rules); violations kill the
    process, or are logged and let through when ``log_only`` (the spec's
    ``sandbox = "log"``)."""
    default = pyseccomp.LOG if log_only else pyseccomp.KILL_PROCESS
    filt = pyseccomp.SyscallFilter(default)
    for rule in STAGE2_ALLOW + extra:
        action = pyseccomp.ALLOW if rule.refuse is None else pyseccomp.ERRNO(rule.refuse)
        _add(filt, action, rule)
    return filt


def build_stage1(exec_path_address: int) -> Any:
    """The deny list loaded at exec. execve is refused unless its path is the
    buffer at ``exec_path_address``: the jail's own exec passes exactly that
    pointer, and the new program's address space no longer has it (stage 2
    then forbids execve outright)."""
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for rule in STAGE1_DENY:
        _add(filt, pyseccomp.ERRNO(rule.refuse or errno.EPERM), rule)
    _add(filt, pyseccomp.ERRNO(errno.EPERM),
         Rule("execve", "only the jail's exec", (ArgCheck(0, Cmp.NE, exec_path_address),)))
    return filt


def load(filt: Any) -> None:
    try:
        filt.load()
    except OSError as e:
        raise FilterError(f"cannot load the seccomp filter: {e}") from None
