"""Tiny random diffusers models saved in the reference's weights-root layout."""

from __future__ import annotations

from pathlib import Path

from .models import save_diffusers

TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 12,
    "scaling_factor": 0.5,
}
"""12×12 frames ↔ 4×6×6 latents."""

TINY_LIDM = {
    "sample_size": 6,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"],
    "block_out_channels": [32, 32, 32],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "norm_num_groups": 8,
}
"""6×6 latents, padded 6 → 8 by the sampler (like the reference's 14 → 16)."""

TINY_LVDM = {
    "sample_size": 6,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    ],
    "up_block_types": [
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    ],
    "block_out_channels": [32, 32, 32],
    "addition_time_embed_dim": 1,
    "projection_class_embeddings_input_dim": 1,
    "layers_per_block": 1,
    "cross_attention_dim": 1,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [2, 2, 2],
    "num_frames": 8,
}
"""Windows of 8 frames (stride 4), head dim 16, EF as a single conditioning token."""


def make_weights_root(root: Path, dataset: str = "dynamic", seed: int = 0) -> Path:
    """Write ``root/{vae, lidm_<dataset>, lvdm}`` from tiny random diffusers models."""
    from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel

    save_diffusers(AutoencoderKL, TINY_VAE, root / "vae", seed)
    save_diffusers(UNet2DModel, TINY_LIDM, root / f"lidm_{dataset}", seed + 1)
    save_diffusers(UNetSpatioTemporalConditionModel, TINY_LVDM, root / "lvdm", seed + 2)
    return root
