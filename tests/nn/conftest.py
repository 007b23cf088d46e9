"""Fixtures of the module tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from support.models import randomize_norms


def _random_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (biases, mix factors, packed projections: a default of 0 or 1
    would hide mix-ups), norms' scales around 1; in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return randomize_norms(module, g).eval()


@pytest.fixture
def random_weights() -> Callable[[torch.nn.Module, int], torch.nn.Module]:
    """``random_weights(module, seed)``: the module with seeded random parameters."""
    return _random_weights
