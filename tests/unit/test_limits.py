"""One rule, one place: every checker of an id, a LUN, a block size or an
emulator's shape agrees with emulators.limits (and the heartbeat protocol's
bounds), and no two modules define a same-named constant with different values."""

from __future__ import annotations

import ast
import asyncio
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from emulators.config import ConfigError, EmulatorConfig, checked_lun
from emulators.limits import (
    BLOCK_SIZES,
    MAX_LUN,
    image_size_problem,
    is_id,
    resize_problem,
)
from launcher.heartbeat.protocol import MAX_CONTROLLERS, MAX_REQUEST_QUEUES
from launcher.management.commands import CommandError, Dispatcher
from launcher.spec import SpecError, parse_spec

REPO = Path(__file__).resolve().parents[2]

IDS = ["d0", "a", "0abc", "a_b-c", "x" * 32, "x" * 33, "-x", "_x", "A", "d\u00e9", "", "a b"]
LUNS = [-1, 0, 1, MAX_LUN, MAX_LUN + 1, 0x3FFF]
SIZES = [0, 256, 512, 1024, 2048, 4096, 8192]


def _spec(tmp_path: Path, *, disk: dict[str, Any] | None = None, controllers: int = 1,
          queues: int = 1) -> dict[str, Any]:
    image = tmp_path / "d.img"
    if not image.exists():
        image.write_bytes(bytes(8192))
    return {
        "vm": {"name": "vm", "run_dir": str(tmp_path / "run")},
        "emulator": [{"id": "e0"}],
        "controller": [{"id": f"c{i}", "emulator": "e0", "queues": queues}
                       for i in range(controllers)],
        "disk": [{"id": "d0", "controller": "c0", "lun": 0, "image": str(image)} | (disk or {})],
    }


def _spec_ok(tmp_path: Path, **kwargs: Any) -> bool:
    try:
        parse_spec(_spec(tmp_path, **kwargs), tmp_path / "vm.toml")
    except SpecError:
        return False
    return True


class _AcceptAll:
    """A VM that has every disk and controller: only the argument checks refuse."""

    async def disk_add(self, *args: object) -> None:
        pass

    async def disk_remove(self, *args: object) -> None:
        pass


def _command_ok(name: str, args: dict[str, Any]) -> bool:
    try:
        asyncio.run(Dispatcher(_AcceptAll()).dispatch(name, args))  # type: ignore[arg-type]
    except CommandError:
        return False
    return True


def _config_ok(**lun: Any) -> bool:
    fields: dict[str, Any] = {"lun": 0, "disk_id": "d0", "fd": 3, "readonly": False,
                              "block_size": 512} | lun
    try:
        checked_lun(**fields)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("ident", IDS)
def test_every_checker_agrees_on_ids(tmp_path: Path, ident: str) -> None:
    expected = is_id(ident)
    assert _spec_ok(tmp_path, disk={"id": ident}) is expected
    assert _command_ok("disk-remove", {"id": ident}) is expected
    assert _config_ok(disk_id=ident) is expected


@pytest.mark.parametrize("lun", LUNS)
def test_every_checker_agrees_on_luns(tmp_path: Path, lun: int) -> None:
    expected = 0 <= lun <= MAX_LUN
    assert _spec_ok(tmp_path, disk={"lun": lun}) is expected
    assert _command_ok("disk-add", {"id": "d1", "controller": "c0", "lun": lun,
                                    "image": "/d.img"}) is expected
    assert _config_ok(lun=lun) is expected


@pytest.mark.parametrize("size", SIZES)
def test_every_checker_agrees_on_block_sizes(tmp_path: Path, size: int) -> None:
    expected = size in BLOCK_SIZES
    assert _spec_ok(tmp_path, disk={"block_size": size}) is expected
    assert _command_ok("disk-add", {"id": "d1", "controller": "c0", "lun": 1,
                                    "image": "/d.img", "block_size": size}) is expected
    assert _config_ok(block_size=size) is expected


@pytest.mark.parametrize("count", [1, MAX_CONTROLLERS, MAX_CONTROLLERS + 1])
def test_spec_and_emulator_agree_on_controllers_per_emulator(tmp_path: Path, count: int) -> None:
    expected = count <= MAX_CONTROLLERS
    assert _spec_ok(tmp_path, controllers=count) is expected
    config = {"id": "e0", "control_fd": -1, "state_fd": -1, "first_start": True,
              "controllers": [{"id": f"c{i}", "socket_fd": 10 + i, "queues": 1, "luns": []}
                              for i in range(count)]}
    try:
        EmulatorConfig.from_json(json.dumps(config))
    except ConfigError:
        assert not expected
    else:
        assert expected


@pytest.mark.parametrize("queues", [1, MAX_REQUEST_QUEUES, MAX_REQUEST_QUEUES + 1])
def test_spec_and_emulator_agree_on_queues(tmp_path: Path, queues: int) -> None:
    expected = queues <= MAX_REQUEST_QUEUES
    assert _spec_ok(tmp_path, queues=queues) is expected
    config = {"id": "e0", "control_fd": -1, "state_fd": -1, "first_start": True,
              "controllers": [{"id": "c0", "socket_fd": 10, "queues": queues, "luns": []}]}
    try:
        EmulatorConfig.from_json(json.dumps(config))
    except ConfigError:
        assert not expected
    else:
        assert expected


def test_image_and_resize_rules() -> None:
    assert image_size_problem(0, 512) is not None
    assert image_size_problem(513, 512) is not None
    assert image_size_problem(4096, 4096) is None
    assert resize_problem(4096, 8192, 4096) is None
    assert resize_problem(4096, 4096, 512) is None
    assert "shrinking" in (resize_problem(8192, 4096, 512) or "")
    assert "multiple" in (resize_problem(4096, 4097, 512) or "")
    assert "multiple" in (resize_problem(0, 0, 512) or "")


# -- no two same-named constants disagree -------------------------------------------

# Each wire format names its own magic and version: the same name, by design,
# in the module that defines the format.
PER_FORMAT = {"MAGIC", "VERSION"}


def _constant(node: ast.expr) -> object:
    """The value of a constant expression (numbers, strings, operators), else None."""
    for sub in ast.walk(node):
        if not isinstance(sub, ast.Constant | ast.BinOp | ast.UnaryOp | ast.Tuple
                          | ast.operator | ast.unaryop | ast.Load):
            return None
    return eval(compile(ast.Expression(node), "<constant>", "eval"), {"__builtins__": {}})


def test_no_two_modules_give_one_constant_name_two_values() -> None:
    values: dict[str, dict[str, object]] = defaultdict(dict)
    for path in sorted([*REPO.glob("launcher/**/*.py"), *REPO.glob("emulators/**/*.py")]):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            else:
                continue
            if not isinstance(target, ast.Name) or target.id.startswith("_"):
                continue
            if not target.id.isupper() or target.id in PER_FORMAT:
                continue
            constant = _constant(value)
            if constant is not None:
                values[target.id][str(path.relative_to(REPO))] = constant
    clashes = {name: where for name, where in values.items()
               if len({repr(v) for v in where.values()}) > 1}
    assert not clashes, clashes
