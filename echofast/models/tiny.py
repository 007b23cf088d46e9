"""Tiny VAE / LIDM / LVDM configurations (diffusers config dicts) for smoke runs and tests.

12×12 frames ↔ 4×6×6 latents (the VAE), 6×6 latents padded 6 → 8 by the samplers (the LIDM, as
the reference pads 14 → 16), LVDM windows of 8 frames (stride 4), head dim 16, the EF as a single
conditioning token. Build a model with random weights from one with e.g.
``LVDM.from_config(TINY_CONFIGS["lvdm"])`` after seeding torch.
"""

from __future__ import annotations

from typing import Any

TINY_VAE: dict[str, Any] = {
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

TINY_LIDM: dict[str, Any] = {
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

TINY_LVDM: dict[str, Any] = {
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

#: The three by model name ("vae", "lidm", "lvdm").
TINY_CONFIGS: dict[str, dict[str, Any]] = {"vae": TINY_VAE, "lidm": TINY_LIDM, "lvdm": TINY_LVDM}
