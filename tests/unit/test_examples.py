"""The bundled example specs stay valid as the spec grows (their guests and
disk images are made by scripts/setup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.spec import EmulatorKind, load_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_each_example_is_a_valid_spec(path: Path) -> None:
    spec = load_spec(path)
    assert spec.emulators and spec.disks


def test_the_lsi_example_serves_two_lsi_controllers_and_polls() -> None:
    spec = load_spec(EXAMPLES[0].parent / "lsi.toml")
    assert [e.kind for e in spec.emulators] == [EmulatorKind.LSI, EmulatorKind.LSI]
    assert "irqpoll" in spec.vm.append.split()
