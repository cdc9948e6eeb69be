"""The emulator's end of its control channel to mplaunch.

Over an AF_UNIX SOCK_SEQPACKET socket (one datagram, one message) the
emulator says READY once it is locked down, answers every PING from its
event loop with the progress of each queue, and, when it starts as a warm
spare, receives its whole assignment (a config and the fds it names) in one
ASSIGN. While it serves, COMMANDs add, remove or resize a LUN, each answered
by one RESULT carrying the command's seq. The protocol itself (every message
decoded into its own class) is in launcher.heartbeat.protocol.
"""

from __future__ import annotations

import os
import socket

from launcher.heartbeat import protocol as proto


class ControlChannel:
    def __init__(self, fd: int) -> None:
        # Family and type given: no getsockname/getsockopt (not allowed once locked down).
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fd)
        self.sock.setblocking(False)
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: proto.Message) -> None:
        data, fds = proto.encode(message)
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass  # mplaunch is gone or slow; its heartbeat decides what that means

    def receive(self) -> list[proto.Message]:
        """Every message now waiting; [] and `closed` once mplaunch is gone."""
        out: list[proto.Message] = []
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, proto.MAX_DATAGRAM + 1, proto.MAX_FDS)
            except BlockingIOError:
                return out
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                self.closed = True
                return out
            try:
                out.append(proto.decode(data, fds, sender=proto.Sender.LAUNCHER))
            except proto.ControlProtocolError:
                for fd in fds:
                    os.close(fd)
                raise

    def close(self) -> None:
        self.closed = True
        self.sock.close()
