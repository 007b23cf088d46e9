"""Tiny random diffusers models saved in the reference's weights-root layout."""

from __future__ import annotations

from pathlib import Path

from echofast.models.tiny import TINY_CONFIGS

from .models import save_diffusers

TINY_VAE = TINY_CONFIGS["vae"]
"""12×12 frames ↔ 4×6×6 latents."""

TINY_LIDM = TINY_CONFIGS["lidm"]
"""6×6 latents, padded 6 → 8 by the sampler (like the reference's 14 → 16)."""

TINY_LVDM = TINY_CONFIGS["lvdm"]
"""Windows of 8 frames (stride 4), head dim 16, EF as a single conditioning token."""


def make_weights_root(root: Path, dataset: str = "dynamic", seed: int = 0) -> Path:
    """Write ``root/{vae, lidm_<dataset>, lvdm}`` from tiny random diffusers models."""
    from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel

    save_diffusers(AutoencoderKL, TINY_VAE, root / "vae", seed)
    save_diffusers(UNet2DModel, TINY_LIDM, root / f"lidm_{dataset}", seed + 1)
    save_diffusers(UNetSpatioTemporalConditionModel, TINY_LVDM, root / "lvdm", seed + 2)
    return root
