"""bench/plot.py renders every chart with matplotlib from fixture results.

Each builder's figure is read back (the heights of its bars, the points of
its lines, its texts) and the command-line entry point is run for real,
writing PNGs into a temporary folder.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) is not installed")

import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from bench import plot  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _kind_case(case: str, bs: int, depth: int, kind: str, iops: float) -> dict[str, Any]:
    mb_s = iops * bs / 1e6
    samples = [{"iops": iops * f, "mb_s": mb_s * f, "lat_p50_us": 50.0, "lat_p99_us": 90.0,
                "load_1m": 1.5} for f in (0.9, 1.0, 1.1)]
    return {"case": case, "rw": "randread", "bs": bs, "iodepth": depth, "kind": kind,
            "iops": iops, "mb_s": mb_s, "lat_p50_us": 50.0, "lat_p99_us": 90.0,
            "samples": samples}


FIO = {
    "host": {"cpus": 2},
    "load_1m": [1.2, 2.5, 1.8],
    "cases": [
        _kind_case("4k randread QD1", 4096, 1, "emulator", 900.0),
        _kind_case("4k randread QD1", 4096, 1, "in-process", 1000.0),
        _kind_case("4k randread QD32", 4096, 32, "emulator", 5000.0),
        _kind_case("4k randread QD32", 4096, 32, "in-process", 8000.0),
        _kind_case("1M read QD4", 1 << 20, 4, "emulator", 200.0),
        _kind_case("1M read QD4", 1 << 20, 4, "in-process", 210.0),
        _kind_case("only one kind", 4096, 1, "emulator", 1.0),
    ],
    "ratios": [
        {"case": "4k randread QD1", "iops": 0.9, "mb_s": 0.9, "lat_p50": 0.88},
        {"case": "4k randread QD32", "iops": 0.625, "mb_s": 0.625, "lat_p50": 0.6},
        {"case": "1M read QD4", "iops": 0.952, "mb_s": 0.952, "lat_p50": 0.97},
    ],
}


def _roles(**pss_mib: float) -> dict[str, dict[str, float]]:
    return {r: {"pss_kib": m * 1024, "uss_kib": m * 900, "rss_kib": m * 1500}
            for r, m in pss_mib.items()}


FOOTPRINT = {"summary": [
    {"mode": "backends", "emulators": 1, "runs": 3,
     "roles": _roles(launcher=99.0, holder=1.0, emulator=1.0, qemu=200.0)},
    {"mode": "full", "emulators": 2, "runs": 3,
     "roles": _roles(launcher=8.0, holder=3.0, emulator=6.0, template=2.0, spare=1.0,
                     qemu=200.0)},
    {"mode": "full", "emulators": 1, "runs": 3,
     "roles": _roles(launcher=8.0, holder=3.0, emulator=3.0, spare=1.0, qemu=200.0)},
]}

RATE = {"cases": [
    {"size": 4096, "depth": 32, "ratio": 0.2, "emulator_cpu_us_per_request": 2.5},
    {"size": 65536, "depth": 32, "ratio": 0.55, "emulator_cpu_us_per_request": 9.0},
]}


def _throughput() -> dict[str, Any]:
    def sample(kind: str, op: str, seconds: float) -> dict[str, Any]:
        return {"kind": kind, "op": op, "rc": 0, "bytes": 100_000_000, "seconds": seconds}

    boots = [{"samples": [sample("emulator", "read", 1.0), sample("in-process", "read", 0.5),
                          sample("emulator", "write", 2.0), sample("in-process", "write", 2.0),
                          {"kind": "emulator", "op": "read", "rc": 1, "bytes": 0}]}]
    summary = {op: {"emulator_mb_s": e, "in_process_mb_s": i, "ratio": e / i}
               for op, e, i in (("read", 100.0, 200.0), ("write", 50.0, 50.0))}
    return {"parameters": {"block": 65536}, "summary": summary, "boots": boots}


def _write(folder: Path, name: str, data: object) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(data))


def _bars(ax: Axes) -> list[list[float]]:
    """Heights of the bars of each bar series drawn on `ax`, in drawing order."""
    return [[round(p.get_height(), 6) for p in c] for c in ax.containers
            if isinstance(c, BarContainer)]


def _ys(line: Line2D) -> list[float]:
    return [round(float(v), 6) for v in np.asarray(line.get_ydata(), dtype=float)]


def _texts(ax: Axes) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_fio_matrix_compares_iops_and_mb_s_apart_with_ratios(tmp_path: Path) -> None:
    _write(tmp_path, "fio_matrix.json", FIO)
    fig = plot.fio_matrix(tmp_path)
    iops, mb_s, ratio = fig.axes
    # The case measured on one kind only is left out; 4k cases in IOPS, 1M in MB/s.
    assert [t.get_text() for t in iops.get_xticklabels()] == ["4k randread\nQD1",
                                                              "4k randread\nQD32"]
    assert _bars(iops) == [[900.0, 5000.0], [1000.0, 8000.0]]
    assert _bars(mb_s) == [[209.7152], [220.20096]]
    assert iops.get_ylabel() == "IOPS" and mb_s.get_ylabel() == "MB/s"
    assert {"ratio 0.90", "ratio 0.62"} <= set(_texts(iops)) and "ratio 0.95" in _texts(mb_s)
    # The ratio panel: the file's ratios, in the panels' order, and the 0.9 line.
    assert [t.get_text() for t in ratio.get_xticklabels()] == [
        "4k randread\nQD1", "4k randread\nQD32", "1M read\nQD4"]
    assert _bars(ratio) == [[0.9, 0.625, 0.952]]
    assert [_ys(line) for line in ratio.get_lines()] == [[0.9, 0.9]]
    # Every sample is a dot over its bar: three per bar.
    assert [_ys(line) for line in mb_s.get_lines()] == [
        [188.74368, 209.7152, 230.68672], [198.180864, 220.20096, 242.221056]]
    assert [len(_ys(line)) for line in iops.get_lines()] == [3, 3, 3, 3]
    assert "3 boots, load 1.2-2.5" in fig.get_suptitle()


def test_fio_matrix_of_small_blocks_only_has_one_bar_panel(tmp_path: Path) -> None:
    cases = [c for c in FIO["cases"] if c["bs"] == 4096]  # type: ignore[index]
    _write(tmp_path, "fio_matrix.json", {**FIO, "cases": cases, "load_1m": []})
    fig = plot.fio_matrix(tmp_path)
    bars, ratio = fig.axes
    assert bars.get_ylabel() == "IOPS" and _bars(ratio) == [[0.9, 0.625]]
    assert "0 boots" in fig.get_suptitle()


def test_footprint_stacks_every_role_but_qemu(tmp_path: Path) -> None:
    _write(tmp_path, "footprint.json", FOOTPRINT)
    (ax,) = plot.footprint(tmp_path).axes
    # Mode "full" only, by emulator count; a role one row lacks is 0 there.
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1 emulator", "2 emulators"]
    assert ax.get_legend_handles_labels()[1] == [
        "target 25 MiB per VM", "launcher", "holder", "emulator", "spare", "template"]
    assert _bars(ax) == [[8.0, 8.0], [3.0, 3.0], [3.0, 6.0], [1.0, 1.0], [0.0, 2.0]]
    assert {"15.0 MiB", "20.0 MiB"} <= set(_texts(ax))
    assert [_ys(line) for line in ax.get_lines()] == [[25, 25]]


def test_request_rate_throughput_and_recovery_charts(tmp_path: Path) -> None:
    _write(tmp_path, "emulator_rate.json", RATE)
    (rate,) = plot.request_rate(tmp_path).axes
    assert _bars(rate) == [[0.2, 0.55]]
    assert [t.get_text() for t in rate.get_xticklabels()] == ["4 KiB, depth 32",
                                                              "64 KiB, depth 32"]
    assert [_ys(line) for line in rate.get_lines()] == [[0.5, 0.5]]
    assert rate.get_ylim()[1] >= 0.6  # the target line clear of the frame

    _write(tmp_path, "guest_throughput.json", _throughput())
    (ax,) = plot.throughput(tmp_path).axes
    assert _bars(ax) == [[100.0, 50.0], [200.0, 50.0]]
    # One dot per successful dd (the failed one is not drawn).
    assert [_ys(line) for line in ax.get_lines()] == [[100.0], [50.0], [200.0], [50.0]]
    assert ax.get_xticklabels()[0].get_text() == "read (ratio 0.50)"

    stalls = [{"stall_ms": v} for v in (8.0, 2.0, 4.0, 6.0)] + [{"stall_ms": None}]
    _write(tmp_path, "recovery-kill-spare.json", {"samples": stalls})
    (ax,) = plot.recovery_cdf(tmp_path).axes
    step, *targets = ax.get_lines()
    assert np.asarray(step.get_xdata()).tolist() == [2.0, 2.0, 4.0, 6.0, 8.0]
    assert _ys(step) == [0, 25.0, 50.0, 75.0, 100.0]
    assert step.get_label() == "SIGKILL, warm spare (n=4)"
    assert [np.asarray(t.get_xdata()).tolist()[0] for t in targets] == [2, 10, 50]
    assert ax.get_xscale() == "log"


def _migration(hops: list[tuple[float | None, float, float]], load: float) -> dict[str, Any]:
    samples = [{"hop": i + 1, "downtime_ms": q, "paused_ms": p, "stall_ms": st}
               for i, (q, p, st) in enumerate(hops)]
    return {"memory": "256M", "samples": samples,
            "host": {"load_start": [load, 0, 0], "load_end": [load + 0.5, 0, 0]}}


def test_migration_stacks_qemus_downtime_and_the_hand_over_beside_the_stall(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, "migration.json", _migration([(50.0, 90.0, 240.0), (None, 60.0, 200.0)],
                                                  1.0))
    (ax,) = plot.migration(tmp_path).axes
    # QEMU's part (0 where it was not reported), the hand-over on it, the stall.
    assert _bars(ax) == [[50.0, 0.0], [40.0, 60.0], [240.0, 200.0]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["unix 1", "unix 2"]
    assert {"90", "60", "240", "200"} <= set(_texts(ax))
    assert "load 1.0-1.5" in ax.get_title()
    assert "without tcp" in capsys.readouterr().err

    _write(tmp_path, "migration-tcp.json", _migration([(10.0, 30.0, 100.0)], 2.0))
    (ax,) = plot.migration(tmp_path).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["unix 1", "unix 2", "tcp 1"]
    assert "load 1.0-2.5" in ax.get_title()

    _write(tmp_path / "none", "migration.json", {"samples": [], "host": {}})
    with pytest.raises(plot.ResultMissing):
        plot.migration(tmp_path / "none")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_cli_writes_what_it_has_data_for_and_names_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, images = tmp_path / "out", tmp_path / "img"
    _write(results, "emulator_rate.json", RATE)
    _write(results, "footprint.json", FOOTPRINT)
    _write(results, "fio_matrix.json", FIO)
    (results / "recovery-kill-spare.json").write_text('{"samples": [')  # being written
    assert plot.main(["--results", str(results), "--images", str(images)]) == 0
    written = sorted(p.name for p in images.iterdir())
    assert written == ["fio-matrix.png", "footprint.png", "request-rate.png"]
    for name in written:
        width, height = _png_size(images / name)
        assert width == 960 and 500 <= height <= 800
        assert (images / name).stat().st_size > 20_000  # drawn, not a blank canvas
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"wrote {images / n}" for n in
                                ("request-rate.png", "fio-matrix.png", "footprint.png")]
    assert f"throughput.png: skipped: {results / 'guest_throughput.json'}: missing" in err
    assert "recovery-kill-spare.json: not complete JSON" in err
    assert "recovery-cdf.png: skipped" in err


def test_cli_reports_a_result_of_unexpected_shape_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path, "fio_matrix.json", {"cases": [{"kind": "emulator"}]})
    assert plot.main(["--results", str(tmp_path), "--images", str(tmp_path / "img")]) == 1
    err = capsys.readouterr().err
    assert "fio-matrix.png: failed: unexpected result format: KeyError('case')" in err
    assert not (tmp_path / "img").exists()


def test_cli_with_no_results_writes_nothing(tmp_path: Path) -> None:
    assert plot.main(["--results", str(tmp_path), "--images", str(tmp_path / "img")]) == 1
    assert not (tmp_path / "img").exists()


def test_only_the_plot_module_imports_matplotlib() -> None:
    """matplotlib is the bench extra, not something the launcher may need."""
    for package in ("launcher", "emulators"):
        for source in (REPO / package).rglob("*.py"):
            assert "matplotlib" not in source.read_text(), source
