"""Building blocks (fused where it pays) with diffusers-compatible parameter names."""

from .attention import Attention
from .embeddings import (
    TimestepEmbedding,
    batch_timesteps,
    distinct_timesteps,
    timestep_features,
)
from .norm import GroupNorm, LayerNorm
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

__all__ = [
    "Attention",
    "Downsample2D",
    "GroupNorm",
    "LayerNorm",
    "ResnetBlock2D",
    "TimestepEmbedding",
    "Upsample2D",
    "batch_timesteps",
    "distinct_timesteps",
    "timestep_features",
]
