"""ROC AUC with a bootstrap confidence interval, and a binomial interval (NumPy only).

AUC is the Mann–Whitney statistic: the probability that a random positive scores above a random
negative, ties counting one half. The bootstrap resamples the scored pairs with replacement (the
reference's protocol, 10,000 resamples, interval from the sorted resampled AUCs at
``int(0.025·n)`` and ``int(0.975·n)``; the reference's ``randint(0, len − 1)`` never drew the
last pair: fixed). A resample with a single class has no AUC and is left out (counted).
Resampling is done with multinomial counts over the original pairs, so each resample's AUC is a
weighted Mann–Whitney sum over the sorted scores: no per-resample sort.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order of ``scores`` and the start of each run of equal values in that order."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of each row of ``weights`` (B, N): item ``i`` counted ``weights[b, i]`` times
    (a bootstrap resample as counts). NaN where a row has no positive or no negative weight."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order, starts = _tie_groups(scores)
    pos = labels[order]
    ws = w[:, order]
    wp = np.add.reduceat(ws * pos, starts, axis=1)  # positive weight per tie group
    wn = np.add.reduceat(ws * ~pos, starts, axis=1)  # negative weight per tie group
    below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each group
    num = (wp * (below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def roc_auc(labels, scores) -> float:
    """ROC AUC (ties count one half). Raises ValueError without both classes."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("ROC AUC needs at least one positive and one negative pair")
    return float(weighted_auc(labels, scores, np.ones((1, len(labels))))[0])


@dataclass
class AUCResult:
    auc: float
    ci_low: float
    ci_high: float
    ci_level: float
    bootstrap_mean: float
    n_bootstrap: int
    n_bootstrap_used: int
    n_pairs: int
    n_positive: int
    n_negative: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_auc(
    labels,
    scores,
    *,
    n_bootstrap: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
    chunk: int = 500,
) -> AUCResult:
    """AUC and its bootstrap ``ci`` interval (resampling pairs with replacement, seeded)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D of one length, got {labels.shape}, {scores.shape}"
        )
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    auc = roc_auc(labels, scores)
    n = len(labels)
    rng = np.random.default_rng(seed)
    values = []
    for s in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - s)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b)
        values.append(weighted_auc(labels, scores, counts))
    boot = np.concatenate(values) if values else np.zeros(0)
    boot = np.sort(boot[np.isfinite(boot)])
    if len(boot) == 0:
        lo = hi = mean = float("nan")
    else:
        tail = (1 - ci) / 2
        lo = float(boot[int(tail * len(boot))])
        hi = float(boot[min(int((1 - tail) * len(boot)), len(boot) - 1)])
        mean = float(boot.mean())
    return AUCResult(
        auc=auc,
        ci_low=lo,
        ci_high=hi,
        ci_level=ci,
        bootstrap_mean=mean,
        n_bootstrap=n_bootstrap,
        n_bootstrap_used=len(boot),
        n_pairs=n,
        n_positive=int(labels.sum()),
        n_negative=int((~labels).sum()),
        seed=seed,
    )


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (its bounds are exactly 0 at
    ``k = 0`` and 1 at ``k = n``, where rounding would leave them a hair inside)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = _normal_quantile(0.5 + level / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (bisection on erf; exact to ~1e-12)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
