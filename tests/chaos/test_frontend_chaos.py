"""Chaos from the front-end's side: refused messages mixed with emulator kills.

QEMU only sends good messages, so a VM cannot produce these; the test
front-end does (tests/support/keeper_rig.py: a real emulator process behind
the launcher's session keepers, a front-end playing QEMU 7.2 and the guest).
A seeded random sequence mixes, on two controllers:

* verified I/O (WRITE then READ of a 4 KiB block, compared),
* a memory table no correct front-end sends (a region beyond its fd, or an
  fd that cannot be mapped) asked with REPLY_ACK: the keeper must answer
  with a failure status and keep the session,
* a ring message no correct front-end sends (a ring index out of range)
  asked with REPLY_ACK: the same,
* SIGKILL of the emulator, then a successor that gets the keepers' replay,
* SIGKILL while a request is in flight (submitted, not yet waited for).

Afterwards: every refusal was reported once, no emulator ever received a
refused message (none exited with the protocol status, none logged a
traceback), every block read back what was written, and every kill was
followed by a successor that served.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulators.vhost_user.constants import Request
from emulators.vhost_user.messages import MemoryRegion, MemoryTable, VringState
from tests.support.emulator_harness import (
    FIRST_REQUEST_QUEUE,
    ControllerRig,
    ControllerSpec,
    Disk,
    decode_reply,
)
from tests.support.keeper_rig import KeeperRig
from tests.support.vhost_frontend import UVA_BASE, FrontendError

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
MEMORY = 4 * MIB
STEPS = int(os.environ.get("MPL_FRONTEND_CHAOS_STEPS", "60"))
BLOCKS = 64  # 4 KiB blocks per disk the test writes


@pytest.fixture()
def rig(tmp_path: Path) -> Iterator[KeeperRig]:
    specs = [
        ControllerSpec("c0", (Disk(tmp_path / "a.img"),), queues=1, memory_size=MEMORY),
        ControllerSpec("c1", (Disk(tmp_path / "b.img"),), queues=1, memory_size=MEMORY),
    ]
    keeper_rig = KeeperRig.start(specs, tmp_path)
    yield keeper_rig
    keeper_rig.close()


def _write(lba: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 8, 0)


def _read(lba: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0)


def _block(rng: random.Random) -> bytes:
    return rng.randbytes(4096)


def _bad_table(c: ControllerRig, which: int) -> tuple[MemoryTable, tuple[int, ...], list[int]]:
    if which == 0:  # a region larger than the memfd behind it
        return MemoryTable((MemoryRegion(0, 2 * MEMORY, UVA_BASE, 0),)), (c.frontend.memfd,), []
    r, w = os.pipe()  # an fd that cannot be mapped
    return MemoryTable((MemoryRegion(0, MEMORY, UVA_BASE, 0),)), (r,), [r, w]


def test_refused_messages_and_kills_mixed(rig: KeeperRig) -> None:
    seed = int(os.environ.get("MPL_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nfront-end chaos seed {seed} (MPL_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    written: dict[tuple[int, int], bytes] = {}
    refused = kills = ios = 0
    log: list[str] = []
    for step in range(STEPS):
        i = rng.randrange(2)
        c = rig.rigs[i]
        what = rng.choices(["io", "table", "ring", "kill", "kill-inflight"], [5, 2, 2, 2, 1])[0]
        log.append(f"{step} {what} c{i}")
        if what == "io":
            lba = 8 * rng.randrange(BLOCKS)
            data = _block(rng)
            w = c.command(_write(lba), data_out=[data])
            assert (w.response, w.status) == (0, 0), (log, w)
            written[(i, lba)] = data
            r = c.command(_read(lba), data_in=[4096])
            assert (r.response, r.status, r.data) == (0, 0, data), log
            ios += 1
        elif what == "table":
            table, fds, ours = _bad_table(c, rng.randrange(2))
            with pytest.raises(FrontendError, match="failed"):
                c.frontend.request(Request.SET_MEM_TABLE, table, fds=fds, need_reply=True)
            for fd in ours:
                os.close(fd)
            refused += 1
        elif what == "ring":
            with pytest.raises(FrontendError, match="failed"):
                c.frontend.request(Request.SET_VRING_NUM, VringState(9, 64), need_reply=True)
            refused += 1
        elif what == "kill":
            rig.replace_emulator()
            kills += 1
        else:
            # A WRITE submitted and not waited for, then the kill: the
            # successor runs it again (or it had completed); either way the
            # guest gets one completion and the block holds the data.
            lba = 8 * rng.randrange(BLOCKS)
            data = _block(rng)
            head = c.submit_command(_write(lba), data_out=[data])
            rig.replace_emulator()
            kills += 1
            reply = decode_reply(*c.wait(FIRST_REQUEST_QUEUE, head))
            assert (reply.response, reply.status) == (0, 0), (log, reply)
            written[(i, lba)] = data
    # Everything written reads back, through the last emulator.
    for (i, lba), data in sorted(written.items()):
        r = rig.rigs[i].command(_read(lba), data_in=[4096])
        assert (r.response, r.status, r.data) == (0, 0, data), (i, lba, log)
    assert len(rig.refusals) == refused, (rig.refusals, log)
    assert rig.emulator is not None
    assert rig.emulator.alive(), rig.emulator.stderr()
    emulators = [*rig.old_emulators, rig.emulator]
    for emulator in emulators:
        text = emulator.stderr()
        assert "Traceback" not in text, text
        assert emulator.proc.returncode in (None, -9), (emulator.proc.returncode, text)
    print(f"{STEPS} steps: {ios} verified I/O, {refused} refused messages, {kills} kills")
