"""``LVDM``: echofast's latent video diffusion UNet (diffusers ``UNetSpatioTemporalConditionModel``
config keys and state dict).

EchoNet-Synthetic's LVDM turns a conditioning latent (repeated over frames, concatenated on
channels to the noisy latents) and an ejection fraction (a single cross-attention token) into a
64-frame latent video; see the project spec.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn import GroupNorm, TimestepEmbedding, batch_timesteps, timestep_features
from ..nn._mode import eager_inference
from ..nn.embeddings import RunMemo, TimeEmbedding, time_projections, value_key
from ..nn.spatiotemporal import (
    AlphaBlender,
    MixWeights,
    SpatioTemporalDownStage,
    SpatioTemporalMidStage,
    SpatioTemporalUpStage,
    TransformerSpatioTemporalModel,
)
from .base import ModelBase, check_input, require, run_stage
from .outputs import SampleOutput

DOWN_TYPES = ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
UP_TYPES = ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")


def _per_block(key: str, value, n: int) -> list[int]:
    """An int (every block) or a list of n ints, as diffusers accepts them."""
    if isinstance(value, int) and not isinstance(value, bool):
        values = [value] * n
    elif isinstance(value, (list, tuple)):
        require(f"len({key})", len(value), [n])
        values = list(value)
    else:
        raise ConfigError(
            f"config key {key!r}: value {value!r} is not supported "
            "(an int or a list of ints, one per block)"
        )
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(
                f"config key {key!r}: value {value!r} is not supported "
                f"(entry {i} = {v!r} is not a positive int)"
            )
    return values


class LVDM(ModelBase):
    """Spatio-temporal UNet, a drop-in for diffusers' ``UNetSpatioTemporalConditionModel``.

    ``model(sample, timestep, encoder_hidden_states, added_time_ids).sample`` with sample
    (B, T, in_channels, H, W) → (B, T, out_channels, H, W). T is free (not tied to
    ``num_frames``); H and W need not be multiples of 2^(levels-1): the up path then resizes to
    the skips' sizes, as diffusers does. ``encoder_hidden_states`` is (B, L, cross_attention_dim)
    and ``added_time_ids`` (B, n) with n·addition_time_embed_dim equal to
    projection_class_embeddings_input_dim.

    Split input (EchoNet-Synthetic's layout: channels ``[0, c)`` noisy latents, ``[c, 2c)`` a
    conditioning latent repeated over the frames, c = in_channels / 2): ``conv_in`` is linear, so
    the conditioning half contributes the same feature map to every frame. Compute it once with
    :meth:`conditioning_features` and pass it as ``conditioning=``; ``sample`` then holds only the
    c noisy channels. Same outputs as the full input up to float rounding (the two halves are
    summed after their convolutions: one more rounding of the ``conv_in`` output).
    """

    diffusers_class = "UNetSpatioTemporalConditionModel"

    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 8,
        out_channels: int = 4,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ),
        up_block_types: Sequence[str] = (
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ),
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        addition_time_embed_dim: int = 256,
        projection_class_embeddings_input_dim: int = 768,
        layers_per_block: int | Sequence[int] = 2,
        cross_attention_dim: int | Sequence[int] = 1024,
        transformer_layers_per_block: int | Sequence[int] = 1,
        num_attention_heads: int | Sequence[int] = (5, 10, 20, 20),
        num_frames: int = 25,
    ):
        self.register_config(locals())
        chans = list(block_out_channels)
        n = len(chans)
        if n < 1:
            raise ConfigError("config key 'block_out_channels': value [] is not supported")
        require("len(down_block_types)", len(down_block_types), [n])
        require("len(up_block_types)", len(up_block_types), [n])
        for i, kind in enumerate(down_block_types):
            require(f"down_block_types[{i}]", kind, DOWN_TYPES)
        for i, kind in enumerate(up_block_types):
            require(f"up_block_types[{i}]", kind, UP_TYPES)
        for i, c in enumerate(chans):
            if not isinstance(c, int) or c <= 0 or c % 32:
                raise ConfigError(
                    f"config key 'block_out_channels': entry {i} = {c!r} is not a "
                    "positive multiple of 32 (the norm group count)"
                )
        heads = _per_block("num_attention_heads", num_attention_heads, n)
        layers = _per_block("layers_per_block", layers_per_block, n)
        xdim = _per_block("cross_attention_dim", cross_attention_dim, n)
        depth = _per_block("transformer_layers_per_block", transformer_layers_per_block, n)
        # heads of the levels with transformers (cross-attention stages, and the mid block)
        attending = (
            {i for i, k in enumerate(down_block_types) if k == DOWN_TYPES[0]}
            | {n - 1 - i for i, k in enumerate(up_block_types) if k == UP_TYPES[1]}
            | {n - 1}
        )
        for i in sorted(attending):
            c, h = chans[i], heads[i]
            if c % h:
                raise ConfigError(
                    f"config key 'num_attention_heads': entry {i} = {h} does not "
                    f"divide block_out_channels[{i}] = {c}"
                )

        temb = chans[0] * 4
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb)
        self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(down_block_types):
            attn = kind == "CrossAttnDownBlockSpatioTemporal"
            self.down_blocks.append(
                SpatioTemporalDownStage(
                    chans[max(i - 1, 0)],
                    chans[i],
                    temb_channels=temb,
                    num_layers=layers[i],
                    downsample=i < n - 1,
                    heads=heads[i] if attn else None,
                    transformer_layers=depth[i],
                    cross_attention_dim=xdim[i],
                )
            )
        self.mid_block = SpatioTemporalMidStage(
            chans[-1],
            temb_channels=temb,
            heads=heads[-1],
            transformer_layers=depth[-1],
            cross_attention_dim=xdim[-1],
        )
        rev = list(reversed(chans))
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(up_block_types):
            attn = kind == "CrossAttnUpBlockSpatioTemporal"
            j = n - 1 - i
            self.up_blocks.append(
                SpatioTemporalUpStage(
                    rev[min(i + 1, n - 1)],
                    rev[i],
                    rev[max(i - 1, 0)],
                    temb_channels=temb,
                    num_layers=layers[j] + 1,
                    upsample=i < n - 1,
                    heads=heads[j] if attn else None,
                    transformer_layers=depth[j],
                    cross_attention_dim=xdim[j],
                )
            )
        self.num_upsamplers = n - 1
        self.conv_norm_out = GroupNorm(32, chans[0], eps=1e-5, activation="silu")
        self.conv_out = nn.Conv2d(chans[0], out_channels, 3, padding=1)
        self.relayout_convs()  # conv kernels in the activations' layout (ModelBase.memory_format)
        self._run_memo: RunMemo | None = None
        self._time_projections = time_projections(self)
        self._mix_weights = MixWeights([m for m in self.modules() if isinstance(m, AlphaBlender)])
        self._packed_groups = (self._time_projections, self._mix_weights)
        # the modules the precomputed features are split over, in a fixed order
        self._feature_transformers = [
            m for m in self.modules() if isinstance(m, TransformerSpatioTemporalModel)
        ]
        self._feature_attentions = [
            block.attn2
            for tr in self._feature_transformers
            for pair in zip(tr.transformer_blocks, tr.temporal_transformer_blocks)
            for block in pair
        ]
        self._relayout()

    @contextlib.contextmanager
    def sampling_cache(self) -> Iterator[RunMemo]:
        """Reuse timestep-only work across the calls of one sampling run (inference only).

        Inside the block, the time embedding, every resblock's time-embedding projections and the
        frame-position embeddings are computed once per distinct (timestep, ``added_time_ids``,
        batch size, autocast state) and reused by later calls: the values are exactly those a call
        would compute. Entries are checked against the weights' storage and version counters, so
        changed weights are never served stale; the memo is dropped when the block ends, and
        nothing is reused under autograd. Keys read the timestep and ``added_time_ids`` values
        (a host copy of the small ids tensor, i.e. a device sync, per call).
        """
        previous = self._run_memo
        self._run_memo = memo = RunMemo()
        try:
            yield memo
        finally:
            self._run_memo = previous

    # ---- embeddings ---------------------------------------------------------------------------

    def time_embed(self, timesteps: torch.Tensor, added_time_ids: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps and (B, n) added time ids → (B, 4·C0) embedding in the model's dtype."""
        dtype = self.conv_in.weight.dtype
        b = timesteps.shape[0]
        emb = self.time_embedding(
            timestep_features(
                timesteps, self.config.block_out_channels[0], flip_sin_to_cos=True, freq_shift=0
            ).to(dtype)
        )
        add = timestep_features(
            added_time_ids.flatten(),
            self.config.addition_time_embed_dim,
            flip_sin_to_cos=True,
            freq_shift=0,
        ).reshape(b, -1)
        return emb + self.add_embedding(add.to(emb.dtype))

    def _time_conditioning(
        self,
        timestep: torch.Tensor | float | int,
        timesteps: torch.Tensor,
        added_time_ids: torch.Tensor,
        precomputed: dict[str, torch.Tensor | None],
    ) -> TimeEmbedding:
        """The call's :class:`TimeEmbedding`: from the caller's precomputed features
        (:meth:`time_features`, :meth:`context_features`, :meth:`frame_features`), from the
        sampling run's memo when active, or computed."""
        memo = self._run_memo
        packed = {"projections": self._time_projections, "mixers": self._mix_weights}
        features = self._precomputed_features(precomputed)
        table = precomputed["time_features"]
        if table is not None:
            return TimeEmbedding(None, table=table, features=features, **packed)
        if memo is None or not eager_inference():
            emb = self.time_embed(timesteps, added_time_ids)
            return TimeEmbedding(emb, features=features, **packed)
        key = (value_key(timestep), value_key(added_time_ids), timesteps.shape[0], timesteps.device)
        deps = (self.time_embedding, self.add_embedding)
        emb = memo.get(deps, ("emb", key), lambda: self.time_embed(timesteps, added_time_ids))
        return TimeEmbedding(emb, memo, key, deps, features=features, **packed)

    # ---- precomputed per-run features ----------------------------------------------------------
    #
    # Within a sampling run the time embedding's projections depend only on the step (and the
    # added time ids), the cross-attentions' outputs for a single-token context only on that
    # context, and the frame-position embeddings only on the frame count: a sampler computes them
    # once (a table of every step's projections, once per batch and once per run) and passes
    # them to every call, so a call (a CUDA-graph replay included) launches none of that work.

    def feature_widths(self) -> dict[str, int]:
        """Columns of :meth:`time_features`, :meth:`context_features` and :meth:`frame_features`."""
        return {
            "time_features": sum(self._time_projections.sizes) + self._mix_weights.width,
            "context_features": sum(a.to_out[0].out_features for a in self._feature_attentions),
            "frame_features": sum(tr.in_channels for tr in self._feature_transformers),
        }

    def time_features(
        self, timestep: torch.Tensor | float | int, added_time_ids: torch.Tensor
    ) -> torch.Tensor:
        """Every resblock's time-embedding projection (+ its folded conv bias) for a timestep,
        then every AlphaBlender's temporal weight ``1 - sigmoid(mix_factor)`` (the same in every
        row; carried here so that no step computes them): (B, P),
        P = ``feature_widths()["time_features"]``, for ``added_time_ids`` (B, n) and a
        timestep (a number, or 0-d, (1,) or (B,)). Pass row i of it as ``time_features=`` to a
        call whose sample i has that timestep and ids: the call then skips its time embedding.
        Compute it under the call's autocast state (its dtype is the call's)."""
        cfg = self.config
        n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
        if added_time_ids.dim() != 2 or added_time_ids.shape[1] != n_ids:
            raise ValueError(
                f"added_time_ids must be (B, {n_ids}), got {tuple(added_time_ids.shape)}"
            )
        b = added_time_ids.shape[0]
        timesteps = self._timesteps(timestep, b, added_time_ids.device)
        proj = self._time_projections.all(self.time_embed(timesteps, added_time_ids))
        mix = self._mix_weights.all(proj.dtype).to(proj.device)
        return torch.cat([proj, mix.expand(b, -1)], dim=-1)

    def context_features(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Every cross-attention's output for a single-token context: (B, R),
        R = ``feature_widths()["context_features"]``, from ``encoder_hidden_states`` (B, 1, D).
        Pass it as ``context_features=`` to calls with that context (one row per sample).
        Compute it under the call's autocast state."""
        ctx = encoder_hidden_states
        if ctx.dim() != 3 or ctx.shape[1] != 1:
            raise ValueError(
                "context_features are for single-token contexts (B, 1, D); got "
                f"encoder_hidden_states of shape {tuple(ctx.shape)}"
            )
        ctx = self._call_context(ctx)
        return torch.cat([a.single_key(ctx)[:, 0] for a in self._feature_attentions], dim=-1)

    def frame_features(
        self, num_frames: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Every transformer's frame-position embedding of frames 0..T-1: (T, Q),
        Q = ``feature_widths()["frame_features"]``. Pass it as ``frame_features=`` to calls of
        ``num_frames`` frames. Compute it under the call's autocast state."""
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        device = torch.device(device) if device is not None else self.device
        dtype = self._call_dtype(device)
        return torch.cat(
            [tr.frame_embedding(num_frames, device, dtype) for tr in self._feature_transformers],
            dim=-1,
        )

    def _call_context(self, ctx: torch.Tensor) -> torch.Tensor:
        """The context as the cross-attentions read it: cast once to autocast's dtype (the cast
        every key/value projection would make)."""
        dev = ctx.device.type
        if ctx.is_floating_point() and torch.is_autocast_enabled(dev):
            return ctx.to(torch.get_autocast_dtype(dev))
        return ctx

    def _check_precomputed(
        self, precomputed: dict[str, torch.Tensor | None], rows: dict[str, int], device, dtype
    ) -> None:
        """Shapes, device and dtype of the precomputed features against this call's."""
        if all(v is None for v in precomputed.values()):
            return
        widths = self.feature_widths()
        for name, value in precomputed.items():
            if value is None:
                continue
            want = (rows[name], widths[name])
            if tuple(value.shape) != want or value.device != device or value.dtype != dtype:
                raise ValueError(
                    f"{name} must be {want} {dtype} on {device} (LVDM.{name} computed under "
                    f"this call's autocast state), got {tuple(value.shape)} {value.dtype} on "
                    f"{value.device}"
                )

    def _precomputed_features(
        self, precomputed: dict[str, torch.Tensor | None]
    ) -> dict[nn.Module, torch.Tensor]:
        """{module: its columns} of the context and frame features."""
        out: dict[nn.Module, torch.Tensor] = {}
        frames = precomputed["frame_features"]
        if frames is not None:
            trs = self._feature_transformers
            out.update(zip(trs, frames.split([tr.in_channels for tr in trs], dim=-1)))
        ctx = precomputed["context_features"]
        if ctx is not None:
            attns = self._feature_attentions
            out.update(zip(attns, ctx.split([a.to_out[0].out_features for a in attns], dim=-1)))
        return out

    @staticmethod
    def _timesteps(
        timestep: torch.Tensor | float | int, batch: int, device: torch.device
    ) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            # as diffusers' SVD UNet: a Python float stays fractional (float64), an int is int64
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if dtype == torch.float64 and device.type == "mps":
                dtype = torch.float32
            timestep = torch.tensor([timestep], dtype=dtype, device=device)
        return batch_timesteps(timestep, batch, device)

    # ---- the conditioning half of conv_in ------------------------------------------------------

    def _split_channels(self) -> int:
        """c: the noisy latents are input channels ``[0, c)``, the conditioning ``[c, 2c)``."""
        n = self.config.in_channels
        if n % 2:
            raise ValueError(
                "the conditioning split needs an even in_channels (noisy latents and a "
                f"conditioning latent of equal size); this LVDM has {n}"
            )
        return n // 2

    def conditioning_features(self, cond: torch.Tensor) -> torch.Tensor:
        """``conv_in``'s response to the conditioning half of its input, bias included.

        Args:
            cond: (N, c, H, W) conditioning latents, padded as the sample will be (c =
                in_channels / 2): the frame-constant channels ``[c, 2c)`` of the full input.

        Returns:
            (N, C0, H, W), C0 = block_out_channels[0], in the activations' layout: pass it as
            ``conditioning=`` to :meth:`forward` (one per batch item, shared by all its frames).
            Computed in autocast's dtype when autocast is on, else in ``cond``'s dtype (the
            weights' when they match; an ``autocast_copy``'s reduced-precision weights are cast).
        """
        c = self._split_channels()
        if cond.dim() != 4 or cond.shape[1] != c:
            raise ValueError(f"cond must be (N, {c}, H, W), got {tuple(cond.shape)}")
        w = self.conv_in.weight[:, c:].contiguous(memory_format=self.memory_format)
        bias = self.conv_in.bias
        if w.dtype != cond.dtype and not torch.is_autocast_enabled(cond.device.type):
            # e.g. an autocast_copy (reduced-precision weights) given fp32 conditioning
            w = w.to(cond.dtype)
            bias = None if bias is None else bias.to(cond.dtype)
        x = cond.contiguous(memory_format=self.memory_format)
        return F.conv2d(x, w, bias, padding=self.conv_in.padding)

    def _conv_in(self, sample: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C, H, W) → (B·T, C0, H, W): the full ``conv_in``, or its noisy half plus the
        precomputed conditioning features broadcast over the frames (added in place)."""
        b, t = sample.shape[:2]
        flat = sample.flatten(0, 1).contiguous(memory_format=self.memory_format)
        if conditioning is None:
            return self.conv_in(flat)
        c = self._split_channels()
        w = self.conv_in.weight[:, :c].contiguous(memory_format=self.memory_format)
        x = F.conv2d(flat, w, None, padding=self.conv_in.padding)
        if eager_inference():
            x.unflatten(0, (b, t)).add_(conditioning.unsqueeze(1))
            return x
        return (x.unflatten(0, (b, t)) + conditioning.unsqueeze(1)).flatten(0, 1)

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        return_dict: bool = True,
        *,
        conditioning: torch.Tensor | None = None,
        time_features: torch.Tensor | None = None,
        context_features: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
        channels_last_output: bool = False,
    ) -> SampleOutput | tuple[torch.Tensor]:
        """The denoiser's output (B, T, out_channels, H, W).

        ``conditioning``: None (``sample`` is the full (B, T, in_channels, H, W) input), or the
        (B, C0, H, W) :meth:`conditioning_features` of each sample's conditioning latent; then
        ``sample`` is (B, T, in_channels / 2, H, W), the noisy channels only.

        Precomputed features (each optional; the call then skips that work; the caller
        guarantees they belong to this call's inputs): ``time_features`` (B, P),
        :meth:`time_features` of this timestep and ``added_time_ids``; ``context_features``
        (B, R), :meth:`context_features` of ``encoder_hidden_states`` (single-token contexts);
        ``frame_features`` (T, Q), :meth:`frame_features` of T frames. Sampling pipelines
        compute them once per run or batch.

        Layouts: ``sample`` is read in place when its frames are already in the activations'
        layout (``memory_format``) and dtype (autocast's when on), else copied once.
        ``channels_last_output=True`` returns the output as a view of the frames the last
        convolution wrote (no copy; in channels-last memory, so not contiguous), for callers
        that read strided tensors (the sampler's fused step).
        """
        cfg = self.config
        split = conditioning is not None
        want = self._split_channels() if split else cfg.in_channels
        if torch.is_tensor(sample) and (sample.dim() != 5 or sample.shape[2] != want):
            raise ValueError(
                f"sample must be (B, T, {want}, H, W)"
                + (" with conditioning=" if split else "")
                + f", got {tuple(sample.shape)}"
            )
        check_input("sample", sample, "B, T, C, H, W", C=want)
        check_input("encoder_hidden_states", encoder_hidden_states, "B, L, D")
        if not torch.is_tensor(added_time_ids):
            raise ValueError(
                f"added_time_ids must be a (B, n) tensor, got {type(added_time_ids).__name__}"
            )
        b, t = sample.shape[:2]
        if split and tuple(conditioning.shape) != (b, cfg.block_out_channels[0], *sample.shape[3:]):
            raise ValueError(
                f"conditioning must be {(b, cfg.block_out_channels[0], *sample.shape[3:])} (the "
                f"conditioning_features of one latent per sample), got {tuple(conditioning.shape)}"
            )
        ctx = encoder_hidden_states
        if ctx.dim() != 3 or ctx.shape[0] != b:
            raise ValueError(f"encoder_hidden_states must be ({b}, L, D), got {tuple(ctx.shape)}")
        if context_features is None or ctx.shape[1] != 1:
            # cast once: the cast every cross-attention's key/value projection would make (with
            # precomputed single-key outputs no cross-attention reads the context's values)
            ctx = self._call_context(ctx)
        n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
        if added_time_ids.shape != (b, n_ids) or n_ids * cfg.addition_time_embed_dim != (
            cfg.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                f"added_time_ids must be ({b}, {n_ids}) (projection_class_embeddings_input_dim / "
                f"addition_time_embed_dim ids per sample), got {tuple(added_time_ids.shape)}"
            )

        factor = 2**self.num_upsamplers
        forward_upsample_size = any(s % factor != 0 for s in sample.shape[-2:])
        precomputed = {
            "time_features": time_features,
            "context_features": context_features,
            "frame_features": frame_features,
        }
        if context_features is not None and ctx.shape[1] != 1:
            raise ValueError(
                "context_features are for single-token contexts; encoder_hidden_states has "
                f"shape {tuple(ctx.shape)}"
            )
        rows = {"time_features": b, "context_features": b, "frame_features": t}
        self._check_precomputed(precomputed, rows, sample.device, self._call_dtype(sample.device))
        timesteps = self._timesteps(timestep, b, sample.device)
        emb = self._time_conditioning(timestep, timesteps, added_time_ids, precomputed)

        # channels-last activations (ModelBase.memory_format): faster CPU convs, and the token and
        # (B, C, T, H, W) layouts of the transformers and temporal resnets become views
        x = self._conv_in(sample, conditioning)
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.down_blocks:
            x, res = run_stage(self, block, x, emb, ctx, t)
            skips += res
        x = run_stage(self, self.mid_block, x, emb, ctx, t)
        upsample_size = None
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = tuple(skips[-1].shape[2:])
            x = run_stage(self, block, x, res, emb, ctx, t, upsample_size)
        x = self.conv_out(self.conv_norm_out(x))
        x = x.unflatten(0, (b, t))
        if not channels_last_output:
            x = x.contiguous()
        return SampleOutput(sample=x) if return_dict else (x,)
