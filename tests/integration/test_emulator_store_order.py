"""The state store is untrusted input: an emulator reads it only once locked down.

The previous emulator wrote the store, and may have been compromised, so
DESIGN.md's rule applies: nothing an adversary controls is parsed by an
unconfined emulator. A spare reads it on assignment, after its lockdown by
construction; this test holds a direct start (``python -m emulators
CONFIG``) to the same order, by running its ``main`` with the lockdown and
the store's readers recorded.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from emulators import process
from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from emulators.scsi import sense as S
from emulators.scsi.lun import LunState
from launcher.statestore import layout


def test_a_direct_start_reads_the_store_only_after_its_lockdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_fd = layout.create(tmp_path / "state", layout.Layout(1, 3, 4))
    store = layout.StateStore(state_fd)
    saved = LunState(sense=S.INVALID_OPCODE, write_cache_enabled=False)
    store.write_lun_slot(0, 0, 0, saved.pack())
    store.close()
    disk_fd = os.open(tmp_path / "disk", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(disk_fd, 1 << 20)
    ours, theirs = socket.socketpair()
    theirs.close()  # the front-end is gone: the emulator ends after its start
    config = EmulatorConfig(
        "e0",
        (ControllerConfig("c0", ours.detach(), 1, (LunConfig(0, "d0", disk_fd, False, 512),)),),
        state_fd=state_fd,
        first_start=False,
    )

    events: list[str] = []
    loaded: list[LunState] = []
    store_init = layout.StateStore.__init__
    unpack = LunState.unpack.__func__  # type: ignore[attr-defined]

    def recording_init(self: layout.StateStore, fd: int) -> None:
        events.append("store")
        store_init(self, fd)

    def recording_unpack(cls: type[LunState], data: bytes | memoryview) -> LunState:
        events.append("unpack")
        state: LunState = unpack(cls, data)
        loaded.append(state)
        return state

    monkeypatch.setattr(process, "lockdown",
                        lambda mode, standby_thread=False: events.append("lockdown"))
    monkeypatch.setattr(layout.StateStore, "__init__", recording_init)
    monkeypatch.setattr(LunState, "unpack", classmethod(recording_unpack))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert process.main(["emulators", config.to_json(), "on"]) == process.EXIT_OK
    finally:
        signal.set_wakeup_fd(-1)
        for s, h in handlers.items():
            signal.signal(s, h)
        os.close(disk_fd)
        os.close(state_fd)
    assert events == ["lockdown", "store", "unpack"]
    assert loaded == [saved]  # and what it read is the predecessor's state
