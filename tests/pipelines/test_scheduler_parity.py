"""The pipelines with schedulers other than the reference DDPM (DDIM; other prediction types,
spacings, variances; clipping off or tight), against the sampling loop written with diffusers'
scheduler class of the same config (tiny random models, per-sample noise). Both sides call the
same diffusers UNet (the pipelines take any module of that call convention), so what differs is
the fused step (``step_coefficients``, ``clip_bound``, ``step_needs_noise``) against diffusers'
``step``. The fused step's affine form rounds differently (2e-6 per step, tests/ops), and epsilon
prediction amplifies that by up to 1/√ᾱ_t (≈ 150 at t = 999) through the next UNet calls: about
4e-5 after 5 steps, hence its looser bound; a wrong coefficient or clip is off by far more."""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel, UNetSpatioTemporalConditionModel
from support.models import rel_err
from support.threads import one_torch_thread

from echofast import schedulers
from echofast.pipelines import LIDMPipeline, LVDMPipeline

TOL = 1e-5
TOL_EPSILON = 2e-4

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

CONFIGS = [
    (
        "DDIMScheduler",
        {
            "prediction_type": "epsilon",
            "clip_sample": True,
            "clip_sample_range": 1.0,
            "timestep_spacing": "trailing",
            "set_alpha_to_one": False,
        },
        5,
    ),
    (
        "DDPMScheduler",
        {
            "prediction_type": "sample",
            "clip_sample": False,
            "variance_type": "fixed_large",
            "timestep_spacing": "linspace",
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        },
        3,
    ),
    (
        "DDIMScheduler",
        {"prediction_type": "v_prediction", "clip_sample": False, "steps_offset": 1},
        4,
    ),
    (
        "DDPMScheduler",
        {"prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 0.5},
        3,
    ),
]


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _pad(x):  # 6×6 latents, a 3-level UNet: 1 per side
    return F.pad(x, (1, 1, 1, 1), mode="replicate")


def _tol(config):
    return TOL_EPSILON if config["prediction_type"] == "epsilon" else TOL


def _pair(name, config, steps):
    ours = getattr(schedulers, name)(**config)
    theirs = getattr(diffusers, name)(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    return ours, theirs


def _step(scheduler, out, t, latents, gens):
    if isinstance(scheduler, diffusers.DDPMScheduler):
        return scheduler.step(out, t, latents, generator=gens).prev_sample
    return scheduler.step(out, t, latents).prev_sample  # DDIM, eta 0: no draw


@pytest.mark.parametrize(("name", "config", "steps"), CONFIGS)
def test_lidm_pipeline_matches_the_diffusers_loop(weights_root, name, config, steps):
    ours, theirs = _pair(name, config, steps)
    unet = UNet2DModel.from_pretrained(weights_root / "lidm_dynamic").eval()
    seeds = [3, 8, 5]
    gens = _gens(seeds)
    with torch.no_grad():
        latents = torch.cat([torch.randn(1, 4, 6, 6, generator=g) for g in gens])
        for t in theirs.timesteps:
            out = unet(_pad(latents), t).sample[..., 1:-1, 1:-1]
            latents = _step(theirs, out, t, latents, gens)
    pipe = LIDMPipeline(unet, scheduler=ours)
    got = pipe(3, generator=_gens(seeds), num_inference_steps=steps, batch_size=2, progress=False)
    assert got.latents.shape == latents.shape
    assert rel_err(got.latents, latents) <= _tol(config)


@pytest.mark.parametrize(("name", "config", "steps"), CONFIGS[:2])
def test_lvdm_pipeline_matches_the_diffusers_loop(weights_root, name, config, steps):
    """One window of 8 frames (no stitching), two videos with their own EF."""
    ours, theirs = _pair(name, config, steps)
    unet = UNetSpatioTemporalConditionModel.from_pretrained(weights_root / "lvdm").eval()
    seeds = [13, 4]
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    ef = torch.tensor([30.0, 65.0])
    gens = _gens(seeds)
    with torch.no_grad():
        latents = torch.cat([torch.randn(1, 8, 4, 6, 6, generator=g) for g in gens])
        for t in theirs.timesteps:
            x = torch.cat([latents, cond[:, None].expand(2, 8, 4, 6, 6)], dim=2)
            x = _pad(x.flatten(0, 1)).reshape(2, 8, 8, 8, 8)
            out = unet(
                x,
                t,
                encoder_hidden_states=(ef / 100).reshape(2, 1, 1),
                added_time_ids=torch.zeros(2, 1),
            ).sample[..., 1:-1, 1:-1]
            latents = _step(theirs, out, t, latents, gens)
    pipe = LVDMPipeline(unet, scheduler=ours)
    got = pipe(
        cond,
        ef,
        num_frames=8,
        generator=_gens(seeds),
        num_inference_steps=steps,
        output_type="latent",
        progress=False,
    ).latents
    assert got.shape == latents.shape
    assert rel_err(got, latents) <= _tol(config)
