"""Fuzz harness for the VM spec parser (launcher.spec.load_spec).

The input is the spec file. It is written as good/fuzz.toml in a scratch
folder whose images/ is tests/specs/images, so the relative paths of the
test specs resolve as they do in tests/specs. Only `SpecError` may come
out; a spec that parses must have at least a name.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from launcher.spec import SpecError, load_spec

from .harness import Harness, OneInput

SPECS = Path(__file__).resolve().parents[1] / "specs"
_BAD_SEEDS = ("many_problems", "uid_range_syntax", "dup_lun", "memory_bad_size", "vm_array",
              "unknown_table", "lun_float", "syntax")


def _seeds() -> list[bytes]:
    files = sorted((SPECS / "good").glob("*.toml"))
    files += [SPECS / "bad" / f"{name}.toml" for name in _BAD_SEEDS]
    return [f.read_bytes() for f in files if f.exists()]


def _scratch() -> Path:
    """A scratch folder named after this process; those of dead processes go
    (atheris ends the process without running atexit)."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob("mplaunch-fuzz-spec-*"):
        pid = old.name.rsplit("-", 1)[1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    scratch = tmp / f"mplaunch-fuzz-spec-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return scratch


def _make() -> OneInput:
    scratch = _scratch()
    (scratch / "images").symlink_to(SPECS / "images")
    (scratch / "good").mkdir()
    target = scratch / "good" / "fuzz.toml"

    def one_input(data: bytes) -> None:
        target.write_bytes(data)
        try:
            spec = load_spec(target)
        except SpecError as e:
            assert e.args or str(e), "a SpecError without a problem"
            return
        assert spec.vm.name

    return one_input


SPEC = Harness(
    "spec",
    "the VM spec parser and validator (launcher.spec)",
    _make,
    _seeds,
    max_len=8192,
)
