"""The re-identification metrics against brute force: the bootstrap AUC interval resampled pair by
pair, and the Wilson interval against its closed form with tabulated normal quantiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from echofast.privacy.metrics import bootstrap_auc, roc_auc, wilson_interval


def _brute_auc(y, s) -> float:
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _brute_bootstrap(y, s, n_bootstrap, ci, seed):
    """Resample the pairs with replacement (multinomial counts from ``default_rng(seed)``), the
    AUC of each resample by the pairwise count, single-class resamples left out, the interval
    at ``int(tail·m)`` and ``int((1 − tail)·m)`` of the m sorted values."""
    n = len(y)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap)
    boot = []
    for c in counts:
        idx = np.repeat(np.arange(n), c)
        if y[idx].all() or not y[idx].any():
            continue
        boot.append(_brute_auc(y[idx], s[idx]))
    boot = np.sort(boot)
    tail = (1 - ci) / 2
    m = len(boot)
    return boot[int(tail * m)], boot[min(int((1 - tail) * m), m - 1)], boot.mean(), m


@pytest.mark.parametrize(
    "n,n_pos,n_bootstrap,ci,chunk",
    [(40, 17, 400, 0.95, 64), (9, 2, 300, 0.9, 500), (25, 12, 250, 0.5, 1)],
)
def test_bootstrap_interval_matches_brute_force_resampling(n, n_pos, n_bootstrap, ci, chunk):
    rng = np.random.default_rng(n)
    y = np.zeros(n, bool)
    y[rng.choice(n, n_pos, replace=False)] = True
    s = np.round(rng.normal(size=n) + y, 1)  # ties
    got = bootstrap_auc(y, s, n_bootstrap=n_bootstrap, ci=ci, seed=n + 1, chunk=chunk)
    lo, hi, mean, used = _brute_bootstrap(y, s, n_bootstrap, ci, n + 1)
    assert got.auc == pytest.approx(_brute_auc(y, s), abs=1e-12)
    assert (got.ci_low, got.ci_high) == pytest.approx((lo, hi), abs=1e-12)
    assert got.bootstrap_mean == pytest.approx(mean, abs=1e-12)
    assert got.n_bootstrap_used == used and got.n_bootstrap == n_bootstrap
    assert (got.n_pairs, got.n_positive, got.n_negative) == (n, n_pos, n - n_pos)
    if n_pos == 2:
        assert used < n_bootstrap  # some resamples drew no positive pair


def test_auc_needs_both_classes():
    for y in ([1, 1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="one positive and one negative"):
            roc_auc(y, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        bootstrap_auc([1, 0], [0.5, 0.5, 0.5])
    assert roc_auc([0, 1], [0.2, 0.2]) == 0.5


# two-sided standard normal quantiles z_{(1 + level)/2}
_Z = {0.95: 1.959963984540054, 0.9: 1.6448536269514722, 0.99: 2.5758293035489004}


def _wilson(k, n, z):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@pytest.mark.parametrize("level", sorted(_Z))
def test_wilson_interval_closed_form(level):
    rng = np.random.default_rng(int(level * 100))
    for n in (1, 7, 100, 2000):
        for k in {0, n, *rng.integers(0, n + 1, 5).tolist()}:
            got = wilson_interval(k, n, level)
            assert got == pytest.approx(_wilson(k, n, _Z[level]), abs=1e-9)
    # a tabulated value (Newcombe 1998, method 3: 81/263)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
