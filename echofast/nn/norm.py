"""GroupNorm module that runs normalisation, modulation and activation as one op, and a
LayerNorm that stays in the activations' dtype under autocast."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) fused with an optional SiLU.

    ``forward(x, scale=None, shift=None, add=None)`` computes
    ``act(GN(x + add) * (1 + scale) + shift)`` through :func:`echofast.ops.group_norm`; x is
    (N, C, *spatial), scale/shift (N, C), add (M, C) with M dividing N (see the op).
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
        add: torch.Tensor | None = None,
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
            add=add,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def mixed_layer_norm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``F.layer_norm`` takes a ``dtype`` input with fp32 weight and bias on this device
    type (PyTorch's mixed-dtype kernels; probed once with a tiny call)."""
    x = torch.ones(2, 8, device=device_type, dtype=dtype)
    w = torch.ones(8, device=device_type)
    try:
        with torch.autocast(device_type, enabled=False):
            F.layer_norm(x, (8,), w, w)
    except RuntimeError:
        return False
    return True


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state-dict keys) that keeps a reduced-precision input
    in its dtype under autocast.

    Autocast runs ``layer_norm`` in fp32: it casts the fp16/bf16 input up and returns fp32, which
    the next Linear casts back down — two extra kernels and twice the bytes per norm (105 norms
    per LVDM call). Here an input already in autocast's dtype is normalised directly with the fp32
    weight and bias (PyTorch's mixed-dtype kernel: statistics and affine in fp32, one rounding to
    the input's dtype), which is the value the autocast path gives after the Linear's cast, up to
    the order of the fp32 reduction. Elsewhere (no autocast, another dtype, inside
    ``torch.compile``, which fuses the casts itself, or a PyTorch without the mixed-dtype kernel
    on this device: :func:`mixed_layer_norm_works`) it is ``nn.LayerNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if (
            x.dtype in _HALF
            and self.weight is not None
            and self.weight.dtype == torch.float32
            and torch.is_autocast_enabled(dev)
            and torch.get_autocast_dtype(dev) == x.dtype
            and not torch.compiler.is_compiling()
            and mixed_layer_norm_works(dev, x.dtype)
        ):
            with torch.autocast(dev, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return super().forward(x)
