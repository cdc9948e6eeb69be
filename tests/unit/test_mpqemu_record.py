"""The mpqemu record: what a new remote gets, in what order, with which fds,
and the rule for the request that was waiting for its reply."""

from __future__ import annotations

import random

import pytest

from launcher.mpqemu.codec import (
    BarRead,
    BarWrite,
    DeviceReset,
    PciConfigRead,
    PciConfigWrite,
    Region,
    Request,
    Ret,
    SetIrqfd,
    SyncSysmem,
)
from launcher.mpqemu.record import MAX_CONFIG_WRITES, Record, RecordError

GIB = 1 << 30


class Fds:
    """Fake dup/close with books: which copies are open."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.next = 1000
        self.open: set[int] = set()
        self.fail_after = fail_after

    def dup(self, fd: int) -> int:
        if self.fail_after is not None and len(self.open) >= self.fail_after:
            raise OSError(24, "Too many open files")
        self.next += 1
        self.open.add(self.next)
        return self.next

    def close(self, fd: int) -> None:
        self.open.remove(fd)  # KeyError: closed twice or never ours


def new_record(fds: Fds | None = None) -> tuple[Record, Fds]:
    books = fds or Fds()
    return Record(books.dup, books.close), books


def sysmem(n: int = 2) -> SyncSysmem:
    return SyncSysmem(tuple(Region(i * GIB, GIB, i * GIB) for i in range(n)),
                      tuple(range(10, 10 + n)))


def write(record: Record, addr: int, val: int, length: int) -> None:
    record.request(PciConfigWrite(addr, val, length))
    record.replied()


def test_sync_sysmem_keeps_copies_and_replaces_them() -> None:
    record, fds = new_record()
    first = sysmem(2)
    record.note(first)
    assert record.sysmem is not None and record.sysmem.regions == first.regions
    kept = set(record.sysmem.fds)
    assert kept == fds.open and not kept & set(first.fds)
    record.note(sysmem(3))
    assert record.sysmem is not None and len(record.sysmem.regions) == 3
    assert fds.open == set(record.sysmem.fds) and not fds.open & kept
    record.close()
    assert fds.open == set()


def test_set_irqfd_keeps_copies_and_replaces_them() -> None:
    record, fds = new_record()
    record.note(SetIrqfd(5, 6))
    assert record.irqfd is not None
    first = set(record.irqfd.fds)
    assert first == fds.open and len(first) == 2
    record.note(SetIrqfd(7, 8))
    assert fds.open == set(record.irqfd.fds) and not fds.open & first
    record.close()
    record.close()  # idempotent
    assert fds.open == set()


def test_a_failed_dup_keeps_nothing_and_the_old_copies() -> None:
    record, fds = new_record(Fds(fail_after=3))
    record.note(sysmem(2))
    old = record.sysmem
    assert old is not None
    with pytest.raises(OSError):
        record.note(sysmem(3))  # third copy fails
    assert record.sysmem is old and fds.open == set(old.fds)


def test_config_writes_condensed_in_order_of_last_write() -> None:
    record, _ = new_record()
    write(record, 0x10, 0xFFFFFFFF, 4)  # BAR sizing
    write(record, 0x04, 0x0000, 2)
    write(record, 0x10, 0xFEBF0000, 4)
    write(record, 0x04, 0x0007, 2)
    write(record, 0x0D, 0x40, 1)
    assert record.config_writes == (
        PciConfigWrite(0x10, 0xFEBF0000, 4),
        PciConfigWrite(0x04, 0x0007, 2),
        PciConfigWrite(0x0D, 0x40, 1),
    )


def apply(space: bytearray, w: PciConfigWrite) -> None:
    space[w.addr:w.addr + w.len] = w.val.to_bytes(4, "little")[:w.len]


def test_condensed_writes_end_in_the_same_bytes() -> None:
    """Overlapping writes of mixed lengths: replaying the condensed list on a
    blank space gives what the full sequence gave."""
    rng = random.Random(3)
    for _ in range(200):
        record, _ = new_record()
        full = bytearray(256)
        for _ in range(rng.randint(1, 60)):
            length = rng.choice([1, 2, 4])
            addr = rng.randrange(0, 20 - length)  # a small window: many overlaps
            w = PciConfigWrite(addr, rng.randrange(1 << 32), length)
            write(record, w.addr, w.val, w.len)
            apply(full, w)
        condensed = bytearray(256)
        for w in record.config_writes:
            apply(condensed, w)
        assert condensed[:20] == full[:20]


def test_config_writes_are_bounded_by_the_space() -> None:
    assert MAX_CONFIG_WRITES == 256 + 255 + 253
    record, _ = new_record()
    for _ in range(2):
        for length in (1, 2, 4):
            for addr in range(0, 257 - length):
                write(record, addr, 1, length)
    assert len(record.config_writes) == MAX_CONFIG_WRITES


def test_a_config_write_enters_the_record_only_once_answered() -> None:
    record, _ = new_record()
    record.request(PciConfigWrite(4, 7, 2))
    assert len(record.config_writes) == 0
    plan = record.replay_plan(after_loss=True)
    assert len(plan.setup) == 0 and plan.resend == PciConfigWrite(4, 7, 2)
    assert record.replied() == PciConfigWrite(4, 7, 2)
    assert list(record.config_writes) == [PciConfigWrite(4, 7, 2)]


def test_reads_are_not_recorded() -> None:
    record, _ = new_record()
    for request in (PciConfigRead(0, 0, 4), BarRead(0, 0, 4, True), BarWrite(0, 1, 1, True),
                    DeviceReset()):
        record.request(request)
        record.replied()
    assert record.config_writes == ()


def test_one_request_at_a_time() -> None:
    record, _ = new_record()
    record.request(BarRead(0xC000, 0, 1, False))
    with pytest.raises(RecordError, match="BAR_WRITE sent while BAR_READ waits"):
        record.request(BarWrite(0xC000, 0, 1, False))
    record.replied()
    with pytest.raises(RecordError, match="no request waits"):
        record.replied()


def test_plan_order_and_local_replies() -> None:
    record, _ = new_record()
    write(record, 0x04, 7, 2)
    record.note(SetIrqfd(5, 6))
    record.note(sysmem(1))
    write(record, 0x10, 0xFEBF0000, 4)
    record.request(BarRead(0xFEBF0000, 0, 1, True))
    plan = record.replay_plan(after_loss=True)
    assert [type(m) for m in plan.setup] == [SyncSysmem, SetIrqfd, PciConfigWrite,
                                             PciConfigWrite]
    assert plan.setup[0] is record.sysmem and plan.setup[1] is record.irqfd  # lent fds
    assert plan.local_replies == 2
    assert plan.resend == BarRead(0xFEBF0000, 0, 1, True) and plan.answer is None


@pytest.mark.parametrize("pending", [
    PciConfigRead(0, 0, 4), PciConfigWrite(4, 7, 2), BarRead(0xC000, 0, 1, False),
    DeviceReset(),
])
def test_pending_requests_sent_again(pending: Request) -> None:
    record, _ = new_record()
    record.request(pending)
    plan = record.replay_plan(after_loss=True)
    assert plan.resend == pending and plan.answer is None


def test_a_bar_write_in_flight_is_answered_not_sent_again() -> None:
    record, _ = new_record()
    record.request(BarWrite(0xFEBF002C, 0x1000, 4, True))  # DSP: would start SCRIPTS
    plan = record.replay_plan(after_loss=True)
    assert plan.resend is None and plan.answer == Ret(0)
    assert record.answered_locally() == BarWrite(0xFEBF002C, 0x1000, 4, True)
    assert record.pending is None


def test_a_first_remote_gets_a_held_bar_write() -> None:
    record, _ = new_record()
    record.request(BarWrite(0xC000, 1, 1, False))
    plan = record.replay_plan(after_loss=False)
    assert plan.resend == BarWrite(0xC000, 1, 1, False) and plan.answer is None


def test_empty_record_empty_plan() -> None:
    record, _ = new_record()
    plan = record.replay_plan(after_loss=True)
    assert (plan.setup, plan.local_replies, plan.resend, plan.answer) == ((), 0, None, None)


def test_closed_record_refuses() -> None:
    record, _ = new_record()
    record.close()
    with pytest.raises(RecordError):
        record.note(SetIrqfd(1, 2))
    with pytest.raises(RecordError):
        record.replay_plan(after_loss=True)
