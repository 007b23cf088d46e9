"""PNG figures of the privacy report (no plotting dependency): overlaid histograms of max
correlations with the threshold τ, and text. Deterministic bytes for the same inputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..fsutil import atomic_write
from ..train.loop import _Canvas

# 5×7 glyphs: 7 rows top to bottom, 5 bits per row (MSB = left column).
_FONT = {
    "A": (14, 17, 17, 31, 17, 17, 17),
    "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (30, 17, 17, 17, 17, 17, 30),
    "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15),
    "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12),
    "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17),
    "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16),
    "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30),
    "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4),
    "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4),
    "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14),
    "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2),
    "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14),
    "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    ".": (0, 0, 0, 0, 0, 12, 12),
    ",": (0, 0, 0, 0, 12, 4, 8),
    ":": (0, 12, 12, 0, 12, 12, 0),
    "-": (0, 0, 0, 31, 0, 0, 0),
    "+": (0, 4, 4, 31, 4, 4, 0),
    "=": (0, 0, 31, 0, 31, 0, 0),
    "%": (24, 25, 2, 4, 8, 19, 3),
    "(": (2, 4, 8, 8, 8, 4, 2),
    ")": (8, 4, 2, 2, 2, 4, 8),
    "[": (14, 8, 8, 8, 8, 8, 14),
    "]": (14, 2, 2, 2, 2, 2, 14),
    "/": (0, 1, 2, 4, 8, 16, 0),
    "_": (0, 0, 0, 0, 0, 0, 31),
    "<": (2, 4, 8, 16, 8, 4, 2),
    ">": (8, 4, 2, 1, 2, 4, 8),
    "'": (4, 4, 8, 0, 0, 0, 0),
    "#": (10, 10, 31, 10, 31, 10, 10),
    "*": (0, 4, 21, 14, 21, 4, 0),
    "!": (4, 4, 4, 4, 4, 0, 4),
    "?": (14, 17, 1, 2, 4, 0, 4),
    " ": (0, 0, 0, 0, 0, 0, 0),
}

BLUE = (60, 110, 200)
ORANGE = (235, 140, 40)
GREEN = (60, 160, 80)
RED = (200, 40, 40)
GREY = (90, 90, 90)
LIGHT = (225, 225, 225)


def draw_text(canvas: _Canvas, x: int, y: int, text: str, rgb=(0, 0, 0), scale: int = 1) -> int:
    """Draw ``text`` (upper-cased; unknown characters as '?') at (x, y); returns the end x."""
    for ch in text.upper():
        rows = _FONT.get(ch, _FONT["?"])
        for r, bits in enumerate(rows):
            for c in range(5):
                if bits >> (4 - c) & 1:
                    for dx in range(scale):
                        for dy in range(scale):
                            canvas.dot(x + c * scale + dx, y + r * scale + dy, rgb)
        x += 6 * scale
    return x


def _fill(canvas: _Canvas, x0: int, y0: int, x1: int, y1: int, rgb) -> None:
    for y in range(max(0, min(y0, y1)), min(canvas.h, max(y0, y1) + 1)):
        for x in range(max(0, min(x0, x1)), min(canvas.w, max(x0, x1) + 1)):
            canvas.dot(x, y, rgb)


def histogram_png(
    series: Sequence[tuple[str, np.ndarray, tuple[int, int, int]]],
    edges: np.ndarray,
    *,
    tau: float | None,
    title: Sequence[str],
    width: int = 900,
    height: int = 560,
) -> bytes:
    """Density histograms of each ``(label, values, colour)`` over ``edges``, drawn as outlined
    steps (the first also filled lightly), a vertical line at ``tau``, and ``title`` lines."""
    canvas = _Canvas(width, height)
    top = 16 + 12 * len(title) + 20
    left, right, bottom = 60, width - 20, height - 50
    for i, line in enumerate(title):
        draw_text(canvas, 12, 10 + 12 * i, line)
    densities = []
    widths = np.diff(edges)
    for _, values, _ in series:
        counts, _ = np.histogram(np.asarray(values, dtype=np.float64), bins=edges)
        total = counts.sum()
        densities.append(counts / (total * widths) if total else counts * 0.0)
    peak = max([float(d.max()) for d in densities if len(d)] + [1e-12])
    lo, hi = float(edges[0]), float(edges[-1])

    def px(v: float) -> int:
        return round(left + (v - lo) / (hi - lo) * (right - left))

    def py(d: float) -> int:
        return round(bottom - d / peak * (bottom - top))

    for k in range(6):
        gx = left + k * (right - left) // 5
        canvas.line(gx, top, gx, bottom, LIGHT)
        draw_text(canvas, gx - 15, bottom + 8, f"{lo + k * (hi - lo) / 5:.3f}", GREY)
    for k in range(5):
        gy = bottom - k * (bottom - top) // 4
        canvas.line(left, gy, right, gy, LIGHT)
        draw_text(canvas, 4, gy - 3, f"{k * peak / 4:.3g}", GREY)
    for n, ((_, _, rgb), d) in enumerate(zip(series, densities)):
        light = tuple(int(255 - (255 - c) * 0.25) for c in rgb)
        for i, v in enumerate(d):
            x0, x1 = px(edges[i]), px(edges[i + 1])
            if n == 0 and v > 0:
                _fill(canvas, x0, py(v), x1, bottom, light)
        prev = bottom
        for i, v in enumerate(d):
            x0, x1, y = px(edges[i]), px(edges[i + 1]), py(v)
            canvas.line(x0, prev, x0, y, rgb, width=2)
            canvas.line(x0, y, x1, y, rgb, width=2)
            prev = y
        canvas.line(px(edges[-1]), prev, px(edges[-1]), bottom, rgb, width=2)
    if tau is not None and lo <= tau <= hi:
        x = px(tau)
        for y in range(top, bottom, 6):
            canvas.line(x, y, x, min(y + 3, bottom), (0, 0, 0), width=2)
        draw_text(canvas, min(x + 4, width - 120), top + 2, f"TAU = {tau:.5f}")
    canvas.line(left, top, left, bottom, GREY)
    canvas.line(left, bottom, right, bottom, GREY)
    draw_text(
        canvas, (left + right) // 2 - 150, height - 22, "MAX PEARSON CORRELATION WITH A REAL FRAME"
    )
    lx = left + 10
    for label, _, rgb in series:
        _fill(canvas, lx, top + 14, lx + 14, top + 22, rgb)
        lx = draw_text(canvas, lx + 20, top + 15, label) + 20
    desc = "; ".join(title)
    return canvas.png(
        {"Title": "privacy report", "Description": desc, "Software": f"echofast {__version__}"}
    )


def text_png(lines: Sequence[str], *, width: int = 900, scale: int = 2) -> bytes:
    """A PNG holding only ``lines`` of text (e.g. "NOT PRIVACY-FILTERED")."""
    height = 30 + len(lines) * 9 * scale * 2
    canvas = _Canvas(width, height)
    for i, line in enumerate(lines):
        draw_text(canvas, 20, 20 + i * 18 * scale, line, RED if i == 0 else (0, 0, 0), scale)
    return canvas.png({"Title": "privacy report", "Description": " ".join(lines)})


def write_png(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
