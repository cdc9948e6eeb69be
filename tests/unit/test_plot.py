"""The dependency-free PNG charts of bench/plot.py render and decode."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from bench import plot


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, data) chunks, checking every CRC."""
    assert png[:8] == plot.PNG_SIGNATURE
    out = []
    pos = 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        data = png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        out.append((kind, data))
        pos += 12 + length
    return out


def _decode(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the RGB rows of a PNG written by plot.encode_png."""
    chunks = _chunks(png)
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT"))
    stride = 1 + width * 3
    assert len(raw) == stride * height
    rows = [raw[i * stride : (i + 1) * stride] for i in range(height)]
    assert all(r[0] == 0 for r in rows)  # filter type 0 on every row
    return width, height, [r[1:] for r in rows]


def test_bar_chart_png_decodes_to_its_pixels() -> None:
    chart = plot.Chart("Tiny 0.5%", "x", "y (MB/s)", width=240, height=160, scale=1,
                       markers=(plot.Marker(2.0, "target"),))
    canvas = plot.bar_chart(chart, ["a", "b"], ["one", "two"], [[1.0, 3.0], [2.5, 0.5]],
                            samples=[[[1.2], [2.9]], [[2.0], [0.4, 0.6]]])
    width, height, rows = _decode(canvas.to_png())
    assert (width, height) == (240, 160)
    assert len(rows) == 160
    assert b"".join(rows) == bytes(canvas.pixels)
    # The first bar's colour is really drawn, and the background is white.
    assert bytes(plot.PALETTE[0]) in b"".join(rows)
    assert canvas.get(0, height - 1) == plot.WHITE


def test_line_chart_grows_for_its_legend_and_draws_the_series() -> None:
    xs, ys = plot.cdf_points([8.0, 12.0, 30.0, 300.0])
    assert ys[-1] == 100.0 and xs[0] == 8.0
    chart = plot.Chart("CDF", "ms", "%", width=320, height=200, scale=1)
    series = [plot.Series("s", xs, ys, plot.PALETTE[1])]
    canvas = plot.line_chart(chart, series, plot.Scale(1, 1000, log=True), plot.Scale(0, 100))
    width, height, rows = _decode(canvas.to_png())
    assert width == 320 and height > 200
    assert bytes(plot.PALETTE[1]) in b"".join(rows)


def test_text_draws_known_glyphs_and_unknown_ones_as_question_mark() -> None:
    a, b = plot.Canvas(20, 12), plot.Canvas(20, 12)
    a.text(0, 0, "~", scale=1)
    b.text(0, 0, "?", scale=1)
    assert a.pixels == b.pixels and a.pixels != plot.Canvas(20, 12).pixels
    assert plot.text_width("ab", 2) == 22


def test_scales_give_round_ticks() -> None:
    assert plot.Scale(0, 250).ticks() == [0, 50, 100, 150, 200, 250]
    assert plot.Scale(1, 1000, log=True).ticks() == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    with pytest.raises(ValueError):
        plot.Scale(0, 10, log=True)
    with pytest.raises(ValueError):
        plot.encode_png(2, 2, b"\0" * 11)


def test_cli_skips_missing_results_and_writes_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, images = tmp_path / "out", tmp_path / "img"
    results.mkdir()
    case = {"size": 65536, "depth": 32, "ratio": 0.31}
    (results / "emulator_rate.json").write_text(json.dumps({"cases": [case]}))
    (results / "recovery-kill-spare.json").write_text('{"samples": [')  # being written
    assert plot.main(["--results", str(results), "--images", str(images)]) == 0
    assert sorted(p.name for p in images.iterdir()) == ["request-rate.png"]
    err = capsys.readouterr().err
    assert "recovery-cdf.png: skipped" in err and "not complete JSON" in err
    assert "throughput.png: skipped" in err and "missing" in err
    _decode((images / "request-rate.png").read_bytes())
