"""Shift-tolerant matching (``shift_tolerance``): the views, the max over views, the calibration
under the same rule, a moved copy matched as an exact copy, the cache and the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echofast.privacy import PrivacyFilter, ReIdentificationModel, unit_rows
from echofast.privacy.data import (
    ShiftToleranceError,
    check_shift_tolerance,
    max_shift_tolerance,
    shift_offsets,
    shifted_view,
    translate,
)
from echofast.privacy.filter import (
    Calibration,
    calibrate,
    embed,
    max_correlation_views,
)
from echofast.privacy.model import normalize_clip


def test_offsets_and_views():
    assert shift_offsets(0) == [(0, 0)]
    one = shift_offsets(1)
    assert one[0] == (0, 0) and len(one) == len(set(one)) == 9
    assert {abs(dy) + abs(dx) for dy, dx in one} == {0, 1, 2}
    with pytest.raises(ValueError, match="shift tolerance"):
        shift_offsets(-1)
    x = torch.randn(5, 4, 7, 7)
    assert shifted_view(x, 0, 0, "frame") is x
    moved = shifted_view(x, 1, -1, "frame")
    assert torch.equal(moved, normalize_clip(translate(x, 1, -1), "frame"))
    assert torch.equal(moved[2], normalize_clip(translate(x[2], 1, -1)[None], "frame")[0])
    assert torch.equal(shifted_view(x, 0, 1, "clip"), translate(x, 0, 1))


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 3), (6, 6), (7, 7), (6, 9), (12, 5)])
def test_tolerance_range_leaves_an_interior(hw):
    """R replaces the outer R-pixel ring: every view works up to (min(h, w) - 1) // 2, and one
    more is refused naming the option and the frame size (it failed inside torch)."""
    shape = (4, *hw)
    most = max_shift_tolerance(shape)
    assert most == (min(hw) - 1) // 2 and 2 * most < min(hw) <= 2 * (most + 1)
    x = torch.randn(3, *shape)
    for dy, dx in shift_offsets(most):
        assert shifted_view(x, dy, dx, "frame", most).shape == x.shape
    assert check_shift_tolerance(most, shape, option="--shift-tolerance") == most
    h, w = hw
    message = rf"--shift-tolerance {most + 1}: .* {h}x{w} latent frames .* at most {most}"
    with pytest.raises(ShiftToleranceError, match=message):
        check_shift_tolerance(most + 1, shape, option="--shift-tolerance")


@pytest.mark.parametrize(
    ("tolerance", "message"),
    [
        (-1, "must be >= 0, got -1"),
        (True, "must be an int"),
        (1.0, "must be an int"),
        ("1", "must be an int >= 0, got .1."),
    ],
)
def test_tolerance_must_be_an_int_at_least_zero(tolerance, message):
    with pytest.raises(ShiftToleranceError, match=f"^--opt {message}"):
        check_shift_tolerance(tolerance, (4, 6, 6), option="--opt")


def test_filter_refuses_a_tolerance_its_frames_do_not_allow(model):
    gallery = unit_rows(torch.randn(2, 32))
    args = (model, gallery, ["a", "b"], np.zeros(2, dtype=np.int64), Calibration(0.9, 95.0, []))
    kw = dict(frame_step=0, num_test_frames=1, num_train_clips=2, num_test_clips=1)
    assert PrivacyFilter(*args, **kw, frame_shape=(4, 6, 6), shift_tolerance=2).shift_tolerance == 2
    with pytest.raises(ShiftToleranceError, match=r"shift_tolerance 3: .* 6x6 latent frames"):
        PrivacyFilter(*args, **kw, frame_shape=(4, 6, 6), shift_tolerance=3)


def test_max_over_views_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    views = [unit_rows(torch.randn(37, 16, generator=g)) for _ in range(4)]
    gallery = unit_rows(torch.randn(300, 16, generator=g))
    v, i = max_correlation_views(views, gallery)
    sims = np.stack([(w @ gallery.T).numpy() for w in views])  # (views, Q, G)
    assert np.allclose(v.numpy(), sims.max(axis=(0, 2)), atol=1e-6)
    best_view = sims.max(axis=2).argmax(axis=0)
    assert (i.numpy() == sims[best_view, np.arange(37)].argmax(axis=1)).all()
    cal = calibrate(views, gallery, 90)
    assert cal.tau == pytest.approx(np.percentile(sims.max(axis=(0, 2)), 90), abs=1e-6)


def _frames(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return normalize_clip(torch.rand(n, 4, 14, 14, generator=g), "frame")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ReIdentificationModel(
        layers=(1, 1, 1, 1), width=8, n_features=32, normalization="frame"
    ).eval()


def _filter(model, gallery: torch.Tensor, tolerance: int) -> PrivacyFilter:
    unit = unit_rows(embed(model, shifted_view(gallery, 0, 0, "frame", tolerance)))
    n = gallery.shape[0]
    return PrivacyFilter(
        model,
        unit,
        [f"clip{k}" for k in range(n)],
        np.zeros(n, dtype=np.int64),
        Calibration(tau=0.999, percentile=95.0, values=np.zeros(1)),
        frame_step=0,
        num_test_frames=1,
        num_train_clips=n,
        num_test_clips=1,
        frame_shape=gallery.shape[1:],
        shift_tolerance=tolerance,
    )


def test_moved_copy_matches_its_source_exactly(model, tmp_path):
    gallery = _frames(12, 1)
    moved = normalize_clip(translate(gallery[[3, 7]], 1, 0), "frame")
    exact_v, _ = _filter(model, gallery, 0).score_frames(moved)
    flt = _filter(model, gallery, 1)
    v, i = flt.score_frames(moved)
    assert (v > 1 - 1e-5).all() and list(i) == [3, 7]
    assert (exact_v < 1 - 1e-3).all()  # without tolerance the moved copies are not exact
    plain, _ = flt.score_frames(gallery)
    assert (plain > 1 - 1e-5).all()  # the identity view comes first: exact copies unchanged
    path = flt.save(tmp_path / "f.safetensors")
    again = PrivacyFilter.load(path, model)
    assert again.shift_tolerance == 1
    assert np.array_equal(again.score_frames(moved)[0], v)


def test_calibration_uses_the_same_rule(model, phantom_latents):
    """τ's values = brute force: each TRAIN frame's views (moved, ringed, normalised again) vs
    the ringed TEST frames, max over views and TEST frames."""
    from echofast.privacy.data import load_split_frames

    f1 = PrivacyFilter.from_reference(model, phantom_latents, frame_step=0, shift_tolerance=1)
    train, test = (
        load_split_frames(phantom_latents, split, frame_step=0, normalization="frame").frames
        for split in ("TRAIN", "TEST")
    )
    t = unit_rows(embed(model, shifted_view(test, 0, 0, "frame", 1)))
    sims = torch.stack(
        [
            unit_rows(embed(model, shifted_view(train, dy, dx, "frame", 1))) @ t.T
            for dy, dx in shift_offsets(1)
        ]
    )
    want = sims.amax(dim=(0, 2)).double().numpy()
    assert np.allclose(f1.calibration.values, want, atol=1e-6)
    assert f1.tau == pytest.approx(np.percentile(want, 95), abs=1e-6)


def test_report_and_generate_key(trained_reid, phantom_latents):
    from echofast.pipelines.dataset import GenerateConfig
    from echofast.privacy.report import setup_filter

    _, folder = trained_reid
    setup = setup_filter(
        folder, phantom_latents, frame_step=4, auc_threshold=0.0, shift_tolerance=1
    )
    assert setup.filter.shift_tolerance == 1
    base = dict(weights="w", out="o", num_videos=1, privacy="p", reference_latents="r")
    plain = GenerateConfig(**base).identity({}, None, privacy={})
    assert "privacy_shift_tolerance" not in plain
    moved = GenerateConfig(**base, privacy_shift_tolerance=1).identity({}, None, privacy={})
    assert moved["privacy_shift_tolerance"] == 1
