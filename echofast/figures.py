"""Dependency-free PNG figures: one RGB canvas, one bitmap font, axes helpers and the plots.

matplotlib is not an echofast dependency, so figures are drawn on a small RGB :class:`Canvas`
(dots, lines, filled rectangles, a 5×7 bitmap font for upper-case labels and numbers) and encoded
by :mod:`echofast.png`. Every plot carries its numbers in PNG ``tEXt`` chunks (title,
description, software) and is deterministic: the same inputs give the same bytes.

Plots: :func:`loss_plot_png` (training loss against step), :func:`histogram_png` (overlaid
density histograms with a threshold line), :func:`scatter_png` and :func:`bland_altman_png`
(EF predictions), :func:`text_png` (a page of text).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .fsutil import atomic_write
from .png import encode_png

RGB = tuple[int, int, int]

BLACK: RGB = (0, 0, 0)
GREY: RGB = (90, 90, 90)
LIGHT: RGB = (225, 225, 225)
BLUE: RGB = (25, 55, 190)
LIGHT_BLUE: RGB = (170, 195, 240)
RED: RGB = (200, 40, 40)
ORANGE: RGB = (235, 140, 40)
GREEN: RGB = (60, 160, 80)

# 5×7 glyphs: 7 rows top to bottom, 5 bits per row (MSB = left column). Text is upper-cased;
# characters without a glyph are drawn as '?'.
_FONT_BITS = {
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
    "²": (12, 2, 4, 8, 14, 0, 0),
    "±": (4, 4, 31, 4, 4, 0, 31),
    " ": (0, 0, 0, 0, 0, 0, 0),
}
_FONT = {
    ch: np.array([[(bits >> (4 - c)) & 1 for c in range(5)] for bits in rows], dtype=bool)
    for ch, rows in _FONT_BITS.items()
}


class Canvas:
    """A white RGB image with aliased drawing primitives; (0, 0) is the top-left pixel and
    everything drawn outside the image is clipped."""

    def __init__(self, width: int, height: int):
        self.px = np.full((height, width, 3), 255, dtype=np.uint8)

    @property
    def width(self) -> int:
        return self.px.shape[1]

    @property
    def height(self) -> int:
        return self.px.shape[0]

    def _blit(self, mask: np.ndarray, x: int, y: int, rgb: RGB) -> None:
        """Set the pixels where the boolean ``mask`` (h, w) is true, its top-left at (x, y)."""
        h, w = mask.shape
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x0 < x1 and y0 < y1:
            self.px[y0:y1, x0:x1][mask[y0 - y : y1 - y, x0 - x : x1 - x]] = rgb

    def dot(self, x: float, y: float, rgb: RGB, radius: int = 0) -> None:
        """A filled disc of ``radius`` pixels (0: one pixel) centred at the rounded (x, y)."""
        d = np.arange(-radius, radius + 1)
        disc = d[:, None] ** 2 + d[None, :] ** 2 <= radius * radius + radius
        self._blit(disc, round(x) - radius, round(y) - radius, rgb)

    def line(
        self, x0: float, y0: float, x1: float, y1: float, rgb: RGB, width: int = 1, dash: int = 0
    ) -> None:
        """A straight line drawn with a ``width``×``width`` square pen; ``dash`` > 0 leaves out
        every other run of ``dash`` steps."""
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        k = np.arange(n + 1)
        if dash:
            k = k[(k // dash) % 2 == 0]
        xs = np.round(x0 + (x1 - x0) * k / n).astype(np.int64)
        ys = np.round(y0 + (y1 - y0) * k / n).astype(np.int64)
        offsets = np.arange(width) - width // 2
        xs = (xs[:, None, None] + offsets[None, None, :]).ravel()
        ys = (ys[:, None, None] + offsets[None, :, None]).ravel()
        keep = (xs >= 0) & (xs < self.width) & (ys >= 0) & (ys < self.height)
        self.px[ys[keep], xs[keep]] = rgb

    def fill(self, x0: int, y0: int, x1: int, y1: int, rgb: RGB) -> None:
        """Fill the rectangle with corners (x0, y0) and (x1, y1), both included."""
        xa, xb = max(0, min(x0, x1)), min(self.width, max(x0, x1) + 1)
        ya, yb = max(0, min(y0, y1)), min(self.height, max(y0, y1) + 1)
        if xa < xb and ya < yb:
            self.px[ya:yb, xa:xb] = rgb

    def text(
        self,
        x: int,
        y: int,
        s: str,
        rgb: RGB = BLACK,
        scale: int = 1,
        vertical: bool = False,
    ) -> int:
        """Draw ``s`` (upper-cased) with its top-left at (x, y), each font pixel ``scale``×``scale``
        screen pixels; ``vertical`` runs bottom-up from (x, y). Returns the x (or, vertical, the
        y) where the next character would go."""
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT["?"]).repeat(scale, axis=0).repeat(scale, axis=1)
            if vertical:
                self._blit(np.rot90(glyph), x, y - 5 * scale + 1, rgb)
                y -= 6 * scale
            else:
                self._blit(glyph, x, y, rgb)
                x += 6 * scale
        return y if vertical else x

    @staticmethod
    def text_width(s: str, scale: int = 1) -> int:
        """Width in pixels of ``s`` drawn by :meth:`text`."""
        return max(6 * scale * len(s) - scale, 0)

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


def even_ticks(lo: float, hi: float, intervals: int) -> list[float]:
    """``intervals + 1`` evenly spaced values from ``lo`` to ``hi``."""
    return [lo + k / intervals * (hi - lo) for k in range(intervals + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.1f}"


class Axes:
    """A plot area inside ``canvas`` (pixel box ``left, right, top, bottom``) mapping the data
    ranges ``xr``, ``yr`` onto it, with grid/tick, frame and label helpers."""

    def __init__(
        self,
        canvas: Canvas,
        xr: tuple[float, float],
        yr: tuple[float, float],
        box: tuple[int, int, int, int],
        scale: int = 1,
    ):
        self.c, self.xr, self.yr, self.scale = canvas, xr, yr, scale
        self.left, self.right, self.top, self.bottom = box

    def x(self, v: float) -> float:
        lo, hi = self.xr
        return self.left + (v - lo) / (hi - lo) * (self.right - self.left)

    def y(self, v: float) -> float:
        lo, hi = self.yr
        return self.bottom - (v - lo) / (hi - lo) * (self.bottom - self.top)

    def grid(
        self,
        xticks: Sequence[float],
        yticks: Sequence[float],
        xfmt: Callable[[float], str] = _fmt,
        yfmt: Callable[[float], str] = _fmt,
    ) -> None:
        """Light grid lines at the ticks, x labels centred below the plot, y labels to its left."""
        c, s = self.c, self.scale
        for v in xticks:
            x, label = self.x(v), xfmt(v)
            c.line(x, self.top, x, self.bottom, LIGHT)
            c.text(int(x - Canvas.text_width(label, s) / 2), self.bottom + 5 * s, label, BLACK, s)
        for v in yticks:
            y, label = self.y(v), yfmt(v)
            c.line(self.left, y, self.right, y, LIGHT)
            x = max(self.left - 5 * s - Canvas.text_width(label, s), 0)
            c.text(x, int(y - 3.5 * s), label, BLACK, s)

    def frame(self) -> None:
        """The left and bottom axis lines."""
        self.c.line(self.left, self.top, self.left, self.bottom, GREY)
        self.c.line(self.left, self.bottom, self.right, self.bottom, GREY)

    def labels(self, xlabel: str, ylabel: str = "", title: str = "") -> None:
        """``xlabel`` centred under the tick labels, ``ylabel`` bottom-up at the left edge,
        ``title`` centred at the top."""
        c, s = self.c, self.scale
        mid_x, mid_y = (self.left + self.right) / 2, (self.top + self.bottom) / 2
        c.text(int(mid_x - Canvas.text_width(xlabel, s) / 2), self.bottom + 20 * s, xlabel, scale=s)
        if ylabel:
            c.text(
                6 * s, int(mid_y + Canvas.text_width(ylabel, s) / 2), ylabel, scale=s, vertical=True
            )
        if title:
            c.text(int(mid_x - Canvas.text_width(title, s) / 2), 7 * s, title, scale=s)


def _software() -> str:
    return f"echofast {__version__}"


def save_png(path: str | os.PathLike, data: bytes) -> Path:
    """Write already-encoded PNG ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# ---- training loss ---------------------------------------------------------------------------


def _centred_mean(ys: Sequence[float], half: int) -> list[float]:
    """Moving average over ``2 * half + 1`` points centred on each point (shorter at the ends)."""
    csum = np.concatenate([[0.0], np.cumsum(np.asarray(ys, dtype=np.float64))])
    i = np.arange(len(ys))
    lo, hi = np.maximum(0, i - half), np.minimum(len(ys), i + half + 1)
    return ((csum[hi] - csum[lo]) / (hi - lo)).tolist()


def loss_plot_png(
    steps: Sequence[int], losses: Sequence[float], width: int = 800, height: int = 480
) -> bytes:
    """A PNG line plot of loss against step: raw (light) and smoothed (dark) curves, y on a log
    scale when the losses span more than a decade, tick labels on both axes."""
    canvas = Canvas(width, height)
    pts = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    ax = Axes(canvas, (0.0, 1.0), (0.0, 1.0), (70, width - 20, 20, height - 40))
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x_lo, x_hi = min(xs), max(xs)
        y_lo, y_hi = min(ys), max(ys)
        log_y = y_lo > 0 and y_hi / y_lo > 10
        fy = math.log10 if log_y else (lambda v: v)
        a, b = fy(y_lo), fy(y_hi)
        if b - a < 1e-12:
            a, b = a - 0.5, b + 0.5
        ax.xr, ax.yr = (x_lo, x_lo + max(x_hi - x_lo, 1)), (a, b)
        ax.grid(
            even_ticks(*ax.xr, 4),
            even_ticks(a, b, 4),
            xfmt=lambda v: str(round(v)),
            yfmt=lambda v: f"{10**v if log_y else v:.3g}",
        )
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            canvas.line(ax.x(x0), ax.y(fy(y0)), ax.x(x1), ax.y(fy(y1)), LIGHT_BLUE)
        if len(pts) > 2:  # centred moving average over ~2% of the points (no lag)
            smooth = [fy(v) for v in _centred_mean(ys, len(pts) // 100)]
            for i in range(len(pts) - 1):
                canvas.line(
                    ax.x(xs[i]), ax.y(smooth[i]), ax.x(xs[i + 1]), ax.y(smooth[i + 1]), BLUE, 2
                )
        desc = f"training loss vs step; x {x_lo}..{x_hi}; y {y_lo:.6g}..{y_hi:.6g}" + (
            " (log scale)" if log_y else ""
        )
    else:
        desc = "training loss vs step; no finite values"
    ax.frame()
    return canvas.png({"Title": "loss", "Description": desc, "Software": _software()})


def write_loss_plot(
    path: str | os.PathLike,
    steps: Sequence[int],
    losses: Sequence[float],
    width: int = 800,
    height: int = 480,
) -> Path:
    """Write :func:`loss_plot_png` to ``path`` atomically."""
    return save_png(path, loss_plot_png(steps, losses, width, height))


# ---- histograms and text pages -----------------------------------------------------------------


def histogram_png(
    series: Sequence[tuple[str, np.ndarray, RGB]],
    edges: np.ndarray,
    *,
    tau: float | None,
    title: Sequence[str],
    xlabel: str = "MAX PEARSON CORRELATION WITH A REAL FRAME",
    name: str = "privacy report",
    width: int = 900,
    height: int = 560,
) -> bytes:
    """Density histograms of each ``(label, values, colour)`` over ``edges``, drawn as outlined
    steps (the first also filled lightly), a dashed vertical line at ``tau``, the ``title``
    lines, a legend and ``xlabel``; ``name`` is the PNG's Title."""
    canvas = Canvas(width, height)
    for i, line in enumerate(title):
        canvas.text(12, 10 + 12 * i, line)
    densities = []
    widths = np.diff(edges)
    for _, values, _ in series:
        counts, _ = np.histogram(np.asarray(values, dtype=np.float64), bins=edges)
        total = counts.sum()
        densities.append(counts / (total * widths) if total else counts * 0.0)
    peak = max([float(d.max()) for d in densities if len(d)] + [1e-12])
    lo, hi = float(edges[0]), float(edges[-1])
    top = 16 + 12 * len(title) + 20
    ax = Axes(canvas, (lo, hi), (0.0, peak), (60, width - 20, top, height - 50))

    def px(v: float) -> int:
        return round(ax.x(v))

    def py(d: float) -> int:
        return round(ax.y(d))

    ax.grid(
        even_ticks(lo, hi, 5),
        even_ticks(0.0, peak, 4),
        xfmt=lambda v: f"{v:.3f}",
        yfmt=lambda v: f"{v:.3g}",
    )
    bottom = ax.bottom
    for n, ((_, _, rgb), d) in enumerate(zip(series, densities)):
        if n == 0:
            light = tuple(int(255 - (255 - c) * 0.25) for c in rgb)
            for i, v in enumerate(d):
                if v > 0:
                    canvas.fill(px(edges[i]), py(v), px(edges[i + 1]), bottom, light)
        prev = bottom
        for i, v in enumerate(d):
            x0, x1, y = px(edges[i]), px(edges[i + 1]), py(v)
            canvas.line(x0, prev, x0, y, rgb, width=2)
            canvas.line(x0, y, x1, y, rgb, width=2)
            prev = y
        canvas.line(px(edges[-1]), prev, px(edges[-1]), bottom, rgb, width=2)
    if tau is not None and lo <= tau <= hi:
        x = px(tau)
        canvas.line(x, ax.top, x, bottom, BLACK, width=2, dash=4)
        canvas.text(min(x + 4, width - 120), ax.top + 2, f"TAU = {tau:.5f}")
    ax.frame()
    ax.labels(xlabel)
    lx = ax.left + 10
    for label, _, rgb in series:
        canvas.fill(lx, ax.top + 14, lx + 14, ax.top + 22, rgb)
        lx = canvas.text(lx + 20, ax.top + 15, label) + 20
    desc = "; ".join(title)
    return canvas.png({"Title": name, "Description": desc, "Software": _software()})


def text_png(
    lines: Sequence[str], *, width: int = 900, scale: int = 2, name: str = "privacy report"
) -> bytes:
    """A PNG holding only ``lines`` of text, the first in red (e.g. "NOT PRIVACY-FILTERED");
    ``name`` is the PNG's Title."""
    height = 30 + len(lines) * 9 * scale * 2
    canvas = Canvas(width, height)
    for i, line in enumerate(lines):
        canvas.text(20, 20 + i * 18 * scale, line, RED if i == 0 else BLACK, scale)
    return canvas.png({"Title": name, "Description": " ".join(lines), "Software": _software()})


# ---- EF predictions --------------------------------------------------------------------------


def _pad_range(values: np.ndarray, frac: float = 0.05) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    pad = max((hi - lo) * frac, 1.0)
    return lo - pad, hi + pad


def _ef_axes(canvas: Canvas, xr, yr, xlabel: str, ylabel: str, title: str) -> Axes:
    ax = Axes(canvas, xr, yr, (90, canvas.width - 30, 50, canvas.height - 70), scale=2)
    ax.grid(nice_ticks(*xr), nice_ticks(*yr))
    ax.frame()
    ax.labels(xlabel, ylabel, title)
    return ax


def scatter_png(actual: Sequence[float], predicted: Sequence[float], title: str = "") -> bytes:
    """Predicted vs actual EF with the identity line (equal axes)."""
    y, p = np.asarray(actual, float), np.asarray(predicted, float)
    rng = _pad_range(np.concatenate([y, p]))
    canvas = Canvas(640, 640)
    ax = _ef_axes(canvas, rng, rng, "ACTUAL EF (%)", "PREDICTED EF (%)", title)
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
    ax = _ef_axes(
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
        canvas.text(
            ax.right - Canvas.text_width(text, 2) - 4, int(ax.y(value)) - 18, text, color, 2
        )
    for a, b in zip(mean, diff):
        canvas.dot(ax.x(a), ax.y(b), BLACK, radius=2)
    desc = f"Bland-Altman of {len(y)} videos: bias {bias:.4g}, SD {sd:.4g}, limits of agreement "
    desc += f"{lines[0]:.4g} .. {lines[2]:.4g}"
    return canvas.png(
        {"Title": title or "bland-altman", "Description": desc, "Software": _software()}
    )
