"""What a new remote process needs to take over a proxy's link, and how to
bring it there. Pure: fds are opaque ints, duplicated and closed through the
functions the record is built with.

Theory of operation. A remote process holds three kinds of state the proxy
set up once and will not send again: the guest's RAM (SYNC_SYSMEM, sent
again only when the memory map changes), the interrupt eventfds
(SET_IRQFD), and the PCI config space (BAR addresses, command register,
written by firmware and the guest's driver). The record keeps the latest of
each, and the one request the proxy waits on. A new remote gets, in order:
SYNC_SYSMEM, SET_IRQFD, each recorded config write (the relay swallows
their RETs), then the pending request by this rule:

- a config read or write, a BAR read: sent again. A config write sets the
  same value again; a read of a freshly reset chip returns reset values,
  which the guest's driver sees as an idle or halted chip and handles.
- a BAR write that was in flight: NOT sent again; the proxy is told it is
  done (RET 0). The new chip lost its registers with the old process; a
  write meant for the old state can do harm on the new one (a write to DSP
  starts SCRIPTS at that address with reset registers, DSA and the
  scratch registers zero). Dropped, the guest's own error handling (a
  command timeout, then abort and chip reset) brings the chip back.
- DEVICE_RESET: sent again (a reset is idempotent).

The rule applies only after a remote was lost (`replay_plan(after_loss=
True)`); a first remote gets every request as the proxy sent it.

Config writes are condensed: the last value per (addr, len), replayed in the
order of their last write. That ends in the same bytes as the full
sequence: a byte's final value comes from the last write that covered it,
which is kept, and every write replayed after it was also written after it.
Keys are bounded by the config space (at most 256 + 255 + 253 of them).
A config write enters the record when its RET arrives, so it is never both
recorded and pending.

Fds: the record keeps its own duplicates of SYNC_SYSMEM's and SET_IRQFD's
fds (the caller keeps or closes the message's), replaces them when a newer
message comes and closes them on `close()`. A replay plan lends them.

Errors::

    MpqemuError (codec)
     +-- RecordError    the proxy broke the one-request-at-a-time rule
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .codec import (
    CONFIG_LENS,
    CONFIG_SPACE,
    BarWrite,
    MpqemuError,
    PciConfigWrite,
    Request,
    Ret,
    SetIrqfd,
    SyncSysmem,
)

MAX_CONFIG_WRITES = sum(CONFIG_SPACE - n + 1 for n in CONFIG_LENS)
"""Distinct (addr, len) keys a checked config write can have: the bound."""


class RecordError(MpqemuError):
    """The proxy sent a request while another waited for its reply."""


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """How to bring a new remote to the recorded state.

    Send `setup` in order (SYNC_SYSMEM, SET_IRQFD, config writes; the fds
    are the record's, lent: send, do not close), then consume one RET per
    config write in it (`local_replies`). Then, if `resend` is set, send it
    and forward its RET to the proxy; if `answer` is set, send it to the
    proxy at once (the pending request is then over)."""

    setup: tuple[SyncSysmem | SetIrqfd | PciConfigWrite, ...]
    local_replies: int
    resend: Request | None
    answer: Ret | None


class Record:
    """The state a remote holds that the proxy will not send again."""

    def __init__(self, dup_fd: Callable[[int], int], close_fd: Callable[[int], None]) -> None:
        self._dup = dup_fd
        self._close = close_fd
        self.sysmem: SyncSysmem | None = None
        self.irqfd: SetIrqfd | None = None
        self._config: dict[tuple[int, int], PciConfigWrite] = {}
        self.pending: Request | None = None
        self.closed = False

    @property
    def config_writes(self) -> tuple[PciConfigWrite, ...]:
        """The condensed config writes, in replay order."""
        return tuple(self._config.values())

    def note(self, message: SyncSysmem | SetIrqfd) -> None:
        """A setup message the proxy sent: keep duplicates of its fds (the
        caller still owns `message.fds`)."""
        self._check_open()
        if isinstance(message, SyncSysmem):
            fds = self._dup_all(message.fds)
            old = self.sysmem.fds if self.sysmem is not None else ()
            self.sysmem = SyncSysmem(message.regions, fds)
        else:
            intr, resample = self._dup_all(message.fds)
            old = self.irqfd.fds if self.irqfd is not None else ()
            self.irqfd = SetIrqfd(intr, resample)
        for fd in old:
            self._close(fd)

    def request(self, message: Request) -> None:
        """The proxy sent a request and now waits for its reply."""
        self._check_open()
        if self.pending is not None:
            raise RecordError(
                f"{message.command.name} sent while {self.pending.command.name} "
                "waits for its reply")
        self.pending = message

    def replied(self) -> Request:
        """The pending request got its reply: it is over (a config write
        enters the record). Returns it."""
        if self.pending is None:
            raise RecordError("a reply, but no request waits for one")
        done, self.pending = self.pending, None
        if isinstance(done, PciConfigWrite):
            key = (done.addr, done.len)
            self._config.pop(key, None)  # re-inserted last: order of last write
            self._config[key] = done
            assert len(self._config) <= MAX_CONFIG_WRITES
        return done

    def replay_plan(self, after_loss: bool) -> ReplayPlan:
        """What a new remote gets; `after_loss`: a remote holding the proxy's
        state was lost (see the module docstring for the pending request)."""
        self._check_open()
        setup: list[SyncSysmem | SetIrqfd | PciConfigWrite] = []
        if self.sysmem is not None:
            setup.append(self.sysmem)
        if self.irqfd is not None:
            setup.append(self.irqfd)
        writes = self.config_writes
        setup.extend(writes)
        resend: Request | None = self.pending
        answer = None
        if after_loss and isinstance(self.pending, BarWrite):
            resend, answer = None, Ret(0)
        return ReplayPlan(tuple(setup), len(writes), resend, answer)

    def answered_locally(self) -> Request:
        """The plan's `answer` went to the proxy: the pending request is over."""
        return self.replied()

    def close(self) -> None:
        """Close every fd the record holds. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for message in (self.sysmem, self.irqfd):
            if message is not None:
                for fd in message.fds:
                    self._close(fd)
        self.sysmem = self.irqfd = None
        self._config.clear()
        self.pending = None

    def _dup_all(self, fds: tuple[int, ...]) -> tuple[int, ...]:
        copies: list[int] = []
        try:
            for fd in fds:
                copies.append(self._dup(fd))
        except BaseException:
            for fd in copies:
                self._close(fd)
            raise
        return tuple(copies)

    def _check_open(self) -> None:
        if self.closed:
            raise RecordError("the record is closed")
