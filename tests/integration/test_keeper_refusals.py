"""Front-end faults are the front-end's: bad messages through a real keeper.

Each test drives a real emulator process through `SessionKeeper`s, as the
launcher does, with the test front-end playing QEMU 7.2 (init, start, guest
I/O through its drivers), then sends one message that no correct front-end
sends.  The keeper must refuse it before the emulator sees it: the emulator is
not restarted (same process, alive, no traceback), the refusal is reported
(FRONTEND_REFUSED's data), the message is answered the way the vhost-user
spec allows (a failure status where REPLY_ACK was asked, else the keeper
hangs up on that controller), and whatever the spec lets go on does: the same
session after a failure status, the other controller after a hang-up.  A
replacement emulator never gets the refused message.

There is no end-to-end version with a real QEMU and guest: QEMU only sends
good messages, so these faults can only come from a front-end written to
send them, which is what this file uses.
"""

from __future__ import annotations

import functools
import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulators.limits import EXIT_PROTOCOL
from emulators.vhost_user.admission import Admission
from emulators.vhost_user.codec import encode_reply, encode_request
from emulators.vhost_user.constants import Request
from emulators.vhost_user.messages import (
    U64,
    MemoryRegion,
    MemoryTable,
    Payload,
    VringAddr,
    VringFd,
    VringState,
)
from launcher.sessionkeeper import OneInFlight, SessionKeeper
from tests.support.emulator_harness import ControllerRig, ControllerSpec, Disk
from tests.support.keeper_rig import KeeperRig, LoopThread
from tests.support.vhost_frontend import UVA_BASE, FrontendError

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
MEMORY = 4 * MIB


@pytest.fixture()
def rig(tmp_path: Path) -> Iterator[KeeperRig]:
    specs = [
        ControllerSpec("c0", (Disk(tmp_path / "a.img"),), queues=1, memory_size=MEMORY),
        ControllerSpec("c1", (Disk(tmp_path / "b.img"),), queues=1, memory_size=2 * MIB),
    ]
    keeper_rig = KeeperRig.start(specs, tmp_path)
    yield keeper_rig
    keeper_rig.close()


def roundtrip(rig: ControllerRig, lba: int, seed: int) -> None:
    """WRITE(10) then READ(10) of one 4 KiB block on the first request queue."""
    data = bytes((seed + i) & 0xFF for i in range(4096))
    w = rig.command(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 8, 0), data_out=[data])
    assert (w.response, w.status) == (0, 0), w
    r = rig.command(struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0), data_in=[4096])
    assert (r.response, r.status, r.data) == (0, 0, data)


def same_emulator_serves(keeper_rig: KeeperRig, pid: int, controllers: list[int]) -> None:
    emulator = keeper_rig.emulator
    assert emulator is not None and emulator.proc.pid == pid and emulator.alive(), (
        emulator.stderr() if emulator else ""
    )
    for i in controllers:
        roundtrip(keeper_rig.rigs[i], 10 + i, i)
    assert emulator.alive()
    assert "Traceback" not in emulator.stderr()
    assert keeper_rig.old_emulators == []


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def settle(keeper_rig: KeeperRig) -> None:
    """Every callback the keepers' loop had queued has run."""
    keeper_rig.call(lambda: None)


def sync(keeper_rig: KeeperRig) -> None:
    """Every message the front-ends sent has been through its keeper."""
    for rig in keeper_rig.rigs:
        rig.frontend.request(Request.GET_FEATURES)
    settle(keeper_rig)


# --- a status was asked for: QEMU gets a failure, the session goes on


def _bigger_than_its_fd(rig: ControllerRig) -> tuple[MemoryTable, tuple[int, ...], list[int]]:
    return MemoryTable((MemoryRegion(0, 2 * MEMORY, UVA_BASE, 0),)), (rig.frontend.memfd,), []


def _a_socket(rig: ControllerRig) -> tuple[MemoryTable, tuple[int, ...], list[int]]:
    a, b = socket.socketpair()
    fds = [a.detach(), b.detach()]
    return MemoryTable((MemoryRegion(0, MEMORY, UVA_BASE, 0),)), (fds[0],), fds


def _a_pipe(rig: ControllerRig) -> tuple[MemoryTable, tuple[int, ...], list[int]]:
    r, w = os.pipe()
    return MemoryTable((MemoryRegion(0, MEMORY, UVA_BASE, 0),)), (r,), [r, w]


def _read_only(rig: ControllerRig) -> tuple[MemoryTable, tuple[int, ...], list[int]]:
    fd = os.open(f"/proc/self/fd/{rig.frontend.memfd}", os.O_RDONLY)
    return MemoryTable((MemoryRegion(0, MEMORY, UVA_BASE, 0),)), (fd,), [fd]


def _offset_past_the_end(rig: ControllerRig) -> tuple[MemoryTable, tuple[int, ...], list[int]]:
    return MemoryTable((MemoryRegion(0, MEMORY, UVA_BASE, 0x1000),)), (rig.frontend.memfd,), []


@pytest.mark.parametrize(
    "make",
    [_bigger_than_its_fd, _offset_past_the_end, _a_socket, _a_pipe, _read_only],
    ids=["region-beyond-fd", "offset-beyond-fd", "socket", "pipe", "read-only"],
)
def test_memory_table_that_cannot_be_mapped_gets_a_failure_status(
    rig: KeeperRig, make: object
) -> None:
    c0 = rig.rigs[0]
    pid = rig.emulator.proc.pid if rig.emulator else 0
    table, fds, ours = make(c0)  # type: ignore[operator]
    sync(rig)
    before = open_fds()
    with pytest.raises(FrontendError, match="failed: ack 1"):
        c0.frontend.request(Request.SET_MEM_TABLE, table, fds=fds, need_reply=True)
    settle(rig)
    assert open_fds() == before, "the keeper kept an fd of the refused message"
    for fd in ours:
        os.close(fd)
    [refusal] = rig.refusals
    assert refusal.event_data()["controller"] == "c0"
    assert refusal.event_data()["request"] == "SET_MEM_TABLE"
    assert refusal.event_data()["action"] == "failure-ack"
    # The session goes on where it was: same memory, rings still running.
    same_emulator_serves(rig, pid, [0, 1])
    c0.frontend.request(Request.GET_FEATURES)
    # And a replacement emulator is not given the refused table.
    rig.replace_emulator()
    roundtrip(c0, 40, 4)
    roundtrip(rig.rigs[1], 41, 5)
    assert rig.emulator is not None
    assert rig.emulator.alive(), rig.emulator.stderr()


# --- nothing was asked: the keeper hangs up on that controller only


def _send(rig: ControllerRig, request: Request, payload: Payload = None,
          fds: tuple[int, ...] = ()) -> None:
    rig.frontend.send_raw(encode_request(request, payload, fds=fds), fds)


BAD_MESSAGES: list[tuple[str, Request, Payload, str]] = [
    ("ring-index", Request.SET_VRING_NUM, VringState(9, 64), "ring 9 does not exist"),
    ("ring-size", Request.SET_VRING_NUM, VringState(1, 100), "not a power of two"),
    ("ring-too-big", Request.SET_VRING_NUM, VringState(1, 4096), "not a power of two <= 1024"),
    ("ring-base-index", Request.SET_VRING_BASE, VringState(200, 0), "does not exist"),
    ("started-ring-size", Request.SET_VRING_NUM, VringState(2, 64), "is started"),
    ("addresses-outside", Request.SET_VRING_ADDR,
     VringAddr(1, 0, UVA_BASE + 8 * MIB, UVA_BASE + 9 * MIB, UVA_BASE + 10 * MIB, 0),
     "not inside one memory region"),
    ("enable-value", Request.SET_VRING_ENABLE, VringState(1, 2), "must be 0 or 1"),
    ("features", Request.SET_FEATURES, U64(1 << 63), "never offered"),
    ("get-base-index", Request.GET_VRING_BASE, VringState(9, 0), "ring 9 does not exist"),
    ("unsupported", Request.SET_BACKEND_REQ_FD, None, "not supported"),
]


@pytest.mark.parametrize(
    "request_, payload, reason", [m[1:] for m in BAD_MESSAGES], ids=[m[0] for m in BAD_MESSAGES]
)
def test_bad_message_without_a_status_drops_only_its_controller(
    rig: KeeperRig, request_: Request, payload: Payload, reason: str
) -> None:
    c0 = rig.rigs[0]
    pid = rig.emulator.proc.pid if rig.emulator else 0
    if "started" not in reason:
        c0.stop()  # as after a guest reset: the rings may be set up again
    fds: tuple[int, ...] = ()
    if request_ is Request.SET_BACKEND_REQ_FD:
        fds = (os.memfd_create("channel"),)
    _send(c0, request_, payload, fds)
    for fd in fds:
        os.close(fd)
    with pytest.raises(FrontendError, match="closed"):
        c0.frontend.request(Request.GET_FEATURES)
    settle(rig)
    [refusal] = rig.refusals
    data = refusal.event_data()
    assert (data["controller"], data["request"], data["action"]) == (
        "c0", request_.name, "disconnect"
    )
    assert reason in data["reason"]
    assert rig.keepers[0].closed
    same_emulator_serves(rig, pid, [1])


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL])
@pytest.mark.parametrize("kind", ["pipe", "memfd", "socket"])
def test_ring_fd_that_is_not_an_eventfd_is_refused(
    rig: KeeperRig, request_: Request, kind: str
) -> None:
    c0 = rig.rigs[0]
    pid = rig.emulator.proc.pid if rig.emulator else 0
    if kind == "pipe":
        ours = list(os.pipe())
    elif kind == "memfd":
        ours = [os.memfd_create("not-an-eventfd")]
    else:
        a, b = socket.socketpair()
        ours = [a.detach(), b.detach()]
    _send(c0, request_, VringFd(2), (ours[0],))
    for fd in ours:
        os.close(fd)
    with pytest.raises(FrontendError, match="closed"):
        c0.frontend.request(Request.GET_FEATURES)
    settle(rig)
    [refusal] = rig.refusals
    assert "not an eventfd" in refusal.reason
    same_emulator_serves(rig, pid, [1])


def test_bytes_that_do_not_frame_a_message_are_refused(rig: KeeperRig) -> None:
    c0 = rig.rigs[0]
    pid = rig.emulator.proc.pid if rig.emulator else 0
    c0.frontend.send_raw(struct.pack("<III", 999, 1, 0))
    with pytest.raises(FrontendError, match="closed"):
        c0.frontend.request(Request.GET_FEATURES)
    settle(rig)
    [refusal] = rig.refusals
    assert refusal.request == "unknown" and "unknown request code 999" in refusal.reason
    same_emulator_serves(rig, pid, [1])


# --- the backstop: what admission missed is blamed, not re-sent


@pytest.fixture()
def no_admission(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if admission had a gap: every message goes to the emulator."""
    monkeypatch.setattr(Admission, "check", lambda *a, **k: None)


@pytest.mark.usefixtures("no_admission")
@pytest.mark.parametrize("need_reply", [True, False], ids=["asked", "not-asked"])
def test_message_in_flight_when_the_emulator_fails_is_blamed_and_never_resent(
    rig: KeeperRig, need_reply: bool
) -> None:
    c0 = rig.rigs[0]
    table = MemoryTable((MemoryRegion(0, 2 * MEMORY, UVA_BASE, 0),))
    data = encode_request(Request.SET_MEM_TABLE, table, need_reply=need_reply,
                          fds=(c0.frontend.memfd,))
    c0.frontend.send_raw(data, (c0.frontend.memfd,))
    assert rig.emulator is not None
    assert rig.emulator.proc.wait(10) == EXIT_PROTOCOL  # it could not map the region
    line = rig.call(rig.keepers[0].blame_pending)
    assert line is not None and "SET_MEM_TABLE" in line and "c0" in line
    assert rig.call(rig.keepers[1].blame_pending) is None  # c1 had nothing in flight
    [refusal] = rig.refusals
    if need_reply:
        assert refusal.answer.value == "failure-ack"
        assert c0.frontend.read_reply(Request.SET_MEM_TABLE).payload == U64(1)
    else:
        assert refusal.answer.value == "disconnect"
    rig.replace_emulator()  # a restart: the record is replayed, the message is not
    new = rig.emulator
    assert new is not None
    roundtrip(rig.rigs[1], 50, 6)
    if need_reply:
        roundtrip(c0, 51, 7)
    assert new.alive() and "Traceback" not in new.stderr(), new.stderr()


@pytest.mark.usefixtures("no_admission")
def test_message_the_emulator_refuses_is_refused_and_not_recorded(rig: KeeperRig) -> None:
    """The emulator answers a status on every message: a refusal it gives to a
    message QEMU asked nothing for drops the connection; the emulator lives."""
    c0 = rig.rigs[0]
    pid = rig.emulator.proc.pid if rig.emulator else 0
    _send(c0, Request.SET_VRING_NUM, VringState(9, 64))
    with pytest.raises(FrontendError, match="closed"):
        c0.frontend.request(Request.GET_FEATURES)
    settle(rig)
    [refusal] = rig.refusals
    assert refusal.reason == "the emulator refused it" and refusal.request == "SET_VRING_NUM"
    same_emulator_serves(rig, pid, [1])


def test_nothing_in_flight_blames_nothing(rig: KeeperRig) -> None:
    sync(rig)
    assert all(rig.call(k.blame_pending) is None for k in rig.keepers)
    assert rig.refusals == []


@pytest.mark.usefixtures("no_admission")
def test_only_the_message_the_emulator_ended_on_is_blamed(rig: KeeperRig) -> None:
    """Another controller of the same emulator is busy at the same moment (as
    QEMU is when it starts several devices): its messages are innocent, wait
    their turn, and reach the next emulator."""
    c0, c1 = rig.rigs
    sync(rig)

    def c1_new_call_fds() -> None:
        for index in range(3):
            c1.frontend._replace(c1.frontend.call_fds, index, os.eventfd(0, os.EFD_NONBLOCK))
            fd = c1.frontend.call_fds[index]
            c1.frontend.send_raw(encode_request(Request.SET_VRING_CALL, VringFd(index),
                                                fds=(fd,)), (fd,))

    c1_new_call_fds()
    table = MemoryTable((MemoryRegion(0, 2 * MEMORY, UVA_BASE, 0),))
    c0.frontend.send_raw(encode_request(Request.SET_MEM_TABLE, table, fds=(c0.frontend.memfd,)),
                         (c0.frontend.memfd,))
    c1_new_call_fds()
    assert rig.emulator is not None
    assert rig.emulator.proc.wait(10) == EXIT_PROTOCOL
    assert rig.call(rig.keepers[1].blame_pending) is None
    line = rig.call(rig.keepers[0].blame_pending)
    assert line is not None and "SET_MEM_TABLE" in line
    assert [r.controller for r in rig.refusals] == ["c0"]
    rig.replace_emulator()
    roundtrip(c1, 60, 8)
    assert rig.emulator is not None and rig.emulator.alive(), rig.emulator.stderr()


def test_one_message_in_flight_per_emulator() -> None:
    """Two controllers of one emulator: the second keeper forwards only once the
    first message has its answer, so a failing emulator failed on a known one."""
    loop = LoopThread()
    gate = loop.call(OneInFlight)
    qemus, emus, keepers = [], [], []
    try:
        for cid in ("a", "b"):
            qemu, keeper_side = socket.socketpair()
            mine, emu = socket.socketpair()
            qemus.append(qemu)
            emus.append(emu)
            keepers.append(loop.call(functools.partial(
                SessionKeeper, cid, keeper_side, 3, in_flight=gate)))
            loop.call(functools.partial(keepers[-1].attach, mine, False))
        for qemu in qemus:
            qemu.sendall(encode_request(Request.GET_FEATURES))
        ready, _, _ = select.select(emus, [], [], 2.0)
        assert len(ready) == 1  # one forwarded, the other waits
        first = ready[0]
        assert first.recv(64) == encode_request(Request.GET_FEATURES)
        other = emus[1 - emus.index(first)]
        assert select.select([other], [], [], 0.2)[0] == []
        first.sendall(encode_reply(Request.GET_FEATURES, U64(5)))
        assert select.select([other], [], [], 2.0)[0] == [other]
        assert other.recv(64) == encode_request(Request.GET_FEATURES)
        assert qemus[emus.index(first)].recv(64) == encode_reply(Request.GET_FEATURES, U64(5))
    finally:
        for keeper in keepers:
            loop.call(keeper.close)
        for sock in (*qemus, *emus):
            sock.close()
        loop.close()
