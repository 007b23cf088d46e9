"""The diffusers API of DDPM / DDIM beyond the reference sampler, against diffusers' own classes.

Random configs and inputs (seeded); every step compares with diffusers' ``step`` on the same
input and the same noise (the same generator seed: both draw one float32 ``randn``), to
``ATOL + RTOL·|want|``; NaN and ±inf must sit where diffusers has them.
"""

from __future__ import annotations

import inspect
import json
import random

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler as DiffusersDDPM

from echofast.errors import ConfigError
from echofast.schedulers import DDIMScheduler, DDPMScheduler

ATOL = RTOL = 1e-6
SHAPE = (2, 3, 6, 6)
SEEDS = range(4)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)


def random_config(rng: random.Random, kind: str) -> tuple[dict, int]:
    """A random diffusers config of ``kind`` and a step count valid for it."""
    zero_snr = rng.random() < 0.3
    prediction = ["v_prediction", "sample"] if zero_snr else ["epsilon", "v_prediction", "sample"]
    config = {
        "num_train_timesteps": rng.choice([100, 1000]),
        "beta_start": rng.uniform(5e-5, 1e-3),
        "beta_end": rng.uniform(0.01, 0.03),
        "beta_schedule": rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
        "prediction_type": rng.choice(prediction),
        "clip_sample": rng.random() < 0.5,
        "clip_sample_range": rng.choice([0.5, 1.0, 2.0]),
        "thresholding": rng.random() < 0.4,
        "dynamic_thresholding_ratio": rng.uniform(0.6, 1.0),
        "sample_max_value": rng.uniform(1.0, 3.0),
        "timestep_spacing": rng.choice(["leading", "trailing", "linspace"]),
        "steps_offset": rng.choice([0, 1]),
        "rescale_betas_zero_snr": zero_snr,
    }
    if kind == "ddim":
        config["set_alpha_to_one"] = rng.random() < 0.5
    return config, rng.choice([1, 4, 9, 20])


def timesteps_of(ours, theirs) -> list[int]:
    """Our timesteps, checked against diffusers' (which end in a bogus -1 for some trailing
    step counts, a step echofast leaves out)."""
    got, want = ours.timesteps.tolist(), theirs.timesteps.tolist()
    assert got == want[: len(got)] and want[len(got) :] in ([], [-1])
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.long
    return got


def affine_prev(sched, m: torch.Tensor, t: int, x: torch.Tensor, z: torch.Tensor):
    """x_prev from ``step_coefficients`` (what the fused pipelines compute)."""
    c = sched.step_coefficients(t, x.shape[0]).reshape(-1, 6, 1, 1, 1).unbind(1)
    x0 = c[0] * x + c[1] * m
    if sched.clip_bound is not None:
        x0 = x0.clamp(-sched.clip_bound, sched.clip_bound)
    return c[2] * x0 + c[3] * x + c[4] * m + c[5] * z


# ---- signatures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs, method",
    [
        (DDPMScheduler, DiffusersDDPM, "step"),
        (DDPMScheduler, DiffusersDDPM, "set_timesteps"),
        (DDIMScheduler, DiffusersDDIM, "step"),
    ],
)
def test_positional_parameters_and_defaults_match_diffusers(ours, theirs, method):
    """diffusers' parameters come first, in its order and with its defaults, so positional
    calls and pipelines' signature checks (``"eta" in signature(step).parameters``) agree."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    want = list(inspect.signature(getattr(theirs, method)).parameters.values())
    got = list(inspect.signature(getattr(ours, method)).parameters.values())
    assert [(p.name, p.default) for p in got[: len(want)]] == [(p.name, p.default) for p in want]
    assert all(p.kind in positional for p in got[: len(want)])
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in got[len(want) :])


# ---- DDPM: custom timesteps ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers'
@pytest.mark.parametrize("seed", SEEDS)
def test_ddpm_custom_timesteps_match_diffusers(seed):
    rng = random.Random(seed)
    config, _ = random_config(rng, "ddpm")
    config.update(thresholding=False, variance_type=rng.choice(["fixed_small", "fixed_large"]))
    num_train = config["num_train_timesteps"]
    custom = sorted(rng.sample(range(num_train), rng.randint(1, 12)), reverse=True)
    given = [custom, np.array(custom), torch.tensor(custom)][seed % 3]
    ours, theirs = DDPMScheduler(**config), DiffusersDDPM(**config)
    ours.set_timesteps(timesteps=given)
    theirs.set_timesteps(timesteps=given)
    assert timesteps_of(ours, theirs) == custom
    assert ours.custom_timesteps and ours.num_inference_steps == len(custom)
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=data)
    for t in custom:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
        m = 3 * torch.randn(SHAPE, generator=data)
        noise_seed = int(torch.randint(0, 2**31, (1,), generator=data))
        want = theirs.step(m, t, x, torch.Generator().manual_seed(noise_seed))
        got = ours.step(m, t, x, torch.Generator().manual_seed(noise_seed))
        close(got.prev_sample, want.prev_sample)
        close(got.pred_original_sample, want.pred_original_sample)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(noise_seed))
        close(affine_prev(ours, m, t, x, z if t > 0 else 0 * z), want.prev_sample)
        x = want.prev_sample
    ours.set_timesteps(5)  # back to spaced timesteps
    theirs.set_timesteps(5)
    assert not ours.custom_timesteps and timesteps_of(ours, theirs)


def test_ddpm_custom_timesteps_are_validated():
    ours, theirs = DDPMScheduler(), DiffusersDDPM()
    for kwargs in (
        {"num_inference_steps": 3, "timesteps": [9, 5]},  # diffusers' three checks
        {"timesteps": [5, 9]},
        {"timesteps": [5, 5]},
        {"timesteps": [1000, 5]},
    ):
        with pytest.raises(ValueError):
            theirs.set_timesteps(**kwargs)
        with pytest.raises(ValueError, match="timesteps"):
            ours.set_timesteps(**kwargs)
    # ones diffusers lets through (and then indexes from the end, truncates or crashes on)
    for bad in ([10, -1], [], [9.0, 5], [True, False], torch.tensor([[9, 5]]), "95", 9):
        with pytest.raises(ValueError, match="timesteps"):
            ours.set_timesteps(timesteps=bad)
    with pytest.raises(ValueError, match="num_inference_steps and timesteps"):
        ours.set_timesteps()
    ours.set_timesteps(np.int64(10))  # numpy integers, as diffusers takes them
    theirs.set_timesteps(np.int64(10))
    assert timesteps_of(ours, theirs)


# ---- DDPM: variance types ------------------------------------------------------------------------


@pytest.mark.parametrize("variance_type", ["fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_ddpm_variance_types_match_diffusers(variance_type, seed):
    rng = random.Random(seed)
    config, steps = random_config(rng, "ddpm")
    config["variance_type"] = variance_type
    ours, theirs = DDPMScheduler(**config), DiffusersDDPM(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=data)
    learned = variance_type != "fixed_large"
    for t in timesteps_of(ours, theirs):
        m = 3 * torch.randn(SHAPE, generator=data)
        if learned:  # diffusers' learned takes v as σ² itself; learned_range as a mix in [-1, 1]
            v = torch.rand(SHAPE, generator=data)
            m = torch.cat([m, 0.02 * v if variance_type == "learned" else 2 * v - 1], dim=1)
        noise_seed = int(torch.randint(0, 2**31, (1,), generator=data))
        want = theirs.step(m, t, x, torch.Generator().manual_seed(noise_seed), False)
        got = ours.step(m, t, x, torch.Generator().manual_seed(noise_seed), False)
        assert isinstance(got, tuple) and len(got) == len(want) == 2
        close(got[0], want[0])
        close(got[1], want[1])
        if not config["thresholding"]:
            if learned:
                with pytest.raises(ConfigError, match="variance_type"):
                    ours.step_coefficients(t, SHAPE[0])
            else:
                z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(noise_seed))
                close(affine_prev(ours, m, t, x, z), want[0])
        x = want[0]
    if learned:
        with pytest.raises(ValueError, match="twice the sample's channels"):
            ours.step(m[:, :3], t, x)


def test_ddpm_fixed_large_log_is_refused_because_diffusers_returns_nan():
    theirs = DiffusersDDPM(variance_type="fixed_large_log")
    theirs.set_timesteps(10)
    x = torch.randn(SHAPE)
    out = theirs.step(torch.randn(SHAPE), 500, x, torch.Generator().manual_seed(0))
    assert out.prev_sample.isnan().all()
    with pytest.raises(ConfigError, match="variance_type.*fixed_large_log.*NaN"):
        DDPMScheduler(variance_type="fixed_large_log")


# ---- DDIM: eta, use_clipped_model_output, variance_noise -----------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_ddim_eta_and_clipped_model_output_match_diffusers(seed):
    rng = random.Random(seed)
    config, steps = random_config(rng, "ddim")
    ours, theirs = DDIMScheduler(**config), DiffusersDDIM(**config)
    ours.set_timesteps(max(steps, 6))
    theirs.set_timesteps(max(steps, 6))
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=data)
    for i, t in enumerate(timesteps_of(ours, theirs)):
        m = 3 * torch.randn(SHAPE, generator=data)
        eta, clipped = (0.0, 0.3, 1.0)[(seed + i) % 3], (seed + i) % 2 == 0
        z = torch.randn(SHAPE, generator=data)
        want = theirs.step(m, t, x, eta, clipped, None, z)  # diffusers' positional order
        got = ours.step(m, t, x, eta, clipped, None, z)
        close(got.prev_sample, want.prev_sample)
        close(got.pred_original_sample, want.pred_original_sample)
        close(ours.step(m, t, x, eta, clipped, noise=z).prev_sample, want.prev_sample)
        gen_ours, gen_theirs = (
            torch.Generator().manual_seed(seed),
            torch.Generator().manual_seed(seed),
        )
        want = theirs.step(m, t, x, eta=eta, use_clipped_model_output=clipped, generator=gen_theirs)
        got = ours.step(m, t, x, eta=eta, use_clipped_model_output=clipped, generator=gen_ours)
        close(got.prev_sample, want.prev_sample)
        assert torch.equal(gen_ours.get_state(), gen_theirs.get_state())  # same draws
        x = want.prev_sample
    with pytest.raises(ValueError, match="variance_noise"):
        ours.step(m, t, x, 0.5, False, torch.Generator(), z)
    with pytest.raises(ValueError, match="eta"):
        ours.step(m, t, x, eta=-0.5)


# ---- thresholding, zero terminal SNR, more beta schedules ----------------------------------------


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("seed", SEEDS)
def test_thresholding_and_zero_snr_chains_match_diffusers(kind, seed):
    rng = random.Random(100 + seed)
    config, steps = random_config(rng, kind)
    config.update(thresholding=seed in (0, 2), rescale_betas_zero_snr=seed in (0, 1, 3))
    if config["rescale_betas_zero_snr"] and config["prediction_type"] == "epsilon":
        config["prediction_type"] = "v_prediction"
    ours_cls, theirs_cls = {
        "ddpm": (DDPMScheduler, DiffusersDDPM),
        "ddim": (DDIMScheduler, DiffusersDDIM),
    }[kind]
    ours, theirs = ours_cls(**config), theirs_cls(**config)
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=data)
    for t in timesteps_of(ours, theirs):
        m = 3 * torch.randn(SHAPE, generator=data)
        noise_seed = int(torch.randint(0, 2**31, (1,), generator=data))
        want = theirs.step(m, t, x, generator=torch.Generator().manual_seed(noise_seed))
        got = ours.step(m, t, x, generator=torch.Generator().manual_seed(noise_seed))
        close(got.prev_sample, want.prev_sample)
        close(got.pred_original_sample, want.pred_original_sample)
        if config["thresholding"]:
            with pytest.raises(ConfigError, match="thresholding"):
                ours.step_coefficients(t, SHAPE[0])
        else:
            z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(noise_seed))
            z = z if kind == "ddpm" and t > 0 else 0 * z
            close(affine_prev(ours, m, t, x, z), want.prev_sample)
        x = want.prev_sample
    t = torch.tensor([0, 1, config["num_train_timesteps"] - 1])
    x0, noise = torch.randn((3, *SHAPE[1:]), generator=data), torch.randn((3, *SHAPE[1:]))
    close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t))
    bad_ratio = {**config, "thresholding": True, "dynamic_thresholding_ratio": 1.5}
    theirs = theirs_cls(**bad_ratio)
    theirs.set_timesteps(steps)
    with pytest.raises(RuntimeError, match="quantile"):  # diffusers fails only at the step
        theirs.step(m, theirs.timesteps[0], x)
    with pytest.raises(ConfigError, match="dynamic_thresholding_ratio"):
        ours_cls(**bad_ratio)


@pytest.mark.parametrize("schedule", ["sigmoid", "laplace"])
def test_ddpm_sigmoid_and_laplace_betas_match_diffusers(schedule):
    try:
        DiffusersDDPM(beta_schedule=schedule)
    except NotImplementedError:
        pytest.skip(f"diffusers {diffusers.__version__} has no {schedule} betas (0.37 added them)")
    rng = random.Random(schedule)
    for _ in range(3):
        config = {
            "beta_schedule": schedule,
            "num_train_timesteps": rng.choice([10, 100, 1000]),
            "beta_start": rng.uniform(5e-5, 1e-3),
            "beta_end": rng.uniform(0.01, 0.03),
            "rescale_betas_zero_snr": rng.random() < 0.5,
        }
        ours, theirs = DDPMScheduler(**config), DiffusersDDPM(**config)
        assert torch.equal(ours.betas, theirs.betas)
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    with pytest.raises(NotImplementedError):  # diffusers' DDIM has neither
        DiffusersDDIM(beta_schedule=schedule)
    with pytest.raises(ConfigError, match="beta_schedule"):
        DDIMScheduler(beta_schedule=schedule)


# ---- config overrides and saving -----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_config_overrides_and_save_pretrained_match_diffusers(seed, tmp_path):
    rng = random.Random(seed)
    base, steps = random_config(rng, "ddpm")
    override = {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "steps_offset": 0}
    for ours_cls, theirs_cls in ((DDIMScheduler, DiffusersDDIM), (DDPMScheduler, DiffusersDDPM)):
        theirs = theirs_cls.from_config(DiffusersDDPM(**base).config, **override)
        ours = ours_cls.from_config(DDPMScheduler(**base).config, **override)
        assert dict(ours.config) == {k: theirs.config[k] for k in ours.config}
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        assert timesteps_of(ours, theirs)
        folder = tmp_path / ours_cls.__name__
        ours.save_pretrained(folder)
        assert json.loads((folder / "scheduler_config.json").read_text())["steps_offset"] == 0
        loaded = theirs_cls.from_pretrained(folder, timestep_spacing="linspace")
        again = ours_cls.from_pretrained(folder, None, timestep_spacing="linspace")
        assert dict(again.config) == {k: loaded.config[k] for k in again.config}
        with pytest.raises(ConfigError, match="timestep_spacin"):
            ours_cls.from_config(ours.config, timestep_spacin="trailing")


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_steps_each_row_as_diffusers_and_none_at_t_zero(variance_type):
    """A per-sample batch mixing t > 0 and t = 0 (one noise draw for the batch): each row steps
    as diffusers steps the batch at that row's timestep, so the t = 0 row gets no noise
    whatever its v; a
    negative learned σ² gives NaN where diffusers does."""
    ours = DDPMScheduler(variance_type=variance_type)
    theirs = DiffusersDDPM(variance_type=variance_type)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    data = torch.Generator().manual_seed(21)
    x, pred = torch.randn(SHAPE, generator=data), torch.randn(SHAPE, generator=data)
    v = 2 * torch.rand(SHAPE, generator=data) - 1
    t = int(ours.timesteps[4])
    for scale in (0.02, -0.02) if variance_type == "learned" else (1.0,):
        m = torch.cat([pred, scale * v.abs() if variance_type == "learned" else v], dim=1)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        got = ours.step(m, torch.tensor([t, 0]), x, noise=z)
        first = theirs.step(m, t, x, torch.Generator().manual_seed(5))  # draws z too
        last = theirs.step(m, 0, x, torch.Generator().manual_seed(5))
        close(got.prev_sample, torch.cat([first.prev_sample[:1], last.prev_sample[1:]]))
        close(got.pred_original_sample[1:], last.pred_original_sample[1:])
    assert got.prev_sample[:1].isnan().any() == (variance_type == "learned")
    with pytest.raises(ValueError, match="twice the sample's channels"):
        ours.step(torch.randn(8), t, torch.randn(4))


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_step_coefficients_match_diffusers_for_every_prediction_type(kind, prediction_type):
    ours_cls, theirs_cls = {
        "ddpm": (DDPMScheduler, DiffusersDDPM),
        "ddim": (DDIMScheduler, DiffusersDDIM),
    }[kind]
    config = {"prediction_type": prediction_type, "clip_sample_range": 2.0, "steps_offset": 1}
    ours, theirs = ours_cls(**config), theirs_cls(**config)
    ours.set_timesteps(7)
    theirs.set_timesteps(7)
    data = torch.Generator().manual_seed(len(prediction_type))
    x = torch.randn(SHAPE, generator=data)
    for t in timesteps_of(ours, theirs):
        m = 2 * torch.randn(SHAPE, generator=data)
        want = theirs.step(m, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        close(affine_prev(ours, m, t, x, z if kind == "ddpm" else 0 * z), want)
        x = want


def test_ddpm_custom_timesteps_must_be_one_dimensional():
    ours = DDPMScheduler()
    for bad in (torch.tensor(9), np.array(9), np.array([[9, 5]])):
        with pytest.raises(ValueError, match="1-D sequence of integers"):
            ours.set_timesteps(timesteps=bad)
    assert ours.num_inference_steps is None and len(ours.timesteps) == 1000
    ours.set_timesteps(timesteps=np.array([9, 5]))
    assert ours.timesteps.tolist() == [9, 5]
