"""Sending and receiving one holder message (a datagram with its fds).

Shared by the holder and its client; blocking or not is the socket's choice.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

from launcher.holder import protocol as p

_CMSG = socket.CMSG_SPACE(p.HOLDER_MAX_FDS * 4)


def recv(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One datagram and its fds; None at EOF. Truncation is a protocol error."""
    data, anc, flags, _ = sock.recvmsg(p.MAX_MESSAGE + 1, _CMSG, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]))
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise p.ProtocolError("message or its fds truncated")
    if not data and not fds:
        return None
    return data, fds


def send(sock: socket.socket, msg: p.Message, fds: Sequence[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sock.sendmsg([p.encode(msg)], anc)
