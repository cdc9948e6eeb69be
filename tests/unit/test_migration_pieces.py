"""Migration's other pure parts: URIs, what both ends must agree on, the
status query-migrate reports, and a state store image moved whole."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from launcher.migration.channel import (
    MAGIC,
    QEMU_MAGIC,
    Channel,
    DiskInfo,
    EmulatorInfo,
    Hello,
    Kind,
    Role,
)
from launcher.migration.compat import hello_problems, unmigratable
from launcher.migration.destination import read_hello
from launcher.migration.status import Phase, Progress, Status, from_qemu
from launcher.migration.stream import CLASSIFY_TIMEOUT_S, Arrivals, ChannelStream, listen
from launcher.migration.uri import BadUri, parse_uri
from launcher.spec import load_spec
from launcher.statestore import layout, transfer
from launcher.statestore.layout import RingIdentity, StateStore, StateStoreError


@pytest.mark.parametrize("text,path,host,port", [
    ("unix:/run/x.sock", "/run/x.sock", None, None),
    ("unix:rel/x.sock", "rel/x.sock", None, None),
    ("tcp:10.0.0.2:4444", None, "10.0.0.2", 4444),
    ("tcp:dest.example:1", None, "dest.example", 1),
    ("tcp:[::1]:65535", None, "::1", 65535),
])
def test_good_uris(text: str, path: str | None, host: str | None, port: int | None) -> None:
    uri = parse_uri(text)
    assert (uri.path, uri.host, uri.port, str(uri)) == (path, host, port, text)


@pytest.mark.parametrize("text,match", [
    ("", "empty"), ("/run/x.sock", "no scheme"), ("exec:cat", "scheme 'exec'"),
    ("fd:3", "scheme 'fd'"), ("unix:", "needs a socket path"), ("tcp:host", "tcp:HOST:PORT"),
    ("tcp::4444", "needs a host"), ("tcp:h:0", "port '0'"), ("tcp:h:65536", "port '65536'"),
    ("tcp:h:x", "port 'x'"), ("tcp:::1:44", "brackets"), ("tcp:[::1]44", r"\[ADDRESS\]"),
    ("unix:/a b", "blank"), ("unix:/" + "x" * 200, "107 bytes"),
])
def test_bad_uris_say_what_is_allowed(text: str, match: str) -> None:
    with pytest.raises(BadUri, match=match):
        parse_uri(text)


def _hello(**disk: object) -> Hello:
    d = {"id": "d0", "controller": "scsi0", "lun": 0, "size": 8 << 20, "block_size": 512,
         "readonly": False}
    d.update(disk)
    return Hello("vm", (DiskInfo(**d),),  # type: ignore[arg-type]
                 (EmulatorInfo("disk-proc", "scsi", ("scsi0",), 4096),), layout.VERSION)


def test_matching_hellos_have_no_problem() -> None:
    assert hello_problems(_hello(), _hello()) == []


def test_a_size_mismatch_names_the_disk_and_both_sizes() -> None:
    problems = hello_problems(_hello(), _hello(size=16 << 20))
    assert problems == ["disk d0: 8388608 bytes here, 16777216 at the source"]


def test_every_difference_is_named() -> None:
    ours = _hello()
    theirs = Hello("vm", (DiskInfo("d1", "scsi0", 1, 1, 512, False),),
                   (EmulatorInfo("disk-proc", "lsi", ("scsi1",), 8), ), 99)
    text = "\n".join(hello_problems(ours, theirs))
    for part in ("state store layout 99 at the source", "disk d1: at the source, not in",
                 "disk d0: in this spec, not at the source", "kind scsi here, lsi at the source",
                 "kind lsi cannot migrate", "controllers scsi0 here, scsi1 at the source",
                 "state store of 4096 bytes here, 8 at the source"):
        assert part in text
    assert "lun 0 here, 1" in "\n".join(hello_problems(_hello(), _hello(lun=1)))
    assert "readonly False here, True" in "\n".join(hello_problems(_hello(),
                                                                   _hello(readonly=True)))


def test_an_lsi_emulator_cannot_migrate_and_is_named(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(bytes(1 << 20))
    (tmp_path / "vm.toml").write_text(
        '[vm]\nname = "v"\n'
        '[[emulator]]\nid = "old-hba"\nkind = "lsi"\n'
        '[[controller]]\nid = "c0"\nemulator = "old-hba"\n'
        '[[disk]]\nid = "d0"\ncontroller = "c0"\nlun = 0\nimage = "d.img"\n')
    spec = load_spec(tmp_path / "vm.toml")
    assert unmigratable(spec) == ("emulator 'old-hba' is of kind lsi, which cannot migrate "
                                  "(only scsi emulators do)")


def test_status_follows_qemu_and_completes_only_when_told() -> None:
    p = Progress()
    assert p.answer() == {"status": "none"}
    p.begin("tcp:h:1")
    assert p.answer() == {"status": "setup", "uri": "tcp:h:1"}
    assert p.set(Status.ACTIVE) and not p.set(Status.ACTIVE)
    p.ram = {"transferred": 5, "remaining": 7}
    assert p.answer() == {"status": "active", "uri": "tcp:h:1", "phase": "ram",
                          "ram": {"transferred": 5, "remaining": 7}}
    assert from_qemu("completed") is None  # QEMU's end is not the migration's
    p.phase = Phase.STATE
    assert p.answer()["phase"] == "state"
    assert p.set(Status.FAILED, "gone")
    assert p.event() == {"status": "failed", "error-desc": "gone"}
    assert not p.set(Status.COMPLETED)  # a final status stays
    assert [from_qemu(s) for s in ("setup", "device", "cancelling", "failed", "cancelled",
                                   "none")] == [Status.SETUP, Status.ACTIVE, Status.ACTIVE,
                                                Status.FAILED, Status.CANCELLED, None]


def _store(tmp_path: Path, name: str, shape: layout.Layout) -> int:
    return layout.create(tmp_path / name, shape)


def test_a_store_image_moves_whole_with_its_rings_cleared(tmp_path: Path) -> None:
    shape = layout.Layout(1, 4, 8)
    src, dst = _store(tmp_path, "src", shape), _store(tmp_path, "dst", shape)
    store = StateStore(src)
    store.write_lun_slot(0, 3, 3, b"unit attention gone")
    store.write_events_slot(0, b"events")
    store.set_queue_slot(0, 2, RingIdentity(128, 0, 0x1000, 0x2000, 0x3000))
    store.close()
    image = transfer.read_image(src)
    assert transfer.image_problem(dst, image) is None
    transfer.load_image(dst, image)
    loaded = StateStore(dst)
    valid, lun, body = loaded.lun_slot(0, 3)
    assert (valid, lun, bytes(body[:19])) == (True, 3, b"unit attention gone")
    body.release()
    valid, body = loaded.events_slot(0)
    assert valid and bytes(body[:6]) == b"events"
    body.release()
    ring, body = loaded.queue_slot(0, 2)
    assert ring is None  # the ring's position comes with QEMU's stream
    body.release()
    loaded.close()
    for fd in (src, dst):
        os.close(fd)


def test_a_store_of_another_shape_or_garbage_is_refused(tmp_path: Path) -> None:
    dst = _store(tmp_path, "dst", layout.Layout(1, 4, 8))
    other = _store(tmp_path, "other", layout.Layout(2, 4, 8))
    assert "2 controllers" in (transfer.image_problem(dst, transfer.read_image(other)) or "")
    assert "bad magic" in (transfer.image_problem(dst, b"x" * 100) or "")
    assert "shorter than its header" in (transfer.image_problem(dst, b"") or "")
    good = transfer.read_image(dst)
    assert "bytes, this one" in (transfer.image_problem(dst, good + b"\0") or "")
    with pytest.raises(StateStoreError):
        transfer.load_image(dst, b"x" * 100)
    for fd in (dst, other):
        os.close(fd)


def test_migrate_is_refused_for_a_vm_with_an_lsi_emulator(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from launcher.migration.source import MigrationSource

    (tmp_path / "d.img").write_bytes(bytes(1 << 20))
    (tmp_path / "vm.toml").write_text(
        '[vm]\nname = "v"\n'
        '[[emulator]]\nid = "old-hba"\nkind = "lsi"\n'
        '[[controller]]\nid = "c0"\nemulator = "old-hba"\n'
        '[[disk]]\nid = "d0"\ncontroller = "c0"\nlun = 0\nimage = "d.img"\n')
    sv = SimpleNamespace(spec=load_spec(tmp_path / "vm.toml"), backends_only=False,
                         qemu=object(), stopping=False, incoming_pending=False)
    source = MigrationSource(sv)  # type: ignore[arg-type]
    assert source.refused() == ("emulator 'old-hba' is of kind lsi, which cannot migrate "
                                "(only scsi emulators do)")
    assert source.cancel() == "no migration is under way"


def test_a_silent_connection_holds_up_none_after_it(tmp_path: Path) -> None:
    """The destination tells its connections apart each on its own: one that
    sends nothing (a port scan, a stuck peer) does not make the source's
    state channel or QEMU's stream behind it wait CLASSIFY_TIMEOUT_S."""
    path = str(tmp_path / "m.sock")

    async def run() -> list[tuple[Kind, bytes, float]]:
        listener = listen(parse_uri(f"unix:{path}"))
        arrivals = Arrivals(listener)
        clients = []
        try:
            for data in (b"", b"GET / HTTP/1.0\r\n", MAGIC + b"rest", QEMU_MAGIC + b"x"):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(path)
                c.sendall(data)
                if data.startswith(b"GET"):
                    c.shutdown(socket.SHUT_WR)
                clients.append(c)
            got = []
            began = time.monotonic()
            for _ in range(3):
                kind, conn = await asyncio.wait_for(arrivals.next(), 5)
                got.append((kind, conn.recv(8, socket.MSG_PEEK), time.monotonic() - began))
                conn.close()
            return got
        finally:
            arrivals.close()
            listener.close()
            for c in clients:
                c.close()

    got = asyncio.run(run())
    assert {(kind, first) for kind, first, _ in got} == {
        (Kind.STATE, MAGIC), (Kind.QEMU, QEMU_MAGIC + b"x"), (Kind.UNKNOWN, b"GET / HT")}
    assert all(after < 2 for _, _, after in got), got  # not CLASSIFY_TIMEOUT_S
    assert CLASSIFY_TIMEOUT_S > 2


def test_a_state_channel_without_a_hello_is_named_not_fatal() -> None:
    """What the destination logs for a state channel that cannot say hello
    before it drops it and waits on (`read_hello`): never an exception."""
    async def run(data: bytes) -> object:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.sendall(data)
        theirs.close()
        stream = ChannelStream(ours, Role.DESTINATION)
        try:
            return await read_hello(stream)
        finally:
            stream.close()

    source = Channel(Role.SOURCE)
    preamble = source.initiate()
    assert asyncio.run(run(preamble)) == "no hello before it closed"
    bad = asyncio.run(run(MAGIC + b"\xff\xff\xff\xff"))
    assert isinstance(bad, str) and "version" in bad, bad
    hello = Hello("vm", (), (), layout.VERSION)
    good = asyncio.run(run(preamble + source.send(hello)))
    assert isinstance(good, Hello) and good.vm == "vm"
