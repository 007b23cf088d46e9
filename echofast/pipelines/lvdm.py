"""LVDM sampling: EF-conditioned latent videos from heart-image latents, then VAE decoding.

Window stitching is the reference's: the video is rounded up to a multiple of the stride
(half the model's ``num_frames`` window), split into windows of ``num_frames`` frames that overlap
by half, all windows of all videos of a batch go through the UNet in one call, and the step keeps
every frame of window 0 and the second half of each later window (no averaging).

Fixed from the reference: every window is conditioned on its own video's EF (the reference's
``repeat_interleave`` gave most windows another video's EF), and the noise is drawn per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models import LVDM, VAE
from ..ops.window_step import window_step, window_tables
from ..outputs import ModelOutput
from ..rng import randn_tensor
from .common import (
    SamplingPipeline,
    check_cuda_graphs,
    check_decode_dtype,
    check_finite,
    check_precision,
    echofast_model,
    frames_to_uint8,
    pad_replicate,
    resolve_generators,
    square_padding,
    unet_precision,
)


@dataclass
class LVDMPipelineOutput(ModelOutput):
    """``videos``: uint8 (B, T, H, W) grayscale, or None for ``output_type="latent"``;
    ``latents``: fp32 (B, T, C, h, w), × scaling_factor."""

    videos: torch.Tensor | None
    latents: torch.Tensor


def window_plan(num_frames: int, window: int) -> tuple[int, list[int]]:
    """(padded length, window starts) for a video of ``num_frames`` and windows of ``window``.

    Windows start every stride ``s = window // 2`` frames and each later window adds its last
    ``s`` frames. A video no longer than one window is a single window of its length rounded up
    to a multiple of ``s`` (at most ``window``); a longer one gets as many windows as it needs,
    ``window + (n - 1)·s`` frames. For an even window that is the reference's rule, the length
    rounded up to a multiple of ``s``: 192 frames, window 64 → (192, [0, 32, 64, 96, 128]). An
    odd window (e.g. SVD's 25) overlaps its predecessor by ``window - s`` frames.
    """
    if num_frames < 1 or window < 2:
        raise ValueError(f"need num_frames >= 1 and window >= 2, got {num_frames}, {window}")
    stride = window // 2
    if num_frames <= window:
        return min(math.ceil(num_frames / stride) * stride, window), [0]
    later = math.ceil((num_frames - window) / stride)
    return window + later * stride, [k * stride for k in range(later + 1)]


class LVDMPipeline(SamplingPipeline):
    """Animates conditioning latents into videos with requested ejection fractions.

    Per sample, in fp32 and in this order, its generator gives the initial latents
    (1, T_total, C, h, w), then one noise tensor of that shape per step with t > 0.

    Each step runs the UNet on every window of every video of a batch, then the fused
    :func:`~echofast.ops.window_step` (stitch, scheduler update, padded windows written into the
    persistent UNet input). With echofast's :class:`~echofast.models.LVDM` the UNet input holds only
    the noisy latent channels: ``conv_in``'s response to the conditioning latent is computed once
    per batch (:meth:`~echofast.models.LVDM.conditioning_features`) and added at every step;
    other modules (e.g. diffusers' UNet) get the full input with the conditioning channels.

    CUDA graphs (``cuda_graphs=``, :mod:`echofast.pipelines.graphs`): the UNet call is captured
    once per batch shape and replayed at every step, reading the pipeline's persistent input
    tensors directly (no copies). The graphs and their memory pools, and the input tensors, are
    kept by the pipeline for its next calls; :meth:`release_graphs` frees them. On CUDA the loop
    has no per-step host sync: noise is staged through pinned buffers, and the finiteness check
    is recorded on the device and read once per batch (:class:`~.common.FiniteWatch`, same error).
    """

    _model = "lvdm"
    _model_class = LVDM
    lvdm: LVDM

    def __init__(self, lvdm: LVDM, vae: VAE | None = None, scheduler=None):
        super().__init__(lvdm, vae, scheduler)

    @torch.no_grad()
    def __call__(
        self,
        cond_latents: torch.Tensor,
        ef: Sequence[float] | torch.Tensor,
        *,
        num_frames: int = 192,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        sample_indices: Sequence[int] | None = None,
        num_inference_steps: int = 64,
        batch_size: int = 8,
        decode_chunk_size: int = 64,
        output_type: str = "uint8",
        dtype: torch.dtype | str = torch.float32,
        decode_dtype: torch.dtype | str = torch.float32,
        cuda_graphs: bool | None = None,
        progress: bool = True,
        return_dict: bool = True,
    ) -> LVDMPipelineOutput | tuple:
        """Generate one video per conditioning latent.

        Args:
            cond_latents: (B, C, h, w) heart-image latents, × scaling_factor (LIDM output).
            ef: (B,) requested ejection fractions in percent (passed to the model as EF/100),
                finite; values outside 0-100 extrapolate past any training data.
            num_frames: frames per video; any length (see :func:`window_plan`).
            generator / seed / sample_indices: per-sample randomness (stream ``"lvdm"``), as
                :class:`~echofast.pipelines.LIDMPipeline`.
            batch_size: videos per UNet call (each contributes all its windows).
            decode_chunk_size: frames per VAE decode call.
            output_type: "uint8" (decoded videos) or "latent".
            dtype: UNet autocast precision (reduced precision on CUDA only).
            decode_dtype: VAE decode precision, see :meth:`decode` (default float32).
            cuda_graphs: None (default): replay the UNet from CUDA graphs where they can be
                captured, else eager calls; True: graphs or
                :class:`~echofast.errors.BackendUnavailable` listing every reason; False: eager.
        """
        if output_type not in ("uint8", "latent"):
            raise ValueError(f"output_type must be 'uint8' or 'latent', got {output_type!r}")
        if output_type == "uint8" and self.vae is None:
            raise ValueError("decoding videos needs a VAE (or use output_type='latent')")
        cfg = self.lvdm.config
        if cond_latents.dim() != 4:
            raise ValueError(f"cond_latents must be (B, C, h, w), got {tuple(cond_latents.shape)}")
        b, c, h, w = cond_latents.shape
        if b == 0:
            raise ValueError("cond_latents hold no image: got a batch of 0")
        if 2 * c != cfg.in_channels:
            raise ValueError(
                f"cond_latents have {c} channels; this LVDM takes "
                f"{cfg.in_channels} = 2 x {cfg.in_channels // 2}"
            )
        ef = torch.as_tensor(ef, dtype=torch.float32).reshape(-1)
        if ef.numel() != b:
            raise ValueError(f"got {ef.numel()} EF values for {b} conditioning latents")
        bad = (~torch.isfinite(ef)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"ef must be finite: EF {ef[bad[0]].item()} at position {bad[0]}")
        if batch_size < 1 or decode_chunk_size < 1:
            raise ValueError("batch_size and decode_chunk_size must be >= 1")
        decode_dtype = check_decode_dtype(decode_dtype)
        cuda_graphs = check_cuda_graphs(cuda_graphs)
        gens = resolve_generators(
            b, generator=generator, seed=seed, sample_indices=sample_indices, stream="lvdm"
        )
        indices = list(sample_indices) if sample_indices is not None else list(range(b))
        device = self.lvdm.device
        dtype = check_precision(dtype, device)
        model = self._sampling_model(dtype)
        unet = self._unet(cuda_graphs, model)
        pad = square_padding(h, w, 2 ** (len(cfg.block_out_channels) - 1))
        total, starts = window_plan(num_frames, cfg.num_frames)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        latents_out, videos_out = [], []
        # leave=None: kept when it is the only bar, cleared when nested under a job's bar
        bar = tqdm(
            total=b * len(timesteps), disable=not progress, unit="step", desc="LVDM", leave=None
        )
        with bar:
            for s in range(0, b, batch_size):
                sl = slice(s, s + batch_size)
                latents = self._sample(
                    unet,
                    model,
                    cond_latents[sl].to(device, torch.float32),
                    ef[sl].to(device),
                    gens[sl],
                    indices[sl],
                    total,
                    starts,
                    pad,
                    timesteps,
                    dtype,
                    bar,
                )[:, :num_frames]
                latents_out.append(latents)
                if output_type == "uint8":
                    videos_out.append(
                        self.decode(latents, decode_chunk_size, indices[sl], dtype=decode_dtype)
                    )
        result = LVDMPipelineOutput(
            videos=torch.cat(videos_out) if videos_out else None, latents=torch.cat(latents_out)
        )
        return result if return_dict else result.to_tuple()

    def _sample(
        self, unet, model, cond, ef, gens, indices, total, starts, pad, timesteps, dtype, bar
    ):
        b, c, h, w = cond.shape
        cfg = self.lvdm.config
        window = min(cfg.num_frames, total)
        overlap = window - cfg.num_frames // 2
        n_win = len(starts)
        n = b * n_win
        device = cond.device
        f32 = torch.float32
        latents = randn_tensor((b, total, c, h, w), generator=gens, device=device, dtype=f32)
        # The UNet's inputs live in tensors kept between steps (and batches, and calls: a CUDA
        # graph reads them in place): window_step writes the next step's padded windows into x.
        n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
        ehs = self._inputs.get("ehs", (n, 1, 1), f32, device)
        ehs.copy_((ef / 100).repeat_interleave(n_win).reshape(n, 1, 1))
        ids = self._inputs.get("ids", (n, n_ids), f32, device).zero_()
        kwargs = {"encoder_hidden_states": ehs, "added_time_ids": ids}
        split = hasattr(self.lvdm, "conditioning_features")
        hp, wp = h + 2 * pad, w + 2 * pad
        lvdm = echofast_model(model, LVDM)
        x = self._unet_input(lvdm, (n, window, c if split else 2 * c, hp, wp), device, dtype)
        if lvdm is not None:
            kwargs["channels_last_output"] = True  # window_step reads it strided
        cond = pad_replicate(cond, pad)
        if split:  # conv_in's conditioning half, once per batch (fp32, bias included)
            feats = self.lvdm.conditioning_features(cond).repeat_interleave(n_win, dim=0)
            kwargs["conditioning"] = self._inputs.get(
                "conditioning", tuple(feats.shape), feats.dtype, device, feats.stride()
            ).copy_(feats)
        else:
            x[:, :, c:] = cond[:, None, None].expand(b, n_win, window, c, hp, wp).flatten(0, 1)
        wins = torch.stack([latents[:, s : s + window] for s in starts], dim=1)
        x[:, :, :c] = pad_replicate(wins.reshape(n, window, c, h, w), pad)
        frame_window, frame_offset = window_tables(total, starts, window, overlap)
        tables = [
            torch.tensor(v, dtype=torch.int32, device=device)
            for v in (frame_window, frame_offset, starts)
        ]
        coeffs, needs_noise, steps, noise_source, watch = self._step_plan(
            timesteps, b, gens, tuple(latents.shape), device, "LVDM latent", indices
        )
        time_table = self._precompute(lvdm, kwargs, steps, window, dtype)
        clip = self.scheduler.clip_bound
        for step in range(len(timesteps)):
            if time_table is not None:
                kwargs["time_features"].copy_(time_table[step].expand(n, -1))
            with unet_precision(device, dtype):
                pred = unet(x, steps[step], **kwargs).sample
            # the scheduler's own draw (seed contract)
            noise = noise_source() if needs_noise[step] else None
            latents = window_step(
                pred, latents, coeffs[step], noise, *tables, pad=pad, clip=clip, next_input=x
            )
            watch.update(latents, step)
            bar.update(b)
        watch.check()
        return latents

    def _precompute(
        self, model: LVDM | None, kwargs: dict, steps: torch.Tensor, window: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """For echofast's LVDM: the run's constant work, done once instead of at every step
        (:meth:`~echofast.models.LVDM.time_features` and its siblings, under the steps'
        autocast state). Puts ``context_features``, ``frame_features`` and the ``time_features``
        input (filled per step from the returned (S, P) table, one row per step: every sample
        has the same added time ids) into ``kwargs``, as persistent tensors a CUDA graph reads in
        place. Returns the table, or None for other UNets (``model`` None: nothing
        precomputed)."""
        if model is None:
            return None
        ehs, ids = kwargs["encoder_hidden_states"], kwargs["added_time_ids"]
        n, device = ids.shape[0], ids.device
        with unet_precision(device, dtype):
            table = model.time_features(steps, ids[:1].expand(len(steps), -1))
            fixed = {
                "context_features": model.context_features(ehs),
                "frame_features": model.frame_features(window, device),
            }
        for name, value in fixed.items():
            kwargs[name] = self._inputs.get(name, tuple(value.shape), value.dtype, device)
            kwargs[name].copy_(value)
        kwargs["time_features"] = self._inputs.get(
            "time_features", (n, table.shape[1]), table.dtype, device
        )
        return table

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        chunk_size: int = 64,
        indices: Sequence[int] | None = None,
        *,
        dtype: torch.dtype | str = torch.float32,
    ) -> torch.Tensor:
        """Latents (B, T, C, h, w) × scaling_factor → uint8 grayscale videos (B, T, H, W).

        ``dtype``: decode precision. float32 (default, the reference's), or float16/bfloat16 by
        autocast (fp32 weights, GroupNorm statistics in fp32), on any device. Measured error vs
        fp32 on the real VAE config with random weights and on the demo VAE:
        ``tests/models/test_vae_precision.py`` (its docstring has the numbers and bounds).
        """
        dtype = check_decode_dtype(dtype)
        if latents.dim() != 5 or latents.shape[0] * latents.shape[1] == 0:
            raise ValueError(
                f"latents must be (B, T, C, h, w) with B, T >= 1, got {tuple(latents.shape)}"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        b, t = latents.shape[:2]
        flat = latents.reshape(b * t, *latents.shape[2:]) / self.vae.config.scaling_factor
        vae_device = self.vae.device
        frames = []
        with unet_precision(vae_device, dtype):
            for s in range(0, flat.shape[0], chunk_size):
                decoded = self.vae.decode(
                    flat[s : s + chunk_size].to(vae_device, self.vae.dtype)
                ).sample
                frames.append(decoded)
        decoded = torch.cat(frames).reshape(b, t, *frames[0].shape[1:])
        check_finite(decoded, "decoded video", indices or list(range(b)), "decode")
        return frames_to_uint8(decoded.flatten(0, 1)).reshape(b, t, *decoded.shape[-2:])
