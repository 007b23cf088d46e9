"""2D residual blocks and resamplers with diffusers' state-dict layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._mode import eager_inference
from .embeddings import TimeEmbedding, conv_without_bias, project_time
from .norm import GroupNorm

FUSED_EPILOGUE_DEVICES = frozenset({"cuda"})
"""Devices on which :class:`ResnetBlock2D` runs its convolutions without their biases and adds
them, with the residual, in one :func:`echofast.ops.bias_residual` pass (eager inference): cuDNN
adds a bias in a broadcast kernel of its own over a channels-last output, CPU convolutions add
theirs for free."""


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (key ``conv``), or 2x2 average pooling when ``use_conv`` is False.

    ``padding=0`` pads one zero row/column at the bottom/right first, as the LDM encoders do.
    """

    def __init__(
        self, channels: int, *, use_conv: bool, out_channels: int | None = None, padding: int = 1
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.padding = padding
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding)
        elif out_channels != channels:
            raise ValueError(f"pooling downsample keeps channels: {channels} != {out_channels}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return F.avg_pool2d(x, 2, 2)
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv (key ``conv``) when ``use_conv``."""

    def __init__(self, channels: int, *, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block: GN+SiLU, conv, (+temb | GN modulated by temb), GN+SiLU, conv.

    Keys as diffusers' ``ResnetBlock2D``: norm1, conv1, time_emb_proj, norm2, conv2,
    conv_shortcut. ``up``/``down`` resample both paths without a conv (nearest / avg-pool).
    ``time_embedding_norm``: "default" adds the projected embedding before norm2;
    "scale_shift" applies ``norm2(h) * (1 + scale) + shift`` inside the fused norm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-6,
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"unsupported time_embedding_norm {time_embedding_norm!r}")
        out_channels = out_channels or in_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            mult = 2 if time_embedding_norm == "scale_shift" else 1
            self.time_emb_proj = nn.Linear(temb_channels, mult * out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.resample: nn.Module | None = None
        if up:
            self.resample = Upsample2D(in_channels, use_conv=False)
        elif down:
            self.resample = Downsample2D(in_channels, use_conv=False)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def time_fold(self) -> nn.Conv2d | None:
        """The conv whose bias is folded into the time projection (conv1, when the projection is
        added to its output: ``time_embedding_norm="default"``), else None."""
        if self.time_emb_proj is None or self.time_embedding_norm != "default":
            return None
        return self.conv1 if self.conv1.bias is not None else None

    def time_projection(self, temb: torch.Tensor | TimeEmbedding) -> torch.Tensor:
        """``time_emb_proj(silu(temb))`` (+ conv1's bias when :meth:`time_fold`): (N,
        temb_channels) -> (N, k·C_out); depends only on t (memoised within a sampling run when
        ``temb`` is a :class:`TimeEmbedding`)."""
        return project_time(temb, self.time_emb_proj, self.time_fold())

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | TimeEmbedding | None = None
    ) -> torch.Tensor:
        """x (N, C_in, H, W); temb (N, temb_channels), or (1, temb_channels) shared by the batch,
        or a :class:`TimeEmbedding` holding it."""
        h = self.norm1(x)
        if self.resample is not None:
            x = self.resample(x)
            h = self.resample(h)
        scale = shift = add = None
        if self.time_emb_proj is not None and temb is not None:
            # conv1's bias, when folded, comes with the projection: one small add, not a
            # full-size one after the convolution
            h = conv_without_bias(self.conv1, h) if self.time_fold() else self.conv1(h)
            t = self.time_projection(temb)
            if self.time_embedding_norm == "default":
                add = t  # h + t, added by norm2 as it reads h
            else:
                scale, shift = (c.expand(h.shape[0], -1) for c in t.chunk(2, dim=1))
        elif self.time_embedding_norm == "scale_shift":
            raise ValueError("temb is required when time_embedding_norm is 'scale_shift'")
        else:
            h = self.conv1(h)
        h = self.norm2(h, scale=scale, shift=shift, add=add)
        if self._fused_epilogue(x):
            return self._epilogue(conv_without_bias(self.conv2, self.dropout(h)), x)
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = h.add_(x) if eager_inference() else x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out

    def _fused_epilogue(self, x: torch.Tensor) -> bool:
        return (
            eager_inference()
            and x.device.type in FUSED_EPILOGUE_DEVICES
            and self.output_scale_factor == 1.0
        )

    def _epilogue(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``conv2(h) + b2 + x`` (or ``+ conv_shortcut(x) + b_sc``) in one pass over ``y``, conv2's
        output without its bias (the shortcut also runs without its bias): one
        :func:`~echofast.ops.bias_residual` instead of two bias kernels and an add."""
        sc = self.conv_shortcut
        if sc is None:
            return ops.bias_residual(y, residual=x, bias=self.conv2.bias, out=y)
        r = conv_without_bias(sc, x)
        return ops.bias_residual(y, residual=r, bias=self.conv2.bias, bias2=sc.bias, out=y)
