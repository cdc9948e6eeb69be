"""The wire pieces of the hot standby: PROMOTE and the predecessor's pidfd
in an emulator's config."""

from __future__ import annotations

import json

import pytest

from emulators.config import ControllerConfig, EmulatorConfig, LunConfig
from launcher.heartbeat import protocol as proto


def test_promote_round_trips_with_its_seq() -> None:
    data, fds = proto.encode(proto.Promote(41))
    assert fds == []
    assert proto.decode(data, [], sender=proto.Sender.LAUNCHER) == proto.Promote(41)


def test_only_the_launcher_promotes_and_promote_carries_nothing() -> None:
    data, _ = proto.encode(proto.Promote(1))
    with pytest.raises(proto.RemoteControlError, match="does not send PROMOTE"):
        proto.decode(data, [], sender=proto.Sender.EMULATOR)
    with pytest.raises(proto.RemoteControlError, match="payload is 1 bytes"):
        proto.decode(data + b"\0", [], sender=proto.Sender.LAUNCHER)
    with pytest.raises(proto.RemoteControlError, match="fds arrived"):
        proto.decode(data, [7], sender=proto.Sender.LAUNCHER)


def _config(predecessor_fd: int) -> EmulatorConfig:
    luns = (LunConfig(0, "d0", 11, False, 512),)
    return EmulatorConfig("e0", (ControllerConfig("scsi0", 10, 1, luns),), control_fd=3,
                          state_fd=12, first_start=False, predecessor_fd=predecessor_fd)


def test_a_standby_config_carries_the_pidfd_with_its_other_fds() -> None:
    config = _config(13)
    assert config.assigned_fds() == [12, 10, 11, 13]
    again = EmulatorConfig.from_json(config.to_json())
    assert again == config
    moved = again.with_fds([112, 110, 111, 113])
    assert moved.predecessor_fd == 113 and moved.state_fd == 112
    assert moved.controllers[0].socket_fd == 110


def test_a_config_without_a_predecessor_serves_at_once() -> None:
    raw = json.loads(_config(-1).to_json())
    del raw["predecessor_fd"]  # as a launcher of before the standby wrote it
    config = EmulatorConfig.from_json(json.dumps(raw))
    assert config.predecessor_fd == -1
    assert 13 not in config.all_fds()
