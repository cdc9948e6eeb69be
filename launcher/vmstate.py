"""vm-state.json: what a re-attaching launcher cannot learn from the holder.

The holder keeps fds and children; what they mean is here: the spec as the
VM was started (its text, so an edited file only applies at the next
start), the accelerator chosen then, and per emulator the process that
serves it, its uid, the disks it serves now (management adds, removes and
resizes them at run time) and the counters its restart policy decides by.
The launcher rewrites the file, atomically, whenever one of these changes;
the next launcher trusts nothing in it that it can check otherwise (pids
are adopted only if the holder names them as its live children).

Parsing is strict: a field of the wrong type or out of range is a
:class:`VmStateError` naming the field and value, never another exception.
A field added later without changing what the others mean has a default
and leaves `VERSION` alone, so a launcher upgraded under a running VM can
read what its predecessor wrote; any other change raises `VERSION`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.restart_policy import check_snapshot
from launcher.slotbase import SlotStats
from launcher.spec import DiskSpec, Spec, parse_spec

VERSION = 1
MAX_STATE_BYTES = 4 * 1024 * 1024
"""A vm-state.json larger than this is not one mplaunch wrote."""
_PID_MAX = 2**22
_UID_MAX = 2**32 - 1


class VmStateError(Exception):
    """vm-state.json is missing a field, has a wrong one, or is not one at all."""


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise VmStateError(f"{where}: no field {key!r}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise VmStateError(f"{where}.{key} = {value!r:.80}: not a {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _ranged(obj: dict[str, Any], key: str, where: str, low: int, high: int,
            nullable: bool = False) -> int | None:
    value = _get(obj, key, (int, type(None)) if nullable else int, where)
    if value is not None and not low <= value <= high:
        raise VmStateError(f"{where}.{key} = {value}: not in {low}..{high}")
    return value  # type: ignore[no-any-return]


def _finite(obj: dict[str, Any], key: str, where: str, nullable: bool = False) -> float | None:
    """A number JSON may spell as a float or an int, finite (Python's JSON
    reads NaN and Infinity, and an int too large for a float)."""
    value = _get(obj, key, (int, float, type(None)) if nullable else (int, float), where)
    if value is None:
        return None
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise VmStateError(f"{where}.{key} = {value!r:.80}: not a finite, non-negative number")
    return number


def _disk_to_json(disk: DiskSpec) -> dict[str, Any]:
    return {"id": disk.id, "controller": disk.controller, "lun": disk.lun,
            "image": str(disk.image), "format": disk.format, "readonly": disk.readonly,
            "block_size": disk.block_size}


def _disk_from_json(obj: object, where: str) -> DiskSpec:
    if not isinstance(obj, dict):
        raise VmStateError(f"{where}: not an object")
    return DiskSpec(
        id=_get(obj, "id", str, where), controller=_get(obj, "controller", str, where),
        lun=_ranged(obj, "lun", where, 0, 16383) or 0,
        image=Path(_get(obj, "image", str, where)), format=_get(obj, "format", str, where),
        readonly=_get(obj, "readonly", bool, where),
        block_size=_ranged(obj, "block_size", where, 512, 65536) or 512,
    )


@dataclass(frozen=True)
class SlotState:
    """One emulator's part: who serves it and what it serves now."""

    pid: int | None = None
    uid: int | None = None
    disks: dict[str, list[DiskSpec]] = field(default_factory=dict)
    starts: int = 0
    restarts: int = 0
    spare_restarts: int = 0
    last_exit: str | None = None
    last_stall_ms: float | None = None
    policy: dict[str, Any] | None = None
    #: When its occupant started (CLOCK_MONOTONIC ns: one clock for the whole boot).
    started_ns: int = 0
    #: The package version its occupant reported ("": not known).
    version: str = ""

    @classmethod
    def of(cls, pid: int | None, uid: int | None, disks: dict[str, list[DiskSpec]],
           stats: SlotStats | None, policy: Any, version: str | None = None) -> SlotState:
        """From a live slot (`policy`: its RestartPolicy, if it has one)."""
        stats = stats or SlotStats()
        return cls(pid, uid, {c: list(ds) for c, ds in disks.items()}, stats.starts,
                   stats.restarts, stats.spare_restarts, stats.last_exit,
                   stats.last_stall_ms, policy.snapshot() if policy is not None else None,
                   stats.started_ns, version or "")

    def stats(self) -> SlotStats:
        return SlotStats(starts=self.starts, restarts=self.restarts,
                         spare_restarts=self.spare_restarts, last_exit=self.last_exit,
                         last_stall_ms=self.last_stall_ms, started_ns=self.started_ns)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid,
                "disks": {c: [_disk_to_json(d) for d in ds] for c, ds in self.disks.items()},
                "starts": self.starts, "restarts": self.restarts,
                "spare_restarts": self.spare_restarts, "last_exit": self.last_exit,
                "last_stall_ms": self.last_stall_ms, "policy": self.policy,
                "started_ns": self.started_ns, "version": self.version}

    @classmethod
    def from_json(cls, obj: object, where: str) -> SlotState:
        if not isinstance(obj, dict):
            raise VmStateError(f"{where}: not an object")
        raw_disks = _get(obj, "disks", dict, where)
        disks = {}
        for cid, items in raw_disks.items():
            if not isinstance(items, list):
                raise VmStateError(f"{where}.disks.{cid}: not a list")
            disks[cid] = [_disk_from_json(d, f"{where}.disks.{cid}[{i}]")
                          for i, d in enumerate(items)]
            for i, disk in enumerate(disks[cid]):
                if disk.controller != cid:
                    raise VmStateError(f"{where}.disks.{cid}[{i}].controller = "
                                       f"{disk.controller!r:.80}: not {cid!r:.80}")
        policy = _get(obj, "policy", (dict, type(None)), where)
        if policy is not None:
            try:
                check_snapshot(policy)
            except ValueError as e:
                raise VmStateError(f"{where}.policy: {e}") from None
        return cls(
            pid=_ranged(obj, "pid", where, 1, _PID_MAX, nullable=True),
            uid=_ranged(obj, "uid", where, 0, _UID_MAX, nullable=True),
            disks=disks,
            starts=_ranged(obj, "starts", where, 0, 2**62) or 0,
            restarts=_ranged(obj, "restarts", where, 0, 2**62) or 0,
            spare_restarts=_ranged(obj, "spare_restarts", where, 0, 2**62) or 0,
            last_exit=_get(obj, "last_exit", (str, type(None)), where),
            last_stall_ms=_finite(obj, "last_stall_ms", where, nullable=True),
            policy=policy,
            started_ns=_ranged({"started_ns": 0, **obj}, "started_ns", where, 0, 2**63) or 0,
            version=_get({"version": "", **obj}, "version", str, where),
        )


@dataclass(frozen=True)
class VmState:
    """The whole file."""

    spec_path: str
    spec_text: str
    accel: str
    started: float
    backends_only: bool = False
    qemu_pid: int | None = None
    qemu_uid: int | None = None
    slots: dict[str, SlotState] = field(default_factory=dict)

    def spec(self) -> Spec:
        """The spec as the VM was started, parsed again from its text (the
        file may have been edited since: that applies at the next start).
        VmStateError if the text is not TOML any more; SpecError if this
        mplaunch does not accept what the one that wrote it did."""
        try:
            data = tomllib.loads(self.spec_text)
        except tomllib.TOMLDecodeError as e:
            raise VmStateError(f"vm-state.spec_text: not TOML: {e}") from None
        return parse_spec(data, self.spec_path)

    def to_json(self) -> str:
        return json.dumps({
            "version": VERSION, "spec_path": self.spec_path, "spec_text": self.spec_text,
            "accel": self.accel, "started": self.started, "backends_only": self.backends_only,
            "qemu_pid": self.qemu_pid, "qemu_uid": self.qemu_uid,
            "slots": {k: v.to_json() for k, v in self.slots.items()},
        }, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> VmState:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise VmStateError(f"not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise VmStateError("not a JSON object")
        where = "vm-state"
        version = _get(obj, "version", int, where)
        if version != VERSION:
            raise VmStateError(f"version {version}: this mplaunch reads version {VERSION}")
        started = _finite(obj, "started", where)
        assert started is not None
        slots_raw = _get(obj, "slots", dict, where)
        return cls(
            spec_path=_get(obj, "spec_path", str, where),
            spec_text=_get(obj, "spec_text", str, where),
            accel=_get(obj, "accel", str, where),
            started=started,
            backends_only=_get(obj, "backends_only", bool, where),
            qemu_pid=_ranged(obj, "qemu_pid", where, 1, _PID_MAX, nullable=True),
            qemu_uid=_ranged(obj, "qemu_uid", where, 0, _UID_MAX, nullable=True),
            slots={k: SlotState.from_json(v, f"{where}.slots.{k}") for k, v in slots_raw.items()},
        )

    def save(self, path: Path) -> None:
        """Replace `path` atomically: a launcher that dies mid-write leaves the
        previous state, never half of one. No fsync: the file has to outlive
        the launcher, not the host (a host crash ends the VM anyway)."""
        temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        data = self.to_json().encode()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # a leftover of the same name keeps its mode
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.rename(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    @classmethod
    def load(cls, path: Path) -> VmState:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VmStateError(f"{path}: missing (the VM's launcher went before writing it)") \
                from None
        try:
            data = os.read(fd, MAX_STATE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_STATE_BYTES:
            raise VmStateError(f"{path}: larger than {MAX_STATE_BYTES} bytes")
        try:
            return cls.from_json(data)
        except VmStateError as e:
            raise VmStateError(f"{path}: {e}") from None
