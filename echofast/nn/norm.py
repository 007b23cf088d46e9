"""GroupNorm module that runs normalisation, modulation and activation as one op."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) fused with an optional SiLU.

    ``forward(x, scale=None, shift=None)`` computes ``act(GN(x) * (1 + scale) + shift)`` through
    :func:`echofast.ops.group_norm`; x is (N, C, *spatial), scale/shift (N, C).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        activation: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = activation

    def forward(
        self,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ops.group_norm(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            activation=self.activation,
            scale=scale,
            shift=shift,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
