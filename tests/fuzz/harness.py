"""What every fuzz harness shares: its description, input reading, the invariant checks.

A harness is a `Harness`: `make()` sets the target up once and returns the
function that takes one input (`bytes`) and raises only when an invariant
breaks; `seeds()` builds a handful of valid inputs with the tests' own
builders (tests/fuzz/corpus/NAME/ holds them, see `python -m tests.fuzz
--write-seeds`). The same function runs under atheris (coverage-guided, in
a child process: atheris calls exit) and in plain Python (corpus replay in
the test suite), so a harness module never imports atheris itself.

Invariants every harness asserts, each in its own words:

- only the module's own error types leave the parser; anything else
  propagates, which atheris reports as a crash with the input saved;
- nothing is touched outside the memory handed to the parser: buffers are
  carved out of one bytearray between canary bytes (`CanaryArena`), checked
  after each input;
- an answer within a bound: `bounded` fails an input that takes longer than
  the harness's `bound` seconds (libFuzzer's -timeout catches one that never
  returns);
- no internal-failure log line: layers that catch every exception to keep
  serving (the SCSI target, the management dispatcher) log them at ERROR,
  which `ErrorLog` turns into a failure.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

OneInput = Callable[[bytes], None]


@dataclass(frozen=True)
class Harness:
    """One fuzz target. `bound` is the most seconds one input may take."""

    name: str
    doc: str
    make: Callable[[], OneInput]
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096
    bound: float = 2.0


class SlowInput(AssertionError):
    """One input took longer than its harness allows."""


def bounded(one_input: OneInput, bound: float) -> OneInput:
    """`one_input` that fails any input taking more than `bound` seconds of
    CPU. CPU time, not wall time: on a shared host a fuzzer waiting for a
    CPU is not a slow parser (one was, waiting 2.3 s for an input that runs
    in a few milliseconds)."""

    def run(data: bytes) -> None:
        start = time.process_time()
        one_input(data)
        elapsed = time.process_time() - start
        if elapsed > bound:
            raise SlowInput(f"one input took {elapsed:.3f} s of CPU, the bound is {bound} s")

    return run


class Input:
    """Reads fields from the front of a fuzz input; past its end every field is 0.

    Reading from the front keeps seeds easy to build with struct.pack, and
    a mutation of one byte changes one field.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(self.left)

    def _int(self, fmt: str, size: int) -> int:
        raw = self.take(size)
        return int(struct.unpack(fmt, raw.ljust(size, b"\0"))[0])

    def u8(self) -> int:
        return self._int("<B", 1)

    def u16(self) -> int:
        return self._int("<H", 2)

    def u32(self) -> int:
        return self._int("<I", 4)

    def records(self) -> list[tuple[int, bytes]]:
        """The rest as records of (u16 length, u8 tag, bytes): chunks of a stream."""
        out: list[tuple[int, bytes]] = []
        while self.left >= 3:
            n = self.u16()
            tag = self.u8()
            out.append((tag, self.take(n)))
        return out


def record(tag: int, data: bytes) -> bytes:
    """One record as `Input.records` reads it (for building seeds)."""
    return struct.pack("<HB", len(data), tag) + data


GUARD = 64
_PATTERN = bytes((0xA5, 0x5A, 0xC3, 0x3C)) * (GUARD // 4)


class CanaryArena:
    """Writable buffers carved out of one bytearray, each between canary bytes.

    A parser handed `buffers` can reach the guards only by writing past a
    buffer's end (through an address computed by hand, a ctypes pointer, a
    preadv into a wrong length): `check` sees it.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        total = GUARD + sum(size + GUARD for size in sizes)
        self.raw = bytearray(total)
        self._guards: list[int] = []
        view = memoryview(self.raw)
        self.buffers: list[memoryview] = []
        at = 0
        for size in sizes:
            self._guards.append(at)
            self.raw[at : at + GUARD] = _PATTERN
            at += GUARD
            self.buffers.append(view[at : at + size])
            at += size
        self._guards.append(at)
        self.raw[at : at + GUARD] = _PATTERN

    def check(self) -> None:
        for at in self._guards:
            if self.raw[at : at + GUARD] != _PATTERN:
                raise AssertionError(f"canary at arena offset {at:#x} was overwritten")

    def clear(self) -> None:
        for buf in self.buffers:
            buf[:] = bytes(len(buf))


class ErrorLog(logging.Handler):
    """Collects ERROR records of the given loggers; `check` fails if there are any."""

    def __init__(self, *loggers: str) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        for name in loggers:
            logging.getLogger(name).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def check(self) -> None:
        if self.records:
            first = self.records[0]
            self.records.clear()
            raise AssertionError(f"internal failure logged: {first.getMessage()}") from (
                first.exc_info[1] if first.exc_info else None
            )
