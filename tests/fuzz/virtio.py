"""Fuzz harness for the descriptor-chain walker and split queue over guest memory.

The guest owns the rings and descriptors, so the input is guest RAM: a flags
byte (queue size, EVENT_IDX, INDIRECT, complete each chain or not), a u16
that may override ``avail->idx``, then the bytes of guest memory from
address 0 on. Memory is the layout of tests/unit/test_virtio_fuzz.py (two
adjacent regions and one after a hole), carved out of a `CanaryArena`;
`drain` from the same test pops every chain and checks that each view lies
inside guest memory. The seeds are rings the test driver built.
"""

from __future__ import annotations

from emulators.virtio.memory import GuestMemory, MemoryRegion
from emulators.virtio.splitqueue import SplitQueue
from emulators.virtio.state import MemoryQueueState
from tests.support.driver import TestDriver
from tests.unit.test_virtio_fuzz import LAYOUT, drain

from .harness import CanaryArena, Harness, Input, OneInput

SIZES = (1, 2, 4, 8, 16, 32)
_SPAN = LAYOUT[1][0] + LAYOUT[1][1]  # the two adjacent regions from address 0


def canary_memory() -> tuple[GuestMemory, CanaryArena]:
    """Guest memory of `LAYOUT` whose regions sit between canaries."""
    arena = CanaryArena([size for _, size in LAYOUT])
    regions = [MemoryRegion(gpa, size, 0x10_0000 + gpa, 0) for gpa, size in LAYOUT]
    return GuestMemory.from_buffers(regions, arena.buffers), arena


def ring_gpas(size: int) -> tuple[int, int, int]:
    """Where the test driver puts a queue of `size` at address 0."""
    layout = TestDriver(canary_memory()[0], size, 0).layout
    return layout.desc_gpa, layout.avail_gpa, layout.used_gpa


_RINGS = {size: ring_gpas(size) for size in SIZES}


def _flags(size: int, event_idx: bool, indirect: bool, complete: bool) -> int:
    return (SIZES.index(size) | event_idx << 3 | indirect << 4 | complete << 5)


def _seeds() -> list[bytes]:
    out = []
    shapes: list[tuple[int, bool, list[tuple[list[bytes], list[int]]]]] = [
        (4, False, [([b"\x01" * 19], [96]), ([b"hdr"], [108])]),
        (8, True, [([b"\x02" * 51], [108, 4096 - 2048]), ([b"x" * 19], [])]),
        (8, False, [([b"a", b"b"], [8, 8])]),
        (16, True, [([b"r"], [1])] * 5),
        (1, False, [([], [8])]),
    ]
    for size, indirect, chains in shapes:
        memory, _arena = canary_memory()
        driver = TestDriver(memory, size, 0, data_end=_SPAN)
        for readable, writable in chains:
            driver.add_chain(readable, writable, indirect=indirect)
        image = memory.read(0, _SPAN).rstrip(b"\0")
        out.append(bytes((_flags(size, True, indirect, True),)) + b"\xff\xff" + image)
    return out


def _make() -> OneInput:
    def one_input(data: bytes) -> None:
        inp = Input(data)
        flags = inp.u8()
        size = SIZES[(flags & 7) % len(SIZES)]
        event_idx, indirect, complete = bool(flags & 8), bool(flags & 16), bool(flags & 32)
        avail_idx = inp.u16()
        memory, arena = canary_memory()
        memory.write(0, inp.take(_SPAN))
        desc, avail, used = _RINGS[size]
        if avail_idx != 0xFFFF:  # otherwise keep the one in the image
            memory.write_u16(avail + 2, avail_idx)
        queue = SplitQueue(memory, size, desc, avail, used, event_idx=event_idx,
                           indirect=indirect, state=MemoryQueueState(size))
        queue.set_base(0)
        drain(queue, arena.buffers, complete)  # type: ignore[arg-type]
        queue.release()
        memory.close()
        arena.check()

    return one_input


CHAIN = Harness(
    "virtio_chain",
    "the split queue and descriptor-chain walker over guest memory (emulators.virtio)",
    _make,
    _seeds,
    max_len=3 + _SPAN,
)
