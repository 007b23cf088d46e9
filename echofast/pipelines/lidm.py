"""LIDM sampling: latent heart images, seeded per sample (the reference algorithm, fixed RNG)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import LIDM, VAE
from ..ops.window_step import window_step
from ..outputs import ModelOutput
from ..rng import randn_tensor
from .common import (
    SamplingPipeline,
    check_cuda_graphs,
    check_precision,
    echofast_model,
    frames_to_uint8,
    pad_replicate,
    resolve_generators,
    square_padding,
    unet_precision,
)

OUTPUT_TYPES = ("latent", "pt", "np", "pil")


@dataclass
class LIDMPipelineOutput(ModelOutput):
    """``latents``: (N, C, h, w) fp32, already × scaling_factor (as the reference saves them);
    ``images``: grayscale previews per ``output_type`` (None for "latent")."""

    latents: torch.Tensor
    images: torch.Tensor | np.ndarray | list | None = None


def _latent_size(sample_size: int | Sequence[int] | None) -> tuple[int, int]:
    """(h, w) of the LIDM's latents from its config's ``sample_size`` (an int or (h, w))."""
    if sample_size is None:
        raise ValueError(
            "this LIDM's config has no sample_size, so the latent size to sample is unknown: "
            "set config key 'sample_size' (e.g. 14 for the reference's 14×14 latents)"
        )
    if isinstance(sample_size, int):
        return sample_size, sample_size
    if len(sample_size) != 2:
        raise ValueError(f"config key 'sample_size' must be an int or (h, w), got {sample_size!r}")
    return int(sample_size[0]), int(sample_size[1])


class LIDMPipeline(SamplingPipeline):
    """Draws latent heart images with the LIDM and a DDPM/DDIM scheduler.

    Per sample, in fp32 and in this order, its own generator gives: the initial latents
    (1, C, h, w), then one noise tensor of that shape per step with t > 0 (the scheduler's
    draw). Each step runs the UNet on the latents padded (replicate, to a multiple of the UNet's
    downsampling factor: 14 → 16) and applies the scheduler's update to the unpadded latents;
    the update is the scheduler's affine step (``step_coefficients``), fused with the unpadding
    and the next step's padding by :func:`~echofast.ops.window_step` (one window of one frame).

    ``cuda_graphs=`` as :class:`~echofast.pipelines.LVDMPipeline`: the UNet call replayed from a
    CUDA graph that reads the pipeline's persistent padded input in place; on CUDA no per-step
    host sync (staged noise, finiteness recorded on the device and checked once per batch).
    """

    _model = "lidm"
    _model_class = LIDM
    lidm: LIDM

    def __init__(self, lidm: LIDM, vae: VAE | None = None, scheduler=None):
        super().__init__(lidm, vae, scheduler)

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
        cuda_graphs: bool | None = None,
        progress: bool = True,
        return_dict: bool = True,
    ) -> LIDMPipelineOutput | tuple:
        """Sample ``num_images`` latents (see the class docstring for the RNG contract).

        ``generator``: one per image; or ``seed`` (+ optional global ``sample_indices``) from
        which per-sample generators are derived by :func:`echofast.rng.sample_seed` (stream
        ``"lidm"``); with neither, ``seed=0`` (a call is reproducible by default).
        ``output_type``: "latent", or also decoded previews as "pt" (N, 1, H, W) float in [0, 1],
        "np" (N, H, W, 1) float, "pil" (grayscale images, uint8 reference rounding).
        ``dtype``: UNet autocast precision (reduced precision on CUDA only).
        ``cuda_graphs``: None (default): CUDA graphs where they can be captured, else eager
        calls; True: graphs or :class:`~echofast.errors.BackendUnavailable` with every reason;
        False: eager.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(f"output_type={output_type!r} needs a VAE")
        if batch_size < 1 or num_images < 1:
            raise ValueError(
                f"num_images and batch_size must be >= 1, got {num_images}, {batch_size}"
            )
        cuda_graphs = check_cuda_graphs(cuda_graphs)
        gens = resolve_generators(
            num_images, generator=generator, seed=seed, sample_indices=sample_indices, stream="lidm"
        )
        indices = list(sample_indices) if sample_indices is not None else list(range(num_images))
        device = self.lidm.device
        dtype = check_precision(dtype, device)
        model = self._sampling_model(dtype)
        unet = self._unet(cuda_graphs, model)
        cfg = self.lidm.config
        h, w = _latent_size(cfg.sample_size)
        pad = square_padding(h, w, 2 ** (len(cfg.block_out_channels) - 1))
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        shape = (cfg.in_channels, h, w)
        out = []
        bar = tqdm(  # leave=None: kept when it is the only bar, cleared when nested
            total=num_images * len(timesteps),
            disable=not progress,
            unit="step",
            desc="LIDM",
            leave=None,
        )
        with bar:
            for start in range(0, num_images, batch_size):
                sl = slice(start, start + batch_size)
                out.append(
                    self._sample(
                        unet, model, gens[sl], indices[sl], shape, pad, timesteps, dtype, bar
                    )
                )
        latents = torch.cat(out)
        images = (
            None if output_type == "latent" else self._previews(latents, output_type, batch_size)
        )
        result = LIDMPipelineOutput(latents=latents, images=images)
        return result if return_dict else result.to_tuple()

    def _sample(
        self, unet, model, gens, indices, shape, pad, timesteps, dtype, bar
    ) -> torch.Tensor:
        n = len(gens)
        c, h, w = shape
        device = self.lidm.device
        f32 = torch.float32
        latents = randn_tensor((n, *shape), generator=gens, device=device, dtype=f32)[:, None]
        # the padded UNet input, kept between steps (a CUDA graph reads it in place); window_step
        # writes the next step's padded latents into it
        lidm = echofast_model(model, LIDM)
        x = self._unet_input(lidm, (n, c, h + 2 * pad, w + 2 * pad), device, dtype)
        x.copy_(pad_replicate(latents[:, 0], pad))
        one_window = torch.zeros(1, dtype=torch.int32, device=device)
        coeffs, needs_noise, steps, noise_source, watch = self._step_plan(
            timesteps, n, gens, tuple(latents.shape), device, "LIDM latent", indices
        )
        kwargs = {}
        if lidm is not None:  # every step's time embedding, once per batch: (S, P)
            with unet_precision(device, dtype):
                table = lidm.time_features(steps)
            kwargs["time_features"] = self._inputs.get(
                "time_features", (1, table.shape[1]), table.dtype, device
            )
            kwargs["channels_last_output"] = True  # window_step reads it strided
        clip = self.scheduler.clip_bound
        for step in range(len(timesteps)):
            if kwargs:
                kwargs["time_features"].copy_(table[step : step + 1])
            with unet_precision(device, dtype):
                pred = unet(x, steps[step], **kwargs).sample
            noise = noise_source() if needs_noise[step] else None
            latents = window_step(
                pred[:, None],
                latents,
                coeffs[step],
                noise,
                one_window,
                one_window,
                one_window,
                pad=pad,
                clip=clip,
                next_input=x[:, None],
            )
            watch.update(latents, step)
            bar.update(n)
        watch.check()
        return latents[:, 0]

    def _previews(self, latents: torch.Tensor, output_type: str, chunk_size: int):
        """The VAE decode of ``latents`` as grayscale previews, ``chunk_size`` images per decode
        call, on the VAE's device and in its dtype; "pt" previews on the latents' device."""
        flat = latents / self.vae.config.scaling_factor
        decoded = torch.cat(
            [
                self.vae.decode(flat[s : s + chunk_size].to(self.vae.device, self.vae.dtype))
                .sample.float()
                .to(latents.device)
                for s in range(0, flat.shape[0], chunk_size)
            ]
        )
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(f.cpu().numpy(), mode="L") for f in frames_to_uint8(decoded)]
        gray = ((decoded.mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)
        return gray if output_type == "pt" else gray.permute(0, 2, 3, 1).cpu().numpy()
