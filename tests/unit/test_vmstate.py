"""vm-state.json: a round trip keeps everything; anything else is a VmStateError."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.spec import DiskSpec
from launcher.vmstate import SlotState, VmState, VmStateError

DISK = DiskSpec("d0", "c0", 3, Path("/images/a.img"), "raw", True, 4096)
STATE = VmState(
    spec_path="/etc/mplaunch/demo.toml", spec_text="[vm]\nname = \"demo\"\n", accel="tcg",
    started=1_790_000_000.25, backends_only=False, qemu_pid=4242, qemu_uid=64002,
    slots={"e0": SlotState(pid=4300, uid=64000, disks={"c0": [DISK]}, starts=3, restarts=2,
                           spare_restarts=1, last_exit="killed by SIGKILL",
                           last_stall_ms=5.5, policy={"window": [1, 2]}),
           "e1": SlotState()},
)


def test_round_trip_keeps_every_field() -> None:
    assert VmState.from_json(STATE.to_json()) == STATE


def test_save_replaces_atomically_and_privately(tmp_path: Path) -> None:
    path = tmp_path / "vm-state.json"
    STATE.save(path)
    assert VmState.load(path) == STATE
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm-state.json"]  # no temp left


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(VmStateError, match="missing"):
        VmState.load(tmp_path / "vm-state.json")


def _with(change: dict[str, Any]) -> str:
    obj = json.loads(STATE.to_json())
    obj.update(change)
    return json.dumps(obj)


@pytest.mark.parametrize(("text", "says"), [
    ("", "not JSON"),
    ("[]", "not a JSON object"),
    (_with({"version": 2}), "version 2"),
    (_with({"qemu_pid": 0}), "qemu_pid = 0"),
    (_with({"qemu_pid": True}), "qemu_pid = True"),
    (_with({"started": "soon"}), "started"),
    (_with({"slots": {"e0": []}}), "slots.e0: not an object"),
    (_with({"slots": {"e0": {**json.loads(STATE.to_json())["slots"]["e0"],
                             "disks": {"c0": [{"id": "x"}]}}}}), "no field 'controller'"),
])
def test_bad_fields_are_named(text: str, says: str) -> None:
    with pytest.raises(VmStateError, match=says):
        VmState.from_json(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(json.loads(STATE.to_json()))), json_values))
def test_garbage_is_a_vmstate_error(change: dict[str, Any]) -> None:
    with contextlib.suppress(VmStateError):
        VmState.from_json(_with(change))
