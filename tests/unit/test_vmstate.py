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

from launcher.restart_policy import ExitReason, RestartPolicy
from launcher.spec import DiskSpec, GiveUpAction, RestartMode
from launcher.vmstate import SlotState, VmState, VmStateError

DISK = DiskSpec("d0", "c0", 3, Path("/images/a.img"), "raw", True, 4096)


def _policy_after_a_crash() -> dict[str, Any]:
    policy = RestartPolicy("e0", RestartMode.ON_FAILURE, 3, 60, GiveUpAction.PAUSE)
    policy.start(1_000)
    policy.on_started(2_000)
    policy.on_exit(3_000, -9, ExitReason.CRASHED)
    return policy.snapshot()


STATE = VmState(
    spec_path="/etc/mplaunch/demo.toml", spec_text="[vm]\nname = \"demo\"\n", accel="tcg",
    started=1_790_000_000.25, backends_only=False, qemu_pid=4242, qemu_uid=64002,
    slots={"e0": SlotState(pid=4300, uid=64000, disks={"c0": [DISK]}, starts=3, restarts=2,
                           spare_restarts=1, last_exit="killed by SIGKILL",
                           last_stall_ms=5.5, policy=_policy_after_a_crash()),
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


def _slot(change: dict[str, Any]) -> str:
    """The state with slot e0's fields changed."""
    return _with({"slots": {"e0": {**json.loads(STATE.to_json())["slots"]["e0"], **change}}})


@pytest.mark.parametrize(("text", "says"), [
    ("", "not JSON"),
    ("[]", "not a JSON object"),
    (_with({"version": 2}), "version 2"),
    (_with({"qemu_pid": 0}), "qemu_pid = 0"),
    (_with({"qemu_pid": True}), "qemu_pid = True"),
    (_with({"started": "soon"}), "started"),
    (_with({"started": float("nan")}), "started = nan"),
    (_with({"started": 10**400}), "started = 1000"),
    (_with({"slots": {"e0": []}}), "slots.e0: not an object"),
    (_slot({"disks": {"c0": [{"id": "x"}]}}), "no field 'controller'"),
    (_slot({"disks": {"c1": json.loads(STATE.to_json())["slots"]["e0"]["disks"]["c0"]}}),
     r"disks.c1\[0\].controller = 'c0'"),
    (_slot({"last_stall_ms": float("inf")}), "last_stall_ms = inf"),
    (_slot({"policy": {"state": "running"}}), "slots.e0.policy: restart policy: no field"),
    (_slot({"policy": {**_policy_after_a_crash(), "restarts": [5, 1]}}), "not times in order"),
    (_slot({"policy": {**_policy_after_a_crash(), "state": "backoff",
                       "restart_at_ns": None}}), "in backoff with no restart_at_ns"),
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


def test_the_policy_is_kept_as_its_snapshot() -> None:
    again = VmState.from_json(STATE.to_json())
    policy = RestartPolicy("e0", RestartMode.ON_FAILURE, 3, 60, GiveUpAction.PAUSE)
    assert again.slots["e0"].policy is not None
    policy.restore(again.slots["e0"].policy)
    assert policy.snapshot() == _policy_after_a_crash()
    assert policy.restarts_in_window(4_000) == 1


def test_the_spec_is_the_one_as_started(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text('[vm]\nname = "first"\n')
    state = VmState(spec_path=str(path), spec_text=path.read_text(), accel="tcg", started=1.0)
    path.write_text('[vm]\nname = "edited"\n')
    spec = state.spec()
    assert spec.vm.name == "first"
    assert spec.path == path


def test_a_spec_text_that_is_not_toml_is_a_vmstate_error() -> None:
    state = VmState(spec_path="/x.toml", spec_text="[vm\n", accel="tcg", started=1.0)
    with pytest.raises(VmStateError, match="spec_text: not TOML"):
        state.spec()


def test_a_failed_save_leaves_the_old_state_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "vm-state.json"
    STATE.save(path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").write_text("")
    with pytest.raises(OSError):  # renaming a file over a non-empty folder fails
        VmState(spec_path="/b", spec_text="", accel="kvm", started=2.0).save(
            tmp_path / "elsewhere")
    assert VmState.load(path) == STATE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "vm-state.json"]


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm-state.json"
    path.write_bytes(b" " * (4 * 1024 * 1024 + 1))
    with pytest.raises(VmStateError, match="larger than"):
        VmState.load(path)
