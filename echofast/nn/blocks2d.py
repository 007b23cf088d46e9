"""UNet/VAE stages built from :class:`ResnetBlock2D` and :class:`Attention`.

Module names follow diffusers (``resnets``, ``attentions``, ``downsamplers``, ``upsamplers``) so
that state dicts match ``DownEncoderBlock2D``/``DownBlock2D``/``AttnDownBlock2D``,
``UpDecoderBlock2D``/``UpBlock2D``/``AttnUpBlock2D`` and ``UNetMidBlock2D``.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


def _feature_attention(
    channels: int, head_dim: int, eps: float, groups: int | None, rescale: float
) -> Attention:
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        bias=True,
        eps=eps,
        norm_num_groups=groups,
        residual_connection=True,
        rescale_output_factor=rescale,
    )


class DownStage2D(nn.Module):
    """``num_layers`` resnets (each followed by attention when ``attention_head_dim``), then an
    optional downsampler: ``"conv"`` (stride-2 conv) or ``"resnet"`` (resnet with avg-pool).

    ``forward(x, temb)`` returns ``(x, skips)``: every layer's output, and the downsampled one.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        num_layers: int,
        eps: float,
        groups: int,
        attention_head_dim: int | None = None,
        downsample: str | None = None,
        downsample_padding: int = 1,
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        res = dict(
            temb_channels=temb_channels,
            eps=eps,
            groups=groups,
            dropout=dropout,
            time_embedding_norm=time_embedding_norm,
            output_scale_factor=output_scale_factor,
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **res)
            for i in range(num_layers)
        )
        self.attentions = None
        if attention_head_dim is not None:
            self.attentions = nn.ModuleList(
                _feature_attention(
                    out_channels, attention_head_dim, eps, groups, output_scale_factor
                )
                for _ in range(num_layers)
            )
        self.downsamplers = None
        if downsample == "conv":
            self.downsamplers = nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, padding=downsample_padding)]
            )
        elif downsample == "resnet":
            self.downsamplers = nn.ModuleList([ResnetBlock2D(out_channels, down=True, **res)])
        elif downsample is not None:
            raise ValueError(f"unsupported downsample {downsample!r}")

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            x = down(x, temb) if isinstance(down, ResnetBlock2D) else down(x)
            skips.append(x)
        return x, tuple(skips)


class UpStage2D(nn.Module):
    """Resnets (+ attention) consuming skip connections, then an optional upsampler.

    With ``prev_output_channels`` set (UNet), layer i concatenates the last remaining skip
    tensor on channels; its input width is (prev_output_channels if i == 0 else out) + (in_channels
    if i is the last layer else out). Without it (VAE decoder) there are no skips.
    ``upsample``: ``"conv"`` (nearest + conv), ``"resnet"`` (resnet with nearest) or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        prev_output_channels: int | None,
        temb_channels: int | None,
        num_layers: int,
        eps: float,
        groups: int,
        attention_head_dim: int | None = None,
        upsample: str | None = None,
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        res = dict(
            temb_channels=temb_channels,
            eps=eps,
            groups=groups,
            dropout=dropout,
            time_embedding_norm=time_embedding_norm,
            output_scale_factor=output_scale_factor,
        )
        self.uses_skips = prev_output_channels is not None

        def width(i: int) -> int:
            if not self.uses_skips:
                return in_channels if i == 0 else out_channels
            skip = in_channels if i == num_layers - 1 else out_channels
            return (prev_output_channels if i == 0 else out_channels) + skip

        self.resnets = nn.ModuleList(
            ResnetBlock2D(width(i), out_channels, **res) for i in range(num_layers)
        )
        self.attentions = None
        if attention_head_dim is not None:
            self.attentions = nn.ModuleList(
                _feature_attention(
                    out_channels, attention_head_dim, eps, groups, output_scale_factor
                )
                for _ in range(num_layers)
            )
        self.upsamplers = None
        if upsample == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)])
        elif upsample == "resnet":
            self.upsamplers = nn.ModuleList([ResnetBlock2D(out_channels, up=True, **res)])
        elif upsample is not None:
            raise ValueError(f"unsupported upsample {upsample!r}")

    def forward(
        self,
        x: torch.Tensor,
        skips: tuple[torch.Tensor, ...] = (),
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            if self.uses_skips:
                x = torch.cat([x, skips[-1 - i]], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            x = up(x, temb) if isinstance(up, ResnetBlock2D) else up(x)
        return x


class MidStage2D(nn.Module):
    """resnet, then ``num_layers`` × (attention, resnet) — diffusers' ``UNetMidBlock2D``."""

    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int | None,
        eps: float,
        groups: int,
        attention_head_dim: int,
        attention_groups: int | None,
        add_attention: bool = True,
        num_layers: int = 1,
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        res = dict(
            temb_channels=temb_channels,
            eps=eps,
            groups=groups,
            dropout=dropout,
            time_embedding_norm=time_embedding_norm,
            output_scale_factor=output_scale_factor,
        )
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, **res) for _ in range(num_layers + 1))
        self.attentions = nn.ModuleList(
            _feature_attention(
                channels, attention_head_dim, eps, attention_groups, output_scale_factor
            )
            if add_attention
            else nn.Identity()
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), temb)
        return x
