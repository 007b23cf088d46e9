"""GroupNorm module that runs normalisation, modulation and activation as one op, and a
LayerNorm that stays in the activations' dtype under autocast."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.layer_norm import residual_sum
from ._mode import eager_inference


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) fused with an optional SiLU.

    ``forward(x, scale=None, shift=None, add=None)`` computes
    ``act(GN(x + add) * (1 + scale) + shift)`` through :func:`echofast.ops.group_norm`; x is
    (N, C) or (N, C, *spatial) (every input ``nn.GroupNorm`` takes), scale/shift (N, C), add
    (M, C) with M dividing N (see the op).
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


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state-dict keys) that keeps a reduced-precision input
    in its dtype under autocast.

    Autocast runs ``layer_norm`` in fp32: it casts the fp16/bf16 input up and returns fp32, which
    the next Linear casts back down — two extra kernels and five times the bytes per norm (80
    norms per LVDM call). Here an input already in autocast's dtype goes to
    :func:`echofast.ops.layer_norm` (fp32 statistics and affine, one rounding to the input's
    dtype: a Triton kernel on CUDA, PyTorch's mixed-dtype kernel where it has one), which is the
    value the autocast path gives after the Linear's cast, up to the order of the fp32 reduction.
    Elsewhere (no autocast, another dtype, or inside ``torch.compile``, which fuses the casts
    itself) it is ``nn.LayerNorm``.
    """

    def _autocast_half(self, x: torch.Tensor) -> bool:
        dev = x.device.type
        return (
            x.dtype in _HALF
            and len(self.normalized_shape) == 1
            and torch.is_autocast_enabled(dev)
            and torch.get_autocast_dtype(dev) == x.dtype
            and not torch.compiler.is_compiling()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._autocast_half(x):
            with torch.autocast(x.device.type, enabled=False):
                return ops.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)

    def add_forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        add: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        add_group: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, self(h))`` for the residual ``h = x + residual`` (plus ``add`` (M, C): one row
        per group of x's rows, e.g. per video); h is written over ``residual`` (a temporary of
        the caller) without autograd. With ``shift`` (C,) the h returned is ``h + shift``
        (rounded to h's dtype), the norm's input is not. Without a residual h is ``x + add``
        in a new tensor; ``add_group``: see :func:`echofast.ops.add_layer_norm`.

        Where :meth:`forward` would keep x's dtype (autocast) or x and the affine share a dtype
        (no autocast), both are one op, :func:`echofast.ops.add_layer_norm` (a single Triton
        pass on CUDA); otherwise PyTorch adds, then :meth:`forward`.
        """
        dev = x.device.type
        plain = (
            not torch.is_autocast_enabled(dev)
            and len(self.normalized_shape) == 1
            and (self.weight is None or self.weight.dtype == x.dtype)
            and not torch.compiler.is_compiling()
        )
        same = residual is None or residual.dtype == x.dtype
        if same and (self._autocast_half(x) or plain):
            with torch.autocast(dev, enabled=False):
                return ops.add_layer_norm(
                    x,
                    residual,
                    add,
                    self.weight,
                    self.bias,
                    self.eps,
                    shift=shift,
                    add_group=add_group,
                )
        h = residual_sum(x, residual, add, add_group)
        y = self(h)
        if shift is None:
            return h, y
        return (h.add_(shift) if eager_inference() else (h + shift).to(h.dtype)), y
