"""``LIDM``: echofast's latent image diffusion UNet (diffusers ``UNet2DModel`` keys and state dict).

EchoNet-Synthetic's LIDM denoises 4×14×14 heart-image latents (padded to 16×16 by the sampler)
with [128, 256, 256, 512] channels, attention at the first three levels and "resnet" resampling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..config import require
from ..nn import (
    GroupNorm,
    TimestepEmbedding,
    batch_timesteps,
    distinct_timesteps,
    timestep_features,
)
from ..nn._mode import eager_inference
from ..nn.blocks2d import DownStage2D, MidStage2D, UpStage2D
from ..nn.embeddings import RunMemo, TimeEmbedding, time_projections, value_key
from .base import ModelBase, check_input, run_stage
from .outputs import SampleOutput

DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")


class LIDM(ModelBase):
    """Time-conditioned 2D UNet, a drop-in for diffusers' ``UNet2DModel``.

    ``model(sample, timestep).sample`` with sample (N, in_channels, H, W) and a scalar or (N,)
    timestep. Supported: positional time embedding, ``DownBlock2D``/``AttnDownBlock2D`` and
    ``UpBlock2D``/``AttnUpBlock2D`` stages, "conv" or "resnet" resampling, no class embedding.
    """

    diffusers_class = "UNet2DModel"

    def __init__(
        self,
        sample_size: int | Sequence[int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: Sequence[str] = (
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: Sequence[str] = (
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
        ),
        block_out_channels: Sequence[int] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        self.register_config(locals())
        require("time_embedding_type", time_embedding_type, ["positional"])
        require("class_embed_type", class_embed_type, [None])
        require("num_class_embeds", num_class_embeds, [None])
        require("mid_block_type", mid_block_type, ["UNetMidBlock2D", None])
        require("downsample_type", downsample_type, ["conv", "resnet"])
        require("upsample_type", upsample_type, ["conv", "resnet"])
        require("act_fn", act_fn, ["silu", "swish"])
        require("resnet_time_scale_shift", resnet_time_scale_shift, ["default", "scale_shift"])
        n = len(block_out_channels)
        require("len(down_block_types)", len(down_block_types), [n])
        require("len(up_block_types)", len(up_block_types), [n])
        for i, t in enumerate(down_block_types):
            require(f"down_block_types[{i}]", t, DOWN_TYPES)
        for i, t in enumerate(up_block_types):
            require(f"up_block_types[{i}]", t, UP_TYPES)

        chans = list(block_out_channels)
        temb_dim = time_embedding_dim or chans[0] * 4
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim)
        common = dict(
            temb_channels=temb_dim,
            eps=norm_eps,
            groups=norm_num_groups,
            time_embedding_norm=resnet_time_scale_shift,
            dropout=dropout,
        )

        def head_dim(c: int) -> int:
            return attention_head_dim if attention_head_dim is not None else c

        self.down_blocks = nn.ModuleList()
        for i, (kind, c) in enumerate(zip(down_block_types, chans)):
            attn = kind == "AttnDownBlock2D"
            last = i == n - 1
            self.down_blocks.append(
                DownStage2D(
                    chans[max(i - 1, 0)],
                    c,
                    num_layers=layers_per_block,
                    attention_head_dim=head_dim(c) if attn else None,
                    downsample=None if last else (downsample_type if attn else "conv"),
                    downsample_padding=downsample_padding,
                    **common,
                )
            )
        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = MidStage2D(
                chans[-1],
                attention_head_dim=head_dim(chans[-1]),
                attention_groups=(
                    attn_norm_num_groups
                    if attn_norm_num_groups is not None
                    else norm_num_groups
                    if resnet_time_scale_shift == "default"
                    else None
                ),
                add_attention=add_attention,
                output_scale_factor=mid_block_scale_factor,
                **common,
            )
        rev = list(reversed(chans))
        self.up_blocks = nn.ModuleList()
        for i, (kind, c) in enumerate(zip(up_block_types, rev)):
            attn = kind == "AttnUpBlock2D"
            last = i == n - 1
            self.up_blocks.append(
                UpStage2D(
                    rev[min(i + 1, n - 1)],
                    c,
                    prev_output_channels=rev[max(i - 1, 0)],
                    num_layers=layers_per_block + 1,
                    attention_head_dim=head_dim(c) if attn else None,
                    upsample=None if last else (upsample_type if attn else "conv"),
                    **common,
                )
            )
        self.conv_norm_out = GroupNorm(norm_num_groups, chans[0], eps=norm_eps, activation="silu")
        self.conv_out = nn.Conv2d(chans[0], out_channels, 3, padding=1)
        self._run_memo: RunMemo | None = None
        self._time_projections = time_projections(self)
        self._packed_groups = (self._time_projections,)
        self._relayout()

    @contextlib.contextmanager
    def sampling_cache(self) -> Iterator[RunMemo]:
        """Reuse timestep-only work across the calls of one sampling run (inference only).

        Inside the block the time embedding and every resblock's time-embedding projection are
        computed once per distinct (timestep, autocast state) and reused: exactly the
        values a call computes. Entries are checked against the weights' storage and version
        counters (never stale), dropped when the block ends, and not used under autograd.
        """
        previous = self._run_memo
        self._run_memo = memo = RunMemo()
        try:
            yield memo
        finally:
            self._run_memo = previous

    def time_embed(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps → (N, time_embed_dim) embedding in the model's dtype."""
        feats = timestep_features(
            timesteps,
            self.config.block_out_channels[0],
            flip_sin_to_cos=self.config.flip_sin_to_cos,
            freq_shift=self.config.freq_shift,
        )
        return self.time_embedding(feats.to(self.conv_in.weight.dtype))

    def time_features(self, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """Every resblock's time-embedding projection (+ its folded conv bias) for a timestep: (1,
        P) for a number or a 0-d/(1,) tensor, (N, P) for N timesteps. Pass it (one row for a
        batch sharing the timestep, or one per sample) as ``time_features=`` to a call with that
        timestep: the call then skips its time embedding. Compute it under the call's autocast
        state (its dtype is the call's)."""
        n = timestep.shape[0] if torch.is_tensor(timestep) and timestep.dim() > 0 else 1
        timesteps = batch_timesteps(timestep, n, self.device)
        return self._time_projections.all(self.time_embed(timesteps))

    def _check_time_features(
        self, table: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        width = sum(self._time_projections.sizes)
        rows_ok = table.dim() == 2 and table.shape[0] in (1, batch) and table.shape[1] == width
        if not rows_ok or table.device != device or table.dtype != dtype:
            raise ValueError(
                f"time_features must be (1, {width}) or ({batch}, {width}) {dtype} on {device} "
                f"(LIDM.time_features computed under this call's autocast state), got "
                f"{tuple(table.shape)} {table.dtype} on {table.device}"
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        time_features: torch.Tensor | None = None,
        channels_last_output: bool = False,
    ) -> SampleOutput | tuple[torch.Tensor]:
        """The denoiser's output (N, out_channels, H, W) for ``sample`` (N, in_channels, H, W).

        ``time_features``: :meth:`time_features` of this timestep, computed beforehand (the call
        then skips its time embedding; sampling pipelines compute a table of every step's once
        per run). ``sample`` is read in place when it is already in the activations' layout
        (``memory_format``) and dtype; ``channels_last_output=True`` returns the output as the
        last convolution wrote it (channels-last memory, no copy)."""
        if class_labels is not None:
            raise ValueError("class_labels given, but this LIDM has no class embedding")
        check_input("sample", sample, "N, C, H, W", C=self.config.in_channels)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = batch_timesteps(timestep, sample.shape[0], sample.device)
        memo = self._run_memo
        tp = self._time_projections
        if time_features is not None:
            dtype = self._call_dtype(sample.device)
            self._check_time_features(time_features, sample.shape[0], sample.device, dtype)
            emb = TimeEmbedding(None, table=time_features, projections=tp)
        elif memo is None or not eager_inference():
            emb = TimeEmbedding(self.time_embed(distinct_timesteps(timesteps)), projections=tp)
        else:
            # a shared timestep is embedded once, (1, E), whatever the batch size
            key = (value_key(timestep), sample.device)
            deps = (self.time_embedding,)
            emb = TimeEmbedding(
                memo.get(
                    deps, ("emb", key), lambda: self.time_embed(distinct_timesteps(timesteps))
                ),
                memo,
                key,
                deps,
                projections=tp,
            )
        x = self.conv_in(sample.contiguous(memory_format=self.memory_format))
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.down_blocks:
            x, res = run_stage(self, block, x, emb)
            skips += res
        if self.mid_block is not None:
            x = run_stage(self, self.mid_block, x, emb)
        for block in self.up_blocks:
            k = len(block.resnets)
            x = run_stage(self, block, x, skips[-k:], emb)
            skips = skips[:-k]
        x = self.conv_out(self.conv_norm_out(x))
        if not channels_last_output:
            x = x.contiguous()
        return SampleOutput(sample=x) if return_dict else (x,)
