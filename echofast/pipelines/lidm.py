"""LIDM sampling: latent heart images, seeded per sample (the reference algorithm, fixed RNG)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import LIDM, VAE
from ..nn.embeddings import sampling_cache
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
    unpad,
)

OUTPUT_TYPES = ("latent", "pt", "np", "pil")


@dataclass
class LIDMPipelineOutput(ModelOutput):
    """``latents``: (N, C, h, w) fp32, already × scaling_factor (as the reference saves them);
    ``images``: grayscale previews per ``output_type`` (None for "latent")."""

    latents: torch.Tensor
    images: torch.Tensor | np.ndarray | list | None = None


class LIDMPipeline:
    """Draws latent heart images with the LIDM and a DDPM/DDIM scheduler.

    Per sample, in fp32 and in this order, its own generator gives: the initial latents
    (1, C, h, w), then one noise tensor of that shape per step with t > 0 (drawn by the
    scheduler). Each step pads the latents (replicate, to a multiple of the UNet's downsampling
    factor: 14 → 16), runs the UNet, unpads and steps the scheduler on the unpadded latents.
    """

    def __init__(self, lidm: LIDM, vae: VAE | None = None, scheduler=None):
        self.lidm = lidm
        self.vae = vae
        self.scheduler = scheduler if scheduler is not None else reference_scheduler()

    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 1,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        sample_indices: Sequence[int] | None = None,
        num_inference_steps: int = 64,
        batch_size: int = 32,
        output_type: str = "latent",
        dtype: torch.dtype | str = torch.float32,
        progress: bool = True,
        return_dict: bool = True,
    ) -> LIDMPipelineOutput | tuple:
        """Sample ``num_images`` latents (see the class docstring for the RNG contract).

        ``generator``: one per image; or ``seed`` (+ optional global ``sample_indices``) from
        which per-sample generators are derived by :func:`echofast.rng.sample_seed` (stream
        ``"lidm"``). ``output_type``: "latent", or also decoded previews as "pt" (N, 1, H, W)
        float in [0, 1], "np" (N, H, W, 1) float, "pil" (grayscale images, uint8 reference
        rounding). ``dtype``: UNet autocast precision (reduced precision on CUDA only).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(f"output_type={output_type!r} needs a VAE")
        if batch_size < 1 or num_images < 1:
            raise ValueError(
                f"num_images and batch_size must be >= 1, got {num_images}, {batch_size}"
            )
        gens = resolve_generators(
            num_images, generator=generator, seed=seed, sample_indices=sample_indices, stream="lidm"
        )
        indices = list(sample_indices) if sample_indices is not None else list(range(num_images))
        device = self.lidm.device
        dtype = check_precision(dtype, device)
        cfg = self.lidm.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        pad = latent_padding(size, 2 ** (len(cfg.block_out_channels) - 1))
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        shape = (cfg.in_channels, size, size)
        out = []
        bar = tqdm(
            total=num_images * len(timesteps), disable=not progress, unit="step", desc="LIDM"
        )
        # timestep-only work (time embedding and its per-block projections) once per run
        with sampling_cache(self.lidm):
            for start in range(0, num_images, batch_size):
                g = gens[start : start + batch_size]
                idx = indices[start : start + batch_size]
                latents = randn_tensor(
                    (len(g), *shape), generator=g, device=device, dtype=torch.float32
                )
                for step, t in enumerate(timesteps):
                    with unet_precision(device, dtype):
                        pred = self.lidm(pad_replicate(latents, pad), t).sample
                    pred = unpad(pred, pad).float()
                    latents = self.scheduler.step(pred, t, latents, generator=g).prev_sample
                    check_finite(latents, "LIDM latent", idx, step)
                    bar.update(len(g))
                out.append(latents)
        bar.close()
        latents = torch.cat(out)
        images = None if output_type == "latent" else self._previews(latents, output_type)
        result = LIDMPipelineOutput(latents=latents, images=images)
        return result if return_dict else result.to_tuple()

    def _previews(self, latents: torch.Tensor, output_type: str):
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(f.cpu().numpy(), mode="L") for f in frames_to_uint8(decoded)]
        gray = ((decoded.float().mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)
        return gray if output_type == "pt" else gray.permute(0, 2, 3, 1).cpu().numpy()
