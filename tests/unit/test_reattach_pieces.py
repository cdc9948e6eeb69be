"""What a launcher taking over a running VM gets back, piece by piece: an
emulator's control link with messages meant for the launcher before, the
run folder and uid leases through lock fds a holder kept, the management
socket still listening, the restart policy's counters."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from emulators.process import Emulator
from launcher import keeperrecord
from launcher.heartbeat import protocol as proto
from launcher.heartbeat.detector import NoReply, ProgressTotals
from launcher.heartbeat.link import BARRIER_SEQ, ControlLink, ProtocolBroken, control_pair
from launcher.management.server import EventBus, ManagementServer, bind_management_socket
from launcher.restart_policy import (
    ExitReason,
    GiveUp,
    Nothing,
    RestartPolicy,
    RunState,
    Start,
    check_snapshot,
)
from launcher.runfolder import (
    LOCK_NAME,
    MARKER_NAME,
    RunFolder,
    RunFolderBusy,
    RunFolderForeign,
    is_own,
)
from launcher.spec import GiveUpAction, RestartMode
from launcher.uidpool import HostUids, Lease, UidPool
from launcher.vmstate import VmState
from tests.unit.test_management_commands import FakeVm

pytestmark = pytest.mark.timeout(30)
T = TypeVar("T")
MS = 1_000_000
S = 1_000_000_000


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro
    return asyncio.run(main())


# --- the control link ------------------------------------------------------------


def emulator_send(sock: socket.socket, message: proto.Message) -> None:
    data, fds = proto.encode(message)
    assert not fds
    sock.send(data)


async def emulator_receive(sock: socket.socket) -> proto.Message:
    data = await asyncio.wait_for(
        asyncio.get_running_loop().sock_recv(sock, proto.MAX_DATAGRAM + 1), 5)
    return proto.decode(data, [], sender=proto.Sender.LAUNCHER)


async def barrier_of(sock: socket.socket) -> proto.Ping:
    """The first thing an adopted link sends: its barrier ping."""
    ping = await emulator_receive(sock)
    assert isinstance(ping, proto.Ping) and ping.seq == BARRIER_SEQ
    return ping


def unanswered_before(theirs: socket.socket) -> None:
    """What the emulator sent a launcher that died before reading it."""
    emulator_send(theirs, proto.Ready(4321, True, version="1.0"))
    emulator_send(theirs, proto.Assigned(True))
    emulator_send(theirs, proto.Pong(1, 1, (proto.QueueProgress(0, 0, 50, 3),)))
    emulator_send(theirs, proto.Result(False, "answer to the last launcher", seq=1))
    emulator_send(theirs, proto.Result(True, seq=99))


def test_an_adopted_link_drops_what_the_launcher_before_was_sent() -> None:
    async def main() -> None:
        ours, theirs = control_pair()
        theirs.setblocking(False)
        unanswered_before(theirs)
        before = time.monotonic_ns()
        link = ControlLink("e0", ours, adopted=True)
        barrier = await barrier_of(theirs)
        assert barrier.sent_ns >= before
        await asyncio.sleep(0.1)  # the stale messages are read meanwhile
        assert not link.hung.done() and not link.ready.done() and not link.settled.done()
        emulator_send(theirs, proto.Pong(BARRIER_SEQ, barrier.sent_ns))
        await asyncio.wait_for(link.settled, 5)

        # From here on it is a link like any other: seq 1 again, and judged.
        command = asyncio.create_task(link.command(proto.LunRemove("c0", 2), 5))
        sent = await emulator_receive(theirs)
        assert sent == proto.LunRemove("c0", 2, seq=1)
        emulator_send(theirs, proto.Result(True, seq=1))
        assert await command == proto.Result(True, seq=1)
        assert not link.hung.done()
        emulator_send(theirs, proto.Result(True, seq=42))
        verdict = await asyncio.wait_for(link.hung, 5)
        assert isinstance(verdict, ProtocolBroken) and "never sent" in verdict.reason
        link.close()
        theirs.close()
    run(main())


def test_a_link_of_its_own_judges_the_same_messages() -> None:
    async def main() -> None:
        ours, theirs = control_pair()
        link = ControlLink("e0", ours)
        assert link.settled.done()
        emulator_send(theirs, proto.Result(True, seq=99))
        verdict = await asyncio.wait_for(link.hung, 5)
        assert isinstance(verdict, ProtocolBroken) and "never sent" in verdict.reason
        link.close()
        theirs.close()
    run(main())


def test_a_late_answer_to_the_launcher_before_never_answers_a_new_command() -> None:
    """The old command and the new one have the same seq (each launcher
    counts from 1); the emulator answers them in order, the barrier between."""
    async def main() -> None:
        ours, theirs = control_pair()
        theirs.setblocking(False)
        link = ControlLink("e0", ours, adopted=True)
        command = asyncio.create_task(link.command(proto.LunRemove("c0", 2), 5))
        barrier = await barrier_of(theirs)
        assert await emulator_receive(theirs) == proto.LunRemove("c0", 2, seq=1)
        # Still busy with the old launcher's command 1 when ours came in:
        emulator_send(theirs, proto.Result(False, "the old command 1", seq=1))
        emulator_send(theirs, proto.Pong(BARRIER_SEQ, barrier.sent_ns))
        emulator_send(theirs, proto.Result(True, seq=1))
        assert await command == proto.Result(True, seq=1)
        assert not link.hung.done()
        link.close()
        theirs.close()
    run(main())


def test_an_old_barrier_is_not_this_links() -> None:
    """A launcher that took over and died before its barrier was answered:
    that answer is stale too, though its seq is the barrier's."""
    async def main() -> None:
        ours, theirs = control_pair()
        theirs.setblocking(False)
        emulator_send(theirs, proto.Pong(BARRIER_SEQ, 5))
        link = ControlLink("e0", ours, adopted=True)
        barrier = await barrier_of(theirs)
        await asyncio.sleep(0.1)
        assert not link.settled.done()
        emulator_send(theirs, proto.Pong(BARRIER_SEQ, barrier.sent_ns))
        await asyncio.wait_for(link.settled, 5)
        link.close()
        assert isinstance(link.ready.exception(), Exception)  # LinkClosed, not pending
        theirs.close()
    run(main())


def test_stale_pongs_are_neither_progress_nor_an_error() -> None:
    """Stale PONGs carry the seqs the new detector uses (1, 2, ...): shown to
    it they would be a protocol violation, or, matched, progress. The
    emulator then hangs: the verdict must be NoReply."""
    async def main() -> None:
        ours, theirs = control_pair()
        theirs.setblocking(False)
        for seq in (1, 2, 3):
            emulator_send(theirs, proto.Pong(seq, seq, (proto.QueueProgress(0, 0, 7, 1),)))
        link = ControlLink("e0", ours, adopted=True)
        link.watch(50, 300)
        async with link.beating():
            barrier = await barrier_of(theirs)
            ping = await emulator_receive(theirs)  # the detector's first
            assert isinstance(ping, proto.Ping) and ping.seq == 1
            emulator_send(theirs, proto.Pong(2, 2, (proto.QueueProgress(0, 0, 9, 1),)))
            emulator_send(theirs, proto.Pong(BARRIER_SEQ, barrier.sent_ns))
            verdict = await asyncio.wait_for(link.hung, 5)
        assert isinstance(verdict, NoReply) and verdict.since_ms >= 300
        assert link.detector is not None
        assert link.detector.totals == ProgressTotals(0, 0)
        assert link.round_trip_ms is None
        link.close()
        theirs.close()
    run(main())


def test_an_adopted_link_keeps_a_healthy_emulator() -> None:
    async def main() -> None:
        ours, theirs = control_pair()
        theirs.setblocking(False)
        unanswered_before(theirs)
        link = ControlLink("e0", ours, adopted=True)
        link.watch(50, 300)

        async def answer_every_ping() -> None:
            while True:
                ping = await emulator_receive(theirs)
                assert isinstance(ping, proto.Ping)
                emulator_send(theirs, proto.Pong(ping.seq, ping.sent_ns,
                                                 (proto.QueueProgress(0, 0, ping.seq, 0),)))

        echo = asyncio.create_task(answer_every_ping())
        async with link.beating():
            await asyncio.sleep(0.8)
        assert not link.hung.done()
        assert link.settled.done() and link.round_trip_ms is not None
        echo.cancel()
        link.close()
        theirs.close()
    run(main())


def test_the_emulator_itself_answers_a_taken_over_link(tmp_path: Path) -> None:
    """The emulator's own control loop (in process): the launcher before sent
    a command (seq 1) and a ping, then died; the link taken over through the
    holder's copy of its socket sends its own command 1. Only the new
    answer answers it."""
    async def main() -> None:
        image = tmp_path / "d0.img"
        image.write_bytes(bytes(1 << 20))
        ours, theirs = control_pair()
        guest_end, emulator_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lun = LunConfig(0, "d0", os.open(image, os.O_RDWR), False, 512)
        emulator = Emulator(EmulatorConfig(
            "e0", (ControllerConfig("c0", emulator_end.detach(), 1, (lun,)),),
            control_fd=theirs.detach()))
        assert emulator.control is not None
        kept = os.dup(ours.fileno())  # the holder's copy of the launcher's end
        before = ControlLink("e0", ours)
        before.send(proto.LunRemove("c0", 7, seq=1))  # no such LUN: refused
        before.send(proto.Ping(1, time.monotonic_ns()))
        before.close()  # the launcher dies; the emulator has not answered yet

        link = ControlLink("e0", socket.socket(fileno=kept), adopted=True)
        command = asyncio.create_task(link.command(proto.LunRemove("c0", 0), 5))
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        loop.add_reader(emulator.control.fileno(), emulator._on_control)
        try:
            answer = await command
            assert answer == proto.Result(True, seq=1), answer
            assert link.settled.done() and not link.hung.done()
            assert 0 not in emulator.controllers[0].target.scsi.luns
        finally:
            loop.remove_reader(emulator.control.fileno())
            link.close()
            for controller in emulator.controllers:
                controller.close()
            emulator.control.close()
            guest_end.close()
    run(main())


# --- uid leases --------------------------------------------------------------------


def test_a_lease_given_back_by_the_holder_is_one_like_any_other(tmp_path: Path) -> None:
    pool = UidPool(70000, 70001, "vm1", tmp_path)
    uid = pool.take()
    assert uid is not None
    held = os.dup(pool.leases[uid].fd)  # the holder's copy: the same open file
    os.close(pool.leases[uid].fd)  # the launcher dies without giving it back
    other = HostUids(70000, 70001, tmp_path)
    assert other.holder(uid) is not None  # still taken

    again = UidPool(70000, 70001, "vm1", tmp_path)
    lease = Lease.from_fd(uid, "vm1", held)
    assert lease.held and lease.fd == held
    again.adopt(lease)
    assert again.used == {uid}
    assert again.take(preferred=uid) != uid  # taken, even by its own pool
    again.give_back(uid)
    assert not lease.held and lease.fd == -1
    assert other.holder(uid) is None  # free again host-wide
    taken = other.take("someone", preferred=uid)
    assert taken is not None and taken.uid == uid
    taken.release()
    again.close()


def test_a_pool_refuses_a_second_lease_on_one_uid(tmp_path: Path) -> None:
    pool = UidPool(70000, 70001, "vm1", tmp_path)
    uid = pool.take()
    assert uid is not None
    copy = Lease.from_fd(uid, "vm1", os.dup(pool.leases[uid].fd))
    with pytest.raises(ValueError, match=f"uid {uid}"):
        pool.adopt(copy)
    copy.release()
    pool.close()


# --- the management socket -----------------------------------------------------------


async def qmp_greeting_and_capabilities(path: Path) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        greeting = json.loads(await asyncio.wait_for(reader.readline(), 5))
        writer.write(b'{"execute": "qmp_capabilities"}\n')
        answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert answer == {"return": {}}
        return greeting  # type: ignore[no-any-return]
    finally:
        writer.close()


def test_management_goes_on_on_the_socket_the_holder_kept(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "mplaunch.sock"
        bus = EventBus()
        first = ManagementServer(path, FakeVm(bus), bus)
        await first.start()
        assert first.listener is not None
        kept = os.dup(first.listener.fileno())  # the holder's copy
        assert "QMP" in await qmp_greeting_and_capabilities(path)
        await first.close(unlink=False)  # handed on: the path stays
        assert path.exists()

        # A client that comes while no launcher serves waits in the backlog.
        waiting = asyncio.create_task(qmp_greeting_and_capabilities(path))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        second = ManagementServer(path, FakeVm(bus), bus)
        await second.start(socket.socket(fileno=kept))
        assert second.listener is not None and second.listener.fileno() == kept
        assert "QMP" in await waiting
        await second.close()
        assert not path.exists()
    run(main())


def test_a_socket_bound_here_is_the_one_served(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "mplaunch.sock"
        sock = bind_management_socket(path)
        bus = EventBus()
        server = ManagementServer(path, FakeVm(bus), bus)
        await server.start(sock)
        assert server.listener is sock
        assert "QMP" in await qmp_greeting_and_capabilities(path)
        await server.close()
        assert not path.exists()
    run(main())


# --- the run folder ----------------------------------------------------------------------


def test_run_folder_paths(tmp_path: Path) -> None:
    with RunFolder.acquire(tmp_path / "vm1", "vm1") as run_folder:
        assert run_folder.holder_sock == tmp_path / "vm1" / "holder.sock"
        assert run_folder.vm_state_file == tmp_path / "vm1" / "vm-state.json"
        assert run_folder.keeper_record("e0", "c0") == tmp_path / "vm1" / "keeper-e0-c0.rec"
        for path in (run_folder.holder_sock, run_folder.vm_state_file,
                     run_folder.keeper_record("e0", "c0")):
            assert is_own(path.name)
        assert os.fstat(run_folder.lock_fd).st_ino == (tmp_path / "vm1" / LOCK_NAME).stat().st_ino
    assert not (tmp_path / "vm1").exists()


def keeper_record_temp_name(folder: Path) -> str:
    """The temporary name keeperrecord writes under, seen by making its
    rename fail (a non-empty folder in the way)."""
    (folder / "keeper-e9-c9.rec").mkdir()
    (folder / "keeper-e9-c9.rec" / "x").write_text("")
    with pytest.raises(OSError):
        keeperrecord.write_atomically(folder, "keeper-e9-c9.rec", b"data")
    (folder / "keeper-e9-c9.rec" / "x").unlink()
    (folder / "keeper-e9-c9.rec").rmdir()
    [temp] = [p.name for p in folder.iterdir() if "keeper-e9-c9" in p.name]
    return temp


def test_a_stale_folder_loses_every_file_mplaunch_writes_and_nothing_else(
        tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    run_folder = RunFolder.acquire(path, "vm1")
    VmState(spec_path="/x.toml", spec_text="", accel="tcg", started=1.0).save(
        run_folder.vm_state_file)
    keeperrecord.write_atomically(path, "keeper-e0-c0.rec", b"record")
    ours = ["vm-state.json", f".vm-state.json.tmp{os.getpid()}", "keeper-e0-c0.rec",
            keeper_record_temp_name(path), "holder.sock", ".holder.sock.4242"]
    for name in ours:
        (path / name).touch()
    theirs = ["vm-state.json.bak", ".vm-state.json.tmp", "keeper-notes.txt", "holder.sock.old",
              "keeper-e0-c0.rec~"]
    for name in theirs:
        (path / name).write_text("not mplaunch's")
    run_folder.release_lock_only()  # the launcher (and its holder) died
    with RunFolder.acquire(path, "vm1") as again:
        assert again.stale_cleaned
        assert sorted(os.listdir(path)) == sorted([LOCK_NAME, MARKER_NAME, *theirs])
    assert sorted(os.listdir(path)) == sorted(theirs)


def test_a_folder_is_taken_over_through_the_lock_fd_the_holder_kept(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    first = RunFolder.acquire(path, "vm1")
    kept = os.dup(first.lock_fd)  # the holder's copy
    first.release_lock_only()  # the launcher dies: its holder keeps the folder
    with pytest.raises(RunFolderBusy):
        RunFolder.acquire(path, "vm1")
    (path / "vm-state.json").write_text("{}")
    (path / "notes.txt").write_text("mine")

    again = RunFolder.adopt(path, "vm1", os.dup(kept))
    assert (path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert again.made_folder and not again.stale_cleaned
    assert again.lock_fd >= 0
    again.release()
    assert sorted(os.listdir(path)) == ["notes.txt"]  # only what mplaunch made went
    os.close(kept)
    assert again.lock_fd == -1


def test_a_taken_over_folder_with_no_other_files_goes_whole(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    first = RunFolder.acquire(path, "vm1")
    kept = os.dup(first.lock_fd)
    first.release_lock_only()
    again = RunFolder.adopt(path, "vm1", kept)
    again.release()
    assert not path.exists()
    with RunFolder.acquire(path, "vm1"):  # free for the next start
        pass


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


def test_taking_over_a_folder_checks_the_vm_and_the_fd(tmp_path: Path) -> None:
    path = tmp_path / "vm1"
    with RunFolder.acquire(path, "vm1") as owner:
        wrong_vm = os.dup(owner.lock_fd)
        with pytest.raises(RunFolderForeign, match="marker does not name VM 'vm2'"):
            RunFolder.adopt(path, "vm2", wrong_vm)
        assert_closed(wrong_vm)

        not_the_lock = os.open(path / MARKER_NAME, os.O_RDONLY)
        with pytest.raises(RunFolderForeign, match="not its mplaunch.lock"):
            RunFolder.adopt(path, "vm1", not_the_lock)
        assert_closed(not_the_lock)

        # The lock file, but opened anew: the lock is another open file's.
        other_open = os.open(path / LOCK_NAME, os.O_RDWR)
        with pytest.raises(RunFolderForeign, match="does not hold its lock"):
            RunFolder.adopt(path, "vm1", other_open)
        assert_closed(other_open)
        assert (path / LOCK_NAME).read_text().strip() == str(os.getpid())

    with pytest.raises(RunFolderForeign, match="cannot be opened"):
        RunFolder.adopt(path, "vm1", os.open(tmp_path, os.O_RDONLY))


# --- the restart policy -------------------------------------------------------------------


def crash_looping_policy() -> RestartPolicy:
    return RestartPolicy("e0", RestartMode.ON_FAILURE, 2, 60, GiveUpAction.PAUSE)


def test_a_restored_policy_gives_up_where_the_first_would() -> None:
    policy = crash_looping_policy()
    policy.start(1 * S)
    policy.on_started(2 * S)
    assert isinstance(policy.on_exit(3 * S, -9, ExitReason.CRASHED)[0], Start)
    policy.on_started(4 * S)
    [backoff] = policy.on_exit(5 * S, -9, ExitReason.CRASHED)
    assert isinstance(backoff, Nothing) and policy.state is RunState.BACKOFF
    saved = json.loads(json.dumps(policy.snapshot()))  # as vm-state.json keeps it

    again = crash_looping_policy()
    again.restore(saved)
    assert again.snapshot() == policy.snapshot()
    assert again.describe() == policy.describe()
    assert again.next_deadline_ns() == 5 * S + 100 * MS
    assert again.tick(5 * S) == []
    assert isinstance(again.tick(5 * S + 100 * MS)[0], Start)
    again.on_started(6 * S)
    [gave_up] = again.on_exit(7 * S, -9, ExitReason.CRASHED)  # the third in 60 s
    assert isinstance(gave_up, GiveUp) and again.state is RunState.GAVE_UP


def test_a_restored_window_still_slides() -> None:
    policy = crash_looping_policy()
    policy.start(1 * S)
    policy.on_started(1 * S)
    policy.on_exit(2 * S, 1, ExitReason.CRASHED)
    policy.on_started(3 * S)
    again = crash_looping_policy()
    again.restore(policy.snapshot())
    assert again.restarts_in_window(61 * S) == 1
    assert again.restarts_in_window(62 * S) == 0
    assert isinstance(again.on_exit(100 * S, 1, ExitReason.CRASHED)[0], Start)


@pytest.mark.parametrize(("change", "says"), [
    ({"state": "dozing"}, "'dozing' is not a valid RunState"),
    ({"state": None}, "state = None"),
    ({"restarts": [3, True]}, "not times in order"),
    ({"restarts": [3, 2]}, "not times in order"),
    ({"restarts": [-1]}, "not times in order"),
    ({"restart_at_ns": "soon"}, "restart_at_ns = 'soon'"),
    ({"last_exit_reason": "bored"}, "'bored' is not a valid ExitReason"),
    ({"last_now_ns": -5}, "last_now_ns = -5: not a time"),
    ({"last_now_ns": 2**64}, "not a time"),
    ({"state": "backoff", "restart_at_ns": None}, "in backoff with no restart_at_ns"),
])
def test_a_bad_snapshot_is_refused_and_changes_nothing(change: dict[str, Any], says: str) -> None:
    policy = crash_looping_policy()
    policy.start(1 * S)
    before = policy.snapshot()
    bad = {**before, **change}
    with pytest.raises(ValueError, match=says):
        check_snapshot(bad)
    with pytest.raises(ValueError, match=says):
        policy.restore(bad)
    assert policy.snapshot() == before


def test_a_snapshot_missing_a_field_or_not_an_object_is_refused() -> None:
    saved = crash_looping_policy().snapshot()
    del saved["restarts"]
    with pytest.raises(ValueError, match="no field 'restarts'"):
        check_snapshot(saved)
    with pytest.raises(ValueError, match="not an object"):
        check_snapshot([1, 2])
