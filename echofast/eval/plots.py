"""Scatter and Bland–Altman plots of EF predictions as PNG files, without plotting libraries.

matplotlib is not an echofast dependency, so the figures are drawn on a small RGB canvas (lines,
dots, a 5×7 bitmap font for upper-case labels and numbers) and encoded by :mod:`echofast.png`.
Each PNG also carries its numbers in ``tEXt`` chunks (title, description).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..fsutil import atomic_write
from ..png import encode_png

# 5×7 glyphs: 7 rows, 5 bits each (MSB = left column)
_FONT = {
    " ": (0, 0, 0, 0, 0, 0, 0),
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
    "A": (14, 17, 17, 31, 17, 17, 17),
    "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (28, 18, 17, 17, 17, 18, 28),
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
    "Y": (17, 17, 17, 10, 4, 4, 4),
    "Z": (31, 1, 2, 4, 8, 16, 31),
    ".": (0, 0, 0, 0, 0, 12, 12),
    ",": (0, 0, 0, 0, 12, 4, 8),
    "-": (0, 0, 0, 31, 0, 0, 0),
    "+": (0, 4, 4, 31, 4, 4, 0),
    "=": (0, 0, 31, 0, 31, 0, 0),
    "(": (2, 4, 8, 8, 8, 4, 2),
    ")": (8, 4, 2, 2, 2, 4, 8),
    "%": (24, 25, 2, 4, 8, 19, 3),
    ":": (0, 12, 12, 0, 12, 12, 0),
    "/": (0, 1, 2, 4, 8, 16, 0),
    "²": (12, 2, 4, 8, 14, 0, 0),
    "±": (4, 4, 31, 4, 4, 0, 31),
}

BLACK, GREY, LIGHT, BLUE, RED = (
    (0, 0, 0),
    (120, 120, 120),
    (225, 225, 225),
    (30, 60, 190),
    (200, 40, 40),
)


class Canvas:
    """An RGB image with anti-alias-free drawing primitives; (0, 0) is the top-left pixel."""

    def __init__(self, width: int, height: int):
        self.px = np.full((height, width, 3), 255, dtype=np.uint8)

    @property
    def width(self) -> int:
        return self.px.shape[1]

    @property
    def height(self) -> int:
        return self.px.shape[0]

    def dot(self, x: float, y: float, rgb, radius: int = 0) -> None:
        cx, cy = round(x), round(y)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dx * dx + dy * dy <= radius * radius + radius:
                    xx, yy = cx + dx, cy + dy
                    if 0 <= xx < self.width and 0 <= yy < self.height:
                        self.px[yy, xx] = rgb

    def line(self, x0, y0, x1, y1, rgb, width: int = 1, dash: int = 0) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for k in range(n + 1):
            if dash and (k // dash) % 2:
                continue
            t = k / n
            self.dot(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, rgb, radius=width // 2)

    def text(self, x: int, y: int, s: str, rgb=BLACK, scale: int = 2, vertical: bool = False):
        """Draw ``s`` (upper-cased) with its top-left at (x, y); ``vertical`` runs bottom-up."""
        for ch in s.upper():
            rows = _FONT.get(ch, _FONT[" "])
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits >> (4 - c) & 1:
                        for dx in range(scale):
                            for dy in range(scale):
                                if vertical:
                                    px, py = x + r * scale + dy, y - c * scale - dx
                                else:
                                    px, py = x + c * scale + dx, y + r * scale + dy
                                if 0 <= px < self.width and 0 <= py < self.height:
                                    self.px[py, px] = rgb
            if vertical:
                y -= 6 * scale
            else:
                x += 6 * scale

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return 6 * scale * len(s) - scale

    def png(self, text: dict[str, str] | None = None) -> bytes:
        """The canvas as PNG bytes (``text`` → tEXt chunks, latin-1)."""
        return encode_png(self.px, text)


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k)."""
    span = max(hi - lo, 1e-9)
    raw = span / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.1f}"


class _Axes:
    """A plot area with data → pixel mapping, grid, ticks and axis labels."""

    def __init__(self, canvas: Canvas, xr, yr, xlabel: str, ylabel: str, title: str):
        self.c = canvas
        self.left, self.right, self.top, self.bottom = 90, canvas.width - 30, 50, canvas.height - 70
        self.xr, self.yr = xr, yr
        for v in nice_ticks(*xr):
            x = self.x(v)
            canvas.line(x, self.top, x, self.bottom, LIGHT)
            canvas.text(int(x - Canvas.text_width(_fmt(v)) / 2), self.bottom + 10, _fmt(v))
        for v in nice_ticks(*yr):
            y = self.y(v)
            canvas.line(self.left, y, self.right, y, LIGHT)
            canvas.text(self.left - 10 - Canvas.text_width(_fmt(v)), int(y - 7), _fmt(v))
        canvas.line(self.left, self.top, self.left, self.bottom, GREY)
        canvas.line(self.left, self.bottom, self.right, self.bottom, GREY)
        mid_x = (self.left + self.right) / 2
        canvas.text(int(mid_x - Canvas.text_width(xlabel) / 2), self.bottom + 40, xlabel)
        mid_y = (self.top + self.bottom) / 2
        canvas.text(12, int(mid_y + Canvas.text_width(ylabel) / 2), ylabel, vertical=True)
        canvas.text(int(mid_x - Canvas.text_width(title) / 2), 15, title)

    def x(self, v: float) -> float:
        lo, hi = self.xr
        return self.left + (v - lo) / (hi - lo) * (self.right - self.left)

    def y(self, v: float) -> float:
        lo, hi = self.yr
        return self.bottom - (v - lo) / (hi - lo) * (self.bottom - self.top)


def _pad_range(values: np.ndarray, frac: float = 0.05) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    pad = max((hi - lo) * frac, 1.0)
    return lo - pad, hi + pad


def scatter_png(actual: Sequence[float], predicted: Sequence[float], title: str = "") -> bytes:
    """Predicted vs actual EF with the identity line (equal axes)."""
    y, p = np.asarray(actual, float), np.asarray(predicted, float)
    rng = _pad_range(np.concatenate([y, p]))
    canvas = Canvas(640, 640)
    ax = _Axes(canvas, rng, rng, "ACTUAL EF (%)", "PREDICTED EF (%)", title)
    canvas.line(ax.x(rng[0]), ax.y(rng[0]), ax.x(rng[1]), ax.y(rng[1]), BLUE, dash=6)
    for a, b in zip(y, p):
        canvas.dot(ax.x(a), ax.y(b), BLACK, radius=2)
    desc = f"predicted vs actual EF of {len(y)} videos; dashed: identity"
    return canvas.png({"Title": title or "scatter", "Description": desc, "Software": _software()})


def bland_altman_png(actual: Sequence[float], predicted: Sequence[float], title: str = "") -> bytes:
    """Difference (predicted − actual) vs mean, with the bias and bias ± 1.96·SD lines."""
    y, p = np.asarray(actual, float), np.asarray(predicted, float)
    mean, diff = (y + p) / 2, p - y
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    lines = (bias - 1.96 * sd, bias, bias + 1.96 * sd)
    yr = _pad_range(np.concatenate([diff, np.array(lines)]))
    canvas = Canvas(720, 560)
    ax = _Axes(
        canvas,
        _pad_range(mean),
        yr,
        "MEAN OF ACTUAL AND PREDICTED EF (%)",
        "PREDICTED - ACTUAL (%)",
        title,
    )
    for value, label, color in zip(lines, ("-1.96 SD", "BIAS", "+1.96 SD"), (RED, BLUE, RED)):
        canvas.line(ax.left, ax.y(value), ax.right, ax.y(value), color, dash=6)
        text = f"{label} {value:+.1f}"
        canvas.text(ax.right - Canvas.text_width(text) - 4, int(ax.y(value)) - 18, text, color)
    for a, b in zip(mean, diff):
        canvas.dot(ax.x(a), ax.y(b), BLACK, radius=2)
    desc = f"Bland-Altman of {len(y)} videos: bias {bias:.4g}, SD {sd:.4g}, limits of agreement "
    desc += f"{lines[0]:.4g} .. {lines[2]:.4g}"
    return canvas.png(
        {"Title": title or "bland-altman", "Description": desc, "Software": _software()}
    )


def _software() -> str:
    return f"echofast {__version__}"


def save_png(path: str | os.PathLike, data: bytes) -> Path:
    """Write PNG bytes atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
