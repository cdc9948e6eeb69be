"""What a real emulator interpreter has loaded before its lockdown.

The import rule of tests/unit/test_import_boundary.py, checked on a fresh
interpreter: importing the emulator's entry point loads no launcher module
but the wire-format leaves, and the closure stays small (docs/security.md
gives the numbers).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.unit.test_import_boundary import LEAF_PACKAGES, LEAVES

PROBE = "import emulators.process, json, sys; print(json.dumps(sorted(sys.modules)))"
#: Modules loaded by `import emulators.process` (python 3.11, with the
#: interpreter's own start-up modules); docs/security.md has the count. A
#: change that pulls in a large part of the standard library fails here.
CLOSURE_BOUND = 180


def loaded() -> list[str]:
    out = subprocess.run([sys.executable, "-I", "-c", PROBE], capture_output=True,
                         text=True, check=True, timeout=60)
    modules: list[str] = json.loads(out.stdout)
    return modules


def test_the_emulator_loads_only_the_launcher_leaves() -> None:
    modules = loaded()
    launcher = {m for m in modules if m == "launcher" or m.startswith("launcher.")}
    assert launcher <= LEAVES | LEAF_PACKAGES, sorted(launcher - LEAVES - LEAF_PACKAGES)
    assert "launcher.statestore.layout" in launcher  # the probe saw the real thing


def test_the_closure_before_lockdown_stays_small() -> None:
    modules = loaded()
    assert len(modules) <= CLOSURE_BOUND, len(modules)
    # No child processes, temporary files or archives in an emulator.
    for heavy in ("subprocess", "tempfile", "shutil", "ctypes.util", "asyncio"):
        assert heavy not in modules, heavy
