"""Every fault point named in the code is registered, and every registered
point is placed somewhere: a typo at a call site, or a point that lost its
place in a refactoring, fails here rather than in a sweep that never fires."""

from __future__ import annotations

import re
from pathlib import Path

from emulators import faults

REPO = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("emulators", "launcher") for p in (REPO / d).rglob("*.py")
           if p.name != "faults.py"]
CALL = re.compile(r"faults\.(point|strike)\(\s*\"([^\"]+)\"")
#: Names handed to point() through a table (one entry per control command).
QUOTED = re.compile(r"\"((?:queue|lun|events|ring|device|memtable|vhost|control|handover|cold|disk)"
                    r"\.[a-z_.]+)\"")


def _texts() -> dict[Path, str]:
    return {p: p.read_text() for p in SOURCES}


def test_every_call_site_names_a_registered_point_of_its_side() -> None:
    for path, text in _texts().items():
        for kind, name in CALL.findall(text):
            assert name in faults.POINTS, f"{path.relative_to(REPO)}: unknown point {name!r}"
            side = faults.EMULATOR_POINTS if kind == "point" else faults.LAUNCHER_POINTS
            assert name in side, f"{path.relative_to(REPO)}: {kind}() of {name!r}"


def test_every_registered_point_is_placed() -> None:
    placed: set[str] = set()
    for text in _texts().values():
        placed |= {name for _, name in CALL.findall(text)}
        if "faults.point(" in text:
            placed |= {n for n in QUOTED.findall(text) if n in faults.EMULATOR_POINTS}
    missing = [name for name in faults.POINTS if name not in placed]
    assert not missing, f"registered but placed nowhere: {missing}"
