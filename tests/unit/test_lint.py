"""The tree stays ruff- and mypy-clean: CI runs these with the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("tool,args", [("ruff", ["check", "."]), ("mypy", [])])
def test_clean(tool: str, args: list[str]) -> None:
    exe = BIN / tool if (BIN / tool).exists() else shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]' installs it)")
    done = subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
