"""The image primitives behind ``measure_ef`` against brute-force numpy references: Gaussian
blur, cross dilation, 4-connected components, hole filling, Otsu's threshold, the moment
length, the running median and the gap-aware quadratic smoothing."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from echofast.data.measure import (
    _dilate,
    _erode,
    _local_quadratic,
    _moment_length,
    _most_overlapping,
    _otsu,
    _running_median,
    _segment,
    _select_lv,
    fill_holes,
    gaussian_blur,
    label_components,
    measure_volumes,
)

NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def _flood(mask: np.ndarray, seeds: list[tuple[int, int]]) -> np.ndarray:
    """(H, W) bool: the pixels of ``mask`` 4-connected to any of ``seeds`` (breadth first)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    queue = deque(s for s in seeds if mask[s])
    for s in queue:
        seen[s] = True
    while queue:
        y, x = queue.popleft()
        for dy, dx in NEIGHBOURS:
            v, u = y + dy, x + dx
            if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                seen[v, u] = True
                queue.append((v, u))
    return seen


def _random_masks(seed: int, shape: tuple[int, int, int], density: float) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


@pytest.mark.parametrize(("seed", "shape"), [(0, (3, 13, 17)), (1, (2, 31, 9)), (2, (1, 1, 23))])
def test_components_match_a_flood_fill(seed, shape):
    """Each component is labelled 1 + the smallest flat index (over the batch) of its pixels;
    components never join across frames or diagonally."""
    mask = _random_masks(seed, shape, 0.55)
    mask.reshape(-1)[0] = True  # a component whose smallest flat index is 0
    labels = label_components(mask)
    expected = np.zeros(mask.shape, dtype=np.int64)
    flat = np.arange(mask.size).reshape(mask.shape)
    for i in range(shape[0]):
        left = mask[i].copy()
        while left.any():
            start = tuple(int(v) for v in np.argwhere(left)[0])
            comp = _flood(left, [start])
            expected[i][comp] = flat[i][comp].min() + 1
            left &= ~comp
    np.testing.assert_array_equal(labels, expected)


def test_components_of_a_long_snake_are_one_label():
    """A one-pixel-wide serpentine (many union-find rounds) is a single component."""
    mask = np.zeros((1, 21, 21), dtype=bool)
    mask[0, ::2] = True
    mask[0, 1::4, -1] = True
    mask[0, 3::4, 0] = True
    labels = label_components(mask)
    assert set(np.unique(labels[mask]).tolist()) == {1}
    assert (labels[~mask] == 0).all()


@pytest.mark.parametrize("seed", [3, 4])
def test_fill_holes_fills_background_not_reached_from_the_border(seed):
    mask = _random_masks(seed, (2, 15, 19), 0.6)
    h, w = mask.shape[1:]
    border = [(y, x) for y in range(h) for x in range(w) if y in (0, h - 1) or x in (0, w - 1)]
    expected = np.stack([~_flood(~m, border) for m in mask])
    np.testing.assert_array_equal(fill_holes(mask), expected)


def test_cross_dilation_and_erosion_match_brute_force():
    mask = _random_masks(5, (2, 11, 14), 0.2)
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    once = padded[:, 1:-1, 1:-1].copy()
    for dy, dx in NEIGHBOURS:
        once |= padded[:, 1 + dy : padded.shape[1] - 1 + dy, 1 + dx : padded.shape[2] - 1 + dx]
    np.testing.assert_array_equal(_dilate(mask), once)
    np.testing.assert_array_equal(_dilate(mask, 2), _dilate(once))
    np.testing.assert_array_equal(_erode(~mask), ~once)


def test_gaussian_blur_matches_a_direct_two_dimensional_sum():
    """Against a direct sum over a wide (4σ) window of exact Gaussian weights, borders
    replicated: the blur keeps the image's level at the borders and its σ."""
    sigma = 1.2
    x = np.random.default_rng(6).uniform(0, 255, (2, 13, 19)).astype(np.float32)
    x[:, :, :5] += 300.0  # a bright band against the left border
    r = int(np.ceil(4 * sigma))
    offsets = np.arange(-r, r + 1)
    g = np.exp(-0.5 * (offsets / sigma) ** 2)
    g /= g.sum()
    padded = np.pad(x.astype(np.float64), ((0, 0), (r, r), (r, r)), mode="edge")
    h, w = x.shape[1:]
    ref = np.zeros(x.shape)
    for i, dy in enumerate(offsets):
        for j, dx in enumerate(offsets):
            ref += g[i] * g[j] * padded[:, r + dy : r + dy + h, r + dx : r + dx + w]
    out = gaussian_blur(x, sigma)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, ref, atol=1.0)
    assert np.abs(out - ref).mean() < 0.2


def _otsu_split(values: np.ndarray) -> int:
    """Brute-force Otsu over integer grey levels: the ``t`` maximising w0·w1·(μ0 − μ1)² of the
    split ``values < t``; returns how many values fall below it."""
    best, best_t = -1.0, None
    for t in range(1, 256):
        low, high = values[values < t], values[values >= t]
        if not low.size or not high.size:
            continue
        score = low.size * high.size * (low.mean() - high.mean()) ** 2
        if score > best * (1 + 1e-12):
            best, best_t = score, t
    return int((values < best_t).sum())


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_otsu_matches_brute_force_on_integer_levels(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate(
        [rng.normal(40, 12, 300 + 50 * seed), rng.normal(150 + 10 * seed, 25, 200)]
    )
    values = np.clip(np.rint(values), 0, 255).astype(np.float32)
    assert int((values < _otsu(values)).sum()) == _otsu_split(values)


def test_moment_length_is_four_sqrt_of_the_largest_covariance_eigenvalue():
    weights = np.random.default_rng(10).random((3, 9, 14))
    weights[1, :, :7] = 0.0
    weights[2] = 0.0
    weights[2, 2, 1] = weights[2, 6, 12] = 1.0  # two points: a diagonal
    out = _moment_length(weights)
    yy, xx = np.mgrid[0:9, 0:14]
    for i, wgt in enumerate(weights):
        cov = np.cov(np.stack([xx.ravel(), yy.ravel()]), aweights=wgt.ravel(), bias=True)
        assert out[i] == pytest.approx(4 * np.sqrt(np.linalg.eigvalsh(cov).max()), rel=1e-9)


def test_running_median_ignores_nans_and_repeats_the_edges():
    x = np.array([5.0, 1.0, 9.0, np.nan, 3.0, np.nan, np.nan, np.nan])
    expected = [5.0, 5.0, 5.0, 6.0, 3.0, 3.0, np.nan, np.nan]
    np.testing.assert_array_equal(_running_median(x, 3), expected)


def test_volume_smoothing_with_gaps_reproduces_a_parabola():
    """Where a frame has at least 4 valid frames within ±2, the local quadratic fit returns a
    parabola exactly; invalid frames are NaN and isolated ones keep their raw value."""
    t = np.arange(14.0)
    y = 3.0 * (t - 6.3) ** 2 + 2.0 * t + 40.0
    valid = np.ones(14, dtype=bool)
    valid[[3, 9, 10, 11]] = False
    out = _local_quadratic(y + 0.0, valid)
    assert np.isnan(out[~valid]).all()
    enough = [i for i in np.flatnonzero(valid) if (valid & (np.abs(t - i) <= 2)).sum() >= 4]
    assert len(enough) >= 5
    np.testing.assert_allclose(out[enough], y[enough], rtol=1e-9)
    lonely = [i for i in np.flatnonzero(valid) if i not in enough]
    assert lonely and all(out[i] == y[i] for i in lonely)


def test_most_overlapping_component_wins_and_its_holes_are_filled():
    """Frame 0: component 1 overlaps the reference by 4 px, component 2 (a ring) by 12 px;
    the ring is chosen, its hole filled. Frame 1 overlaps nothing: empty."""
    labels = np.zeros((2, 12, 12), dtype=np.int64)
    labels[0, 1:3, 1:5] = 1
    labels[0, 5:10, 5:10] = 2
    labels[0, 7, 7] = 0  # the ring's hole
    reference = np.zeros((2, 12, 12), dtype=bool)
    reference[0, 1:10, 1:10] = True
    reference[0, 1:3, 3:5] = False  # 4 px of component 1 remain
    reference[0, 5:10, 8:10] = False  # 14 of the ring's 24 px remain
    out = _most_overlapping(labels, reference)
    expected = np.zeros_like(reference)
    expected[0, 5:10, 5:10] = True
    np.testing.assert_array_equal(out, expected)


def test_lv_is_the_component_with_the_best_area_weighted_by_the_centre_prior():
    """Score area · exp(−(d/D)²) over all frames: a 10×10 component 7.5 px from the prior
    centre (D = 10) scores 100·e^−0.565 ≈ 57 and beats a 5×5 one on the centre (25); the
    reference then picks, in each frame, the component overlapping it most."""
    labels = np.zeros((2, 40, 40), dtype=np.int64)
    labels[0, 18:23, 18:23] = 1  # 5×5 centred on (20, 20)
    labels[1, 23:33, 15:25] = 2  # 10×10 centred on (27.5, 19.5)
    labels[0, 25:31, 16:24] = 3  # smaller, inside the big one's footprint
    labels[0, 27, 19] = 0  # with a hole
    out = _select_lv(labels, (20.0, 20.0), 10.0)
    np.testing.assert_array_equal(out[1], labels[1] == 2)
    expected = labels[0] == 3
    expected[27, 19] = True
    np.testing.assert_array_equal(out[0], expected)
    assert not _select_lv(np.zeros((2, 9, 9), dtype=np.int64), (4.0, 4.0), 3.0).any()


def test_refinement_follows_the_mask_of_the_nearest_frame_that_had_one():
    """Two dark squares in every frame; the previous pass found square A in frame 0, nothing
    in frame 1 and square B in frame 2: frames 0 and 1 (tie: the earlier) follow A, frame 2
    follows B."""
    blurred = np.full((3, 20, 20), 200.0, dtype=np.float32)
    blurred[:, 3:8, 3:8] = blurred[:, 12:17, 12:17] = 10.0
    previous = np.zeros(blurred.shape, dtype=bool)
    previous[0, 3:8, 3:8] = previous[2, 12:17, 12:17] = True
    out = _segment(blurred, np.ones((1, 20, 20), dtype=bool), 100.0, previous)
    for i, square in ((0, np.s_[3:8, 3:8]), (1, np.s_[3:8, 3:8]), (2, np.s_[12:17, 12:17])):
        assert out[i][square].sum() >= 9 and out[i].sum() == out[i][square].sum(), i


@pytest.fixture(scope="module")
def clip():
    from echofast.data.phantom import make_phantom

    return make_phantom(1020, ef=61.6, frames=36, fps=30)


def test_multichannel_clip_is_measured_on_the_channel_mean(clip):
    """(T, C, H, W) input is reduced to its channel mean: channels that differ but average to
    the grey clip measure like it."""
    grey = clip.frames.astype(np.float32)
    rgb = np.stack([np.zeros_like(grey), 1.5 * grey, 1.5 * grey], axis=1)
    a, b = measure_volumes(grey), measure_volumes(rgb)
    assert b.ef == pytest.approx(a.ef, abs=1e-6) and b.threshold == pytest.approx(a.threshold)


def test_single_frame_and_tiny_frames_are_refused(clip):
    with pytest.raises(ValueError, match="T >= 2"):
        measure_volumes(clip.frames[:1])
    with pytest.raises(ValueError, match="T >= 2"):
        measure_volumes(clip.frames[:, :7, :7])


def test_volumes_scale_with_the_cube_of_the_pixel_size(clip):
    px = measure_volumes(clip.frames)
    ml = measure_volumes(clip.frames, pixel_cm=0.37)
    assert ml.edv == pytest.approx(px.edv * 0.37**3, rel=1e-9)
    np.testing.assert_allclose(ml.volumes, px.volumes * 0.37**3, rtol=1e-9)
    assert ml.ef == pytest.approx(px.ef, rel=1e-9) and px.masks is None
