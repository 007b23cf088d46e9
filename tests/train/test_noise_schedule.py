"""The training noise schedule (``diffusion.scheduler``): the settings training uses work as in
diffusers, and those it cannot honour, or that the pipelines could not sample with, are refused
at config load, naming the file and the key."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler as DiffusersDDPM
from support.weights import TINY_LIDM

from echofast.errors import ConfigError
from echofast.models import LIDM
from echofast.train.config import config_from_dict, load_config
from echofast.train.objectives import build_objective


def _lidm_config(scheduler: dict) -> dict:
    return {
        "model": {"type": "lidm", "config": TINY_LIDM},
        "data": {"source": "random"},
        "seed": 3,
        "diffusion": {"scheduler": scheduler},
    }


@pytest.mark.parametrize(
    "scheduler",
    [
        {"prediction_type": "epsilon"},
        {"prediction_type": "sample", "beta_schedule": "scaled_linear", "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "sigmoid", "beta_start": 0.0005, "beta_end": 0.03},
        {"beta_schedule": "laplace", "num_train_timesteps": 100},
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        {"rescale_betas_zero_snr": True, "prediction_type": "sample"},
        {"num_train_timesteps": 10, "trained_betas": [0.01 * (i + 1) for i in range(10)]},
    ],
)
def test_training_noise_schedules_match_diffusers(scheduler):
    """Noisy input and target (ε, v or x_0) of the LIDM loss, against diffusers' DDPMScheduler
    of the same config, at timesteps that include both ends (the zero-SNR one, N-1)."""
    torch.manual_seed(0)
    model = LIDM.from_config(TINY_LIDM)
    cfg = config_from_dict(_lidm_config(scheduler))
    obj = build_objective(cfg, model)
    try:
        theirs = DiffusersDDPM(**cfg.scheduler_config())
    except NotImplementedError as e:  # laplace betas: diffusers >= 0.37
        pytest.skip(f"diffusers {diffusers.__version__}: {e}")
    n = theirs.config.num_train_timesteps
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 6, 6, generator=g), torch.randn(6, 4, 6, 6, generator=g)
    t = torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (4,), generator=g)])
    obj.draw = lambda x, positions: (t, noise)  # the draws are tested in test_objectives.py
    calls = []

    def net(x, timesteps):
        calls.append(x)
        return model(x, timesteps)

    loss, _ = obj.loss(net, x0, torch.arange(6), 0, torch.device("cpu"))
    noisy = theirs.add_noise(x0, noise, t)
    torch.testing.assert_close(calls[0][..., 1:-1, 1:-1], noisy, rtol=1e-6, atol=1e-6)
    target = {
        "epsilon": noise,
        "v_prediction": theirs.get_velocity(x0, noise, t),
        "sample": x0,
    }[theirs.config.prediction_type]
    with torch.no_grad():
        pred = model(calls[0], t).sample[..., 1:-1, 1:-1]
    torch.testing.assert_close(loss.detach(), F.mse_loss(pred, target), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "scheduler, key",
    [
        ({"thresholding": True}, "thresholding"),
        ({"variance_type": "learned"}, "variance_type"),
        ({"variance_type": "learned_range"}, "variance_type"),
        ({"rescale_betas_zero_snr": True, "prediction_type": "epsilon"}, "rescale_betas_zero_snr"),
        ({"steps_offset": 60}, "steps_offset"),  # 64 leading steps: 945 + 60 > 999
        ({"set_alpha_to_one": False}, "set_alpha_to_one"),  # DDIM's: meaningless here
        ({"_class_name": "PNDMScheduler", "skip_prk_steps": True}, "_class_name"),
    ],
)
def test_training_refuses_scheduler_settings_it_cannot_honour(scheduler, key, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_lidm_config(scheduler)))
    with pytest.raises(ConfigError, match=f"'diffusion.scheduler.{key}'") as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    # the objective refuses them too, for a config changed after loading
    cfg = config_from_dict(_lidm_config({}))
    cfg.diffusion.scheduler = scheduler
    with pytest.raises(ConfigError, match=f"'diffusion.scheduler.{key}'"):
        build_objective(cfg, LIDM.from_config(TINY_LIDM))
