"""Checks on what a kernel leaves alone around the view it writes."""

from __future__ import annotations

import torch


def unchanged_outside(buf: torch.Tensor, before: torch.Tensor, rows: slice, cols: slice) -> bool:
    """Whether ``buf`` equals ``before`` everywhere but ``buf[rows, cols]``."""
    keep = torch.ones_like(buf, dtype=torch.bool)
    keep[rows, cols] = False
    return torch.equal(buf[keep], before[keep])
