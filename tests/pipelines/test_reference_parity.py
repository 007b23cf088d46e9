"""echofast's pipelines vs the reference algorithm written here with diffusers' own modules and
diffusers' DDPMScheduler (tiny random models, same per-sample noise order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    UNet2DModel,
    UNetSpatioTemporalConditionModel,
)
from support.models import build_diffusers, rel_err
from support.threads import one_torch_thread
from support.weights import TINY_LVDM, make_weights_root

from echofast.models import LIDM, LVDM, VAE
from echofast.pipelines import LIDMPipeline, LVDMPipeline
from echofast.schedulers import REFERENCE_SCHEDULER_CONFIG
from echofast.schedulers import DDPMScheduler as OurDDPM

STEPS = 6
TOL = 1e-5


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _pad(x):
    """The reference: pad = (8 - 14 % 8) // 2 for a 4-level UNet; (4 - 6 % 4) // 2 = 1 here,
    and (4 - 10 % 4) // 2 = 1 for 10×10 latents (where a multiple of 8 would pad by 3)."""
    return F.pad(x, (1, 1, 1, 1), mode="replicate")


def reference_lidm(unet, seeds, size=(6, 6)):
    scheduler = DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    scheduler.set_timesteps(STEPS)
    gens = _gens(seeds)
    latents = torch.cat([torch.randn(1, 4, *size, generator=g) for g in gens])
    for t in scheduler.timesteps:
        out = unet(_pad(latents), t).sample[..., 1:-1, 1:-1]
        latents = scheduler.step(out, t, latents, generator=gens).prev_sample
    return latents


def reference_lvdm(unet, cond, ef, seeds, num_frames, plan=None):
    """Reference stitching: length rounded up to the stride, windows concatenated window-major,
    window 0 kept whole and the last ``stride`` frames of later windows (the second half); each
    window gets its own EF. ``plan``: (total, starts) for windows the reference has no rule for."""
    scheduler = DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    scheduler.set_timesteps(STEPS)
    window = unet.config.num_frames
    stride = window // 2
    total = -(-num_frames // stride) * stride
    starts = list(range(0, total - window + 1, stride)) if total > window else [0]
    if plan is not None:
        total, starts = plan
    window = min(window, total)
    gens = _gens(seeds)
    b = cond.shape[0]
    size = cond.shape[-2:]
    latents = torch.cat([torch.randn(1, total, 4, *size, generator=g) for g in gens])
    for t in scheduler.timesteps:
        wins, efs = [], []
        for s in starts:
            x = torch.cat(
                [latents[:, s : s + window], cond[:, None].repeat(1, window, 1, 1, 1)], dim=2
            )
            wins.append(x)
            efs.append(ef / 100)
        x = torch.cat(wins)
        ehs = torch.cat(efs).reshape(-1, 1, 1)
        ids = torch.zeros(x.shape[0], 1)
        pad = _pad(x.flatten(0, 1))
        pad = pad.reshape(*x.shape[:3], *pad.shape[-2:])
        out = unet(pad, t, encoder_hidden_states=ehs, added_time_ids=ids).sample
        out = out[..., 1:-1, 1:-1]
        stitched = torch.zeros_like(latents)
        for k, s in enumerate(starts):
            part = out[k * b : (k + 1) * b]
            if k == 0:
                stitched[:, :window] = part
            else:
                stitched[:, s + window - stride : s + window] = part[:, window - stride :]
        latents = scheduler.step(stitched, t, latents, generator=gens).prev_sample
    return latents[:, :num_frames]


def _latents(pipe, cond, ef, seeds, num_frames):
    return pipe(
        cond,
        ef,
        num_frames=num_frames,
        generator=_gens(seeds),
        num_inference_steps=STEPS,
        output_type="latent",
        progress=False,
    ).latents


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = make_weights_root(tmp_path_factory.mktemp("weights"))
    ref = {
        "vae": AutoencoderKL.from_pretrained(root / "vae").eval(),
        "lidm": UNet2DModel.from_pretrained(root / "lidm_dynamic").eval(),
        "lvdm": UNetSpatioTemporalConditionModel.from_pretrained(root / "lvdm").eval(),
    }
    ours = {
        "vae": VAE.from_pretrained(root / "vae"),
        "lidm": LIDM.from_pretrained(root / "lidm_dynamic"),
        "lvdm": LVDM.from_pretrained(root / "lvdm"),
    }
    return ref, ours


def test_lidm_pipeline_matches_reference(models):
    ref, ours = models
    seeds = [11, 12, 13]
    with torch.no_grad():
        expected = reference_lidm(ref["lidm"], seeds)
    pipe = LIDMPipeline(ours["lidm"], ours["vae"], OurDDPM(**REFERENCE_SCHEDULER_CONFIG))
    got = pipe(
        3, generator=_gens(seeds), num_inference_steps=STEPS, batch_size=2, progress=False
    ).latents
    assert rel_err(got, expected) <= TOL


def test_lidm_pipeline_with_non_square_latents(models, tmp_path):
    """sample_size (h, w) = (6, 10): both axes padded by 1 (to 8×12), as diffusers reads it."""
    ref, _ = models
    config = {k: v for k, v in ref["lidm"].config.items() if not k.startswith("_")}
    wide = UNet2DModel(**{**config, "sample_size": [6, 10]}).eval()
    wide.load_state_dict(ref["lidm"].state_dict())
    wide.save_pretrained(tmp_path / "lidm")
    seeds = [14, 15]
    with torch.no_grad():
        expected = reference_lidm(wide, seeds, size=(6, 10))
    ours = LIDM.from_pretrained(tmp_path / "lidm")
    pipe = LIDMPipeline(ours, scheduler=OurDDPM(**REFERENCE_SCHEDULER_CONFIG))
    got = pipe(2, generator=_gens(seeds), num_inference_steps=STEPS, progress=False).latents
    assert got.shape == expected.shape == (2, 4, 6, 10)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("num_frames", [8, 12, 16])
def test_lvdm_pipeline_matches_reference(models, num_frames):
    """8 frames: one window; 12 → 2 windows (padded length 12); 16 → 3 windows."""
    ref, ours = models
    seeds = [21, 22]
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    ef = torch.tensor([35.0, 70.0])
    with torch.no_grad():
        expected = reference_lvdm(ref["lvdm"], cond, ef, seeds, num_frames)
    pipe = LVDMPipeline(ours["lvdm"], ours["vae"], OurDDPM(**REFERENCE_SCHEDULER_CONFIG))
    got = _latents(pipe, cond, ef, seeds, num_frames)
    assert got.shape == expected.shape == (2, num_frames, 4, 6, 6)
    assert rel_err(got, expected) <= TOL


def test_lvdm_pipeline_follows_the_timesteps_of_the_reference(tmp_path):
    """The tiny LVDM's 32 channels make 32 GroupNorm groups of one channel each, which remove the
    time embedding (a per-channel shift) entirely: that model's output hardly depends on the
    timestep. With 64 channels (two per group) it does, so the timesteps and time features the
    pipeline gives each step are checked against the reference loop."""
    config = dict(TINY_LVDM, block_out_channels=[64, 64, 64])
    ref = build_diffusers(UNetSpatioTemporalConditionModel, config, seed=3).eval()
    ref.save_pretrained(tmp_path / "lvdm")
    ours = LVDM.from_pretrained(tmp_path / "lvdm")
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(8))
    ef = torch.tensor([45.0, 20.0])
    with torch.no_grad():
        x = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(9))
        kw = dict(
            encoder_hidden_states=(ef / 100).reshape(2, 1, 1), added_time_ids=torch.zeros(2, 1)
        )
        early, late = (ref(x, t, **kw).sample for t in (900, 100))
        assert rel_err(early, late) > 1e-2  # the timestep matters to this model
        expected = reference_lvdm(ref, cond, ef, [51, 52], 4)
    pipe = LVDMPipeline(ours, scheduler=OurDDPM(**REFERENCE_SCHEDULER_CONFIG))
    got = _latents(pipe, cond, ef, [51, 52], 4)
    assert got.shape == expected.shape == (2, 4, 4, 6, 6)
    assert rel_err(got, expected) <= TOL


def test_lvdm_pipeline_with_10x10_latents(models):
    """10×10 latents, padded by 1 (to 12×12, a multiple of 4 for the 3-level UNet) as the
    reference pads; two videos of two windows."""
    ref, ours = models
    seeds = [41, 42]
    cond = torch.randn(2, 4, 10, 10, generator=torch.Generator().manual_seed(7))
    ef = torch.tensor([40.0, 75.0])
    with torch.no_grad():
        expected = reference_lvdm(ref["lvdm"], cond, ef, seeds, 12)
    pipe = LVDMPipeline(ours["lvdm"], scheduler=OurDDPM(**REFERENCE_SCHEDULER_CONFIG))
    got = _latents(pipe, cond, ef, seeds, 12)
    assert got.shape == expected.shape == (2, 12, 4, 10, 10)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize(
    ("num_frames", "plan"), [(5, (6, [0])), (7, (7, [0])), (8, (10, [0, 3])), (12, (13, [0, 3, 6]))]
)
def test_lvdm_pipeline_with_an_odd_window(models, tmp_path, num_frames, plan):
    """A 7-frame window (stride 3, later windows add their last 3 frames), as SVD's 25."""
    ref, _ = models
    config = {k: v for k, v in ref["lvdm"].config.items() if not k.startswith("_")}
    odd = UNetSpatioTemporalConditionModel(**{**config, "num_frames": 7}).eval()
    odd.load_state_dict(ref["lvdm"].state_dict())
    odd.save_pretrained(tmp_path / "lvdm")
    seeds = [31, 32]
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    ef = torch.tensor([25.0, 60.0])
    with torch.no_grad():
        expected = reference_lvdm(odd, cond, ef, seeds, num_frames, plan)
    pipe = LVDMPipeline(
        LVDM.from_pretrained(tmp_path / "lvdm"), scheduler=OurDDPM(**REFERENCE_SCHEDULER_CONFIG)
    )
    got = _latents(pipe, cond, ef, seeds, num_frames)
    assert got.shape == expected.shape == (2, num_frames, 4, 6, 6)
    assert rel_err(got, expected) <= TOL


def _reference_uint8(x):
    """The reference's conversion as written: ``uint8(clamp((x + 1) * 128, 0, 255))`` of the
    decoder's channel mean (truncation)."""
    return ((x.mean(dim=1) + 1) * 128).clamp(0, 255).to(torch.uint8)


def test_decode_matches_reference_conversion(models):
    """Against diffusers' VAE, within 1 uint8 level: the two decoders' fp32 rounding differs,
    and truncation turns any difference across an integer into a level. Against our own VAE's
    decode (the same calls, the same floats), exactly: that checks the conversion itself."""
    ref, ours = models
    latents = torch.randn(1, 3, 4, 6, 6, generator=torch.Generator().manual_seed(9))
    pipe = LVDMPipeline(ours["lvdm"], ours["vae"])
    videos = pipe.decode(latents, chunk_size=2)
    with torch.no_grad():
        x = ref["vae"].decode(latents[0] / ref["vae"].config.scaling_factor).sample
        scaled = latents[0] / ours["vae"].config.scaling_factor
        same = torch.cat([ours["vae"].decode(scaled[s : s + 2]).sample for s in (0, 2)])
    assert videos.dtype == torch.uint8 and videos.shape == (1, 3, 12, 12)
    assert (videos[0].int() - _reference_uint8(x).int()).abs().max() <= 1
    assert torch.equal(videos[0], _reference_uint8(same))


def test_uint8_conversion_on_known_values():
    """frames_to_uint8 on channel means exact in fp32: (x + 1) * 128, clamped, truncated."""
    from echofast.pipelines.common import frames_to_uint8

    gray = torch.tensor(
        [-1.5, -1, -0.5, -0.25, -1 / 256, 0, 1 / 256, 0.5, 0.984375, 1 - 1 / 256, 1, 1.5]
    )
    x = (gray[:, None] + torch.tensor([-0.25, 0.0, 0.25])).reshape(2, 6, 3).permute(0, 2, 1)
    x = x[..., None]  # (N=2, C=3, H=6, W=1)
    got = frames_to_uint8(x)
    assert got.dtype == torch.uint8 and got.shape == (2, 6, 1)
    expected = [0, 0, 64, 96, 127, 128, 128, 192, 254, 255, 255, 255]
    assert got.flatten().tolist() == expected
    assert torch.equal(got, _reference_uint8(x))
