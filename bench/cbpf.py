"""A classic-BPF interpreter for seccomp filters, and the kernel's way of
stacking their answers: what a process's filters, read back from the
kernel, let through.

Theory of operation. A seccomp filter is a classic BPF program run on a
64-byte ``struct seccomp_data`` (syscall number, audit arch, instruction
pointer, six arguments); its return value is an action in the top 16 bits
and data (an errno, say) in the low 16. With several filters stacked the
kernel runs every one and keeps the answer whose action is most
restrictive: actions compare as signed 32-bit numbers, lowest wins
(kernel/seccomp.c, ``seccomp_run_filters``).

The interpreter also notes which words of the data a run read: an answer
reached without reading an argument holds for every argument; one that
read an argument may differ for others (``Verdict.reads_args``).

Only what seccomp accepts is implemented (its checker refuses the rest):
loads of 32-bit words from the data (absolute), immediate loads, the
scratch memory, ALU, jumps and returns. cBPF jumps only forward, so a run
ends within the program's length.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

AUDIT_ARCH_X86_64 = 0xC000003E
DATA_SIZE = 64
ARGS_OFFSET = 16
ACTION_MASK = 0xFFFF0000
DATA_MASK = 0x0000FFFF
U32 = 0xFFFFFFFF

# Instruction classes and fields (include/uapi/linux/bpf_common.h).
LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0)
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X = 0x00, 0x08
RET_A = 0x10
TAX, TXA = 0x00, 0x80
MEMWORDS = 16


class Action(enum.IntEnum):
    """seccomp's actions (include/uapi/linux/seccomp.h), by their value."""

    KILL_PROCESS = 0x80000000
    KILL_THREAD = 0x00000000
    TRAP = 0x00030000
    ERRNO = 0x00050000
    USER_NOTIF = 0x7FC00000
    TRACE = 0x7FF00000
    LOG = 0x7FFC0000
    ALLOW = 0x7FFF0000


class BpfError(Exception):
    """The program is not one seccomp would have accepted."""


@dataclass(frozen=True, slots=True)
class Insn:
    code: int
    jt: int
    jf: int
    k: int


def decode(raw: bytes) -> list[Insn]:
    """``struct sock_filter`` array (u16 code, u8 jt, u8 jf, u32 k; native endian)."""
    if len(raw) % 8:
        raise BpfError(f"{len(raw)} bytes is not a whole number of instructions")
    return [Insn(*struct.unpack_from("=HBBI", raw, i)) for i in range(0, len(raw), 8)]


def seccomp_data(nr: int, args: Sequence[int] = (0,) * 6, arch: int = AUDIT_ARCH_X86_64,
                 ip: int = 0) -> bytes:
    """The 64 bytes a filter sees for one call."""
    padded = list(args) + [0] * (6 - len(args))
    return struct.pack("=iIQ6Q", nr, arch, ip, *[a & 0xFFFFFFFFFFFFFFFF for a in padded])


@dataclass(frozen=True, slots=True)
class Verdict:
    """One filter's (or the stack's) answer for one call."""

    value: int
    reads_args: bool = False

    @property
    def action(self) -> Action:
        raw = self.value & ACTION_MASK
        if raw in Action._value2member_map_:
            return Action(raw)
        # The kernel treats an unknown action as KILL_PROCESS.
        return Action.KILL_PROCESS

    @property
    def data(self) -> int:
        return self.value & DATA_MASK

    @property
    def allows(self) -> bool:
        """The call goes to the kernel (LOG lets it through, after a log line)."""
        return self.action in (Action.ALLOW, Action.LOG)

    def __str__(self) -> str:
        if self.action is Action.ERRNO:
            return f"ERRNO({self.data})"
        return self.action.name


def _alu(op: int, a: int, b: int) -> int:
    if op == ADD:
        return (a + b) & U32
    if op == SUB:
        return (a - b) & U32
    if op == MUL:
        return (a * b) & U32
    if op in (DIV, MOD):
        if b == 0:
            raise BpfError("division by zero")
        return (a // b if op == DIV else a % b) & U32
    if op == OR:
        return a | b
    if op == AND:
        return a & b
    if op == LSH:
        return (a << b) & U32 if b < 32 else 0
    if op == RSH:
        return a >> b if b < 32 else 0
    if op == XOR:
        return a ^ b
    raise BpfError(f"unknown ALU operation {op:#x}")


def _jump(op: int, a: int, b: int) -> bool:
    if op == JEQ:
        return a == b
    if op == JGT:
        return a > b
    if op == JGE:
        return a >= b
    if op == JSET:
        return bool(a & b)
    raise BpfError(f"unknown jump {op:#x}")


def run(program: Sequence[Insn], data: bytes) -> Verdict:
    """Run one filter on one call's data."""
    if len(data) != DATA_SIZE:
        raise BpfError(f"seccomp data is {DATA_SIZE} bytes, not {len(data)}")
    a = x = 0
    mem = [0] * MEMWORDS
    reads_args = False
    pc = 0
    while pc < len(program):
        ins = program[pc]
        cls, op, src = ins.code & 0x07, ins.code & 0xF0, ins.code & 0x08
        pc += 1
        if cls == LD:
            mode = ins.code & 0xE0
            if mode == ABS and ins.code & 0x18 == W:
                if ins.k % 4 or ins.k + 4 > DATA_SIZE:
                    raise BpfError(f"load at {ins.k}: not an aligned word of the data")
                reads_args |= ins.k >= ARGS_OFFSET
                a = struct.unpack_from("=I", data, ins.k)[0]
            elif mode == IMM:
                a = ins.k & U32
            elif mode == MEM:
                a = mem[ins.k % MEMWORDS]
            elif mode == LEN:
                a = DATA_SIZE
            else:
                raise BpfError(f"load mode {ins.code:#x} is not allowed in seccomp")
        elif cls == LDX:
            mode = ins.code & 0xE0
            if mode == IMM:
                x = ins.k & U32
            elif mode == MEM:
                x = mem[ins.k % MEMWORDS]
            elif mode == LEN:
                x = DATA_SIZE
            else:
                raise BpfError(f"load mode {ins.code:#x} is not allowed in seccomp")
        elif cls == ST:
            mem[ins.k % MEMWORDS] = a
        elif cls == STX:
            mem[ins.k % MEMWORDS] = x
        elif cls == ALU:
            a = (-a) & U32 if op == NEG else _alu(op, a, x if src == X else ins.k)
        elif cls == JMP:
            if op == JA:
                pc += ins.k
            else:
                taken = _jump(op, a, x if src == X else ins.k)
                pc += ins.jt if taken else ins.jf
        elif cls == RET:
            return Verdict((a if ins.code & 0x18 == RET_A else ins.k) & U32, reads_args)
        elif cls == MISC:
            if ins.code & 0xF8 == TXA:
                a = x
            else:
                x = a
    raise BpfError("the program ran off its end")


def _rank(value: int) -> int:
    """The kernel's order of actions: as signed 32-bit numbers, lower is stricter."""
    action = value & ACTION_MASK
    return action - (1 << 32) if action & 0x80000000 else action


def run_stack(filters: Sequence[Sequence[Insn]], data: bytes) -> Verdict:
    """Every filter on one call, combined as the kernel does. `filters` in
    the order they were installed, oldest first; the kernel runs the newest
    first and keeps the strictest answer, so on a tie (two errnos, say) the
    newest filter's answer wins."""
    if not filters:
        return Verdict(Action.ALLOW)
    best: Verdict | None = None
    reads = False
    for program in reversed(filters):
        verdict = run(program, data)
        reads |= verdict.reads_args
        if best is None or _rank(verdict.value) < _rank(best.value):
            best = verdict
    assert best is not None
    return Verdict(best.value, reads)
