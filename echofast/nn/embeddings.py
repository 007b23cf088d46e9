"""Sinusoidal timestep features and the timestep MLP (diffusers' Timesteps/TimestepEmbedding)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def batch_timesteps(
    timestep: torch.Tensor | float | int, batch: int, device: torch.device
) -> torch.Tensor:
    """A scalar, 0-d, (1,) or (batch,) timestep as a (batch,) tensor on ``device``.

    Python numbers become int64 (truncated), as diffusers' UNets do.
    """
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], dtype=torch.long, device=device)
    elif timestep.dim() == 0:
        timestep = timestep[None]
    timestep = timestep.to(device)
    if timestep.shape[0] == 1 and batch != 1:
        return timestep.expand(batch)
    if timestep.shape[0] != batch:
        raise ValueError(f"got {timestep.shape[0]} timesteps for a batch of {batch}")
    return timestep


def distinct_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """``timesteps[:1]`` when every sample of the batch has the same timestep, else all of them.

    Embedding one shared timestep once (and broadcasting it) is cheaper, and keeps a sample's
    result independent of its batch: small-batch matrix products take batch-size-dependent
    code paths whose rounding differs.
    """
    if timesteps.shape[0] > 1 and bool((timesteps == timesteps[0]).all()):
        return timesteps[:1]
    return timesteps


def timestep_features(
    timesteps: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of ``timesteps`` (N,) -> (N, dim) in fp32.

    Frequencies ``exp(-ln(max_period) * i / (dim/2 - freq_shift))``; ``[sin, cos]``, or
    ``[cos, sin]`` when ``flip_sin_to_cos``; an odd ``dim`` gets one zero column.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent * (-math.log(max_period)) / (half - freq_shift)
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    first, second = (
        (torch.cos(args), torch.sin(args))
        if flip_sin_to_cos
        else (torch.sin(args), torch.cos(args))
    )
    emb = torch.cat([first, second], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(x)))`` — keys ``linear_1``, ``linear_2`` as diffusers."""

    def __init__(self, in_channels: int, embed_dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, out_dim or embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
