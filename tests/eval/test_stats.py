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
