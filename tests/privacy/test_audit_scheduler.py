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
