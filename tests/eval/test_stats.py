"""Fréchet distance, feature statistics and Inception Score against NumPy brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echofast.eval.stats import FeatureStats, frechet_distance, inception_score


def numpy_frechet(mu1, s1, mu2, s2) -> float:
    """Brute force: tr((S1 S2)^1/2) as the sum of the square roots of the (complex) eigenvalues
    of the non-symmetric product S1 S2 (NumPy's general eigensolver)."""
    ev = np.linalg.eigvals(s1 @ s2).astype(complex)
    tr_sqrt = np.sqrt(ev).sum().real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def random_gaussian(rng, d, n, scale=1.0, shift=0.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * scale + shift
    return x.mean(0), np.cov(x, rowvar=False, bias=True), x


@pytest.mark.parametrize("d,n", [(7, 50), (33, 200), (40, 25)])  # the last is rank-deficient
def test_frechet_matches_numpy_bruteforce(d, n):
    rng = np.random.default_rng(d)
    mu1, s1, _ = random_gaussian(rng, d, n)
    mu2, s2, _ = random_gaussian(rng, d, n, scale=1.3, shift=0.4)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = numpy_frechet(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-7, abs=1e-7 * np.trace(s1))


def test_frechet_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(5)
    mu1, s1, _ = random_gaussian(rng, 16, 100)
    mu2, s2, _ = random_gaussian(rng, 16, 100, shift=1.0)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7)


def test_identical_sets_give_zero():
    rng = np.random.default_rng(0)
    mu, s, _ = random_gaussian(rng, 64, 300)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)


def test_mean_shift_closed_form_and_monotone():
    rng = np.random.default_rng(1)
    mu, s, _ = random_gaussian(rng, 12, 80)
    delta = rng.standard_normal(12)
    values = [frechet_distance(mu, s, mu + t * delta, s) for t in (0.25, 0.5, 1.0, 2.0)]
    for t, v in zip((0.25, 0.5, 1.0, 2.0), values):
        assert v == pytest.approx(t * t * (delta @ delta), rel=1e-6)
    assert values == sorted(values)


def test_more_shifted_samples_are_farther():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((500, 10))
    stats = []
    for shift in (0.0, 0.3, 1.0):
        other = rng.standard_normal((500, 10)) * (1 + shift) + shift
        stats.append(
            frechet_distance(
                base.mean(0), np.cov(base.T, bias=True), other.mean(0), np.cov(other.T, bias=True)
            )
        )
    assert stats[0] < stats[1] < stats[2]


def test_feature_stats_streaming_equals_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((103, 9)).astype(np.float32) * 3 + 2
    fs = FeatureStats(9)
    for lo, hi in ((0, 1), (1, 40), (40, 103)):
        fs.update(torch.from_numpy(x[lo:hi]))
    mu, cov = fs.mean_cov()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu.numpy(), x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x64, rowvar=False, bias=True), atol=1e-10)
    assert fs.count == 103 and mu.dtype == torch.float64
    with pytest.raises(ValueError):
        fs.update(torch.zeros(2, 8))


def numpy_inception_score(p: np.ndarray, splits: int) -> tuple[float, float]:
    scores = []
    n = len(p)
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        py = part.mean(0)
        kl = [sum(r[j] * (np.log(r[j]) - np.log(py[j])) for j in range(len(r))) for r in part]
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_uniform_is_one():
    p = torch.full((50, 7), 1 / 7)
    mean, std = inception_score(p, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_one_hot_counts_classes():
    p = torch.eye(5).repeat(4, 1)  # each split of 5 rows holds 5 distinct confident classes
    mean, std = inception_score(p, splits=4)
    assert mean == pytest.approx(5.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_matches_bruteforce():
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.full(6, 0.3), size=53)
    ours = inception_score(torch.from_numpy(p), splits=5)
    ref = numpy_inception_score(p, 5)
    assert ours == pytest.approx(ref, rel=1e-10)


def test_feature_stats_without_features_refuses_a_mean():
    with pytest.raises(ValueError, match="no features"):
        FeatureStats(4).mean_cov()
    fs = FeatureStats(4)
    fs.update(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="no features"):
        fs.mean_cov()


def test_feature_stats_accumulate_in_float64():
    """float32 features whose spread is tiny next to their mean: float32 sums would lose it."""
    x = (1e4 + torch.arange(6, dtype=torch.float64)[:, None] * torch.ones(1, 2)).float()
    fs = FeatureStats(2)
    for row in x:
        fs.update(row[None])
    _, cov = fs.mean_cov()
    ref = np.cov(x.double().numpy(), rowvar=False, bias=True)
    np.testing.assert_allclose(cov.numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize(
    "shapes",
    [
        ((3,), (3, 3), (4,), (3, 3)),  # means of different sizes
        ((3,), (3, 3), (3,), (4, 4)),  # covariances of different sizes
        ((3,), (4, 4), (3,), (4, 4)),  # covariance not (d, d)
        ((3,), (3, 2), (3,), (3, 2)),  # not square
    ],
)
def test_frechet_refuses_mismatched_shapes(shapes):
    mu1, s1, mu2, s2 = (np.eye(*s) if len(s) == 2 else np.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, s1, mu2, s2)


def test_frechet_uses_the_symmetric_part_of_each_covariance():
    """Covariances accumulated in low precision are symmetric only up to round-off; the distance
    is that of their symmetric parts (both triangles count, not just one)."""
    rng = np.random.default_rng(6)
    mu1, s1, _ = random_gaussian(rng, 8, 60)
    mu2, s2, _ = random_gaussian(rng, 8, 60, shift=0.5)
    skew = np.triu(rng.standard_normal((8, 8)) * 0.05 * np.abs(s1).max(), 1)
    ref = numpy_frechet(mu1, s1, mu2, s2)
    for a, b in ((s1 + skew - skew.T, s2), (s1, s2 - skew + skew.T)):
        assert frechet_distance(mu1, a, mu2, b) == pytest.approx(ref, rel=1e-9)


def test_frechet_keeps_float64_precision():
    """Means far from zero that differ below float32 resolution: the distance is still the
    squared difference of the means (the covariances are equal)."""
    rng = np.random.default_rng(7)
    mu1 = 1e4 + rng.standard_normal(10)
    delta = 1e-4 * rng.standard_normal(10)
    _, s, _ = random_gaussian(rng, 10, 40)
    for mu2 in (mu1 + delta, torch.from_numpy(mu1 + delta)):
        assert frechet_distance(mu1, s, mu2, s) == pytest.approx(delta @ delta, rel=1e-4)


def test_inception_score_argument_checks():
    p = torch.full((6, 3), 1 / 3)
    assert inception_score(p, splits=6) == pytest.approx((1.0, 0.0))  # one row per split
    assert inception_score(p, splits=1) == pytest.approx((1.0, 0.0))
    for bad in (
        lambda: inception_score(p, splits=7),
        lambda: inception_score(p, splits=0),
        lambda: inception_score(torch.full((12,), 0.5), splits=2),
    ):
        with pytest.raises(ValueError, match="need"):
            bad()
