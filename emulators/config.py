"""What an emulator process is told at start: its controllers, LUNs and fds.

The launcher opens every file and makes every socket; the emulator receives
descriptor numbers only, so it needs no path and no open() at all. The
description travels as JSON in argv (the environment is empty) and is
validated here, on the emulator's side, before anything uses it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from emulators.limits import BLOCK_SIZE_RULE, BLOCK_SIZES, ID_RULE, MAX_LUN, is_id
from launcher.heartbeat.protocol import MAX_CONTROLLERS, MAX_REQUEST_QUEUES


class ConfigError(ValueError):
    """The launcher handed a description this emulator cannot serve."""


@dataclass(frozen=True, slots=True)
class LunConfig:
    lun: int
    disk_id: str
    fd: int
    readonly: bool
    block_size: int


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    id: str
    socket_fd: int
    queues: int
    luns: tuple[LunConfig, ...]


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    id: str
    controllers: tuple[ControllerConfig, ...]
    control_fd: int = -1
    state_fd: int = -1
    first_start: bool = True
    #: A hot standby's: a pidfd of the process it stands by for. It serves
    #: nothing (no ring, no state store write) until that fd says the
    #: predecessor is dead (emulators.process, "Hot standby"). -1: serve now.
    predecessor_fd: int = -1
    #: The slot's liveness page (launcher.statestore.liveness): the serving
    #: emulator holds its lock, a standby waits on it. -1: the slot has none.
    liveness_fd: int = -1

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> EmulatorConfig:
        try:
            raw = json.loads(text)
            controllers = _list(raw, "controllers")
            if len(controllers) > MAX_CONTROLLERS:
                raise ValueError(f"{len(controllers)} controllers, at most {MAX_CONTROLLERS}")
            return cls(
                id=_id(raw, "id"),
                controllers=tuple(_controller(c) for c in controllers),
                control_fd=_int(raw, "control_fd", -1, 1 << 20),
                state_fd=_int(raw, "state_fd", -1, 1 << 20),
                first_start=_bool(raw, "first_start"),
                predecessor_fd=_int(raw, "predecessor_fd", -1, 1 << 20)
                if "predecessor_fd" in raw else -1,
                liveness_fd=_int(raw, "liveness_fd", -1, 1 << 20)
                if "liveness_fd" in raw else -1,
            )
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"bad emulator configuration: {e}") from None

    def with_fds(self, received: list[int]) -> EmulatorConfig:
        """This config with its fds (but the control fd) replaced, in the order of
        `assigned_fds()`, by those a spare received: numbers differ across processes."""
        wanted = self.assigned_fds()
        if len(received) != len(wanted):
            raise ConfigError(f"{len(received)} fds received, the config names {len(wanted)}")
        new = dict(zip(wanted, received, strict=True))
        controllers = tuple(
            ControllerConfig(
                c.id, new[c.socket_fd], c.queues,
                tuple(LunConfig(x.lun, x.disk_id, new[x.fd], x.readonly, x.block_size)
                      for x in c.luns),
            )
            for c in self.controllers
        )
        state_fd = new[self.state_fd] if self.state_fd >= 0 else -1
        predecessor_fd = new[self.predecessor_fd] if self.predecessor_fd >= 0 else -1
        liveness_fd = new[self.liveness_fd] if self.liveness_fd >= 0 else -1
        return EmulatorConfig(self.id, controllers, self.control_fd, state_fd, self.first_start,
                              predecessor_fd, liveness_fd)

    def assigned_fds(self) -> list[int]:
        """The fds that travel with an assignment: all but the control fd."""
        return [fd for fd in self.all_fds() if fd != self.control_fd]

    def all_fds(self) -> list[int]:
        fds = [fd for fd in (self.control_fd, self.state_fd) if fd >= 0]
        for c in self.controllers:
            fds.append(c.socket_fd)
            fds.extend(lun.fd for lun in c.luns)
        if self.predecessor_fd >= 0:
            fds.append(self.predecessor_fd)
        if self.liveness_fd >= 0:
            fds.append(self.liveness_fd)
        return fds


def _controller(raw: Any) -> ControllerConfig:
    luns = tuple(_lun(x) for x in _list(raw, "luns"))
    if len({x.lun for x in luns}) != len(luns):
        raise ValueError("duplicate LUN on a controller")
    return ControllerConfig(
        id=_id(raw, "id"),
        socket_fd=_int(raw, "socket_fd", 0, 1 << 20),
        queues=_int(raw, "queues", 1, MAX_REQUEST_QUEUES),
        luns=luns,
    )


def _lun(raw: Any) -> LunConfig:
    return checked_lun(
        _int(raw, "lun", 0, MAX_LUN), _str(raw, "disk_id"), _int(raw, "fd", 0, 1 << 20),
        _bool(raw, "readonly"), _int(raw, "block_size", 0, 1 << 20),
    )


def checked_lun(lun: int, disk_id: str, fd: int, readonly: bool, block_size: int) -> LunConfig:
    """A LUN's description, checked against the rules every side enforces
    (emulators.limits); ValueError says which one it breaks. Used for the LUNs
    of a config and for a LUN added at run time alike."""
    if not 0 <= lun <= MAX_LUN:
        raise ValueError(f"lun {lun} is out of range 0..{MAX_LUN}")
    if not is_id(disk_id):
        raise ValueError(f"disk_id {disk_id!r} must be {ID_RULE}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} must be {BLOCK_SIZE_RULE}")
    return LunConfig(lun, disk_id, fd, readonly, block_size)


def _list(raw: Any, key: str) -> list[Any]:
    value = raw[key]
    if not isinstance(value, list):
        raise TypeError(f"{key} must be a list")
    return value


def _id(raw: Any, key: str) -> str:
    value = _str(raw, key)
    if not is_id(value):
        raise ValueError(f"{key} {value!r} must be {ID_RULE}")
    return value


def _str(raw: Any, key: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key} must be a non-empty string")
    return value


def _bool(raw: Any, key: str) -> bool:
    value = raw[key]
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be a boolean")
    return value


def _int(raw: Any, key: str, low: int, high: int) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key} must be an integer from {low} to {high}, not {value!r}")
    return value
