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
from ..nn.embeddings import sampling_cache
from ..ops.window_step import window_step, window_tables
from ..outputs import ModelOutput
from ..rng import randn_tensor
from .common import (
    check_finite,
    check_precision,
    frames_to_uint8,
    latent_padding,
    pad_replicate,
    reference_scheduler,
    resolve_generators,
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

    The length is rounded up to a multiple of the stride ``window // 2``; a video no longer
    than one window is a single window of that length. 192 frames, window 64 → (192,
    [0, 32, 64, 96, 128]).
    """
    if num_frames < 1 or window < 2:
        raise ValueError(f"need num_frames >= 1 and window >= 2, got {num_frames}, {window}")
    stride = window // 2
    total = math.ceil(num_frames / stride) * stride
    if total <= window:
        return total, [0]
    return total, list(range(0, total - window + 1, stride))


class LVDMPipeline:
    """Animates conditioning latents into videos with requested ejection fractions.

    Per sample, in fp32 and in this order, its generator gives the initial latents
    (1, T_total, C, h, w), then one noise tensor of that shape per step with t > 0.
    """

    def __init__(self, lvdm: LVDM, vae: VAE | None = None, scheduler=None):
        self.lvdm = lvdm
        self.vae = vae
        self.scheduler = scheduler if scheduler is not None else reference_scheduler()
        if not hasattr(self.scheduler, "step_coefficients"):
            raise TypeError(
                f"LVDMPipeline needs an echofast scheduler (echofast.schedulers.DDPMScheduler or "
                f"DDIMScheduler: the fused window step uses step_coefficients), got "
                f"{type(self.scheduler).__name__}"
            )

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
        progress: bool = True,
        return_dict: bool = True,
    ) -> LVDMPipelineOutput | tuple:
        """Generate one video per conditioning latent.

        Args:
            cond_latents: (B, C, h, w) heart-image latents, × scaling_factor (LIDM output).
            ef: (B,) requested ejection fractions in percent (passed to the model as EF/100).
            num_frames: frames per video; any length (see :func:`window_plan`).
            generator / seed / sample_indices: per-sample randomness (stream ``"lvdm"``), as
                :class:`~echofast.pipelines.LIDMPipeline`.
            batch_size: videos per UNet call (each contributes all its windows).
            decode_chunk_size: frames per VAE decode call.
            output_type: "uint8" (decoded videos) or "latent".
            dtype: UNet autocast precision; the VAE decodes in fp32.
        """
        if output_type not in ("uint8", "latent"):
            raise ValueError(f"output_type must be 'uint8' or 'latent', got {output_type!r}")
        if output_type == "uint8" and self.vae is None:
            raise ValueError("decoding videos needs a VAE (or use output_type='latent')")
        cfg = self.lvdm.config
        if cond_latents.dim() != 4:
            raise ValueError(f"cond_latents must be (B, C, h, w), got {tuple(cond_latents.shape)}")
        b, c, h, w = cond_latents.shape
        if 2 * c != cfg.in_channels:
            raise ValueError(
                f"cond_latents have {c} channels; this LVDM takes "
                f"{cfg.in_channels} = 2 x {cfg.in_channels // 2}"
            )
        ef = torch.as_tensor(ef, dtype=torch.float32).reshape(-1)
        if ef.numel() != b:
            raise ValueError(f"got {ef.numel()} EF values for {b} conditioning latents")
        if batch_size < 1 or decode_chunk_size < 1:
            raise ValueError("batch_size and decode_chunk_size must be >= 1")
        gens = resolve_generators(
            b, generator=generator, seed=seed, sample_indices=sample_indices, stream="lvdm"
        )
        indices = list(sample_indices) if sample_indices is not None else list(range(b))
        device = self.lvdm.device
        dtype = check_precision(dtype, device)
        pad = latent_padding(h, 2 ** (len(cfg.block_out_channels) - 1))
        total, starts = window_plan(num_frames, cfg.num_frames)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        bar = tqdm(total=b * len(timesteps), disable=not progress, unit="step", desc="LVDM")
        latents_out, videos_out = [], []
        # timestep-only work (time embeddings and their per-block projections) once per run
        with sampling_cache(self.lvdm):
            for s in range(0, b, batch_size):
                sl = slice(s, s + batch_size)
                latents = self._sample(
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
                    videos_out.append(self.decode(latents, decode_chunk_size, indices[sl]))
        bar.close()
        result = LVDMPipelineOutput(
            videos=torch.cat(videos_out) if videos_out else None, latents=torch.cat(latents_out)
        )
        return result if return_dict else result.to_tuple()

    def _sample(self, cond, ef, gens, indices, total, starts, pad, timesteps, dtype, bar):
        b, c, h, w = cond.shape
        cfg = self.lvdm.config
        window = min(cfg.num_frames, total)
        overlap = window - cfg.num_frames // 2
        n_win = len(starts)
        device = cond.device
        latents = randn_tensor(
            (b, total, c, h, w), generator=gens, device=device, dtype=torch.float32
        )
        ehs = (ef / 100).repeat_interleave(n_win).reshape(b * n_win, 1, 1)
        n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
        ids = torch.zeros(b * n_win, n_ids, device=device)
        # The UNet input of every window, replicate-padded, kept between steps: the conditioning
        # channels are written once, the latent channels by window_step after every step.
        hp, wp = h + 2 * pad, w + 2 * pad
        x = torch.empty(b * n_win, window, 2 * c, hp, wp, device=device)
        cond_in = cond[:, None, None].expand(b, n_win, window, c, h, w)
        x[:, :, c:] = pad_replicate(cond_in.reshape(b * n_win, window, c, h, w), pad)
        wins = torch.stack([latents[:, s : s + window] for s in starts], dim=1)
        x[:, :, :c] = pad_replicate(wins.reshape(b * n_win, window, c, h, w), pad)
        frame_window, frame_offset = window_tables(total, starts, window, overlap)
        tables = [
            torch.tensor(v, dtype=torch.int32, device=device)
            for v in (frame_window, frame_offset, starts)
        ]
        clip = self.scheduler.clip_bound
        for step, t in enumerate(timesteps):
            with unet_precision(device, dtype):
                pred = self.lvdm(x, t, encoder_hidden_states=ehs, added_time_ids=ids).sample
            noise = None
            if self.scheduler.step_needs_noise(t):  # the scheduler's own draw (seed contract)
                noise = randn_tensor(
                    tuple(latents.shape), generator=gens, device=device, dtype=torch.float32
                )
            coeffs = self.scheduler.step_coefficients(t, b).to(device)
            latents = window_step(
                pred, latents, coeffs, noise, *tables, pad=pad, clip=clip, next_input=x
            )
            check_finite(latents, "LVDM latent", indices, step)
            bar.update(b)
        return latents

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, chunk_size: int = 64, indices: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Latents (B, T, C, h, w) × scaling_factor → uint8 grayscale videos (B, T, H, W)."""
        b, t = latents.shape[:2]
        flat = latents.reshape(b * t, *latents.shape[2:]) / self.vae.config.scaling_factor
        vae_device = self.vae.device
        frames = []
        for s in range(0, flat.shape[0], chunk_size):
            decoded = self.vae.decode(
                flat[s : s + chunk_size].to(vae_device, self.vae.dtype)
            ).sample
            frames.append(decoded)
        decoded = torch.cat(frames).reshape(b, t, *frames[0].shape[1:])
        check_finite(decoded, "decoded video", indices or list(range(b)), "decode")
        return frames_to_uint8(decoded.flatten(0, 1)).reshape(b, t, *decoded.shape[-2:])
