"""``echofast.patch`` inside sampling code: diffusers pipelines and the reference's own loop keep
working and give the same samples (same generators) patched and unpatched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.configs import LIDM_SMALL_CONFIG
from support.models import build_diffusers, rel_err

import echofast

pytest.importorskip("diffusers")


def reference_lvdm_loop(unet, cond: torch.Tensor, ef: torch.Tensor, frames: int, steps: int):
    """EchoNet-Synthetic's LVDM sampling loop (reference scheduler config, replicate padding by
    one latent pixel, conditioning latent repeated over frames, EF as the one context token)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="fixed_small",
        clip_sample=True,
        clip_sample_range=4.0,
        prediction_type="v_prediction",
        timestep_spacing="leading",
        steps_offset=0,
    )
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    b, c, h, w = cond.shape
    latents = torch.randn(b, frames, c, h, w, generator=generator)
    cond = cond[:, None].expand(b, frames, c, h, w)
    ids = torch.zeros(b, 1)
    for t in scheduler.timesteps:
        x = torch.cat([latents, cond], dim=2).flatten(0, 1)
        x = F.pad(x, (1, 1, 1, 1), mode="replicate").unflatten(0, (b, frames))
        v = unet(
            x, t, encoder_hidden_states=ef[:, None, None], added_time_ids=ids, return_dict=False
        )[0]
        latents = scheduler.step(v[..., 1:-1, 1:-1], t, latents, generator=generator).prev_sample
    return latents


@torch.no_grad()
def test_reference_loop_with_one_patch_line(kit):
    unet = kit.build("lvdm")
    g = torch.Generator().manual_seed(3)
    cond, ef = torch.randn(2, 4, 6, 6, generator=g), torch.tensor([0.35, 0.6])
    expected = reference_lvdm_loop(unet, cond, ef, frames=5, steps=3)
    report = echofast.patch(unet)
    assert [r.echofast_class for r in report.replaced] == ["echofast.models.LVDM"]
    got = reference_lvdm_loop(unet, cond, ef, frames=5, steps=3)
    assert rel_err(got, expected) <= 1e-5
    echofast.unpatch(unet)
    assert torch.equal(reference_lvdm_loop(unet, cond, ef, frames=5, steps=3), expected)


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "call_sites"])
@torch.no_grad()
def test_ddpm_pipeline(replace):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = build_diffusers(UNet2DModel, {**LIDM_SMALL_CONFIG, "sample_size": 16})
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)

    def sample():
        out = pipe(
            batch_size=2,
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=4,
            output_type="np",
        )
        return torch.from_numpy(out.images)

    expected = sample()
    report = echofast.patch(pipe, replace_models=replace)
    assert report.target == "DDPMPipeline"
    assert [r.path for r in report.replaced] == (["unet"] if replace else [])
    assert report.patched and all(s.path.startswith("unet") for s in report.patched)
    assert pipe.unet is unet and type(pipe.unet).__name__ == "UNet2DModel"
    assert rel_err(sample(), expected) <= 1e-5
    assert echofast.patch(pipe, replace_models=replace) is report
    assert echofast.unpatch(pipe) is True
    assert torch.equal(sample(), expected)


@torch.no_grad()
def test_stable_video_diffusion_pipeline(kit):
    pytest.importorskip(
        "transformers",
        reason="transformers is not installed: StableVideoDiffusionPipeline needs its CLIP "
        "image encoder (a heavy dependency the test environment does not carry)",
    )
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        latent_channels=4,
    )
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,  # the UNet's cross_attention_dim
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=40,
            image_size=32,
            patch_size=4,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        use_karras_sigmas=True,
        sigma_min=0.002,
        sigma_max=700.0,
        timestep_type="continuous",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae.eval(),
        image_encoder=encoder.eval(),
        unet=kit.build("svd_like"),
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def frames():
        return pipe(
            image,
            height=32,
            width=32,
            num_frames=3,
            num_inference_steps=2,
            min_guidance_scale=1.0,
            max_guidance_scale=2.5,
            decode_chunk_size=3,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).frames

    expected = frames()
    report = echofast.patch(pipe)
    assert [r.path for r in report.replaced] == ["unet"]
    assert any(item.path == "image_encoder" for item in report.left_alone)
    assert rel_err(frames(), expected) <= 1e-4
    echofast.unpatch(pipe)
    assert torch.equal(frames(), expected)


def test_pipeline_whose_model_was_patched_before():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = build_diffusers(UNet2DModel, {**LIDM_SMALL_CONFIG, "sample_size": 16})
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    own = echofast.patch(unet)
    report = echofast.patch(pipe)
    assert [(i.path, i.reason) for i in report.left_alone] == [
        ("unet", "already patched by another echofast.patch call")
    ]
    assert not report.patched and not report.replaced
    assert echofast.unpatch(pipe) is True
    assert echofast.patch(unet) is own  # untouched by the pipeline's patch and unpatch
    assert echofast.unpatch(unet) is True


@torch.no_grad()
def test_pipeline_components_that_are_not_diffusers_models_are_reported_and_kept():
    from diffusers import DiffusionPipeline, UNet2DModel

    class WithHelper(DiffusionPipeline):
        def __init__(self, unet, helper):
            super().__init__()
            self.register_modules(unet=unet, helper=helper)

    helper = torch.nn.Sequential(torch.nn.GroupNorm(2, 4))
    pipe = WithHelper(build_diffusers(UNet2DModel, LIDM_SMALL_CONFIG), helper)
    report = echofast.patch(pipe)
    assert [r.path for r in report.replaced] == ["unet"]
    assert [(i.path, i.what, i.reason) for i in report.left_alone] == [
        ("helper", "Sequential", "not a diffusers model (left as is)")
    ]
    assert type(helper[0]) is torch.nn.GroupNorm
    assert echofast.unpatch(pipe) is True


@torch.no_grad()
def test_save_pretrained_of_a_patched_pipeline_loads_in_diffusers(tmp_path):
    """A pipeline built around an already patched UNet records the UNet's library from its
    class's module: it is saved as ``["diffusers", "UNet2DModel"]`` and loads without
    echofast."""
    import json

    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = build_diffusers(UNet2DModel, {**LIDM_SMALL_CONFIG, "sample_size": 16})
    echofast.patch(unet)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    pipe.save_pretrained(tmp_path)
    echofast.unpatch(unet)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is UNet2DModel
    state = loaded.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())


@torch.no_grad()
def test_patching_a_pipeline_again_sees_a_change_in_any_of_its_models(kit):
    from diffusers import DiffusionPipeline

    class Latent(DiffusionPipeline):
        def __init__(self, vae, unet):
            super().__init__()
            self.register_modules(vae=vae, unet=unet)

    pipe, x = Latent(kit.build("vae"), kit.build("lidm")), kit.inputs("lidm")
    report = echofast.patch(pipe)
    assert [r.path for r in report.replaced] == ["vae", "unet"] and echofast.patch(pipe) is report
    pipe.unet.conv_out.register_forward_hook(lambda module, args, out: out * 0.5)  # the 2nd model
    assert echofast.patch(pipe) is not report
    got = pipe.unet(**x).sample
    echofast.unpatch(pipe)
    assert rel_err(got, pipe.unet(**x).sample) <= 1e-5
