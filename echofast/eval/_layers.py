"""Small building blocks shared by the inference-only feature extractors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm(nn.Module):
    """Inference batch norm ``(x − running_mean)/sqrt(running_var + eps)·weight + bias`` over
    dim 1, for any rank. Same state-dict keys as ``nn.BatchNorm*d`` minus ``num_batches_tracked``
    (the extractors never train)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


def randomize_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random weights for tests and benchmarks: convolution/linear weights He-normal, biases and
    norm affines small, running statistics plausible (mean ~0, var ~1). Returns ``module``."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
                )
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
            elif isinstance(m, FrozenBatchNorm):
                n = m.weight.numel()
                m.weight.copy_(1 + 0.1 * torch.randn(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_var.copy_(1 + 0.5 * torch.rand(n, generator=generator))
    return module
