"""Plots of the benchmark results, drawn with matplotlib.

`python -m bench.plot` reads the JSON results in bench/out/ and writes a PNG
per chart into docs/img/. A chart whose result file is missing or not complete
JSON (a benchmark may be rewriting it) is skipped, naming the file; one whose
file has an unexpected shape fails, and the exit status is then 1.

matplotlib is the `bench` extra, not a runtime dependency: only this module
imports it. Figures are plain `Figure`s on an Agg canvas, not pyplot's: no
display, no global list of figures; each builder returns its figure so that a
test can read back what each axes was given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
KINDS = ("emulator", "in-process")
RATIO = "emulator / in-process"
COLORS = {"emulator": "tab:blue", "in-process": "tab:orange", RATIO: "tab:green"}
TARGET = "tab:red"
LARGE_BLOCK = 65536  # fio cases with blocks this size or larger are compared in MB/s


class ResultMissing(Exception):
    """A result file is absent or not (yet) valid JSON; its chart is skipped."""


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultMissing(f"{path}: missing (run its benchmark first)") from None
    except json.JSONDecodeError as e:
        raise ResultMissing(f"{path}: not complete JSON ({e}); is a benchmark writing it?") from e
    if not isinstance(data, dict):
        raise ResultMissing(f"{path}: not a JSON object")
    return data


def figure(height: float = 5.4) -> Figure:
    """A 960 px wide figure on the Agg canvas, laid out to fit its labels."""
    fig = Figure(figsize=(9.6, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def target(ax: Axes, value: float, label: str) -> None:
    ax.axhline(value, color=TARGET, linestyle="--", linewidth=1.5, label=label)
    ax.set_ylim(top=max(ax.get_ylim()[1], value * 1.2))  # the line never on the frame


def grouped_bars(ax: Axes, groups: Sequence[str], series: Mapping[str, Sequence[float]],
                 fmt: str, samples: Mapping[str, Sequence[Sequence[float]]] | None = None,
                 ) -> list[float]:
    """Each series' bars side by side per group, values printed on them; returns
    the top of each group. `samples[name][g]`, the measurements behind a bar,
    are drawn as dots over it so that their spread shows."""
    width = 0.8 / len(series)
    tops = [0.0] * len(groups)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width * 0.92, label=name, color=COLORS.get(name, f"C{i}"))
        # Over the bar, or inside it when sample dots take the space above.
        ax.bar_label(bars, fmt=fmt, padding=2, fontsize="small",
                     label_type="center" if samples else "edge")
        tops = [max(t, v) for t, v in zip(tops, values, strict=True)]
        for g, points in enumerate(samples[name] if samples else []):
            ax.plot([xs[g]] * len(points), points, "o", color="black", mfc="white", ms=4)
            tops[g] = max([tops[g], *points])
    # Long names (fio's cases) break before their queue depth, so that
    # neighbouring labels do not run into each other.
    ax.set_xticks(range(len(groups)), [g.replace(" QD", "\nQD") for g in groups])
    return tops


def request_rate(results: Path) -> Figure:
    cases = load(results / "emulator_rate.json")["cases"]
    fig = figure()
    ax = fig.add_subplot()
    grouped_bars(ax, [f"{c['size'] // 1024} KiB, depth {c['depth']}" for c in cases],
                 {"emulator / host preadv": [c["ratio"] for c in cases]}, "%.2f")
    target(ax, 0.5, "target 0.5 (64 KiB, depth 32)")
    ax.set(title="Emulator request rate / host preadv rate", ylabel="ratio",
           xlabel="request size, queue depth")
    ax.legend(loc="upper left")
    return fig


def throughput(results: Path) -> Figure:
    data = load(results / "guest_throughput.json")
    ops = ("read", "write")
    per: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
    for s in (s for boot in data["boots"] for s in boot["samples"]):
        if s.get("rc") == 0 and s.get("seconds"):  # a failed dd has no rate
            per[(s["kind"], s["op"])].append(s["bytes"] / s["seconds"] / 1e6)
    summary = data["summary"]
    fig = figure()
    ax = fig.add_subplot()
    grouped_bars(ax, [f"{op} (ratio {summary[op]['ratio']:.2f})" for op in ops],
                 {k: [summary[op][f"{k.replace('-', '_')}_mb_s"] for op in ops] for k in KINDS},
                 "%.1f", samples={k: [per[(k, op)] for op in ops] for k in KINDS})
    block_kib = data.get("parameters", {}).get("block", 65536) // 1024
    ax.set(title=f"Guest throughput: {block_kib} KiB dd, queue depth 1", ylabel="MB/s",
           xlabel="bars: median of boots, dots: each boot")
    ax.legend()
    return fig


RECOVERY_CASES = (  # bench/recovery.py's file names; "spare" ones predate the hot standby
    ("recovery-kill-standby.json", "SIGKILL, hot standby"),
    ("recovery-kill-standby-deep.json", "SIGKILL, hot standby, several readers"),
    ("recovery-kill-spare.json", "SIGKILL, warm spare"),
    ("recovery-kill-nospare.json", "SIGKILL, no spare"),
    ("recovery-hang-standby.json", "SIGSTOP (hang), hot standby"),
    ("recovery-hang-spare.json", "SIGSTOP (hang), warm spare"),
)


def recovery_cdf(results: Path) -> Figure:
    """One step line per recovery result present; the others are named on stderr."""
    fig = figure()
    ax = fig.add_subplot()
    for name, label in RECOVERY_CASES:
        try:
            samples = load(results / name)["samples"]
        except ResultMissing as e:
            print(f"recovery-cdf.png: without {label}: {e}", file=sys.stderr)
            continue
        stalls = sorted(float(s["stall_ms"]) for s in samples if s.get("stall_ms"))
        if stalls:
            percent = [100 * (i + 1) / len(stalls) for i in range(len(stalls))]
            ax.step(stalls[:1] + stalls, [0.0, *percent], where="post", linewidth=2,
                    label=f"{label} (n={len(stalls)})")
    if not ax.get_lines():
        raise ResultMissing(f"no recovery samples in {results}/recovery-*.json")
    for ms, label, style in ((2, "median (standby)", "--"), (10, "p99", ":"),
                             (50, "median (no spare)", "-.")):
        ax.axvline(ms, color=TARGET, linestyle=style, label=f"target: {label} {ms} ms")
    ax.set(xscale="log", ylim=(0, 100), title="Guest I/O stall after an emulator kill or hang",
           xlabel="stall (ms, log scale)", ylabel="events (%)")
    ax.xaxis.set_major_formatter("{x:g}")  # 1, 10, 100 rather than powers of ten
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, fontsize="small")
    return fig


def fio_matrix(results: Path) -> Figure:
    """Per case, grouped bars in IOPS (MB/s for large blocks), each group's ratio
    written over it; a panel of the file's ratios against 0.9 underneath."""
    data = load(results / "fio_matrix.json")
    by = {(c["case"], c["kind"]): c for c in data["cases"]}
    names = [n for n in dict.fromkeys(c for c, _ in by) if all((n, k) in by for k in KINDS)]
    if not names:
        raise ResultMissing(f"{results / 'fio_matrix.json'}: no case measured on both kinds")
    unit = {n: "mb_s" if by[(n, KINDS[0])]["bs"] >= LARGE_BLOCK else "iops" for n in names}
    ratios = {r["case"]: r for r in data["ratios"]}
    panels = [(m, cs) for m in ("iops", "mb_s") if (cs := [n for n in names if unit[n] == m])]
    boots, loads = len(data["load_1m"]), data["load_1m"] or [0.0]
    fig = figure(7.2)
    fig.suptitle("fio in the guest: emulator vs QEMU's in-process virtio-scsi (medians of "
                 f"{boots} boots, load {min(loads):.1f}-{max(loads):.1f})")
    grid = fig.add_gridspec(2, len(panels), width_ratios=[len(c) for _, c in panels],
                            height_ratios=(2, 1))
    for col, (m, cases) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        tops = grouped_bars(
            ax, cases, {k: [by[(n, k)][m] for n in cases] for k in KINDS},
            "%.0f" if m == "iops" else "%.1f",
            samples={k: [[s[m] for s in by[(n, k)]["samples"]] for n in cases] for k in KINDS})
        for g, (n, top) in enumerate(zip(cases, tops, strict=True)):
            ax.annotate(f"ratio {ratios[n][m]:.2f}", (g, top), xytext=(0, 14),
                        textcoords="offset points", ha="center", fontweight="bold")
        ax.set(ylim=(0, max(tops) * 1.3), ylabel={"iops": "IOPS", "mb_s": "MB/s"}[m])
        ax.legend(loc="upper left", fontsize="small")
    order = [n for _, cases in panels for n in cases]
    ratio = [ratios[n][unit[n]] for n in order]
    rax = fig.add_subplot(grid[1, :])
    grouped_bars(rax, order, {RATIO: ratio}, "%.2f")
    target(rax, 0.9, "target 0.9")
    rax.set(ylim=(0, max(1.0, *ratio) * 1.4), ylabel="ratio")
    rax.legend(loc="upper left", fontsize="small", ncols=2)
    return fig


def footprint(results: Path) -> Figure:
    """Supervision PSS per VM, stacked by role: every role but "qemu", whatever
    the roles are called. One mode ("full" if present): the modes cost the same."""
    rows = load(results / "footprint.json")["summary"]
    mode = "full" if any(r["mode"] == "full" for r in rows) else rows[0]["mode"]
    rows = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["emulators"])
    roles = dict.fromkeys(role for r in rows for role in r["roles"] if role != "qemu")
    if not roles:
        raise ValueError("no supervision role in its summary")
    fig = figure()
    ax = fig.add_subplot()
    groups = [f"{r['emulators']} emulator{'s' if r['emulators'] > 1 else ''}" for r in rows]
    bottom = [0.0] * len(rows)
    for role in roles:
        mib = [r["roles"].get(role, {}).get("pss_kib", 0.0) / 1024 for r in rows]
        bars = ax.bar(groups, mib, 0.6, bottom=bottom, label=role, edgecolor="white")
        ax.bar_label(bars, fmt="%.1f", label_type="center", fontsize="small")
        bottom = [b + m for b, m in zip(bottom, mib, strict=True)]
    ax.bar_label(bars, labels=[f"{t:.1f} MiB" for t in bottom], padding=3, fontweight="bold")
    target(ax, 25, "target 25 MiB per VM")
    runs = max(r.get("runs", 1) for r in rows)
    ax.set(ylim=(0, max(bottom) * 1.15), ylabel="PSS (MiB)",
           title=f"Supervision memory per VM: PSS by role (mode {mode}, median of {runs} runs)")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="upper left")  # top role first, as stacked
    return fig


MIGRATION_RUNS = (("migration.json", "unix"), ("migration-tcp.json", "tcp"))


def migration(results: Path) -> Figure:
    """Per migration of each bench/migration.py result present: the guest's
    pause stacked as QEMU's downtime and the hand-over, the guest-visible I/O
    stall beside it; the runs' load averages in the title."""
    runs = []
    for name, label in MIGRATION_RUNS:
        try:
            runs.append((label, load(results / name)))
        except ResultMissing as e:
            print(f"migration.png: without {label}: {e}", file=sys.stderr)
    rows = [(f"{label} {s['hop']}", s) for label, data in runs for s in data["samples"]
            if s.get("paused_ms") is not None and s.get("stall_ms") is not None]
    if not rows:
        raise ResultMissing(f"no migration samples in {results}/migration*.json")
    fig = figure()
    ax = fig.add_subplot()
    xs = list(range(len(rows)))
    qemu = [float(s.get("downtime_ms") or 0.0) for _, s in rows]
    handover = [float(s["paused_ms"]) - q for q, (_, s) in zip(qemu, rows, strict=True)]
    left = [x - 0.2 for x in xs]
    ax.bar(left, qemu, 0.38, label="QEMU's downtime", color="tab:blue")
    paused = ax.bar(left, handover, 0.38, bottom=qemu, label="hand-over (state, restart, cont)",
                    color="tab:cyan")
    ax.bar_label(paused, labels=[f"{s['paused_ms']:.0f}" for _, s in rows], fontsize="small")
    stall = ax.bar([x + 0.2 for x in xs], [float(s["stall_ms"]) for _, s in rows], 0.38,
                   label="guest I/O stall", color="tab:orange")
    ax.bar_label(stall, fmt="%.0f", fontsize="small")
    loads = [x for _, data in runs for x in (data["host"]["load_start"][0],
                                             data["host"]["load_end"][0])]
    ax.set_xticks(xs, [label for label, _ in rows])
    ax.set(ylabel="ms", xlabel="run, migration",
           title=f"Live migration, {runs[0][1].get('memory', '?')} guest writing and "
                 f"verifying: pause and I/O stall (load {min(loads):.1f}-{max(loads):.1f})")
    ax.legend(loc="upper left", fontsize="small")
    return fig


CHARTS: tuple[tuple[str, Callable[[Path], Figure]], ...] = (
    ("request-rate.png", request_rate),
    ("throughput.png", throughput),
    ("recovery-cdf.png", recovery_cdf),
    ("fio-matrix.png", fio_matrix),
    ("footprint.png", footprint),
    ("migration.png", migration),
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=REPO / "bench" / "out",
                   help="folder of benchmark JSON results (default: bench/out)")
    p.add_argument("--images", type=Path, default=REPO / "docs" / "img",
                   help="folder to write PNGs to (default: docs/img)")
    args = p.parse_args(argv)
    written = failed = 0
    for name, build in CHARTS:
        try:
            fig = build(args.results)
        except ResultMissing as e:
            print(f"{name}: skipped: {e}", file=sys.stderr)
            continue
        except (LookupError, TypeError, ValueError) as e:
            print(f"{name}: failed: unexpected result format: {e!r}", file=sys.stderr)
            failed += 1
            continue
        args.images.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.images / name)
        print(f"wrote {args.images / name}")
        written += 1
    return 0 if written and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
