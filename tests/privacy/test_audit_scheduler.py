"""The privacy audit re-noises planted copies with the sampler the LIDM folder records
(``scheduler_config.json``, written by ``echofast train export``), else the reference DDPM."""

from __future__ import annotations

import pytest
import torch

import echofast.privacy.audit as audit
from echofast.privacy import PrivacyFilter, ReIdentificationModel
from echofast.privacy.report import FilterSetup
from echofast.schedulers import DDIMScheduler, DDPMScheduler


@pytest.fixture(scope="module")
def setup(phantom_latents):
    torch.manual_seed(0)
    model = ReIdentificationModel(
        layers=(1, 1, 1, 1), width=8, n_features=32, normalization="frame"
    )
    flt = PrivacyFilter.from_reference(model, phantom_latents, percentile=95, frame_step=0)
    return FilterSetup(flt, {}, {}, True)


@pytest.mark.parametrize("recorded", [None, "ddim_epsilon"])
def test_renoising_uses_the_lidm_folders_recorded_sampler(
    setup, phantom_latents, tmp_path, monkeypatch, recorded
):
    folder = tmp_path / "lidm_dynamic"
    folder.mkdir()
    if recorded:
        DDIMScheduler(prediction_type="epsilon").save_config(folder)
    used = []

    def renoise(x0, strength, lidm, *, seed, scheduler):
        used.append(scheduler)
        return x0

    monkeypatch.setattr(audit, "_load_lidm", lambda path, dataset: (object(), folder))
    monkeypatch.setattr(audit, "renoise_lidm", renoise)
    result, _ = audit.run_audit(
        setup, phantom_latents, num_planted=4, strengths=(0.3, 0.6), lidm=folder
    )
    assert len(used) == 2
    if recorded:
        assert all(type(s) is DDIMScheduler for s in used)
        assert all(s.config.prediction_type == "epsilon" for s in used)
        assert "recorded DDIMScheduler sampler, scheduler_config.json" in result["denoiser"]
    else:
        assert all(type(s) is DDPMScheduler for s in used)
        assert all(s.config.prediction_type == "v_prediction" for s in used)
        assert "reference DDPM sampler" in result["denoiser"]


def test_lidm_renoising_matches_a_diffusers_sdedit_loop(tmp_path):
    """``renoise_lidm`` with the reference sampler = diffusers' DDPMScheduler and UNet2DModel:
    noise to the first timestep <= 0.3·1000, then step to 0, the 10×10 latents replicate-padded
    to 12×12 for the 3-level UNet; sample i draws from its own seeded generator whatever the
    batch. A weights root resolves to its ``lidm_<dataset>`` folder."""
    from diffusers import DDPMScheduler as DiffusersDDPM
    from diffusers import UNet2DModel
    from support.models import save_diffusers
    from support.weights import TINY_LIDM

    from echofast.rng import sample_seed
    from echofast.schedulers import REFERENCE_SCHEDULER_CONFIG

    folder = tmp_path / "lidm_dynamic"
    theirs = save_diffusers(UNet2DModel, TINY_LIDM, folder, 1).eval()
    ours, found = audit._load_lidm(tmp_path, "dynamic")
    assert found == folder and audit._load_lidm(folder, "dynamic")[1] == folder
    x0 = torch.randn(3, 4, 10, 10, generator=torch.Generator().manual_seed(0))
    got = audit.renoise_lidm(x0, 0.3, ours, seed=7, batch_size=2)

    sched = DiffusersDDPM(**REFERENCE_SCHEDULER_CONFIG)
    sched.set_timesteps(64)
    steps = [int(t) for t in sched.timesteps if int(t) <= 300]
    gens = [torch.Generator().manual_seed(sample_seed(7, i, "renoise-0.3")) for i in range(3)]
    eps = torch.cat([torch.randn((1, 4, 10, 10), generator=g) for g in gens])
    x = sched.add_noise(x0, eps, torch.tensor([steps[0]]))
    with torch.no_grad():
        for t in steps:
            padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
            pred = theirs(padded, t).sample[..., 1:-1, 1:-1]
            x = sched.step(pred, t, x, generator=gens).prev_sample
    assert steps[0] == 300 and len(steps) == 21
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
