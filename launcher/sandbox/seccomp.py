"""Turning seccomp profiles (:mod:`launcher.sandbox.profiles`) into loaded filters.

This module and the profiles are leaves the emulator loads before its
lockdown: neither imports the other, nor anything else of mplaunch. The
caller hands the rules in; a rule is anything shaped like
``profiles.Rule`` (:class:`RuleLike`).

libseccomp (through pyseccomp) compiles the rules to BPF for the native
architecture only; a syscall made through another ABI (i386, x32) hits the
filter's bad-architecture action, which kills. Loading a filter also sets
no_new_privs, which the jail has set already.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import sys
import types
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> Any:
    """pyseccomp looks its libraries up with ctypes.util.find_library, which
    runs ldconfig in a child process: impossible in the jail (no new
    processes, no exec), and ctypes.util alone would load a dozen modules
    (subprocess, tempfile, shutil, hashlib...) into the emulator before its
    lockdown. pyseccomp is given a stand-in ctypes.util that knows the
    sonames, which dlopen resolves by itself; the real one, if it was
    loaded, is put back."""
    stub = types.ModuleType("ctypes.util")
    stub.find_library = SONAMES.get  # type: ignore[attr-defined]
    saved_module = sys.modules.get("ctypes.util")
    saved_attr = getattr(ctypes, "util", None)
    sys.modules["ctypes.util"] = stub
    setattr(ctypes, "util", stub)  # noqa: B010
    try:
        import pyseccomp
    finally:
        if saved_module is None:
            del sys.modules["ctypes.util"]
        else:
            sys.modules["ctypes.util"] = saved_module
        if saved_attr is None:
            delattr(ctypes, "util")
        else:
            setattr(ctypes, "util", saved_attr)  # noqa: B010
    return pyseccomp


pyseccomp = _import_pyseccomp()

#: By the value of ``profiles.Cmp``.
_CMP = {"eq": pyseccomp.EQ, "ne": pyseccomp.NE, "masked_eq": pyseccomp.MASKED_EQ}


class ArgCheckLike(Protocol):
    """One argument comparison, as ``profiles.ArgCheck`` holds it."""

    @property
    def index(self) -> int: ...
    @property
    def cmp(self) -> enum.Enum: ...
    @property
    def value(self) -> int: ...
    @property
    def mask(self) -> int: ...


class RuleLike(Protocol):
    """One rule, as ``profiles.Rule`` holds it."""

    @property
    def syscall(self) -> str: ...
    @property
    def when(self) -> Sequence[ArgCheckLike]: ...
    @property
    def refuse(self) -> int | None: ...


class FilterError(Exception):
    """A profile could not be compiled or loaded; the process must not go on."""


def _args(checks: Iterable[ArgCheckLike]) -> list[Any]:
    out = []
    for c in checks:
        op = _CMP.get(c.cmp.value)
        if op is None:
            raise FilterError(f"unknown comparison {c.cmp!r}")
        if op is pyseccomp.MASKED_EQ:
            out.append(pyseccomp.Arg(c.index, op, c.mask, c.value))
        else:
            out.append(pyseccomp.Arg(c.index, op, c.value))
    return out


def _add(filt: Any, action: int, rule: RuleLike) -> None:
    try:
        filt.add_rule(action, rule.syscall, *_args(rule.when))
    except (OSError, ValueError, RuntimeError) as e:
        raise FilterError(f"seccomp rule for {rule.syscall}: {e}") from None


def build_allow_list(rules: Iterable[RuleLike], log_only: bool) -> Any:
    """An allow list (the emulator's stage 2, ``profiles.STAGE2_ALLOW``):
    violations kill the process, or are logged and let through when
    ``log_only`` (the spec's ``sandbox = "log"``)."""
    default = pyseccomp.LOG if log_only else pyseccomp.KILL_PROCESS
    filt = pyseccomp.SyscallFilter(default)
    for rule in rules:
        action = pyseccomp.ALLOW if rule.refuse is None else pyseccomp.ERRNO(rule.refuse)
        _add(filt, action, rule)
    return filt


def build_deny_list(rules: Iterable[RuleLike]) -> Any:
    """A deny list (the jail's stage 1, ``profiles.stage1_deny``): each rule
    refuses with its errno (EPERM by default), everything else is allowed."""
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for rule in rules:
        _add(filt, pyseccomp.ERRNO(rule.refuse or errno.EPERM), rule)
    return filt


def load(filt: Any) -> None:
    try:
        filt.load()
    except OSError as e:
        raise FilterError(f"cannot load the seccomp filter: {e}") from None
