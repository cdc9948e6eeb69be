"""Run one fuzz harness under atheris, replay inputs, or rewrite the seed corpora.

    python -m tests.fuzz --list
    python -m tests.fuzz NAME --minutes N        # or --seconds N, --runs N
    python -m tests.fuzz NAME --replay FILE...   # each input once, without atheris
    python -m tests.fuzz --write-seeds [NAME]    # tests/fuzz/corpus/NAME/seed-*

A run reads the committed corpus (tests/fuzz/corpus/NAME/) and writes what it
finds to its work folder (default build/fuzz/NAME/): new inputs under
corpus/, a failing input as crash-*, slow-unit-* or timeout-*, which
`--replay` runs again with a full traceback. Arguments after `--` go to
libFuzzer. atheris ends the process itself: exit status 0 means the run
found nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import traceback
from pathlib import Path

from . import registry

ROOT = Path(__file__).resolve().parents[2]
HANG_SECONDS = 30
"""libFuzzer's -timeout: an input that has not returned by then is a hang.
The harness's own bound (seconds, much lower) fails slow inputs that return."""


def main(argv: list[str] | None = None) -> int:
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    if args.list:
        for name in registry.HARNESSES:
            print(f"{name:15} {registry.load(name).doc}")
        return 0
    if args.write_seeds:
        for name in [args.name] if args.name else list(registry.HARNESSES):
            print(f"{name}: {write_seeds(name)} seeds")
        return 0
    if args.name not in registry.HARNESSES:
        print(f"unknown harness {args.name!r}; --list names them", file=sys.stderr)
        return 2
    if args.replay:
        return replay(args.name, args.replay)
    return fuzz(args, extra)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?")
    p.add_argument("--list", action="store_true", help="name every harness")
    how_long = p.add_mutually_exclusive_group()
    how_long.add_argument("--minutes", type=float)
    how_long.add_argument("--seconds", type=float)
    how_long.add_argument("--runs", type=int, help="this many inputs, then stop")
    p.add_argument("--workdir", type=Path, help="default: build/fuzz/NAME")
    p.add_argument("--replay", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--write-seeds", action="store_true")
    args = p.parse_args(argv)
    if not (args.list or args.write_seeds or args.name):
        p.error("name a harness, or --list")
    return args, extra


def fuzz(args: argparse.Namespace, extra: list[str]) -> int:
    import atheris  # type: ignore[import-untyped]  # imported here: --replay needs none

    logging.disable(logging.WARNING)  # hostile input makes warnings by the thousand

    workdir: Path = args.workdir or ROOT / "build" / "fuzz" / args.name
    found = workdir / "corpus"
    found.mkdir(parents=True, exist_ok=True)
    # Instrument the code under test: it is imported for the first time here.
    with atheris.instrument_imports(include=["emulators", "launcher"]):
        harness = registry.load(args.name)
        one_input = harness.make()
    from .harness import bounded

    flags = [f"-max_len={harness.max_len}", f"-timeout={HANG_SECONDS}",
             f"-artifact_prefix={workdir}/", "-print_final_stats=1"]
    if args.minutes is not None:
        flags.append(f"-max_total_time={max(1, round(args.minutes * 60))}")
    elif args.seconds is not None:
        flags.append(f"-max_total_time={max(1, round(args.seconds))}")
    elif args.runs is not None:
        flags.append(f"-runs={args.runs}")
    corpora = [str(found), str(registry.corpus_dir(args.name))]
    atheris.Setup([sys.argv[0], *flags, *extra, *corpora], bounded(one_input, harness.bound))
    atheris.Fuzz()
    return 0  # not reached: atheris exits


def replay(name: str, files: list[Path]) -> int:
    """Run each file once through the harness; print what failed."""
    from .harness import bounded

    harness = registry.load(name)
    one_input = bounded(harness.make(), harness.bound)
    failed = 0
    for path in files:
        for file in sorted(path.iterdir()) if path.is_dir() else [path]:
            try:
                one_input(file.read_bytes())
            except Exception:
                failed += 1
                print(f"{file}: FAILED", file=sys.stderr)
                traceback.print_exc()
    print(f"{name}: {failed} of the inputs failed" if failed else f"{name}: all inputs pass")
    return 1 if failed else 0


def write_seeds(name: str) -> int:
    """Replace tests/fuzz/corpus/NAME/seed-* with the harness's seeds (other
    files, such as regression inputs, stay)."""
    folder = registry.corpus_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("seed-*"):
        old.unlink()
    seeds = registry.load(name).seeds()
    for data in seeds:
        (folder / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
    return len(seeds)


if __name__ == "__main__":
    sys.exit(main())
