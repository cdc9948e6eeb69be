"""The mpqemu relay between two socketpairs, with scripted peers.

Both ends are scripted here: a "proxy" that sends what QEMU's
x-pci-proxy-dev sends (SYNC_SYSMEM with memfds, SET_IRQFD with eventfds,
config and BAR accesses) and a "remote" that answers as QEMU's x-remote
machine does, or sends what it should not. The relay runs in a real asyncio
loop on real sockets and real fds. The real remote process is exercised by
the slot's end-to-end tests; the last tests here pin the wire format to the
host's QEMU (7.2) by talking to a real ``-machine x-remote`` process through
the codec and the relay, when QEMU is there and we are root.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from launcher.mpqemu.codec import (
    BarRead,
    BarWrite,
    Command,
    ConnectionClosed,
    Decoder,
    DeviceReset,
    Message,
    NeedData,
    PciConfigRead,
    PciConfigWrite,
    Region,
    Ret,
    Role,
    SetIrqfd,
    SyncSysmem,
    encode,
)
from launcher.mpqemu.relay import MpqemuRelay

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
WAIT = 2.0


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


class Peer:
    """One scripted end of a socketpair: sends encoded messages with their fds,
    decodes what comes back. Fds received are closed at `close()`."""

    def __init__(self, sock: socket.socket, role: Role) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.decoder = Decoder(role, os.close)
        self.received_fds: list[int] = []

    def send(self, message: Message) -> None:
        self.send_raw(encode(message), message.fds)

    def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    async def _readable(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.sock.fileno(), wake)
        try:
            await asyncio.wait_for(ready, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self.sock.fileno())

    async def recv(self, reply_to: Command | None = None, timeout: float = WAIT) -> Message:
        while True:
            message = self.decoder.next_message(reply_to)
            if not isinstance(message, NeedData):
                assert not isinstance(message, ConnectionClosed)
                self.received_fds += message.fds
                return message
            assert await self._readable(timeout), "nothing came"
            data, fds, _, _ = socket.recv_fds(self.sock, 4096, 16)
            assert data, "the link closed"
            self.decoder.receive_data(data, fds)

    async def silent(self, timeout: float = 0.2) -> None:
        assert not await self._readable(timeout), "something came"

    async def closed(self) -> bool:
        assert await self._readable(WAIT)
        return self.sock.recv(1) == b""

    def close(self) -> None:
        for fd in self.received_fds:
            os.close(fd)
        self.decoder.close()
        self.sock.close()


@dataclass
class Rig:
    relay: MpqemuRelay
    proxy: Peer
    proxy_closed: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    remotes: list[Peer] = field(default_factory=list)

    def new_remote(self) -> Peer:
        ours, theirs = socket.socketpair()
        self.relay.attach(ours)
        peer = Peer(theirs, Role.REQUESTS)
        self.remotes.append(peer)
        return peer


def run(test: Callable[[Rig], Awaitable[None]]) -> None:
    """Run `test` with a relay in a fresh loop; every fd it opened must be closed."""
    before = open_fds()

    async def main() -> None:
        ours, theirs = socket.socketpair()
        proxy_closed: list[str] = []
        faults: list[str] = []
        relay = MpqemuRelay("lsi0", ours, proxy_closed.append, faults.append)
        rig = Rig(relay, Peer(theirs, Role.REPLIES), proxy_closed, faults)
        try:
            await test(rig)
        finally:
            relay.close()
            rig.proxy.close()
            for remote in rig.remotes:
                remote.close()

    asyncio.run(main())
    assert open_fds() == before, "fds leaked"


@pytest.fixture()
def memory() -> Iterator[tuple[int, int]]:
    """Two memfds of guest RAM, as the proxy would send them."""
    fds = [os.memfd_create("ram0"), os.memfd_create("ram1")]
    for fd in fds:
        os.ftruncate(fd, 2 * MIB)
    yield fds[0], fds[1]
    for fd in fds:
        os.close(fd)


def sysmem(*fds: int) -> SyncSysmem:
    return SyncSysmem(tuple(Region(i * 4 * MIB, 2 * MIB, 0) for i in range(len(fds))), fds)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


async def set_up(rig: Rig, remote: Peer, ram: tuple[int, ...], irq: tuple[int, int]) -> None:
    """What QEMU's proxy does first: memory, interrupts, BAR addresses."""
    rig.proxy.send(sysmem(*ram))
    rig.proxy.send(SetIrqfd(*irq))
    got = await remote.recv()
    assert isinstance(got, SyncSysmem) and all(map(same_file, got.fds, ram))
    got = await remote.recv()
    assert isinstance(got, SetIrqfd) and all(map(same_file, got.fds, irq))
    for write in (PciConfigWrite(0x10, 0xFFFFFFFF, 4), PciConfigWrite(0x10, 0xC000, 4),
                  PciConfigWrite(0x04, 0x0001, 2), PciConfigWrite(0x04, 0x0007, 2)):
        rig.proxy.send(write)
        assert await remote.recv() == write
        remote.send(Ret(0))
        assert await rig.proxy.recv(Command.PCI_CFGWRITE) == Ret(0)


def eventfds() -> tuple[int, int]:
    return os.eventfd(0), os.eventfd(0)


def test_forwards_both_ways(memory: tuple[int, int]) -> None:
    async def script(rig: Rig) -> None:
        irq = eventfds()
        remote = rig.new_remote()
        await set_up(rig, remote, memory, irq)
        rig.proxy.send(BarRead(0xC014, 0, 1, False))
        assert await remote.recv() == BarRead(0xC014, 0, 1, False)
        assert rig.relay.waiting_for_reply
        # SYNC_SYSMEM may come while a request waits: forwarded at once
        rig.proxy.send(sysmem(memory[1]))
        got = await remote.recv()
        assert isinstance(got, SyncSysmem) and same_file(got.fds[0], memory[1])
        remote.send(Ret(0x12))
        assert await rig.proxy.recv(Command.BAR_READ) == Ret(0x12)
        assert not rig.relay.waiting_for_reply
        rig.proxy.send(DeviceReset())
        assert await remote.recv() == DeviceReset()
        remote.send(Ret(None))
        assert await rig.proxy.recv(Command.DEVICE_RESET) == Ret(None)
        assert rig.relay.stats.forwarded == 2 + 4 * 2 + 2 + 1 + 2
        assert rig.faults == [] and rig.proxy_closed == []
        for fd in irq:
            os.close(fd)

    run(script)


def test_detach_during_a_bar_read_then_replay_and_resend(memory: tuple[int, int]) -> None:
    async def script(rig: Rig) -> None:
        irq = eventfds()
        first = rig.new_remote()
        await set_up(rig, first, memory, irq)
        rig.proxy.send(BarRead(0xC014, 0, 1, False))
        assert await first.recv() == BarRead(0xC014, 0, 1, False)
        rig.relay.detach()  # the remote died with the read in flight
        assert not rig.relay.attached and rig.relay.waiting_for_reply
        rig.proxy.send(sysmem(memory[1]))  # recorded and held meanwhile
        await rig.proxy.silent()
        second = rig.new_remote()
        got = await second.recv()
        assert isinstance(got, SyncSysmem) and same_file(got.fds[0], memory[1])
        assert len(got.regions) == 1
        got = await second.recv()
        assert isinstance(got, SetIrqfd) and all(map(same_file, got.fds, irq))
        writes = [await second.recv() for _ in range(2)]
        assert writes == [PciConfigWrite(0x10, 0xC000, 4), PciConfigWrite(0x04, 0x0007, 2)]
        assert await second.recv() == BarRead(0xC014, 0, 1, False)
        for _ in writes:
            second.send(Ret(0))  # swallowed by the relay
        await rig.proxy.silent()
        second.send(Ret(0x80))
        assert await rig.proxy.recv(Command.BAR_READ) == Ret(0x80)
        await rig.proxy.silent()
        stats = rig.relay.stats
        assert (stats.replayed, stats.resent, stats.answered_locally) == (4, 1, 0)
        assert rig.faults == []
        for fd in irq:
            os.close(fd)

    run(script)


def test_a_bar_write_in_flight_is_answered_not_sent_again(memory: tuple[int, int]) -> None:
    async def script(rig: Rig) -> None:
        irq = eventfds()
        first = rig.new_remote()
        await set_up(rig, first, memory, irq)
        dsp = BarWrite(0xC02C, 0x1000, 4, False)
        rig.proxy.send(dsp)
        assert await first.recv() == dsp
        rig.relay.detach()
        await rig.proxy.silent()
        second = rig.new_remote()
        assert await rig.proxy.recv(Command.BAR_WRITE) == Ret(0)
        kinds = [type(await second.recv()) for _ in range(4)]
        assert kinds == [SyncSysmem, SetIrqfd, PciConfigWrite, PciConfigWrite]
        await second.silent()  # not the BAR write
        second.send(Ret(0))
        second.send(Ret(0))
        rig.proxy.send(BarRead(0xC014, 0, 1, False))  # life goes on
        assert await second.recv() == BarRead(0xC014, 0, 1, False)
        second.send(Ret(3))
        assert await rig.proxy.recv(Command.BAR_READ) == Ret(3)
        assert rig.relay.stats.answered_locally == 1 and rig.relay.stats.resent == 0
        assert rig.faults == []
        for fd in irq:
            os.close(fd)

    run(script)


def test_a_bar_write_held_before_the_first_remote_is_sent() -> None:
    async def script(rig: Rig) -> None:
        rig.proxy.send(BarWrite(0xC000, 1, 1, False))
        await rig.proxy.silent()
        remote = rig.new_remote()
        assert await remote.recv() == BarWrite(0xC000, 1, 1, False)
        remote.send(Ret(0))
        assert await rig.proxy.recv(Command.BAR_WRITE) == Ret(0)
        assert rig.relay.stats.answered_locally == 0

    run(script)


@pytest.mark.parametrize("bad", [
    b"garbage garbage garbage!",
    encode(Ret(None)),  # an empty RET answers only DEVICE_RESET
    encode(BarRead(0, 0, 4, True)),  # a request, not a reply
])
def test_a_bad_reply_is_a_remote_fault(bad: bytes) -> None:
    async def script(rig: Rig) -> None:
        remote = rig.new_remote()
        rig.proxy.send(BarRead(0xC014, 0, 1, False))
        assert await remote.recv() == BarRead(0xC014, 0, 1, False)
        remote.send_raw(bad)
        assert await remote.closed()
        assert len(rig.faults) == 1 and "the remote broke the protocol" in rig.faults[0]
        assert not rig.relay.attached and rig.relay.waiting_for_reply
        await rig.proxy.silent()
        second = rig.new_remote()
        assert await second.recv() == BarRead(0xC014, 0, 1, False)
        second.send(Ret(1))
        assert await rig.proxy.recv(Command.BAR_READ) == Ret(1)
        assert rig.relay.stats.faults == 1 and rig.proxy_closed == []

    run(script)


def test_a_reply_when_none_is_due_is_a_remote_fault() -> None:
    async def script(rig: Rig) -> None:
        remote = rig.new_remote()
        remote.send(Ret(0))
        assert await remote.closed()
        assert rig.faults == ["the remote sent a reply when none was due"]
        await rig.proxy.silent()

    run(script)


def test_a_remote_fd_is_a_remote_fault() -> None:
    async def script(rig: Rig) -> None:
        remote = rig.new_remote()
        rig.proxy.send(BarRead(0xC014, 0, 1, False))
        await remote.recv()
        fd = os.eventfd(0)
        remote.send_raw(encode(Ret(0)), (fd,))
        os.close(fd)
        assert await remote.closed()
        assert len(rig.faults) == 1 and "fds" in rig.faults[0]

    run(script)


def test_the_remote_closing_its_link_is_a_fault() -> None:
    async def script(rig: Rig) -> None:
        remote = rig.new_remote()
        remote.sock.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.1)
        assert rig.faults == ["the remote closed its link"] and not rig.relay.attached

    run(script)


def test_a_second_request_before_the_reply_closes_the_proxy() -> None:
    async def script(rig: Rig) -> None:
        remote = rig.new_remote()
        rig.proxy.send(BarRead(0xC014, 0, 1, False))
        await remote.recv()
        rig.proxy.send(BarRead(0xC014, 0, 1, False))
        assert await rig.proxy.closed()
        assert len(rig.proxy_closed) == 1 and "waits for its reply" in rig.proxy_closed[0]
        assert rig.relay.closed and await remote.closed()

    run(script)


@pytest.mark.parametrize("bad", [
    encode(PciConfigWrite(0, 0, 4))[:-4] + (3).to_bytes(4, "little"),  # len 3
    encode(Ret(0)),
    (99).to_bytes(4, "little") + bytes(12),
])
def test_a_malformed_proxy_message_closes_the_proxy(bad: bytes) -> None:
    async def script(rig: Rig) -> None:
        rig.new_remote()
        rig.proxy.send_raw(bad)
        assert await rig.proxy.closed()
        assert len(rig.proxy_closed) == 1 and "the proxy broke the protocol" in rig.proxy_closed[0]
        assert rig.faults == []

    run(script)


def test_the_proxy_closing_closes_the_relay() -> None:
    async def script(rig: Rig) -> None:
        remote = rig.new_remote()
        rig.proxy.sock.shutdown(socket.SHUT_WR)
        assert await remote.closed()
        assert rig.proxy_closed == ["the proxy closed the link"] and rig.relay.closed
        late, theirs = socket.socketpair()
        rig.relay.attach(late)  # closed relay: the socket is closed, not used
        assert theirs.recv(1) == b""
        theirs.close()

    run(script)


# --- the host's QEMU as the remote ---------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")
real_qemu = pytest.mark.skipif(QEMU is None or os.geteuid() != 0,
                               reason="needs qemu-system-x86_64 and root")


def start_remote() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """QEMU's x-remote machine with one LSI53C895A on a socketpair, returned
    once its QMP monitor answered a command. Not sooner: x-remote serves its
    link as soon as the object exists, before the machine's first reset,
    which then undoes what it was sent (the greeting is no sign: it is
    written before that reset too; an answer comes from the main loop)."""
    assert QEMU is not None
    ours, theirs = socket.socketpair()
    monitor, monitor_theirs = socket.socketpair()
    proc = subprocess.Popen(
        [QEMU, "-machine", "x-remote,vfio-user=off", "-nodefaults", "-display", "none",
         "-accel", "tcg", "-device", "lsi53c895a,id=lsi0",
         "-object", f"x-remote-object,id=r,devid=lsi0,fd={theirs.fileno()}",
         "-chardev", f"socket,id=mon,fd={monitor_theirs.fileno()}",
         "-mon", "chardev=mon,mode=control"],
        pass_fds=[theirs.fileno(), monitor_theirs.fileno()], stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    theirs.close()
    monitor_theirs.close()
    monitor.settimeout(10)
    greeting = monitor.recv(4096)
    assert greeting.startswith(b'{"QMP"'), (greeting, proc.stderr.read() if proc.stderr else "")
    monitor.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert monitor.recv(4096).startswith(b'{"return"')
    monitor.close()
    return proc, ours


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@real_qemu
def test_real_qemu_speaks_the_codec() -> None:
    """The vendor and device ids of the LSI53C895A (0x1000, 0x0012) through
    encode() and the decoder; DEVICE_RESET's reply is an empty RET."""
    proc, link = start_remote()
    try:
        link.settimeout(10)
        decoder = Decoder(Role.REPLIES, os.close)

        def ask(request: Message) -> Message:
            link.sendall(encode(request))
            while isinstance(reply := decoder.next_message(request.command), NeedData):
                data, fds, _, _ = socket.recv_fds(link, 4096, 8)
                assert data, proc.stderr.read() if proc.stderr else ""
                decoder.receive_data(data, fds)
            assert not isinstance(reply, ConnectionClosed)
            return reply

        assert ask(PciConfigRead(0x00, 0, 2)) == Ret(0x1000)
        assert ask(PciConfigRead(0x02, 0, 2)) == Ret(0x0012)
        assert ask(PciConfigRead(0x00, 0, 4)) == Ret(0x0012_1000)
        assert ask(DeviceReset()) == Ret(None)
        assert ask(PciConfigWrite(0x10, 0xFFFFFFFF, 4)) == Ret(0)
        assert ask(PciConfigRead(0x10, 0, 4)) == Ret(0xFFFFFF01)  # 256-byte I/O BAR
    finally:
        link.close()
        stop(proc)


@real_qemu
def test_real_qemu_through_the_relay_and_a_restart() -> None:
    """Set-up through the relay to a real remote (RAM as a memfd, eventfds, the
    I/O BAR's address); the remote is killed with a config read in flight;
    a new one gets the replay, and the re-sent read sees the replayed BAR."""
    ram = os.memfd_create("ram")
    os.ftruncate(ram, 2 * MIB)
    irq = eventfds()
    procs: list[subprocess.Popen[bytes]] = []

    async def script(rig: Rig) -> None:
        proc, link = start_remote()
        procs.append(proc)
        rig.relay.attach(link)
        rig.proxy.send(SyncSysmem((Region(0, 2 * MIB, 0),), (ram,)))
        rig.proxy.send(SetIrqfd(*irq))
        for write in (PciConfigWrite(0x10, 0xFFFFFFFF, 4), PciConfigWrite(0x10, 0xC000, 4),
                      PciConfigWrite(0x04, 0x0001, 2)):
            rig.proxy.send(write)
            assert await rig.proxy.recv(Command.PCI_CFGWRITE) == Ret(0)
        rig.proxy.send(PciConfigRead(0x10, 0, 4))
        assert await rig.proxy.recv(Command.PCI_CFGREAD) == Ret(0xC001)
        os.kill(proc.pid, 19)  # SIGSTOP: the next request stays in flight
        rig.proxy.send(PciConfigRead(0x10, 0, 4))
        await rig.proxy.silent()
        rig.relay.detach()
        stop(proc)
        proc, link = start_remote()
        procs.append(proc)
        rig.relay.attach(link)
        assert await rig.proxy.recv(Command.PCI_CFGREAD, timeout=10) == Ret(0xC001)
        rig.proxy.send(PciConfigRead(0x04, 0, 2))
        assert await rig.proxy.recv(Command.PCI_CFGREAD) == Ret(0x0001)
        assert rig.relay.stats.resent == 1 and rig.relay.stats.replayed == 4
        assert rig.faults == [] and proc.poll() is None
        for proc in procs:
            stop(proc)

    try:
        run(script)
    finally:
        for proc in procs:
            stop(proc)
        for fd in (ram, *irq):
            os.close(fd)


@pytest.mark.parametrize("nfds", [8, 9])
def test_too_many_fds_from_the_proxy_close_it(nfds: int) -> None:
    """8 fds: the codec refuses them (QEMU would); 9: more than the relay
    reads at once (the kernel truncates): refused too, none leaks."""
    async def script(rig: Rig) -> None:
        rig.new_remote()
        fds = tuple(os.eventfd(0) for _ in range(nfds))
        regions = [(i * MIB, MIB, 0) for i in range(8)]
        body = struct.pack("=8Q8Q8q", *(r[0] for r in regions), *(r[1] for r in regions),
                           *(r[2] for r in regions))
        rig.proxy.send_raw(struct.pack("=i4xQ", 0, len(body)) + body, fds)
        for fd in fds:
            os.close(fd)
        assert await rig.proxy.closed()
        assert len(rig.proxy_closed) == 1 and "fds" in rig.proxy_closed[0]

    run(script)


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@real_qemu
def test_real_proxy_and_remotes_through_the_relay() -> None:
    """The host's QEMU on both sides: a VMM (q35, memfd RAM, no guest: its
    firmware enumerates PCI and drives the LSI53C895A) whose x-pci-proxy-dev
    talks through the relay. The first remote is stopped before the VMM
    starts, so the firmware's first access waits; the remote is replaced,
    the record replayed, the access re-sent, and the firmware goes on:
    hundreds of real proxy messages, none refused by the codec."""
    before = open_fds()
    procs: list[subprocess.Popen[bytes]] = []

    async def main() -> None:
        proc, link = start_remote()
        procs.append(proc)
        os.kill(proc.pid, 19)  # SIGSTOP
        ours, theirs = socket.socketpair()
        closed: list[str] = []
        faults: list[str] = []
        relay = MpqemuRelay("lsi0", ours, closed.append, faults.append)
        relay.attach(link)
        assert QEMU is not None
        vmm = subprocess.Popen(
            [QEMU, "-machine", "q35", "-accel", "tcg", "-m", "128", "-nodefaults",
             "-display", "none", "-serial", "none",
             "-object", "memory-backend-memfd,id=ram0,size=128M,share=on",
             "-numa", "node,memdev=ram0",
             "-device", f"x-pci-proxy-dev,id=lsi0,fd={theirs.fileno()}"],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(vmm)
        theirs.close()
        try:
            assert await until(lambda: relay.waiting_for_reply, 20), relay.stats
            sysmem = relay.record.sysmem
            assert sysmem is not None and sysmem.regions[0].size == 128 * MIB
            assert relay.record.irqfd is not None
            relay.detach()
            stop(proc)
            proc, link = start_remote()
            procs.append(proc)
            relay.attach(link)
            assert relay.stats.resent == 1 and relay.stats.replayed == 2
            assert await until(lambda: relay.stats.forwarded > 500, 30), relay.stats
            assert faults == [] and closed == [] and vmm.poll() is None
            stop(vmm)
            assert await until(lambda: bool(closed), 5)  # closed, or broken mid-reply
            assert len(closed) == 1 and relay.closed
        finally:
            relay.close()

    try:
        asyncio.run(main())
    finally:
        for proc in procs:
            stop(proc)
    assert open_fds() == before, "fds leaked"
