"""``VAE``: echofast's AutoencoderKL (diffusers ``AutoencoderKL`` config keys and state dict).

EchoNet-Synthetic's VAE maps 112×112 frames to 4×14×14 latents with 4 down stages of
[128, 256, 256, 512] channels; see the project spec for the pixel conventions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import require
from ..nn import GroupNorm
from ..nn.blocks2d import DownStage2D, MidStage2D, UpStage2D
from .base import ModelBase, check_input, run_stage
from .outputs import DiagonalGaussian, EncoderOutput, SampleOutput

ACTIVATIONS = ("silu", "swish")


class Encoder(nn.Module):
    """conv_in → down stages → mid (resnet, attention, resnet) → GN+SiLU → conv_out (2·latent)."""

    gradient_checkpointing = False  # ModelBase.enable_gradient_checkpointing turns it on

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        groups: int,
        mid_attention: bool,
    ):
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownStage2D(
                chans[max(i - 1, 0)],
                c,
                temb_channels=None,
                num_layers=layers_per_block,
                eps=1e-6,
                groups=groups,
                downsample="conv" if i < len(chans) - 1 else None,
                downsample_padding=0,
            )
            for i, c in enumerate(chans)
        )
        self.mid_block = MidStage2D(
            chans[-1],
            temb_channels=None,
            eps=1e-6,
            groups=groups,
            attention_head_dim=chans[-1],
            attention_groups=groups,
            add_attention=mid_attention,
        )
        self.conv_norm_out = GroupNorm(groups, chans[-1], eps=1e-6, activation="silu")
        self.conv_out = nn.Conv2d(chans[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = run_stage(self, block, x)
        x = run_stage(self, self.mid_block, x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    """conv_in → mid → up stages (layers+1 resnets, nearest+conv) → GN+SiLU → conv_out."""

    gradient_checkpointing = False  # ModelBase.enable_gradient_checkpointing turns it on

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        groups: int,
        mid_attention: bool,
    ):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidStage2D(
            rev[0],
            temb_channels=None,
            eps=1e-6,
            groups=groups,
            attention_head_dim=rev[0],
            attention_groups=groups,
            add_attention=mid_attention,
        )
        self.up_blocks = nn.ModuleList(
            UpStage2D(
                rev[max(i - 1, 0)],
                c,
                prev_output_channels=None,
                temb_channels=None,
                num_layers=layers_per_block + 1,
                eps=1e-6,
                groups=groups,
                upsample="conv" if i < len(rev) - 1 else None,
            )
            for i, c in enumerate(rev)
        )
        self.conv_norm_out = GroupNorm(groups, rev[-1], eps=1e-6, activation="silu")
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = run_stage(self, self.mid_block, self.conv_in(z))
        for block in self.up_blocks:
            x = run_stage(self, block, x)
        return self.conv_out(self.conv_norm_out(x))


class VAE(ModelBase):
    """KL autoencoder, a drop-in for diffusers' ``AutoencoderKL``.

    ``encode(x).latent_dist`` is a :class:`DiagonalGaussian` (``.mean``, ``.sample(generator)``);
    ``decode(z).sample`` is the image. Latents are *not* scaled here: multiply by
    ``config.scaling_factor`` after encoding and divide before decoding, as diffusers pipelines do.
    """

    diffusers_class = "AutoencoderKL"

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | Sequence[int] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        self.register_config(locals())
        for i, t in enumerate(down_block_types):
            require(f"down_block_types[{i}]", t, ["DownEncoderBlock2D"])
        for i, t in enumerate(up_block_types):
            require(f"up_block_types[{i}]", t, ["UpDecoderBlock2D"])
        require("act_fn", act_fn, ACTIVATIONS)
        n = len(block_out_channels)
        require("len(down_block_types)", len(down_block_types), [n])
        require("len(up_block_types)", len(up_block_types), [n])
        self.encoder = Encoder(
            in_channels,
            latent_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            mid_block_add_attention,
        )
        self.decoder = Decoder(
            latent_channels,
            out_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            mid_block_add_attention,
        )
        self.quant_conv = (
            nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        )
        self.post_quant_conv = (
            nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        )
        self._relayout()

    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> EncoderOutput | tuple[DiagonalGaussian]:
        """Images (N, in_channels, H, W) in [-1, 1] → posterior over (N, latent, H/f, W/f)."""
        check_input("x", x, "N, C, H, W", C=self.config.in_channels)
        h = self.encoder(x.contiguous(memory_format=self.memory_format))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        dist = DiagonalGaussian(h.contiguous())
        return EncoderOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> SampleOutput | tuple[torch.Tensor]:
        """Latents (N, latent, h, w), unscaled → images (N, out_channels, H, W)."""
        check_input("z", z, "N, C, h, w", C=self.config.latent_channels)
        z = z.contiguous(memory_format=self.memory_format)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        x = self.decoder(z).contiguous()
        return SampleOutput(sample=x) if return_dict else (x,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> SampleOutput | tuple[torch.Tensor]:
        """Encode then decode (posterior mean, or a sample when ``sample_posterior``)."""
        dist = self.encode(sample).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict)
