"""fp64 formulas written out (no shared code with the implementations under test) used as test
oracles by more than one test module."""

from __future__ import annotations

import torch


def layer_norm_oracle(x, w=None, b=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) · w + b over the last dim, in fp64."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y


def bias_residual_oracle(y, residual=None, bias=None, bias2=None, weight=None):
    """residual + weight·(y + bias) + bias2 with (C,) biases over dim 1, in fp64."""
    shape = (1, -1) + (1,) * (y.dim() - 2)
    v = y.double()
    if bias is not None:
        v = v + bias.double().view(shape)
    if weight is not None:
        v = v * weight.double().item()
    if residual is not None:
        v = v + residual.double()
    if bias2 is not None:
        v = v + bias2.double().view(shape)
    return v
