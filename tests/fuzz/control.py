"""Fuzz harness for the control-channel decoder (launcher.heartbeat.protocol).

Both ends decode what the other sends: the launcher reads a possibly
compromised emulator's datagrams, the emulator reads the launcher's. Input:
one byte (bits 0-1: which sender the decoder expects, none, launcher or
emulator; bits 2-3: how many fds arrived), then the datagram. Only
`RemoteControlError` may come out, and a decoded message must encode back
to a datagram that decodes to the same message.
"""

from __future__ import annotations

from launcher.heartbeat.protocol import (
    Assign,
    Assigned,
    LunAdd,
    LunRemove,
    LunResize,
    LunResizeCheck,
    Message,
    Ping,
    Pong,
    QueueProgress,
    Ready,
    RemoteControlError,
    Result,
    Sender,
    Shutdown,
    decode,
    encode,
)

from .harness import Harness, Input, OneInput

_SENDERS = (None, Sender.LAUNCHER, Sender.EMULATOR, None)


def _seeds() -> list[bytes]:
    messages: list[tuple[int, Message]] = [
        (2, Ready(pid=1234, locked_down=True, seq=1)),
        (1, Assign('{"id": "disk-proc", "controllers": []}', (10, 11), seq=2)),
        (2, Assigned(True, "", seq=2)),
        (2, Assigned(False, "no such disk", seq=3)),
        (1, Ping(seq=4, sent_ns=123456789)),
        (2, Pong(4, 123456789, (QueueProgress(0, 2, 17, 1), QueueProgress(1, 2, 0, 0)))),
        (1, Shutdown(seq=5)),
        (1, LunAdd("scsi0", 3, "d3", 12, True, 4096, seq=6)),
        (1, LunRemove("scsi0", 3, seq=7)),
        (1, LunResizeCheck("scsi0", 0, 1 << 30, seq=8)),
        (1, LunResize("scsi0", 0, 1 << 30, seq=9)),
        (2, Result(False, "LUN 3 is busy", seq=6)),
    ]
    out = []
    for sender, message in messages:
        datagram, fds = encode(message)
        out.append(bytes((sender | len(fds) << 2,)) + datagram)
    return out


def _make() -> OneInput:
    def one_input(data: bytes) -> None:
        inp = Input(data)
        head = inp.u8()
        sender = _SENDERS[head & 3]
        fds = list(range(100, 100 + (head >> 2 & 3)))
        try:
            message = decode(inp.rest(), fds, sender=sender)
        except RemoteControlError:
            return
        again, again_fds = encode(message)
        assert decode(again, again_fds, sender=sender) == message, message

    return one_input


CONTROL = Harness(
    "control",
    "the control-channel decoder between launcher and emulator (launcher.heartbeat.protocol)",
    _make,
    _seeds,
)
