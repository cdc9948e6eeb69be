"""Plots of the benchmark results, drawn without a plotting library.

Theory of operation. The project takes no plotting dependency, so this
module carries the little it needs: an RGB `Canvas` (a bytearray, one
byte per channel) with rectangles, lines, dashes and text in a built-in
5x7 bitmap font, scaled by whole pixels; an `Axes` that maps data to
pixels on a linear or log10 scale and draws ticks, grid and labels; two
chart builders (`line_chart` for CDFs, `bar_chart` for grouped bars with
an optional target line); and a PNG writer (zlib + struct: 8-bit RGB,
filter type 0 on every row, one IDAT). Nothing is anti-aliased: charts
are drawn at a size where that does not matter.

`python -m bench.plot` reads the JSON results in bench/out/ and writes
docs/img/recovery-cdf.png, docs/img/throughput.png and
docs/img/request-rate.png. A result file that is missing or not yet
complete (a benchmark may be rewriting it) is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GRID: Color = (225, 225, 225)
AXIS: Color = (60, 60, 60)
MUTED: Color = (110, 110, 110)
TARGET: Color = (200, 30, 30)
PALETTE: tuple[Color, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189))

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 5x7 glyphs, one string of 7 rows of 5 bits each (top row first); g, j, p, q
# and y have two more rows, a descender drawn below the line of text.
_GLYPH_ROWS: dict[str, str] = {
    " ": "00000 00000 00000 00000 00000 00000 00000",
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    "a": "00000 00000 01110 00001 01111 10001 01111",
    "b": "10000 10000 10110 11001 10001 10001 11110",
    "c": "00000 00000 01110 10000 10000 10001 01110",
    "d": "00001 00001 01101 10011 10001 10001 01111",
    "e": "00000 00000 01110 10001 11111 10000 01110",
    "f": "00110 01001 01000 11100 01000 01000 01000",
    "g": "00000 00000 01111 10001 10001 10001 01111 00001 01110",
    "h": "10000 10000 10110 11001 10001 10001 10001",
    "i": "00100 00000 01100 00100 00100 00100 01110",
    "j": "00010 00000 00110 00010 00010 00010 00010 10010 01100",
    "k": "10000 10000 10010 10100 11000 10100 10010",
    "l": "01100 00100 00100 00100 00100 00100 01110",
    "m": "00000 00000 11010 10101 10101 10001 10001",
    "n": "00000 00000 10110 11001 10001 10001 10001",
    "o": "00000 00000 01110 10001 10001 10001 01110",
    "p": "00000 00000 11110 10001 10001 10001 11110 10000 10000",
    "q": "00000 00000 01111 10001 10001 10001 01111 00001 00001",
    "r": "00000 00000 10110 11001 10000 10000 10000",
    "s": "00000 00000 01110 10000 01110 00001 11110",
    "t": "01000 01000 11100 01000 01000 01001 00110",
    "u": "00000 00000 10001 10001 10001 10011 01101",
    "v": "00000 00000 10001 10001 10001 01010 00100",
    "w": "00000 00000 10001 10001 10101 10101 01010",
    "x": "00000 00000 10001 01010 00100 01010 10001",
    "y": "00000 00000 10001 10001 10001 10001 01111 00001 01110",
    "z": "00000 00000 11111 00010 00100 01000 11111",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 01100 00100 01000",
    "%": "11000 11001 00010 00100 01000 10011 00011",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000",
    "/": "00000 00001 00010 00100 01000 10000 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000",
    ":": "00000 01100 01100 00000 01100 01100 00000",
    ">": "01000 00100 00010 00001 00010 00100 01000",
    "<": "00010 00100 01000 10000 01000 00100 00010",
    "=": "00000 00000 11111 00000 11111 00000 00000",
    "?": "01110 10001 00001 00010 00100 00000 00100",
}
GLYPH_W = 5
GLYPH_H = 7


def _parse_glyph(rows: str) -> tuple[tuple[int, int], ...]:
    """The lit (column, row) cells of a glyph, computed once at import."""
    return tuple(
        (c, r) for r, bits in enumerate(rows.split()) for c, bit in enumerate(bits) if bit == "1"
    )


FONT: dict[str, tuple[tuple[int, int], ...]] = {c: _parse_glyph(g) for c, g in _GLYPH_ROWS.items()}


def text_width(text: str, scale: int) -> int:
    """Width in pixels of `text` at `scale` (one blank column between glyphs)."""
    return max(0, len(text) * (GLYPH_W + 1) * scale - scale)


def text_height(scale: int) -> int:
    """Height in pixels of a line of text at `scale`."""
    return GLYPH_H * scale


def encode_png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """An 8-bit RGB PNG of `rgb` (rows top to bottom), filter type 0 on every row."""
    stride = width * 3
    if width <= 0 or height <= 0 or len(rgb) != stride * height:
        raise ValueError(f"{len(rgb)} bytes is not a {width}x{height} RGB image")

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = bytearray()
    for y in range(height):
        raw.append(0)
        raw += rgb[y * stride : (y + 1) * stride]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(raw), 9))
        + chunk(b"IEND", b"")
    )


class Canvas:
    """An RGB raster; drawing outside it is clipped, not an error."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"canvas size {width}x{height}")
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(background) * (width * height))

    def get(self, x: int, y: int) -> Color:
        i = (y * self.width + x) * 3
        return (self.pixels[i], self.pixels[i + 1], self.pixels[i + 2])

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill the rectangle with corners (x0, y0) and (x1, y1), both inclusive."""
        xa, xb = sorted((x0, x1))
        ya, yb = sorted((y0, y1))
        xa, xb = max(xa, 0), min(xb, self.width - 1)
        ya, yb = max(ya, 0), min(yb, self.height - 1)
        if xa > xb or ya > yb:
            return
        run = bytes(color) * (xb - xa + 1)
        for y in range(ya, yb + 1):
            i = (y * self.width + xa) * 3
            self.pixels[i : i + len(run)] = run

    def dot(self, x: int, y: int, color: Color, size: int = 1) -> None:
        """A square of side `size` centred on (x, y)."""
        h = size // 2
        self.rect(x - h, y - h, x - h + size - 1, y - h + size - 1, color)

    def line(
        self, x0: int, y0: int, x1: int, y1: int, color: Color, width: int = 1, dash: int = 0
    ) -> None:
        """A straight line (Bresenham), `width` pixels thick; `dash` > 0 draws dashes."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx = 1 if x0 < x1 else -1
        sy = 1 if y0 < y1 else -1
        err = dx + dy
        step = 0
        while True:
            if dash <= 0 or (step // dash) % 2 == 0:
                self.dot(x0, y0, color, width)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy
            step += 1

    def text(
        self,
        x: int,
        y: int,
        text: str,
        color: Color = BLACK,
        scale: int = 2,
        anchor: str = "lt",
        vertical: bool = False,
    ) -> None:
        """Draw `text` in the 5x7 font; unknown characters print as '?'.

        `anchor` is two letters: horizontal l/c/r, vertical t/m/b, relative to
        (x, y). `vertical` rotates a quarter turn counter-clockwise (reading
        upwards, for a y-axis label); the anchor then applies to the rotated box.
        """
        w, h = text_width(text, scale), text_height(scale)
        bw, bh = (h, w) if vertical else (w, h)
        ox = {"l": 0, "c": bw // 2, "r": bw}[anchor[0]]
        oy = {"t": 0, "m": bh // 2, "b": bh}[anchor[1]]
        left, top = x - ox, y - oy
        for n, ch in enumerate(text):
            cells = FONT.get(ch, FONT["?"])
            gx = n * (GLYPH_W + 1)
            for c, r in cells:
                if vertical:
                    px, py = left + r * scale, top + bh - (gx + c + 1) * scale
                else:
                    px, py = left + (gx + c) * scale, top + r * scale
                self.rect(px, py, px + scale - 1, py + scale - 1, color)

    def to_png(self) -> bytes:
        return encode_png(self.width, self.height, self.pixels)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.to_png())


@dataclass(frozen=True, slots=True)
class Scale:
    """A data range on one axis, linear or log10."""

    lo: float
    hi: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.hi > self.lo or (self.log and self.lo <= 0):
            raise ValueError(f"bad axis range {self.lo}..{self.hi} (log={self.log})")

    def frac(self, v: float) -> float:
        """Position of `v` as a fraction of the axis (0 at lo, 1 at hi)."""
        if self.log:
            v = max(v, self.lo * 1e-3)
            return (math.log10(v) - math.log10(self.lo)) / (
                math.log10(self.hi) - math.log10(self.lo)
            )
        return (v - self.lo) / (self.hi - self.lo)

    def ticks(self, target: int = 6) -> list[float]:
        """Round tick values inside the range: 1-2-5 steps, or 1-2-5 per decade on log."""
        if self.log:
            out = []
            for e in range(math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi)) + 1):
                for m in (1, 2, 5):
                    v = m * 10.0**e
                    if self.lo * (1 - 1e-9) <= v <= self.hi * (1 + 1e-9):
                        out.append(v)
            return out
        raw = (self.hi - self.lo) / max(target, 1)
        mag = 10.0 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
        first = math.ceil(self.lo / step - 1e-9)
        return [
            round(k * step, 10) for k in range(first, int(self.hi / step + 1e-9) + 1)
        ]


def fmt_num(v: float) -> str:
    """A short tick label: no trailing zeros, thousands without separators."""
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.3g}"


def nice_max(v: float) -> float:
    """The smallest 1-2-2.5-5 x 10^k at or above `v` (an axis top with headroom given)."""
    if v <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(v))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= v * (1 - 1e-9))


@dataclass
class Axes:
    """A plot area on a canvas: data-to-pixel mapping, frame, ticks and grid."""

    canvas: Canvas
    left: int
    top: int
    right: int
    bottom: int
    x: Scale
    y: Scale
    scale: int = 2

    def px(self, v: float) -> int:
        return round(self.left + self.x.frac(v) * (self.right - self.left))

    def py(self, v: float) -> int:
        return round(self.bottom - self.y.frac(v) * (self.bottom - self.top))

    def grid_and_yticks(self, fmt: Callable[[float], str] = fmt_num) -> None:
        c = self.canvas
        for v in self.y.ticks():
            y = self.py(v)
            c.line(self.left, y, self.right, y, GRID)
            c.line(self.left - 5, y, self.left, y, AXIS)
            c.text(self.left - 9, y, fmt(v), AXIS, self.scale, "rm")

    def xticks(
        self, values: Sequence[float], labels: Sequence[str] | None = None, grid: bool = True
    ) -> None:
        c = self.canvas
        for i, v in enumerate(values):
            x = self.px(v)
            if grid:
                c.line(x, self.top, x, self.bottom, GRID)
            c.line(x, self.bottom, x, self.bottom + 5, AXIS)
            label = labels[i] if labels is not None else fmt_num(v)
            c.text(x, self.bottom + 10, label, AXIS, self.scale, "ct")

    def frame(self) -> None:
        c = self.canvas
        c.line(self.left, self.bottom, self.right, self.bottom, AXIS, 2)
        c.line(self.left, self.top, self.left, self.bottom, AXIS, 2)

    def axis_labels(self, xlabel: str, ylabel: str) -> None:
        c = self.canvas
        gap = text_height(self.scale) + 22
        c.text((self.left + self.right) // 2, self.bottom + gap, xlabel, BLACK, self.scale, "ct")
        c.text(12, (self.top + self.bottom) // 2, ylabel, BLACK, self.scale, "lm", vertical=True)


def _legend(c: Canvas, x: int, y: int, items: Sequence[tuple[str, Color]], scale: int) -> None:
    """A boxed legend, one entry a line, with its top-left corner at (x, y)."""
    line_h = text_height(scale) + 10
    w = max(text_width(label, scale) for label, _ in items) + 46
    h = line_h * len(items) + 10
    c.rect(x, y, x + w, y + h, WHITE)
    for x0, y0, x1, y1 in ((x, y, x + w, y), (x, y + h, x + w, y + h), (x, y, x, y + h),
                           (x + w, y, x + w, y + h)):
        c.line(x0, y0, x1, y1, MUTED)
    for i, (label, color) in enumerate(items):
        cy = y + 10 + i * line_h + text_height(scale) // 2
        c.rect(x + 10, cy - 4, x + 30, cy + 3, color)
        c.text(x + 38, cy, label, BLACK, scale, "lm")


@dataclass(frozen=True, slots=True)
class Series:
    """One line of a line chart: points in data units, drawn in order."""

    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    color: Color


@dataclass(frozen=True, slots=True)
class Marker:
    """A dashed reference line across the plot, labelled at its end."""

    value: float
    label: str
    vertical: bool = False
    color: Color = TARGET
    label_left: bool = False  # of a vertical line, to keep clear of the data


@dataclass(frozen=True, slots=True)
class Chart:
    """What every chart shares: size, title and axis labels."""

    title: str
    xlabel: str
    ylabel: str
    width: int = 960
    height: int = 540
    scale: int = 2
    markers: tuple[Marker, ...] = field(default_factory=tuple)


def _legend_row(
    c: Canvas, x: int, y: int, items: Sequence[tuple[str, Color]], scale: int, width: int
) -> int:
    """Legend entries side by side from (x, y), wrapping at `width`; returns its height."""
    line_h = text_height(scale) + 12
    cx, cy = x, y
    for label, color in items:
        w = text_width(label, scale) + 36 + 24
        if cx > x and cx + w > x + width:
            cx, cy = x, cy + line_h
        mid = cy + text_height(scale) // 2
        c.rect(cx, mid - 4, cx + 24, mid + 3, color)
        c.text(cx + 32, mid, label, BLACK, scale, "lm")
        cx += w
    return cy + line_h - y


def _frame(chart: Chart, x: Scale, y: Scale, below: int = 0) -> tuple[Canvas, Axes]:
    """Canvas with the title drawn and the plot area laid out; `below` is room kept
    under the x-axis label (for a legend). A title too wide shrinks a size."""
    c = Canvas(chart.width, chart.height + below)
    s = chart.scale
    ts = s + 1
    while ts > 1 and text_width(chart.title, ts) > chart.width - 20:
        ts -= 1
    c.text(chart.width // 2, 14, chart.title, BLACK, ts, "ct")
    ax = Axes(c, 110, 30 + text_height(s + 1) + 20, chart.width - 30,
              chart.height - 2 * text_height(s) - 46, x, y, s)
    return c, ax


def _markers(ax: Axes, markers: Sequence[Marker]) -> None:
    c, s = ax.canvas, ax.scale
    for m in markers:
        if m.vertical:
            x = ax.px(m.value)
            c.line(x, ax.top, x, ax.bottom, m.color, 2, dash=6)
            if m.label_left:
                c.text(x - 6, ax.top + 4, m.label, m.color, s, "rt")
            else:
                c.text(x + 6, ax.top + 4, m.label, m.color, s, "lt")
        else:
            y = ax.py(m.value)
            c.line(ax.left, y, ax.right, y, m.color, 2, dash=6)
            c.text(ax.left + 8, y - 6, m.label, m.color, s, "lb")


def line_chart(
    chart: Chart,
    series: Sequence[Series],
    x: Scale,
    y: Scale,
    yfmt: Callable[[float], str] = fmt_num,
) -> Canvas:
    """Lines (a CDF is a step line: give it the steps' corners), legend underneath.

    The legend goes below the plot, not inside it, so that it can never hide
    a line whatever the data.
    """
    probe = Canvas(chart.width, 200)
    below = _legend_row(probe, 20, 0, [(s.label, s.color) for s in series], chart.scale,
                        chart.width - 40)
    c, ax = _frame(chart, x, y, below + 6)
    ax.grid_and_yticks(yfmt)
    ax.xticks(x.ticks())
    _markers(ax, chart.markers)
    for s in series:
        pts = [(ax.px(a), ax.py(b)) for a, b in zip(s.xs, s.ys, strict=True)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            c.line(x0, y0, x1, y1, s.color, 3)
    ax.frame()
    ax.axis_labels(chart.xlabel, chart.ylabel)
    _legend_row(c, 20, chart.height, [(s.label, s.color) for s in series], chart.scale,
                chart.width - 40)
    return c


def bar_chart(
    chart: Chart,
    groups: Sequence[str],
    names: Sequence[str],
    values: Sequence[Sequence[float]],
    samples: Sequence[Sequence[Sequence[float]]] | None = None,
    value_fmt: Callable[[float], str] = fmt_num,
) -> Canvas:
    """Grouped bars: `values[g][s]` is series `s` in group `g`, printed above its bar.

    `samples[g][s]`, if given, are the individual measurements behind a bar,
    drawn as black dots over it so the spread is visible.
    """
    if any(len(row) != len(names) for row in values) or len(values) != len(groups):
        raise ValueError("values must be one row per group, one column per series")
    top = max([v for row in values for v in row] + [m.value for m in chart.markers])
    if samples is not None:
        top = max([top] + [p for g in samples for s in g for p in s])
    y = Scale(0.0, nice_max(top * 1.15))
    c, ax = _frame(chart, Scale(0.0, float(len(groups))), y)
    ax.grid_and_yticks()
    ax.xticks([i + 0.5 for i in range(len(groups))], list(groups), grid=False)
    slot = (ax.right - ax.left) / len(groups)
    bar_w = int(slot * 0.7 / len(names))
    for g, row in enumerate(values):
        start = ax.left + g * slot + slot * 0.15
        for s, v in enumerate(row):
            x0 = round(start + s * bar_w)
            color = PALETTE[s % len(PALETTE)]
            c.rect(x0 + 2, ax.py(v), x0 + bar_w - 3, ax.bottom, color)
            highest = max([v, *(samples[g][s] if samples is not None else [])])
            c.text(x0 + bar_w // 2, ax.py(highest) - 8, value_fmt(v), BLACK, chart.scale, "cb")
            if samples is not None:
                for p in samples[g][s]:
                    c.dot(x0 + bar_w // 2, ax.py(p), BLACK, 7)
                    c.dot(x0 + bar_w // 2, ax.py(p), WHITE, 3)
    _markers(ax, chart.markers)
    ax.frame()
    ax.axis_labels(chart.xlabel, chart.ylabel)
    if len(names) > 1:
        legend_w = max(text_width(n, chart.scale) for n in names) + 46
        _legend(c, ax.right - legend_w - 10, ax.top + 8,
                [(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(names)], chart.scale)
    return c


# --- the project's charts -------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


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


def cdf_points(values: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Corners of the empirical CDF as a step line, in percent."""
    v = sorted(values)
    n = len(v)
    xs: list[float] = []
    ys: list[float] = []
    for i, a in enumerate(v):
        xs += [a, a]
        ys += [100.0 * i / n, 100.0 * (i + 1) / n]
    return tuple(xs), tuple(ys)


RECOVERY_CASES = (
    ("recovery-kill-spare.json", "SIGKILL, warm spare"),
    ("recovery-kill-nospare.json", "SIGKILL, no spare"),
    ("recovery-hang-spare.json", "SIGSTOP (hang), warm spare"),
)


def recovery_cdf(out: Path) -> Canvas:
    series = []
    for i, (name, label) in enumerate(RECOVERY_CASES):
        try:
            data = load(out / name)
        except ResultMissing as e:
            print(f"recovery-cdf: skipping {label}: {e}", file=sys.stderr)
            continue
        stalls = [float(s["stall_ms"]) for s in data.get("samples", []) if s.get("stall_ms")]
        if not stalls:
            print(f"recovery-cdf: skipping {label}: no samples", file=sys.stderr)
            continue
        xs, ys = cdf_points(stalls)
        series.append(Series(f"{label} (n={len(stalls)})", xs, ys, PALETTE[i]))
    if not series:
        raise ResultMissing("no recovery results")
    lo = min(min(s.xs) for s in series)
    hi = max(max(s.xs) for s in series)
    x = Scale(10.0 ** math.floor(math.log10(lo)), nice_max(hi * 1.05), log=True)
    chart = Chart(
        "Guest I/O stall after an emulator kill or hang",
        "stall (ms, log scale)",
        "events (%)",
        markers=(
            Marker(10, "median target", True, label_left=True),
            Marker(50, "p99 target", True),
        ),
    )
    return line_chart(chart, series, x, Scale(0, 100), lambda v: f"{fmt_num(v)}%")


def throughput(out: Path) -> Canvas:
    data = load(out / "guest_throughput.json")
    kinds = (("emulator", "emulator"), ("in-process", "in-process"))
    ops = ("read", "write")
    per: dict[tuple[str, str], list[float]] = {(k, o): [] for k, _ in kinds for o in ops}
    for boot in data.get("boots", []):
        for s in boot.get("samples", []):
            if s.get("rc") == 0 and s.get("seconds"):
                per[(s["kind"], s["op"])].append(s["bytes"] / s["seconds"] / 1e6)
    summary = data["summary"]
    values = [[float(summary[o][f"{k.replace('-', '_')}_mb_s"]) for k, _ in kinds] for o in ops]
    groups = [f"{o} (ratio {summary[o]['ratio']:.2f})" for o in ops]
    block_kib = data.get("parameters", {}).get("block", 65536) // 1024
    chart = Chart(
        f"Guest throughput: {block_kib} KiB dd, queue depth 1",
        "bars: median of boots, dots: each boot",
        "MB/s",
    )
    return bar_chart(chart, groups, [n for _, n in kinds], values,
                     samples=[[per[(k, o)] for k, _ in kinds] for o in ops],
                     value_fmt=lambda v: f"{v:.1f}")


def request_rate(out: Path) -> Canvas:
    data = load(out / "emulator_rate.json")
    cases = data["cases"]
    groups = [f"{c['size'] // 1024} KiB, depth {c['depth']}" for c in cases]
    values = [[float(c["ratio"])] for c in cases]
    chart = Chart(
        "Emulator request rate / host preadv rate",
        "request size, queue depth",
        "ratio",
        markers=(Marker(0.3, "target 0.3 (64 KiB, depth 32)"),),
    )
    return bar_chart(chart, groups, ["ratio"], values, value_fmt=lambda v: f"{v:.2f}")


CHARTS: tuple[tuple[str, Callable[[Path], Canvas]], ...] = (
    ("recovery-cdf.png", recovery_cdf),
    ("throughput.png", throughput),
    ("request-rate.png", request_rate),
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=REPO / "bench" / "out",
                   help="folder of benchmark JSON results (default: bench/out)")
    p.add_argument("--images", type=Path, default=REPO / "docs" / "img",
                   help="folder to write PNGs to (default: docs/img)")
    args = p.parse_args(argv)
    written = 0
    for name, build in CHARTS:
        try:
            canvas = build(args.results)
        except ResultMissing as e:
            print(f"{name}: skipped: {e}", file=sys.stderr)
            continue
        canvas.save(args.images / name)
        print(f"wrote {args.images / name}")
        written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
