"""The PNG figure kit: canvas primitives, tick helpers, axes and the numbers the plots carry."""

from __future__ import annotations

import numpy as np
import pytest
from train.test_plot import decode_png

from echofast import __version__, figures
from echofast.figures import (
    BLACK,
    RED,
    Axes,
    Canvas,
    bland_altman_png,
    even_ticks,
    histogram_png,
    loss_plot_png,
    nice_ticks,
    scatter_png,
    text_png,
)


def painted(c: Canvas) -> np.ndarray:
    return (c.px != 255).any(-1)


@pytest.fixture
def made(monkeypatch) -> list[Axes]:
    """Every :class:`Axes` the plots create, in order."""
    created = []

    class RecordingAxes(Axes):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            created.append(self)

    monkeypatch.setattr(figures, "Axes", RecordingAxes)
    return created


def test_dot_is_centred_on_the_rounded_point_and_clipped_at_the_edges():
    c = Canvas(20, 20)
    c.dot(5.6, 7.4, BLACK, radius=2)
    ys, xs = np.nonzero(painted(c))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (5, 9, 4, 8)
    assert (ys.mean(), xs.mean()) == (7, 6)
    # a dot over the corner is the in-canvas part of the same dot drawn further in
    corner, inside = Canvas(20, 20), Canvas(30, 30)
    corner.dot(0, 1, BLACK, radius=3)
    inside.dot(5, 6, BLACK, radius=3)
    np.testing.assert_array_equal(corner.px, inside.px[5:25, 5:25])


@pytest.mark.parametrize("radius", range(5))
def test_dot_is_the_pixels_within_half_a_pixel_of_the_radius(radius):
    c = Canvas(11, 11)
    c.dot(5, 5, BLACK, radius=radius)
    d = np.arange(11) - 5
    expected = np.hypot(d[:, None], d[None, :]) <= radius + 0.5
    np.testing.assert_array_equal(painted(c), expected)


def test_lines_fills_and_dashes():
    c = Canvas(30, 20)
    c.line(3, 3, 3, 3, BLACK)  # a zero-length line is its one pixel
    assert painted(c)[3, 3] and painted(c).sum() == 1
    c = Canvas(30, 20)
    c.line(2, 10, 15, 10, BLACK, width=3)  # a square pen centred on the line
    ys, xs = np.nonzero(painted(c))
    assert sorted(set(ys)) == [9, 10, 11] and sorted(set(xs)) == list(range(1, 17))
    c = Canvas(30, 20)
    c.line(0, 5, 23, 5, BLACK, dash=4)
    row = painted(c)[5]
    assert row[0] and row[23] and not row[24:].any()  # starts and ends with a drawn run
    assert 8 <= row.sum() <= 16 and not row[4:8].all()
    c = Canvas(30, 20)
    c.fill(5, 7, 2, 3, BLACK)  # corners in any order, both included
    expected = np.zeros((20, 30), bool)
    expected[3:8, 2:6] = True
    np.testing.assert_array_equal(painted(c), expected)


def test_text_case_unknown_characters_advance_and_width():
    def drawn(s, scale=1):
        c = Canvas(80, 30)
        end = c.text(2, 3, s, scale=scale)
        return c, end

    lower, upper = drawn("ef"), drawn("EF")
    np.testing.assert_array_equal(lower[0].px, upper[0].px)
    np.testing.assert_array_equal(drawn("é")[0].px, drawn("?")[0].px)
    c, end = drawn("EF", scale=2)
    assert end == 2 + 6 * 2 * 2
    xs = np.nonzero(painted(c).any(0))[0]
    assert xs.max() - xs.min() + 1 == Canvas.text_width("EF", 2) == 22
    assert Canvas.text_width("", 3) == 0


def test_vertical_text_reads_bottom_up():
    across, up = Canvas(40, 40), Canvas(40, 40)
    across.text(10, 10, "LF", scale=2)
    up.text(10, 30, "LF", scale=2, vertical=True)
    a, b = painted(across), painted(up)
    ya, xa = np.nonzero(a)
    yb, xb = np.nonzero(b)
    box_a = a[ya.min() : ya.max() + 1, xa.min() : xa.max() + 1]
    box_b = b[yb.min() : yb.max() + 1, xb.min() : xb.max() + 1]
    np.testing.assert_array_equal(box_b, np.rot90(box_a))  # a quarter turn anticlockwise


@pytest.mark.parametrize("seed", range(6))
def test_nice_ticks_cover_the_range_in_round_steps(seed):
    rng = np.random.default_rng(seed)
    lo = float(rng.uniform(-500, 500)) * 10.0 ** int(rng.integers(-3, 3))
    hi = lo + float(rng.uniform(0.01, 1000)) * 10.0 ** int(rng.integers(-2, 2))
    count = int(rng.integers(3, 9))
    ticks = nice_ticks(lo, hi, count)
    raw = (hi - lo) / (count - 1)
    step = min(m * 10.0**k for m in (1, 2, 5) for k in range(-8, 8) if m * 10.0**k >= raw)
    assert np.diff(ticks) == pytest.approx([step] * (len(ticks) - 1), rel=1e-9)
    assert lo - 1e-9 * step <= ticks[0] < lo + step and hi - step < ticks[-1] <= hi + 1e-9 * step
    assert nice_ticks(0, 20, 6) == [0, 5, 10, 15, 20]


def test_even_ticks_and_labels():
    for lo, hi, n in [(0.0, 1.0, 4), (-3.5, 17.25, 5), (2.0, 2.0, 1)]:
        np.testing.assert_allclose(even_ticks(lo, hi, n), np.linspace(lo, hi, n + 1))
    assert figures._fmt(20.0) == "20" and figures._fmt(-3.0) == "-3" and figures._fmt(2.5) == "2.5"


def test_axes_map_data_onto_the_box_y_up():
    ax = Axes(Canvas(100, 80), (10.0, 30.0), (-1.0, 1.0), (20, 90, 5, 65))
    assert (ax.x(10), ax.x(30), ax.x(20)) == (20, 90, 55)
    assert (ax.y(-1), ax.y(1), ax.y(0)) == (65, 5, 35)


@pytest.mark.parametrize("n,half", [(1, 0), (7, 2), (50, 3), (9, 10)])
def test_centred_mean_is_a_truncated_moving_average(n, half):
    ys = np.random.default_rng(n).normal(size=n)
    expected = [ys[max(0, i - half) : i + half + 1].mean() for i in range(n)]
    np.testing.assert_allclose(figures._centred_mean(ys, half), expected, rtol=1e-12)


def test_loss_plot_uses_a_log_scale_beyond_one_decade_only():
    def description(losses):
        return decode_png(loss_plot_png(range(len(losses)), losses, 200, 100))[3]["Description"]

    assert "log scale" not in description([1.0, 5.0, 10.0])
    assert "log scale" in description([1.0, 5.0, 10.5])
    assert "y 1..2" in description([1.0, float("inf"), 2.0, float("-inf")])


def test_loss_curves_raw_and_centred_moving_average(monkeypatch, made):
    lines = []

    def record(self, x0, y0, x1, y1, rgb, width=1, dash=0):
        lines.append((rgb, (x0, y0, x1, y1)))

    monkeypatch.setattr(Canvas, "line", record)
    rng = np.random.default_rng(1)
    steps = np.arange(5, 305)
    losses = 0.123456789 + rng.uniform(0, 0.5, 300)
    text = decode_png(loss_plot_png(steps.tolist(), losses.tolist()))[3]
    ax = made[-1]
    raw = [seg for rgb, seg in lines if rgb == figures.LIGHT_BLUE]
    smooth = [seg for rgb, seg in lines if rgb == figures.BLUE]
    assert raw[0][:2] == (ax.x(5), ax.y(losses[0])) and raw[-1][2:] == (ax.x(304), ax.y(losses[-1]))
    # ~2% of the points: 300 // 100 = 3 on each side, fewer at the ends
    average = [losses[max(0, i - 3) : i + 4].mean() for i in range(300)]
    assert [seg[1] for seg in smooth] == pytest.approx([ax.y(v) for v in average[:-1]])
    assert smooth[-1][3] == pytest.approx(ax.y(average[-1]))
    span = text["Description"].split("; y ")[1].split("..")
    assert float(span[0]) == pytest.approx(losses.min(), rel=1e-5)
    assert float(span[1]) == pytest.approx(losses.max(), rel=1e-5)


def test_histogram_heights_are_densities(made):

    rng = np.random.default_rng(0)
    edges = np.array([0.0, 0.1, 0.25, 0.5, 0.55, 1.0])
    a, b = rng.uniform(0, 1, 300), rng.beta(5, 2, 90)
    histogram_png([("A", a, BLACK), ("B", b, RED)], edges, tau=None, title=["T"])
    peak = max(np.histogram(v, bins=edges, density=True)[0].max() for v in (a, b))
    assert made[-1].yr == (0.0, pytest.approx(peak, rel=1e-12))
    # a threshold on the last edge is still drawn
    without = histogram_png([("A", a, BLACK)], edges, tau=None, title=["T"])
    assert histogram_png([("A", a, BLACK)], edges, tau=1.0, title=["T"]) != without


def test_text_page_starts_in_red():
    width, height, rows, _ = decode_png(text_png(["NOT FILTERED", "DETAIL"], width=200))
    colors = {bytes(r[i : i + 3]) for r in rows for i in range(0, len(r), 3)}
    assert bytes(RED) in colors and bytes(BLACK) in colors


def test_scatter_puts_actual_on_x_and_predicted_on_y(monkeypatch, made):
    dots = []

    monkeypatch.setattr(Canvas, "dot", lambda self, x, y, rgb, radius=0: dots.append((x, y)))
    actual, predicted = np.array([20.0, 35.0, 70.0]), np.array([30.0, 33.0, 61.0])
    text = decode_png(scatter_png(actual, predicted, "MINE"))[3]
    ax = made[-1]
    assert dots == [(ax.x(a), ax.y(p)) for a, p in zip(actual, predicted)]
    assert text["Title"] == "MINE" and "3 videos" in text["Description"]
    assert decode_png(scatter_png([50.0, 50.0], [50.0, 50.0]))[3]["Title"] == "scatter"


def test_bland_altman_numbers():
    rng = np.random.default_rng(3)
    actual = rng.uniform(20, 80, 41)
    predicted = actual + rng.normal(2, 5, 41)
    text = decode_png(bland_altman_png(actual, predicted))[3]
    diff = predicted - actual
    bias, sd = diff.mean(), diff.std(ddof=1)
    expected = (
        f"Bland-Altman of 41 videos: bias {bias:.4g}, SD {sd:.4g}, limits of agreement "
        f"{bias - 1.96 * sd:.4g} .. {bias + 1.96 * sd:.4g}"
    )
    assert text["Description"] == expected and text["Title"] == "bland-altman"


FIGURES = {
    "loss": lambda: loss_plot_png([1, 2, 3], [3.0, 2.0, 1.0], 120, 80),
    "histogram": lambda: histogram_png(
        [("A", np.array([0.2, 0.7]), BLACK)], np.array([0.0, 0.5, 1.0]), tau=None, title=["T"]
    ),
    "scatter": lambda: scatter_png([40.0, 60.0], [45.0, 58.0]),
    "bland_altman": lambda: bland_altman_png([40.0, 60.0], [45.0, 58.0]),
    "text": lambda: text_png(["NOT PRIVACY-FILTERED", "DETAIL"]),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_figure_carries_title_description_and_software(name):
    text = decode_png(FIGURES[name]())[3]
    assert {"Title", "Description", "Software"} <= set(text), name
    assert text["Software"] == f"echofast {__version__}"
