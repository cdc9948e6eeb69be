"""A real emulator process, driven over real sockets, eventfds and shared memory.

`EmulatorHarness` starts ``python -m emulators CONFIG_JSON`` the way the
launcher does: every socket and disk file is opened here and only fd numbers
reach the child (``pass_fds``), with an empty environment. Each controller
gets a socketpair whose other end a `VhostFrontend` (playing QEMU 7.2) holds,
and one `TestDriver` per ring laid out in the front-end's memfd guest RAM, so
the test writes descriptors exactly where the emulator reads them.

Ring ``i`` of a controller owns the ``i``-th equal slice of guest RAM: its
descriptor table, avail and used rings at the start, then its data buffers.

`ControllerRig.command` builds a virtio-scsi request (virtio 1.1, 5.6.6.1:
the 51-byte header with the 8-byte LUN field, tag, task attribute, priority,
CRN and a 32-byte CDB, then data-out; a 108-byte response buffer, then
data-in buffers), kicks, waits for the used element and decodes the reply.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from emulators.virtio.memory import GuestMemory, MemoryRegion
from tests.support.driver import TestDriver
from tests.support.vhost_frontend import UVA_BASE, RingLayout, VhostFrontend

REPO = Path(__file__).resolve().parents[2]
CDB_SIZE = 32
SENSE_SIZE = 96
REQ_SIZE = 19 + CDB_SIZE
RESP_SIZE = 12 + SENSE_SIZE
CONTROL_QUEUE = 0
EVENT_QUEUE = 1
FIRST_REQUEST_QUEUE = 2

_REQ = struct.Struct("<8sQBBB32s")
_RESP = struct.Struct("<IIHBB")
_TMF = struct.Struct("<II8sQ")


def lun_field(lun: int, target: int = 0) -> bytes:
    """The 8-byte LUN field as Linux builds it: 1, target, flat-space LUN."""
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))


def request_header(
    cdb: bytes,
    *,
    lun: int = 0,
    target: int = 0,
    tag: int = 0,
    attr: int = 0,
    prio: int = 0,
    crn: int = 0,
    lun_bytes: bytes | None = None,
) -> bytes:
    """virtio_scsi_cmd_req with a 32-byte CDB (51 bytes)."""
    if len(cdb) > CDB_SIZE:
        raise ValueError(f"CDB of {len(cdb)} bytes")
    field_ = lun_field(lun, target) if lun_bytes is None else lun_bytes
    return _REQ.pack(field_, tag, attr, prio, crn, cdb.ljust(CDB_SIZE, b"\0"))


def tmf_request(subtype: int, lun: int = 0, target: int = 0, tag: int = 0) -> bytes:
    """virtio_scsi_ctrl_tmf_req (type 0)."""
    return _TMF.pack(0, subtype, lun_field(lun, target), tag)


@dataclass(frozen=True, slots=True)
class ScsiReply:
    """A decoded virtio_scsi_cmd_resp plus the data-in bytes."""

    used_len: int
    response: int
    status: int
    resid: int
    sense: bytes
    data: bytes

    @property
    def sense_key(self) -> int:
        return self.sense[2] & 0x0F if len(self.sense) > 2 else 0

    @property
    def asc(self) -> tuple[int, int]:
        """(ASC, ASCQ) of fixed-format sense; (0, 0) without sense."""
        return (self.sense[12], self.sense[13]) if len(self.sense) > 13 else (0, 0)


def decode_reply(used_len: int, writable: Sequence[bytes]) -> ScsiReply:
    resp = writable[0]
    sense_len, resid, _qual, status, response = _RESP.unpack_from(resp)
    return ScsiReply(
        used_len=used_len,
        response=response,
        status=status,
        resid=resid,
        sense=bytes(resp[12 : 12 + min(sense_len, SENSE_SIZE)]),
        data=b"".join(writable[1:]),
    )


@dataclass(frozen=True, slots=True)
class Disk:
    """One LUN's image: created (sparse, ``size`` bytes) unless it exists."""

    path: Path
    lun: int = 0
    size: int = 4 << 20
    block_size: int = 512
    readonly: bool = False
    disk_id: str = ""


@dataclass(frozen=True, slots=True)
class ControllerSpec:
    id: str
    disks: tuple[Disk, ...]
    queues: int = 1
    queue_size: int = 128
    memory_size: int = 8 << 20


class HarnessError(AssertionError):
    """The emulator did not answer as a working device would."""


@dataclass
class ControllerRig:
    """The QEMU side and the guest side of one controller."""

    spec: ControllerSpec
    frontend: VhostFrontend
    memory: GuestMemory
    drivers: dict[int, TestDriver]
    done: dict[int, dict[int, tuple[int, list[bytes]]]] = field(default_factory=dict)

    @property
    def num_rings(self) -> int:
        return FIRST_REQUEST_QUEUE + self.spec.queues

    def layouts(self, indexes: Sequence[int] | None = None) -> list[RingLayout]:
        out = []
        for index in range(self.num_rings) if indexes is None else indexes:
            lay = self.drivers[index].layout
            out.append(RingLayout(index, lay.size, lay.desc_gpa, lay.avail_gpa, lay.used_gpa))
        return out

    def start(self, bases: dict[int, int] | None = None) -> None:
        self.frontend.start(self.layouts(), bases=bases)

    def stop(self) -> dict[int, int]:
        return self.frontend.stop()

    # -- submission

    def submit(
        self,
        queue: int,
        readable: list[bytes],
        writable_sizes: list[int],
        *,
        indirect: bool = False,
        kick: bool = True,
    ) -> int:
        head = self.drivers[queue].add_chain(readable, writable_sizes, indirect=indirect)
        if kick:
            self.frontend.kick(queue)
        return head

    def submit_command(
        self,
        cdb: bytes,
        *,
        queue: int = FIRST_REQUEST_QUEUE,
        data_out: Sequence[bytes] = (),
        data_in: Sequence[int] = (),
        indirect: bool = False,
        kick: bool = True,
        resp_size: int = RESP_SIZE,
        lun: int = 0,
        target: int = 0,
        tag: int = 0,
        attr: int = 0,
        prio: int = 0,
        crn: int = 0,
    ) -> int:
        header = request_header(
            cdb, lun=lun, target=target, tag=tag, attr=attr, prio=prio, crn=crn
        )
        readable = [header, *data_out]
        return self.submit(
            queue, readable, [resp_size, *data_in], indirect=indirect, kick=kick
        )

    def command(
        self,
        cdb: bytes,
        *,
        queue: int = FIRST_REQUEST_QUEUE,
        data_out: Sequence[bytes] = (),
        data_in: Sequence[int] = (),
        indirect: bool = False,
        timeout: float = 5.0,
        lun: int = 0,
        target: int = 0,
        tag: int = 0,
        attr: int = 0,
        prio: int = 0,
        crn: int = 0,
    ) -> ScsiReply:
        """One command, start to finish."""
        head = self.submit_command(
            cdb, queue=queue, data_out=data_out, data_in=data_in, indirect=indirect,
            lun=lun, target=target, tag=tag, attr=attr, prio=prio, crn=crn,
        )
        used_len, writable = self.wait(queue, head, timeout)
        return decode_reply(used_len, writable)

    def buffers(self, queue: int, head: int) -> list[tuple[int, int]]:
        """(gpa, length) of every buffer of a chain not yet collected."""
        return list(self.drivers[queue]._chains[head].buffers)

    def control(self, request: bytes, reply_size: int = 1, timeout: float = 5.0) -> bytes:
        head = self.submit(CONTROL_QUEUE, [request], [reply_size])
        used_len, writable = self.wait(CONTROL_QUEUE, head, timeout)
        return writable[0][:used_len]

    # -- completion

    def poll(self, queue: int) -> None:
        """Move new used elements of ``queue`` into ``done``."""
        box = self.done.setdefault(queue, {})
        for c in self.drivers[queue].collect():
            box[c.head] = (c.used_len, c.writable)

    def wait(self, queue: int, head: int, timeout: float = 5.0) -> tuple[int, list[bytes]]:
        """Wait (on the call eventfd) until ``head`` is used; its (used_len, buffers)."""
        deadline = time.monotonic() + timeout
        box = self.done.setdefault(queue, {})
        while True:
            self.poll(queue)
            if head in box:
                return box.pop(head)
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"queue {queue}: head {head} not completed in {timeout} s")
            self.frontend.wait_call(queue, min(left, 0.5))

    def wait_all(self, queue: int, heads: Sequence[int], timeout: float = 5.0) -> list[
        tuple[int, list[bytes]]
    ]:
        return [self.wait(queue, h, timeout) for h in heads]

    def close(self) -> None:
        self.memory.close()
        self.frontend.close()


@dataclass
class EmulatorHarness:
    """One emulator child process and a rig per controller it serves."""

    proc: subprocess.Popen[bytes]
    rigs: list[ControllerRig]
    stderr_path: Path
    disk_fds: list[int]

    @classmethod
    def start(
        cls,
        controllers: Sequence[ControllerSpec],
        *,
        first_start: bool = False,
        profile: Path | None = None,
        start_rings: bool = True,
        emulator_id: str = "emu",
        lockdown: str | None = None,
    ) -> EmulatorHarness:
        """Spawn the emulator, then init (and start) every controller as QEMU would.

        ``profile``: run the emulator under cProfile, writing stats there
        when it exits (stop it with :meth:`stop`); writing the file needs
        ``lockdown="off"``. ``lockdown``: the emulator's seccomp mode argument
        (on, log, off); None leaves the emulator's default.
        """
        parent_socks: list[socket.socket] = []
        child_fds: list[int] = []
        disk_fds: list[int] = []
        configs = []
        try:
            for spec in controllers:
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                parent_socks.append(a)
                b_fd = b.detach()
                os.set_inheritable(b_fd, False)
                child_fds.append(b_fd)
                luns = []
                for disk in spec.disks:
                    fd = _open_disk(disk)
                    disk_fds.append(fd)
                    luns.append(
                        LunConfig(
                            lun=disk.lun,
                            disk_id=disk.disk_id or f"{spec.id}-lun{disk.lun}",
                            fd=fd,
                            readonly=disk.readonly,
                            block_size=disk.block_size,
                        )
                    )
                configs.append(ControllerConfig(spec.id, b_fd, spec.queues, tuple(luns)))
            config = EmulatorConfig(emulator_id, tuple(configs), first_start=first_start)
            argv = [sys.executable]
            if profile is not None:
                argv += ["-m", "cProfile", "-o", str(profile)]
            argv += ["-m", "emulators", config.to_json()]
            if lockdown is not None:
                argv.append(lockdown)
            fd, name = tempfile.mkstemp(prefix="emulator-stderr-")
            stderr_path = Path(name)
            try:
                proc = subprocess.Popen(
                    argv,
                    pass_fds=config.all_fds(),
                    env={},
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=fd,
                )
            finally:
                os.close(fd)
        finally:
            for fd in child_fds:
                os.close(fd)
        rigs: list[ControllerRig] = []
        harness = cls(proc, rigs, stderr_path, disk_fds)
        try:
            for spec, sock in zip(controllers, parent_socks, strict=True):
                rigs.append(_make_rig(spec, sock))
            for rig in rigs:
                rig.frontend.init()
                if start_rings:
                    rig.start()
        except BaseException:
            harness.stop()
            raise
        return harness

    @property
    def rig(self) -> ControllerRig:
        return self.rigs[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_exit(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> tuple[int, str]:
        """SIGTERM, wait (kill if it hangs), release everything; (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for rig in self.rigs:
            rig.close()
        self.rigs.clear()
        for fd in self.disk_fds:
            os.close(fd)
        self.disk_fds.clear()
        text = self.stderr()
        self.stderr_path.unlink(missing_ok=True)
        assert self.proc.returncode is not None
        return self.proc.returncode, text

    def __enter__(self) -> EmulatorHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.returncode is None or self.rigs:
            self.stop()


def _open_disk(disk: Disk) -> int:
    if not disk.path.exists():
        with open(disk.path, "wb") as f:
            f.truncate(disk.size)
    fd = os.open(disk.path, os.O_RDONLY if disk.readonly else os.O_RDWR)
    os.set_inheritable(fd, False)
    return fd


def _make_rig(spec: ControllerSpec, sock: socket.socket) -> ControllerRig:
    rings = FIRST_REQUEST_QUEUE + spec.queues
    frontend = VhostFrontend(sock, memory_size=spec.memory_size, num_queues=rings)
    memory = GuestMemory.from_fds(
        [MemoryRegion(0, spec.memory_size, UVA_BASE, 0, frontend.memfd)]
    )
    slice_ = (spec.memory_size // rings) & ~0xFFF
    drivers = {
        index: TestDriver(
            memory, spec.queue_size, index * slice_, data_end=(index + 1) * slice_
        )
        for index in range(rings)
    }
    return ControllerRig(spec, frontend, memory, drivers)


def changed_ranges(before: bytes, after: bytes, chunk: int = 4096) -> list[tuple[int, int]]:
    """[start, end) byte ranges where ``after`` differs from ``before``."""
    if len(before) != len(after):
        raise ValueError("snapshots of different sizes")
    out: list[tuple[int, int]] = []
    for base in range(0, len(before), chunk):
        a, b = before[base : base + chunk], after[base : base + chunk]
        if a == b:
            continue
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                at = base + i
                if out and out[-1][1] == at:
                    out[-1] = (out[-1][0], at + 1)
                else:
                    out.append((at, at + 1))
    return out


def outside(ranges: Sequence[tuple[int, int]], allowed: Sequence[tuple[int, int]]) -> list[
    tuple[int, int]
]:
    """The parts of ``ranges`` not covered by one of the ``allowed`` [start, end) ranges."""
    bad = []
    for start, end in ranges:
        for at in range(start, end):
            if not any(a <= at < b for a, b in allowed):
                bad.append((start, end))
                break
    return bad


def used_ring_range(driver: TestDriver) -> tuple[int, int]:
    """The bytes of a ring the device may write: the used ring (and avail_event)."""
    used = driver.layout.used_gpa
    return used, used + 6 + 8 * driver.size
