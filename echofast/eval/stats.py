"""Feature statistics, the Fréchet distance and the Inception Score, in float64.

Statistics follow StyleGAN's ``FeatureStats`` (the reference protocol's): running sums of the
features and of their outer products in float64, then ``mu = Σx/n`` and the *biased* covariance
``Σ = Σxxᵀ/n − mu·muᵀ``.

Fréchet distance ``d² = |mu₁ − mu₂|² + tr Σ₁ + tr Σ₂ − 2·tr (Σ₁Σ₂)^{1/2}`` with the trace of the
matrix square root computed stably: ``tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ`` where ``λᵢ`` are the eigenvalues
of the symmetric PSD matrix ``Σ₁^{1/2} Σ₂ Σ₁^{1/2}`` (similar to ``Σ₁Σ₂``); both symmetric
eigendecompositions run in float64 and negative round-off eigenvalues are clipped to 0. No
complex parts, no iteration that can stall on near-singular covariances (scipy's ``sqrtm``).
"""

from __future__ import annotations

import torch


class FeatureStats:
    """Streaming mean and biased covariance of feature vectors (float64 sums on ``device``)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = int(dim)
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features (N, dim)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {tuple(features.shape)}")
        x = features.to(self.sum.device, torch.float64)
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.count += x.shape[0]

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu (dim,), Σ (dim, dim)), float64 on the CPU."""
        if self.count < 1:
            raise ValueError("no features were added")
        mu = self.sum.cpu() / self.count
        cov = self.outer.cpu() / self.count - torch.outer(mu, mu)
        return mu, cov


def _sym_sqrt(a: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(a)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64; see the module
    docstring). Inputs may be any float dtype / NumPy-convertible; shapes (d,) and (d, d)."""
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).cpu() for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64).cpu() for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(),) * 2:
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
            f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}"
        )
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    root = _sym_sqrt(s1)
    inner = root @ s2 @ root
    evals = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0)
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * evals.sqrt().sum()
    return float(value)


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class probabilities (N, K) as the original implementation: the N rows
    cut into ``splits`` consecutive parts ``[i·N//splits, (i+1)·N//splits)``; per part
    ``exp(mean_rows KL(p ‖ mean_part p))``; returns (mean, population std) over the parts."""
    p = torch.as_tensor(probs, dtype=torch.float64).cpu()
    n = p.shape[0]
    if p.ndim != 2 or n < splits or splits < 1:
        raise ValueError(f"need (N >= splits, K) probabilities, got {tuple(p.shape)}, {splits}")
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(0, keepdim=True)
        kl = part * (torch.log(part) - torch.log(marginal))
        kl = torch.where(part > 0, kl, torch.zeros_like(kl))
        scores.append(torch.exp(kl.sum(1).mean()))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))
