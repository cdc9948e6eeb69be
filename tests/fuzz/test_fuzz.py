"""Every fuzz harness, briefly: its corpus replayed in-process, then a short
coverage-guided run under atheris in a child process (atheris calls exit).

MPLAUNCH_FUZZ_SECONDS sets the run's length (default 10 s per harness, about
two minutes for all of them); `python -m tests.fuzz NAME --minutes N` runs
one longer.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from . import registry
from .harness import bounded

ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("MPLAUNCH_FUZZ_SECONDS", "10"))
NAMES = list(registry.HARNESSES)


@pytest.mark.parametrize("name", NAMES)
def test_corpus_passes(name: str) -> None:
    """Seeds and every input that once failed (kept as regressions) pass."""
    harness = registry.load(name)
    files = sorted(registry.corpus_dir(name).iterdir())
    assert any(f.name.startswith("seed-") for f in files), f"{name} has no seeds"
    loggers = [logging.getLogger(n) for n in ("emulators", "launcher", "mplaunch")]
    handlers = [list(logger.handlers) for logger in loggers]
    try:
        one_input = bounded(harness.make(), harness.bound)
        for file in files:
            one_input(file.read_bytes())
    finally:  # a harness's ErrorLog must not outlive it
        for logger, kept in zip(loggers, handlers, strict=True):
            logger.handlers[:] = kept


@pytest.mark.parametrize("name", NAMES)
def test_seeds_are_committed(name: str) -> None:
    """The committed seeds are the ones the harness builds (`--write-seeds`)."""
    committed = {f.read_bytes() for f in registry.corpus_dir(name).glob("seed-*")}
    assert committed == set(registry.load(name).seeds()), (
        f"tests/fuzz/corpus/{name} is out of date: python -m tests.fuzz --write-seeds {name}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_short_fuzz_run(name: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tests.fuzz", name, "--seconds", str(SECONDS),
           "--workdir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         timeout=SECONDS + 120)
    found = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert run.returncode == 0 and not found, (
        f"{name}: exit {run.returncode}, inputs saved: {found}\n{run.stderr[-6000:]}"
    )
    assert "Done" in run.stderr, run.stderr[-2000:]
