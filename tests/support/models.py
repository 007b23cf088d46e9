"""Build diffusers reference models with random weights and compare them with echofast's."""

from __future__ import annotations

from pathlib import Path

import torch


def randomize_norms(
    model: torch.nn.Module, generator: torch.Generator | None = None
) -> torch.nn.Module:
    """Give every GroupNorm/LayerNorm random affine parameters (default init would hide bugs)."""
    g = generator or torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and mod.weight is not None:
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.5 * torch.randn(mod.bias.shape, generator=g))
    return model


def build_diffusers(cls, config: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(cls(**config)).eval()


def save_diffusers(cls, config: dict, folder: Path, seed: int = 0) -> torch.nn.Module:
    model = build_diffusers(cls, config, seed)
    model.save_pretrained(folder)
    return model


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
