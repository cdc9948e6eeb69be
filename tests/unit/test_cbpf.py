"""The classic-BPF interpreter of bench/seccomp_surface.py, on filters
libseccomp compiled from mplaunch's own profiles (exported, never loaded)."""

from __future__ import annotations

import errno
import tempfile

import pytest

from bench import cbpf
from bench.seccomp_surface import surface
from launcher.sandbox import profiles
from launcher.sandbox.seccomp import build_allow_list, build_deny_list, pyseccomp

ARCH = pyseccomp.system_arch()
THREAD_FLAGS = 0x3D0F00  # glibc's pthread_create: CLONE_VM|CLONE_THREAD|...
FORK_FLAGS = 0x01200011  # glibc's fork: CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD


def exported(filt: object) -> list[cbpf.Insn]:
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)  # type: ignore[attr-defined]
        f.seek(0)
        return cbpf.decode(f.read())


def nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(ARCH, name))


@pytest.fixture(scope="module")
def no_spawn() -> list[cbpf.Insn]:
    return exported(build_deny_list(profiles.stage1_no_spawn(0x1000)))


@pytest.fixture(scope="module")
def stage2() -> list[cbpf.Insn]:
    return exported(build_allow_list(profiles.STAGE2_ALLOW, log_only=False))


def verdict(program: list[cbpf.Insn], name: str, *args: int) -> cbpf.Verdict:
    return cbpf.run(program, cbpf.seccomp_data(nr(name), args))


def test_the_no_spawn_stage1_refuses_processes_and_lets_threads_through(
        no_spawn: list[cbpf.Insn]) -> None:
    assert verdict(no_spawn, "read").allows
    assert not verdict(no_spawn, "read").reads_args
    for name in ("fork", "vfork", "ptrace", "mount", "bpf"):
        v = verdict(no_spawn, name)
        assert (v.action, v.data) == (cbpf.Action.ERRNO, errno.EPERM), name
    assert verdict(no_spawn, "clone", THREAD_FLAGS).allows
    fork = verdict(no_spawn, "clone", FORK_FLAGS)
    assert (fork.action, fork.data, fork.reads_args) == (cbpf.Action.ERRNO, errno.EPERM, True)
    clone3 = verdict(no_spawn, "clone3")
    assert (clone3.action, clone3.data) == (cbpf.Action.ERRNO, errno.ENOSYS)
    # execve: only the jail's own call, by the address of its path.
    assert verdict(no_spawn, "execve", 0x1000).allows
    assert not verdict(no_spawn, "execve", 0x2000).allows


def test_another_architecture_is_killed(no_spawn: list[cbpf.Insn]) -> None:
    i386 = cbpf.run(no_spawn, cbpf.seccomp_data(3, arch=0x40000003))
    assert i386.action in (cbpf.Action.KILL_PROCESS, cbpf.Action.KILL_THREAD)


def test_the_stricter_filter_wins_the_stack(no_spawn: list[cbpf.Insn],
                                            stage2: list[cbpf.Insn]) -> None:
    stack = [no_spawn, stage2]
    assert cbpf.run_stack(stack, cbpf.seccomp_data(nr("read"))).allows
    assert cbpf.run_stack(stack, cbpf.seccomp_data(nr("clone"), (THREAD_FLAGS,))).action \
        is cbpf.Action.KILL_PROCESS
    openat = cbpf.run_stack(stack, cbpf.seccomp_data(nr("openat")))
    assert (openat.action, openat.data) == (cbpf.Action.ERRNO, errno.EACCES)


def test_the_surface_of_the_emulators_stack(no_spawn: list[cbpf.Insn],
                                            stage2: list[cbpf.Insn]) -> None:
    names = {nr(n): n for n in ("read", "write", "fcntl", "openat", "clone", "fork", "mmap")}
    result = surface([no_spawn, stage2], names)
    assert sorted(result.allowed) == ["mmap", "read", "write"]  # fcntl 0 is F_DUPFD
    assert result.per_filter_allowed == [5, 3]  # clone(0) and fork refused by stage 1
    assert {"fcntl", "mmap", "clone"} <= set(result.depends_on_args)
    assert result.refused["openat"] == f"ERRNO({errno.EACCES})"


def test_alu_jumps_memory_and_returning_a() -> None:
    def ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> cbpf.Insn:
        return cbpf.Insn(code, jt, jf, k)
    program = [
        ins(cbpf.LD | cbpf.W | cbpf.ABS, 0),             # A = nr
        ins(cbpf.ALU | cbpf.ADD | cbpf.K, 5),            # A += 5
        ins(cbpf.ST, 3),                                 # M[3] = A
        ins(cbpf.LDX | cbpf.MEM, 3),                     # X = M[3]
        ins(cbpf.ALU | cbpf.MUL | cbpf.X),               # A *= X
        ins(cbpf.JMP | cbpf.JGT | cbpf.K, 100, 0, 1),    # A > 100 ?
        ins(cbpf.RET | cbpf.K, cbpf.Action.ERRNO | 7),
        ins(cbpf.ALU | cbpf.OR | cbpf.K, cbpf.Action.ALLOW),
        ins(cbpf.RET | cbpf.RET_A),
    ]
    assert cbpf.run(program, cbpf.seccomp_data(1)).value == cbpf.Action.ALLOW | 36
    assert cbpf.run(program, cbpf.seccomp_data(6)).data == 7


@pytest.mark.parametrize("bad", [
    [cbpf.Insn(cbpf.LD | cbpf.W | cbpf.ABS, 0, 0, 64), cbpf.Insn(cbpf.RET, 0, 0, 0)],
    [cbpf.Insn(cbpf.LD | cbpf.W | cbpf.ABS, 0, 0, 2), cbpf.Insn(cbpf.RET, 0, 0, 0)],
    [cbpf.Insn(cbpf.LD | cbpf.W | cbpf.IND, 0, 0, 0)],
    [cbpf.Insn(cbpf.ALU | cbpf.DIV | cbpf.K, 0, 0, 0)],
    [cbpf.Insn(cbpf.LD | cbpf.IMM, 0, 0, 1)],
])
def test_what_seccomp_would_refuse_is_an_error(bad: list[cbpf.Insn]) -> None:
    with pytest.raises(cbpf.BpfError):
        cbpf.run(bad, cbpf.seccomp_data(0))


def test_decode_wants_whole_instructions() -> None:
    with pytest.raises(cbpf.BpfError):
        cbpf.decode(b"\0" * 12)
    assert cbpf.decode(bytes.fromhex("060000000000ff7f")) == [
        cbpf.Insn(6, 0, 0, 0x7FFF0000)]
