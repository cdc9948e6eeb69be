"""A keeper's record outlives the launcher: a new keeper carries on from it.

Real emulator processes behind real keepers (tests.support.keeper_rig). The
launcher's death is played by keeping a copy of every socket and fd it held
(as the holder does), closing the keepers, and building new ones from their
records: `restore`, QEMU's socket, and the running emulator attached with
`replay=False`. The emulator must go on serving, unaware, and a later
restart must replay what the first keepers would have.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulators.vhost_user.codec import encode_request
from emulators.vhost_user.constants import Feature, Request
from emulators.vhost_user.messages import U64, VringFd
from emulators.vhost_user.replay import replay_messages
from launcher import keeperrecord
from launcher.sessionkeeper import OneInFlight, SessionKeeper
from tests.support.emulator_harness import FIRST_REQUEST_QUEUE, ControllerRig, ControllerSpec, Disk
from tests.support.keeper_rig import KeeperRig

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


@pytest.fixture()
def rig(tmp_path: Path) -> Iterator[KeeperRig]:
    specs = [
        ControllerSpec("c0", (Disk(tmp_path / "a.img"),), queues=1, memory_size=4 * MIB),
        ControllerSpec("c1", (Disk(tmp_path / "b.img"),), queues=2, memory_size=2 * MIB),
    ]
    keeper_rig = KeeperRig.start(specs, tmp_path)
    yield keeper_rig
    keeper_rig.close()


def roundtrip(rig: ControllerRig, lba: int, seed: int) -> None:
    data = bytes((seed + i) & 0xFF for i in range(4096))
    w = rig.command(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 8, 0), data_out=[data])
    assert (w.response, w.status) == (0, 0), w
    r = rig.command(struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0), data_in=[4096])
    assert (r.response, r.status, r.data) == (0, 0, data)


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def relaunch(rig: KeeperRig) -> dict[str, list[tuple[bytes, list[int]]]]:
    """The launcher dies and another takes over: what each keeper had is kept
    (dup'd, as the holder keeps it), the keepers go, new ones are built from
    the records and adopt QEMU's sockets and the running emulator. Returns
    what the new keepers' `on_record` hears from then on."""
    held = []

    def die() -> None:  # at one instant of the loop, as a SIGKILL would
        for keeper in rig.keepers:
            data, fds = keeper.encode_record()
            assert keeper.qemu is not None and keeper._backend is not None
            held.append((keeper.controller_id, data, [os.dup(fd) for fd in fds],
                         os.dup(keeper.qemu.fileno()), os.dup(keeper._backend.fileno())))
        for keeper in rig.keepers:
            keeper.close()

    rig.call(die)
    gate = rig.call(OneInFlight)
    heard: dict[str, list[tuple[bytes, list[int]]]] = {}
    new = []
    for spec, (cid, data, fds, qemu_fd, backend_fd) in zip(rig.specs, held, strict=True):
        heard[cid] = []

        def make(cid: str = cid, spec: ControllerSpec = spec) -> SessionKeeper:
            def on_record(record: bytes, its_fds: list[int]) -> None:
                heard[cid].append((record, list(its_fds)))

            return SessionKeeper(
                cid, None, FIRST_REQUEST_QUEUE + spec.queues, on_refused=rig.refusals.append,
                guest_memory=spec.memory_size, in_flight=gate, on_record=on_record,
            )

        keeper = rig.call(make)
        rig.call(functools.partial(keeper.restore, data, fds))
        assert rig.call(keeper.encode_record) == (data, fds)
        rig.call(functools.partial(keeper.set_frontend, socket.socket(fileno=qemu_fd)))
        rig.call(functools.partial(keeper.attach, socket.socket(fileno=backend_fd), False))
        new.append(keeper)
    rig.keepers[:] = new
    return heard


def sync(rig: KeeperRig) -> None:
    """Every message the front-ends sent has been through its keeper."""
    for controller in rig.rigs:
        controller.frontend.request(Request.GET_FEATURES)
    rig.call(lambda: None)


def test_restored_record_replays_fd_for_fd(rig: KeeperRig) -> None:
    sync(rig)
    original = rig.keepers[1]
    data, fds = rig.call(original.encode_record)
    assert sorted(fds) == sorted(original.record.held_fds())
    copies = [os.dup(fd) for fd in fds]
    fresh = rig.call(lambda: SessionKeeper("c1", None, FIRST_REQUEST_QUEUE + 2))
    try:
        rig.call(functools.partial(fresh.restore, data, copies))
        assert fresh.record.snapshot().features == original.record.snapshot().features
        want = replay_messages(original.record.snapshot(), {})
        got = replay_messages(fresh.record.snapshot(), {})
        assert [d for d, _ in got] == [d for d, _ in want]
        assert len(want) > 10 and any(f for _, f in want)
        for (_, theirs), (_, ours) in zip(want, got, strict=True):
            assert [inode(fd) for fd in ours] == [inode(fd) for fd in theirs]
            assert set(ours) <= set(copies)  # its own fds, not the original's
    finally:
        rig.call(fresh.close)
    for fd in copies:  # the restored keeper owned them: closed with it
        with pytest.raises(OSError):
            os.fstat(fd)


def test_refused_record_leaves_a_fresh_keeper_and_closes_the_fds(rig: KeeperRig) -> None:
    sync(rig)  # no fd arrives meanwhile to take a closed one's number
    data, fds = rig.call(rig.keepers[0].encode_record)
    copies = [os.dup(fd) for fd in fds]
    other = rig.call(lambda: SessionKeeper("c0", None, FIRST_REQUEST_QUEUE + 5))
    with pytest.raises(keeperrecord.KeeperRecordError, match="other queues"):
        rig.call(functools.partial(other.restore, data, copies))
    for fd in copies:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert rig.call(other.encode_record) == keeperrecord.encode(
        keeperrecord.from_session(other.record))
    rig.call(other.close)


def test_a_record_from_a_keeper_that_offered_less_is_taken(rig: KeeperRig) -> None:
    """An upgrade under a running VM: the old launcher's keeper offered fewer
    features (no dirty logging); what was negotiated is within the new offer."""
    sync(rig)
    original = rig.keepers[1]
    recorded = rig.call(original.encode_record)[1]
    older = dataclasses.replace(
        keeperrecord.decode(*rig.call(original.encode_record)),
        offered_features=original.record.offered_features & ~(1 << Feature.LOG_ALL))
    data, fds = keeperrecord.encode(older)
    assert sorted(fds) == sorted(recorded)
    copies = {fd: os.dup(fd) for fd in fds}
    fresh = rig.call(lambda: SessionKeeper("c1", None, FIRST_REQUEST_QUEUE + 2))
    try:
        rig.call(functools.partial(fresh.restore, data, [copies[fd] for fd in fds]))
        assert fresh.record.snapshot().features == original.record.snapshot().features
    finally:
        rig.call(fresh.close)
    newer = dataclasses.replace(older, offered_features=older.offered_features | (1 << 40))
    data, fds = keeperrecord.encode(newer)
    other = rig.call(lambda: SessionKeeper("c1", None, FIRST_REQUEST_QUEUE + 2))
    with pytest.raises(keeperrecord.KeeperRecordError, match="features"):
        rig.call(functools.partial(other.restore, data, [os.dup(fd) for fd in fds]))
    rig.call(other.close)


def test_new_keepers_adopt_a_running_emulator_then_restart_it(rig: KeeperRig) -> None:
    assert rig.emulator is not None
    pid = rig.emulator.proc.pid
    c0, c1 = rig.rigs
    roundtrip(c0, 1, 1)
    heard = relaunch(rig)
    # Nothing was sent to the emulator: it serves on, rings where they were.
    roundtrip(c0, 2, 2)
    roundtrip(c1, 3, 3)
    assert rig.emulator.proc.pid == pid and rig.emulator.alive()
    assert rig.old_emulators == []
    # (c1's set-up may still have been under way: its new keeper finished it.)
    sync(rig)
    for keeper in rig.keepers:
        record = rig.call(keeper.encode_record)
        assert heard[keeper.controller_id][-1:] in ([], [record])
    # The control plane goes through the new keepers: a guest reset.
    before = len(heard["c0"])
    bases = c0.stop()
    assert bases[FIRST_REQUEST_QUEUE] == c0.drivers[FIRST_REQUEST_QUEUE].avail_idx
    c0.start(bases)
    roundtrip(c0, 4, 4)
    sync(rig)
    assert len(heard["c0"]) > before
    last, last_fds = heard["c0"][-1]
    assert (last, last_fds) == rig.call(rig.keepers[0].encode_record)
    assert keeperrecord.decode(last, last_fds).pending is None
    # A restart replays the adopted records to a new emulator.
    rig.replace_emulator()
    assert rig.emulator.proc.pid != pid
    roundtrip(c0, 5, 5)
    roundtrip(c1, 6, 6)
    assert rig.emulator.alive() and "Traceback" not in rig.emulator.stderr()


def test_message_in_flight_when_the_launcher_dies_is_answered(rig: KeeperRig) -> None:
    """QEMU waits for an answer the dead launcher was relaying: the record has
    the message (delivered) and the one queued behind it; the new keeper
    forwards the emulator's answer and then the queued message."""
    assert rig.emulator is not None
    c0 = rig.rigs[0]
    keeper = rig.keepers[0]
    assert c0.frontend.reply_ack
    sync(rig)  # c1's set-up done: c0 alone will have a message in flight
    os.kill(rig.emulator.proc.pid, signal.SIGSTOP)
    try:
        index = FIRST_REQUEST_QUEUE
        c0.frontend._replace(c0.frontend.call_fds, index, os.eventfd(0, os.EFD_NONBLOCK))
        call = c0.frontend.call_fds[index]
        c0.frontend.send_raw(encode_request(Request.SET_VRING_CALL, VringFd(index),
                                            need_reply=True, fds=(call,)), (call,))
        c0.frontend.send_raw(encode_request(Request.GET_FEATURES))
        deadline = time.monotonic() + 5
        while True:
            data, fds = rig.call(keeper.encode_record)
            record = keeperrecord.decode(data, fds)
            if (record.pending and record.queued) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert record.pending is not None and record.delivered
        assert record.pending.request is Request.SET_VRING_CALL
        assert [m.request for m in record.queued] == [Request.GET_FEATURES]
        relaunch(rig)
    finally:
        os.kill(rig.emulator.proc.pid, signal.SIGCONT)
    assert c0.frontend.read_reply(Request.SET_VRING_CALL).payload == U64(0)
    features = c0.frontend.read_reply(Request.GET_FEATURES).payload
    assert isinstance(features, U64) and features.value == c0.frontend.offered_features
    roundtrip(c0, 7, 7)  # completions signalled on the new call eventfd
    assert rig.refusals == [] and rig.old_emulators == []
