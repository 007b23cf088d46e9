"""``echofast bench``'s models and the reference's way: echofast's models with diffusers' twins on
the same weights (:func:`build_models`), and the reference's sampling and decode loops written
from the project spec with diffusers' modules only (:func:`reference_lidm`,
:func:`reference_lvdm`, :func:`reference_decode`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: The reference decodes 8 frames per VAE call and moves each chunk to the CPU.
REFERENCE_DECODE_CHUNK = 8


# ---- models ------------------------------------------------------------------------------------


@dataclass
class Models:
    """echofast's models and, when diffusers is installed, diffusers' with the same weights."""

    vae: Any
    lidm: Any
    lvdm: Any
    d_vae: Any = None
    d_lidm: Any = None
    d_lvdm: Any = None
    source: str = ""
    diffusers_missing: str = ""


def _diffusers_classes() -> tuple[Any, Any, Any] | str:
    try:
        from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel
    except ImportError as err:
        return f"diffusers is not importable ({err}); pip install diffusers for the baselines"
    return AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel


def build_models(
    configs: dict[str, dict[str, Any]] | None,
    device: torch.device,
    *,
    weights: str | None = None,
    dataset: str = "dynamic",
    seed: int = 0,
    with_diffusers: bool = True,
) -> Models:
    """echofast VAE/LIDM/LVDM from ``configs`` with random weights (seeded), or from a weights
    root; diffusers' models get the same weights (their state-dict keys are echofast's)."""
    from .models import LIDM, LVDM, VAE

    classes = _diffusers_classes() if with_diffusers else "baselines not requested"
    if weights is not None:
        from .pipelines import EchoSyntheticPipeline

        folders = EchoSyntheticPipeline.folders(weights, dataset)
        ours = {
            "vae": VAE.from_pretrained(folders["vae"]),
            "lidm": LIDM.from_pretrained(folders["lidm"]),
            "lvdm": LVDM.from_pretrained(folders["lvdm"]),
        }
        source = f"weights {weights} ({dataset})"
    else:
        if configs is None:
            raise ValueError("build_models needs configs or weights")
        torch.manual_seed(seed)
        ours = {
            "vae": VAE.from_config(configs["vae"]),
            "lidm": LIDM.from_config(configs["lidm"]),
            "lvdm": LVDM.from_config(configs["lvdm"]),
        }
        source = f"random weights (seed {seed})"
    theirs: dict[str, Any] = {}
    if not isinstance(classes, str):
        for name, cls in zip(("vae", "lidm", "lvdm"), classes):
            model = cls.from_config(dict(ours[name].config))
            model.load_state_dict(ours[name].state_dict())
            theirs[name] = model.to(device).eval()
    return Models(
        vae=ours["vae"].to(device).eval(),
        lidm=ours["lidm"].to(device).eval(),
        lvdm=ours["lvdm"].to(device).eval(),
        d_vae=theirs.get("vae"),
        d_lidm=theirs.get("lidm"),
        d_lvdm=theirs.get("lvdm"),
        source=source,
        diffusers_missing=classes if isinstance(classes, str) else "",
    )


# ---- the reference's way (diffusers modules only) ----------------------------------------------


def _randn(
    shape: tuple[int, ...],
    generator: torch.Generator | Sequence[torch.Generator],
    device: torch.device,
) -> torch.Tensor:
    """Standard normal fp32 on ``device``; a list of generators draws one sample each."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    return torch.cat([_randn((1, *shape[1:]), g, device) for g in generator])


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (nothing for None or float32)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def reference_pad(size: int, levels: int) -> int:
    """The reference's ``(m - size % m) // 2`` for a UNet downsampling by ``m = 2**(levels-1)``."""
    m = 2 ** (levels - 1)
    return (m - size % m) // 2 if size % m else 0


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    if pad == 0:
        return x
    lead = x.shape[:-3]
    out = F.pad(x.reshape(-1, *x.shape[-3:]), (pad,) * 4, mode="replicate")
    return out.reshape(*lead, *out.shape[-3:])


def _unpad(x: torch.Tensor, pad: int) -> torch.Tensor:
    return x[..., pad:-pad, pad:-pad] if pad else x


def reference_lidm(
    unet: Any,
    scheduler: Any,
    num_images: int,
    steps: int,
    *,
    generator: torch.Generator | Sequence[torch.Generator],
    autocast_dtype: torch.dtype | None = torch.float16,
) -> torch.Tensor:
    """The reference's LIDM sampling: randn latents, then per step replicate pad, UNet under
    autocast (fp32 weights), unpad, ``scheduler.step``. Returns (N, C, h, w) fp32 latents."""
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    device = unet.device
    pad = reference_pad(size, len(cfg.block_out_channels))
    latents = _randn((num_images, cfg.in_channels, size, size), generator, device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        with autocast_context(device, autocast_dtype):
            pred = unet(_pad(latents, pad), t).sample
        pred = _unpad(pred, pad)
        latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
    return latents.float()


def reference_lvdm(
    unet: Any,
    scheduler: Any,
    cond: torch.Tensor,
    ef: torch.Tensor,
    num_frames: int,
    steps: int,
    *,
    generator: torch.Generator | Sequence[torch.Generator],
    autocast_dtype: torch.dtype | None = torch.float16,
) -> torch.Tensor:
    """The reference's LVDM sampling and window stitching (spec, "LVDM sampling and stitching").

    The length is rounded up to a multiple of half the window; windows overlap by half and are
    concatenated window-major into one UNet call; the conditioning latent is repeated over frames
    and concatenated on channels; EF/100 is ``repeat_interleave``d over windows (the reference's
    pairing); the step keeps window 0 whole and the second half of later windows. Returns
    (B, T, C, h, w) fp32 latents, T = ``num_frames``.
    """
    cfg = unet.config
    device = unet.device
    b, c, h, w = cond.shape
    window = cfg.num_frames
    stride = window // 2
    total = -(-num_frames // stride) * stride
    starts = list(range(0, total - window + 1, stride)) if total > window else [0]
    window = min(window, total)
    n_win = len(starts)
    pad = reference_pad(h, len(cfg.block_out_channels))
    latents = _randn((b, total, c, h, w), generator, device)
    cond_frames = cond[:, None].repeat(1, window, 1, 1, 1).repeat(n_win, 1, 1, 1, 1)
    ehs = (ef.to(device) / 100).repeat_interleave(n_win).reshape(b * n_win, 1, 1)
    ids = torch.zeros(b * n_win, 1, device=device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        wins = torch.cat([latents[:, s : s + window] for s in starts])
        x = _pad(torch.cat([wins, cond_frames], dim=2), pad)
        with autocast_context(device, autocast_dtype):
            pred = unet(x, t, encoder_hidden_states=ehs, added_time_ids=ids).sample
        pred = _unpad(pred, pad).reshape(n_win, b, window, c, h, w)
        stitched = torch.empty_like(latents, dtype=pred.dtype)
        stitched[:, :window] = pred[0]
        for k, s in enumerate(starts[1:], start=1):
            stitched[:, s + stride : s + window] = pred[k, :, stride:]
        latents = scheduler.step(stitched, t, latents, generator=generator).prev_sample
    return latents[:, :num_frames].float()


def reference_decode(
    vae: Any, latents: torch.Tensor, chunk: int = REFERENCE_DECODE_CHUNK
) -> torch.Tensor:
    """The reference's decode: latents / scaling_factor, fp32 VAE decode ``chunk`` frames per call,
    each chunk moved to the CPU, then ``uint8(clamp((x + 1) * 128))``. Returns (B, T, 3, H, W)
    uint8 on the CPU (the reference keeps three channels)."""
    b, t = latents.shape[:2]
    flat = (latents.reshape(b * t, *latents.shape[2:]) / vae.config.scaling_factor).cpu()
    frames = []
    for s in range(0, flat.shape[0], chunk):
        decoded = vae.decode(flat[s : s + chunk].to(vae.device)).sample
        frames.append(decoded.cpu())
    video = torch.cat(frames)
    pixels = ((video + 1) * 128).clamp(0, 255).to(torch.uint8)
    return pixels.reshape(b, t, *pixels.shape[1:])


def diffusers_scheduler() -> Any:
    """diffusers' ``DDPMScheduler`` with the reference's config."""
    from diffusers import DDPMScheduler

    from .schedulers import REFERENCE_SCHEDULER_CONFIG

    return DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
