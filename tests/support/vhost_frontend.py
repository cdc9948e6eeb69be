"""A vhost-user front-end that plays QEMU 7.2 against a back-end, for tests.

It speaks over a real AF_UNIX stream socket, sends fds with SCM_RIGHTS, and
follows the message order DESIGN.md records for QEMU 7.2's vhost-user-scsi:

- `init()`: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
  GET_QUEUE_NUM (QEMU asks it only when MQ was negotiated), SET_OWNER,
  GET_FEATURES, then SET_VRING_CALL and SET_VRING_ERR for every ring.
- `start(rings)`: SET_FEATURES, SET_MEM_TABLE (NEED_REPLY when REPLY_ACK was
  negotiated: the only message QEMU asks an ack for), then per ring NUM,
  BASE, ADDR, KICK (and a kick right after it, as QEMU does), then
  SET_VRING_ENABLE 1 for all rings, and last SET_VRING_CALL for all rings with
  fresh eventfds (QEMU swaps its masked notifier for the guest notifier).
- `stop()`: SET_VRING_ENABLE 0 for all rings, then GET_VRING_BASE for the
  started ones; returns the bases.

Guest RAM is one memfd mapped here (`memory`), sent as a single region at
guest physical address 0 whose "QEMU virtual address" is
`gpa + UVA_BASE`.  The caller lays out rings in that memory (see
tests/support/driver.py) and passes only their guest physical addresses.
Everything blocks, with a timeout.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from emulators.vhost_user.codec import (
    Decoder,
    Message,
    Role,
    encode_request,
)
from emulators.vhost_user.constants import (
    HEADER,
    HEADER_SIZE,
    Feature,
    ProtocolFeature,
    Request,
    feature_mask,
)
from emulators.vhost_user.messages import (
    U64,
    MemoryRegion,
    MemoryTable,
    Payload,
    VringAddr,
    VringFd,
    VringState,
)

UVA_BASE = 0x7F00_0000_0000
"""Where "QEMU" pretends to have guest RAM mapped: uva = gpa + UVA_BASE."""

FRONTEND_PROTOCOL_FEATURES = feature_mask(
    ProtocolFeature.MQ,
    ProtocolFeature.LOG_SHMFD,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.CONFIG,
    ProtocolFeature.INFLIGHT_SHMFD,
    ProtocolFeature.RESET_DEVICE,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
)
"""Protocol features this front-end accepts when offered (QEMU accepts more)."""

GUEST_FEATURES = feature_mask(
    Feature.VERSION_1,
    Feature.RING_INDIRECT_DESC,
    Feature.SCSI_HOTPLUG,
    Feature.SCSI_CHANGE,
)
"""What the test guest acknowledges unless told otherwise (no EVENT_IDX)."""


class FrontendError(Exception):
    """The back-end answered wrongly, not at all, or refused a request."""


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where one ring lives in guest RAM (guest physical addresses) and its size."""

    index: int
    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int


class VhostFrontend:
    """Plays QEMU on `sock`; owns the guest RAM memfd and every eventfd it makes."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        memory_size: int,
        num_queues: int,
        timeout: float = 5.0,
    ) -> None:
        self.sock = sock
        self.timeout = timeout
        self.num_queues = num_queues
        self.sock.settimeout(timeout)
        self.memory_size = memory_size
        self.memfd = os.memfd_create("mplaunch-test-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, memory_size)
        self.memory = mmap.mmap(self.memfd, memory_size)
        self._decoder = Decoder(Role.FRONTEND, close_fd=os.close)
        self.offered_features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.features = 0
        self.queue_num: int | None = None
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.err_fds: dict[int, int] = {}
        self.started: list[int] = []

    # --- the QEMU sequences

    def init(self) -> None:
        """QEMU 7.2's connection set-up (vhost_dev_init)."""
        self.offered_features = self._get_u64(Request.GET_FEATURES)
        if self.offered_features & (1 << Feature.PROTOCOL_FEATURES):
            self.offered_protocol_features = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = self.offered_protocol_features & FRONTEND_PROTOCOL_FEATURES
            self.request(Request.SET_PROTOCOL_FEATURES, U64(self.protocol_features))
            if self.protocol_features & (1 << ProtocolFeature.MQ):
                self.queue_num = self._get_u64(Request.GET_QUEUE_NUM)
                if self.queue_num < self.num_queues:
                    raise FrontendError(f"back-end has {self.queue_num} queues")
        self.request(Request.SET_OWNER)
        self._get_u64(Request.GET_FEATURES)
        for index in range(self.num_queues):
            self._replace(self.call_fds, index, _eventfd())
            self.request(Request.SET_VRING_CALL, VringFd(index), fds=(self.call_fds[index],))
            self._replace(self.err_fds, index, _eventfd())
            self.request(Request.SET_VRING_ERR, VringFd(index), fds=(self.err_fds[index],))

    def start(
        self,
        rings: Sequence[RingLayout],
        *,
        guest_features: int = GUEST_FEATURES,
        bases: dict[int, int] | None = None,
    ) -> None:
        """QEMU 7.2's device start (vhost_dev_start) for the rings the guest set up."""
        bases = bases or {}
        self.features = (guest_features & self.offered_features) | (
            self.offered_features & (1 << Feature.PROTOCOL_FEATURES)
        )
        self.request(Request.SET_FEATURES, U64(self.features))
        region = MemoryRegion(0, self.memory_size, UVA_BASE, 0)
        self.request(
            Request.SET_MEM_TABLE,
            MemoryTable((region,)),
            fds=(self.memfd,),
            need_reply=self.reply_ack,
        )
        for ring in rings:
            self.request(Request.SET_VRING_NUM, VringState(ring.index, ring.size))
            self.request(Request.SET_VRING_BASE, VringState(ring.index, bases.get(ring.index, 0)))
            self.request(
                Request.SET_VRING_ADDR,
                VringAddr(
                    index=ring.index,
                    flags=0,
                    desc_user_addr=ring.desc_gpa + UVA_BASE,
                    used_user_addr=ring.used_gpa + UVA_BASE,
                    avail_user_addr=ring.avail_gpa + UVA_BASE,
                    log_guest_addr=0,
                ),
            )
            kick = _eventfd()
            self._replace(self.kick_fds, ring.index, kick)
            self.request(Request.SET_VRING_KICK, VringFd(ring.index), fds=(kick,))
            self.kick(ring.index)
        self.started = [ring.index for ring in rings]
        if self.features & (1 << Feature.PROTOCOL_FEATURES):
            for index in range(self.num_queues):
                self.request(Request.SET_VRING_ENABLE, VringState(index, 1))
        for index in range(self.num_queues):
            self._replace(self.call_fds, index, _eventfd())
            self.request(Request.SET_VRING_CALL, VringFd(index), fds=(self.call_fds[index],))

    def stop(self) -> dict[int, int]:
        """QEMU 7.2's device stop (guest reset, reboot, shutdown); returns ring bases."""
        if self.features & (1 << Feature.PROTOCOL_FEATURES):
            for index in range(self.num_queues):
                self.request(Request.SET_VRING_ENABLE, VringState(index, 0))
        bases: dict[int, int] = {}
        for index in self.started:
            reply = self.request(Request.GET_VRING_BASE, VringState(index, 0))
            assert reply is not None and isinstance(reply.payload, VringState)
            if reply.payload.index != index:
                raise FrontendError(f"GET_VRING_BASE {index} answered for {reply.payload.index}")
            bases[index] = reply.payload.num
        self.started = []
        return bases

    # --- data plane

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kick_fds[index], 1)

    def wait_call(self, index: int, timeout: float | None = None) -> bool:
        """Wait for the back-end to signal ring `index`; True if it did."""
        fd = self.call_fds[index]
        ready, _, _ = select.select([fd], [], [], self.timeout if timeout is None else timeout)
        if not ready:
            return False
        os.eventfd_read(fd)
        return True

    # --- messages

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))

    def request(
        self,
        request: Request,
        payload: Payload = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> Message | None:
        """Send one request; return its reply when it has one (or an ack was asked)."""
        data = encode_request(request, payload, need_reply=need_reply, fds=fds)
        self.send_raw(data, fds)
        if request in _REPLIED or need_reply:
            reply = self.read_reply(request)
            if need_reply and request not in _REPLIED:
                assert isinstance(reply.payload, U64)
                if reply.payload.value != 0:
                    raise FrontendError(f"{request.name} failed: ack {reply.payload.value}")
            return reply
        return None

    def send_raw(self, data: bytes, fds: Iterable[int] = ()) -> None:
        fds = list(fds)
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            raise FrontendError("back-end closed the connection") from None

    def read_reply(self, request: Request) -> Message:
        header = self._recv_exact(HEADER_SIZE)
        _, _, size = HEADER.unpack(header)
        self._decoder.receive_data(header)
        if size:
            self._decoder.receive_data(self._recv_exact(size))
        message = self._decoder.next_message()
        if not isinstance(message, Message):
            raise FrontendError(f"no reply to {request.name}: {message!r}")
        if message.request != request:
            raise FrontendError(f"reply to {message.request.name}, expected {request.name}")
        for fd in message.fds:
            os.close(fd)
        return message

    def close(self) -> None:
        """Hang up and release the guest RAM and every eventfd."""
        self.sock.close()
        self._decoder.close()
        for table in (self.kick_fds, self.call_fds, self.err_fds):
            for fd in table.values():
                os.close(fd)
            table.clear()
        self.memory.close()
        os.close(self.memfd)

    def _get_u64(self, request: Request) -> int:
        reply = self.request(request)
        assert reply is not None and isinstance(reply.payload, U64)
        return reply.payload.value

    def _recv_exact(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            try:
                data = self.sock.recv(size - len(chunks))
            except TimeoutError:
                raise FrontendError(f"no reply within {self.timeout} s") from None
            except ConnectionResetError:
                data = b""
            if not data:
                raise FrontendError("back-end closed the connection")
            chunks += data
        return bytes(chunks)

    @staticmethod
    def _replace(table: dict[int, int], index: int, fd: int) -> None:
        old = table.get(index)
        table[index] = fd
        if old is not None:
            os.close(old)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


_REPLIED = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
    }
)
