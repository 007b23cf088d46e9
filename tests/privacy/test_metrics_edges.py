"""The bootstrap AUC's documented defaults and argument checks, what it records, and the Wilson
interval at its ends."""

from __future__ import annotations

import math

import numpy as np
import pytest

from echofast.privacy.metrics import bootstrap_auc, wilson_interval


def _pairs(n: int = 30, seed: int = 3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3 == 0
    return y, rng.normal(size=n) + y


def test_bootstrap_defaults_are_the_reference_protocol():
    y, s = _pairs()
    got = bootstrap_auc(y, s)
    assert (got.n_bootstrap, got.ci_level, got.seed) == (10_000, 0.95, 0)
    assert got.to_dict() == bootstrap_auc(y, s, n_bootstrap=10_000, ci=0.95, seed=0).to_dict()
    assert got.n_bootstrap_used == 10_000
    assert got.ci_low < got.auc < got.ci_high


def test_bootstrap_records_its_seed_and_level():
    y, s = _pairs(17, seed=5)
    a = bootstrap_auc(y, s, n_bootstrap=300, ci=0.8, seed=11)
    assert (a.seed, a.ci_level, a.n_bootstrap) == (11, 0.8, 300)
    assert a.to_dict() == bootstrap_auc(y, s, n_bootstrap=300, ci=0.8, seed=11).to_dict()
    b = bootstrap_auc(y, s, n_bootstrap=300, ci=0.8, seed=12)
    assert b.bootstrap_mean != a.bootstrap_mean


@pytest.mark.parametrize("ci", [0.0, 1.0, -0.5, 1.5])
def test_bootstrap_level_must_be_strictly_between_0_and_1(ci):
    y, s = _pairs(8)
    with pytest.raises(ValueError, match=r"ci must be in \(0, 1\)"):
        bootstrap_auc(y, s, n_bootstrap=10, ci=ci)


def test_bootstrap_needs_one_dimensional_pairs():
    y, s = _pairs(8)
    with pytest.raises(ValueError, match="must be 1-D of one length"):
        bootstrap_auc(y.reshape(2, 4), s.reshape(2, 4), n_bootstrap=10)


def test_bootstrap_without_resamples_has_no_interval():
    y, s = _pairs(8)
    got = bootstrap_auc(y, s, n_bootstrap=0)
    assert got.n_bootstrap_used == 0 and got.auc == pytest.approx(got.auc)
    assert all(math.isnan(v) for v in (got.ci_low, got.ci_high, got.bootstrap_mean))


def test_wilson_interval_stays_inside_0_1():
    for level in (0.5, 0.95):
        for n in (1, 2, 3, 10, 12, 57, 1000):
            for k in (0, 1, n // 2, n - 1, n):
                lo, hi = wilson_interval(k, n, level)
                assert 0.0 <= lo <= hi <= 1.0, (level, k, n, lo, hi)
                assert lo <= k / n <= hi, (level, k, n, lo, hi)
    assert wilson_interval(0, 3, 0.5)[0] == 0.0 and wilson_interval(10, 10, 0.5)[1] == 1.0
    assert wilson_interval(4, 9) == wilson_interval(4, 9, 0.95)
    assert all(math.isnan(v) for v in wilson_interval(3, -1))
