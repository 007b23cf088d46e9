"""DDPM / DDIM schedulers: step-by-step parity with diffusers, noise draws, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler as DiffusersDDPM
from diffusers import EulerDiscreteScheduler

from echofast.errors import ConfigError, MissingFileError
from echofast.schedulers import (
    CONFIG_NAME,
    REFERENCE_SCHEDULER_CONFIG,
    DDIMScheduler,
    DDPMScheduler,
)

SHAPE = (2, 3, 4, 4)
TOL = 1e-6

EPSILON = {"prediction_type": "epsilon"}  # diffusers' defaults: linear, clip to ±1
SAMPLE = {
    "prediction_type": "sample",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
}
COSINE_V = {
    "prediction_type": "v_prediction",
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample_range": 2.0,
}

PAIRS = {"ddpm": (DDPMScheduler, DiffusersDDPM), "ddim": (DDIMScheduler, DiffusersDDIM)}


def _pair(kind: str, config: dict, **extra):
    ours, theirs = PAIRS[kind]
    config = {**config, **extra}
    if kind == "ddim":
        config.pop("variance_type", None)
    return ours(**config), theirs(**config)


def _chain(kind: str, config: dict, steps: int | None, *, seed: int = 0, scale: float = 3.0):
    """Run both schedulers over the whole chain on the same inputs; max |diff| and #clips."""
    ours, theirs = _pair(kind, config)
    if steps is not None:
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=data)
    y = x.clone()
    worst, clipped = 0.0, 0
    bound = ours.config.clip_sample_range
    for t in theirs.timesteps:
        model_output = scale * torch.randn(SHAPE, generator=data)
        noise_seed = int(torch.randint(0, 2**31, (1,), generator=data))
        kwargs = {}
        if kind == "ddpm":  # diffusers draws exactly this randn from the generator
            kwargs["generator"] = torch.Generator().manual_seed(noise_seed)
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(noise_seed))
        else:
            noise = None
        ref = theirs.step(model_output, t, x, **kwargs)
        got = ours.step(model_output, t, y, noise=noise)
        for a, b in (
            (ref.prev_sample, got.prev_sample),
            (ref.pred_original_sample, got.pred_original_sample),
        ):
            assert b.dtype == torch.float32 and b.shape == SHAPE
            worst = max(worst, (a - b).abs().max().item())
        clipped += int(ours.config.clip_sample and got.pred_original_sample.abs().max() == bound)
        x, y = ref.prev_sample, got.prev_sample
    assert torch.isfinite(y).all()
    return worst, clipped


# ---- timesteps -----------------------------------------------------------------------------------


def test_reference_timesteps():
    sched = DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    sched.set_timesteps(64)
    assert sched.timesteps.dtype == torch.long
    assert sched.timesteps.tolist() == list(range(945, -1, -15))
    assert sched.num_inference_steps == 64
    assert sched.init_noise_sigma == 1.0
    assert sched.previous_timestep(945) == 930 and sched.previous_timestep(0) == -1
    assert sched.previous_timestep(torch.tensor(15)).item() == 0


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_for_every_step_count(kind, spacing):
    ours, theirs = _pair(kind, EPSILON, timestep_spacing=spacing)
    extra = []
    for n in range(1, 1001):
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        want = theirs.timesteps.tolist()
        got = ours.timesteps.tolist()
        if len(want) == n + 1:
            # diffusers' trailing np.arange overshoots by one for some n, ending in t = -1;
            # echofast keeps exactly n steps.
            assert want[-1] == -1
            want = want[:-1]
            extra.append(n)
        assert got == want, n
        assert len(got) == n and len(set(got)) == n and got == sorted(got, reverse=True)
    if spacing == "trailing":
        assert extra[:3] == [61, 103, 121] and len(extra) == 62
    else:
        assert extra == []


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_steps_offset_and_device(kind):
    ours, theirs = _pair(kind, EPSILON, steps_offset=1)
    ours.set_timesteps(50, device="cpu")
    theirs.set_timesteps(50)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert ours.timesteps[0] == 981 and ours.timesteps[-1] == 1
    with pytest.raises(ValueError, match="steps_offset"):
        ours.set_timesteps(1000)
    for bad in (0, 1001, 2.0, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            ours.set_timesteps(bad)


# ---- trajectories --------------------------------------------------------------------------------

CONFIGS = {
    "reference": REFERENCE_SCHEDULER_CONFIG,
    "epsilon": EPSILON,
    "sample": SAMPLE,
    "cosine_v": COSINE_V,
}


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_trajectory_matches_diffusers(kind, config, spacing):
    worst, clipped = 0.0, 0
    for steps in (1, 10, 50, 64):
        w, c = _chain(kind, {**CONFIGS[config], "timestep_spacing": spacing}, steps, seed=steps)
        worst, clipped = max(worst, w), clipped + c
    assert worst <= TOL
    if CONFIGS[config].get("clip_sample", True):
        assert clipped > 0  # the clipping path was exercised


@pytest.mark.parametrize(
    "kind, config, extra, steps",
    [
        ("ddpm", "reference", {}, 1000),
        (
            "ddpm",
            "epsilon",
            {"variance_type": "fixed_small_log", "timestep_spacing": "trailing"},
            100,
        ),
        ("ddim", "reference", {"set_alpha_to_one": False, "timestep_spacing": "linspace"}, 1000),
        ("ddpm", "cosine_v", {"steps_offset": 1}, 250),
        ("ddim", "sample", {"steps_offset": 1, "set_alpha_to_one": False}, 200),
        ("ddim", "epsilon", {"steps_offset": 1}, 64),
    ],
)
def test_long_chains_and_variants_match_diffusers(kind, config, extra, steps):
    worst, _ = _chain(kind, {**CONFIGS[config], **extra}, steps)
    assert worst <= TOL


def test_ddpm_without_set_timesteps_steps_by_one():
    worst, _ = _chain("ddpm", {**REFERENCE_SCHEDULER_CONFIG, "num_train_timesteps": 200}, None)
    assert worst <= TOL


def test_reference_chain_is_bitwise_equal():
    worst, _ = _chain("ddpm", REFERENCE_SCHEDULER_CONFIG, 64)
    assert worst == 0.0


# ---- noise draws ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"timestep_spacing": "trailing"}, {"steps_offset": 1}])
def test_generator_draws_one_randn_per_step_with_t_positive(extra):
    sched = DDPMScheduler(**{**REFERENCE_SCHEDULER_CONFIG, **extra})
    sched.set_timesteps(10)
    data = torch.Generator().manual_seed(1)
    x = y = torch.randn(SHAPE, generator=data)
    g_step, g_test = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    draws = 0
    for t in sched.timesteps.tolist():
        out = torch.randn(SHAPE, generator=data)
        before = g_step.get_state()
        x = sched.step(out, t, x, generator=g_step).prev_sample
        if t > 0:
            noise, draws = torch.randn(SHAPE, generator=g_test), draws + 1
        else:  # no draw at t == 0, and explicit noise is ignored
            assert torch.equal(g_step.get_state(), before)
            noise = torch.full(SHAPE, float("nan"))
        y = sched.step(out, t, y, noise=noise).prev_sample
        assert torch.equal(x, y)
        assert torch.equal(g_step.get_state(), g_test.get_state())
    assert draws == (9 if extra == {} else 10)


def test_list_of_generators_makes_samples_batch_independent():
    sched = DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    sched.set_timesteps(8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    outs = torch.randn((8, *SHAPE), generator=torch.Generator().manual_seed(4))
    batch = [torch.Generator().manual_seed(s) for s in (10, 11)]
    alone = [torch.Generator().manual_seed(s) for s in (10, 11)]
    xb, xs = x, [x[i : i + 1] for i in range(2)]
    for k, t in enumerate(sched.timesteps):
        xb = sched.step(outs[k], t, xb, generator=batch).prev_sample
        xs = [
            sched.step(outs[k][i : i + 1], t, xs[i], generator=[alone[i]]).prev_sample
            for i in range(2)
        ]
    assert torch.equal(xb, torch.cat(xs))


def test_ddim_is_deterministic_and_draws_nothing():
    sched = DDIMScheduler(
        **{k: v for k, v in REFERENCE_SCHEDULER_CONFIG.items() if k != "variance_type"}
    )
    sched.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    a = sched.step(out, 800, x, generator=g).prev_sample
    b = sched.step(out, 800, x, noise=torch.randn(SHAPE)).prev_sample
    c = sched.step(out, 800, x).prev_sample
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(g.get_state(), state)
    assert sched.previous_timestep(800) == 600
    with pytest.raises(ValueError, match="eta"):
        sched.step(out, 800, x, eta=-1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(out, 800, x)


# ---- per-sample timesteps, dtypes, outputs -------------------------------------------------------


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_shared_and_per_sample_timesteps(cls):
    config = dict(REFERENCE_SCHEDULER_CONFIG)
    if cls is DDIMScheduler:
        config.pop("variance_type")
    sched = cls(**config)
    sched.set_timesteps(64)
    x, out, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    ref = sched.step(out, 930, x, noise=noise)
    for t in (torch.tensor(930), torch.tensor([930, 930]), np.int64(930), [930, 930]):
        got = sched.step(out, t, x, noise=noise)
        assert torch.equal(got.prev_sample, ref.prev_sample)
        assert torch.equal(got.pred_original_sample, ref.pred_original_sample)
    mixed = sched.step(out, torch.tensor([930, 0]), x, noise=noise, return_dict=False)
    last = sched.step(out[1:], 0, x[1:], noise=noise[1:])
    assert isinstance(mixed, tuple) and torch.equal(mixed[0][:1], ref.prev_sample[:1])
    assert torch.equal(mixed[0][1:], last.prev_sample) and torch.equal(mixed[1][1:], last[1])
    assert torch.equal(sched.previous_timestep(torch.tensor([930, 15])), torch.tensor([915, 0]))
    with pytest.raises(ValueError, match="batch of 2"):
        sched.step(out, torch.tensor([945, 930, 915]), x)
    with pytest.raises(ValueError, match="training range"):
        sched.step(out, 1000, x)
    if cls is DDPMScheduler:
        with pytest.raises(ValueError, match="not one of the 64 timesteps"):
            sched.step(out, 931, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_math_runs_in_fp32(dtype):
    sched = DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    sched.set_timesteps(64)
    x, out, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    ref = sched.step(out.to(dtype), 465, x.to(dtype), noise=noise.to(dtype))
    assert ref.prev_sample.dtype == dtype and ref.pred_original_sample.dtype == dtype
    want = sched.step(
        out.to(dtype).float(), 465, x.to(dtype).float(), noise=noise.to(dtype).float()
    )
    assert torch.equal(ref.prev_sample, want.prev_sample.to(dtype))
    g = torch.Generator().manual_seed(5)
    drawn = sched.step(out.to(dtype), 465, x.to(dtype), generator=g).prev_sample
    fp32_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, sched.step(out.to(dtype), 465, x.to(dtype), noise=fp32_noise)[0])
    assert torch.equal(sched.scale_model_input(x, 465), x)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("config", ["reference", "cosine_v"])
def test_add_noise_and_velocity_match_diffusers(kind, config):
    ours, theirs = _pair(kind, CONFIGS[config])
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn((6, *SHAPE[1:]), generator=g), torch.randn((6, *SHAPE[1:]), generator=g)
    t = torch.tensor([0, 1, 15, 500, 998, 999])
    for name in ("add_noise", "get_velocity"):
        want = getattr(theirs, name)(x0, noise, t)
        got = getattr(ours, name)(x0, noise, t)
        assert (got - want).abs().max().item() <= TOL
        one = getattr(ours, name)(x0[3:4], noise[3:4], 500)
        assert torch.equal(one, got[3:4])
        half = getattr(ours, name)(x0.half(), noise.half(), t)  # fp32 math, fp16 result
        assert half.dtype == torch.float16
        assert torch.equal(
            half, getattr(ours, name)(x0.half().float(), noise.half().float(), t).half()
        )
        # fp64 samples: fp64 math, as diffusers' (the fp32 coefficient table cast up)
        x64, n64 = x0.double(), noise.double()
        got64 = getattr(ours, name)(x64, n64, t)
        assert got64.dtype == torch.float64
        assert torch.equal(got64, getattr(theirs, name)(x64, n64, t))


def test_alphas_match_diffusers():
    for config in CONFIGS.values():
        ours, theirs = _pair("ddpm", config)
        assert torch.equal(ours.betas, theirs.betas)
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    betas = [0.001 * (i + 1) for i in range(10)]
    ours, theirs = _pair("ddpm", {"num_train_timesteps": 10, "trained_betas": betas})
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert len(ours) == 10 and ours.config.trained_betas == betas


# ---- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, key, value",
    [
        (DDPMScheduler, "beta_schedule", "cosine"),
        (DDPMScheduler, "variance_type", "fixed_large_log"),
        (DDPMScheduler, "variance_type", "learned_rang"),
        (DDPMScheduler, "thresholding", "yes"),
        (DDPMScheduler, "rescale_betas_zero_snr", "yes"),
        (DDPMScheduler, "prediction_type", "flow"),
        (DDPMScheduler, "timestep_spacing", "karras"),
        (DDPMScheduler, "num_train_timesteps", 0),
        (DDPMScheduler, "steps_offset", 1.5),
        (DDPMScheduler, "trained_betas", [0.1, 0.2]),
        (DDIMScheduler, "thresholding", None),
        (DDIMScheduler, "set_alpha_to_one", "yes"),
        (DDIMScheduler, "beta_schedule", "laplace"),
        (DDIMScheduler, "beta_schedule", "sigmoid"),
        (DDPMScheduler, "no_such_key", 1),
        (DDIMScheduler, "variance_typ", "fixed_small"),
    ],
)
def test_unsupported_config_raises_naming_the_key(cls, key, value):
    with pytest.raises(ConfigError, match=key):
        cls.from_config({"_class_name": cls.__name__, "_foo": 1, key: value})


def test_config_conversion_and_class_check():
    # diffusers' DDIM-from-DDPM idiom, for configs that name their class (as files do)
    ddpm_config = {
        **DiffusersDDPM(**REFERENCE_SCHEDULER_CONFIG).config,
        "_class_name": "DDPMScheduler",
    }
    ddim = DDIMScheduler.from_config(ddpm_config)
    assert "variance_type" not in ddim.config and ddim.config.clip_sample_range == 4.0
    ddim_config = {**DiffusersDDIM(set_alpha_to_one=False).config, "_class_name": "DDIMScheduler"}
    ddpm = DDPMScheduler.from_config(ddim_config)
    assert ddpm.config.num_train_timesteps == 1000
    # in-memory configs name no class: diffusers' idiom works on them too, from either library
    ddim = DDIMScheduler.from_config(DiffusersDDPM(**REFERENCE_SCHEDULER_CONFIG).config)
    assert "variance_type" not in ddim.config and ddim.config.clip_sample_range == 4.0
    assert DDIMScheduler.from_config(DDPMScheduler().config).config == DDIMScheduler().config
    with pytest.raises(ConfigError, match="variance_typo"):  # a key no class knows: refused
        DDIMScheduler.from_config({"variance_typo": "fixed_small"})
    # another class's config: its other keys are dropped with a warning naming them
    euler = {**EulerDiscreteScheduler().config, "_class_name": "EulerDiscreteScheduler"}
    with pytest.warns(UserWarning, match="'EulerDiscreteScheduler'.*use_karras_sigmas"):
        assert DDPMScheduler.from_config({**euler, "_use_default_values": []}).config == {
            **DDPMScheduler().config,
            "timestep_spacing": "linspace",
        }
    with pytest.raises(ConfigError, match="JSON object"):
        DDPMScheduler.from_config([1, 2])


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_save_config_round_trips_through_diffusers(kind, tmp_path):
    config = {**REFERENCE_SCHEDULER_CONFIG, "steps_offset": 1, "timestep_spacing": "trailing"}
    ours, theirs = _pair(kind, config)
    path = ours.save_config(tmp_path / "ours")
    assert path.name == CONFIG_NAME
    saved = json.loads(path.read_text())
    assert saved["_class_name"] == PAIRS[kind][1].__name__
    loaded = PAIRS[kind][1].from_pretrained(tmp_path / "ours")
    assert {k: loaded.config[k] for k in ours.config} == dict(ours.config)
    assert set(loaded.config) - {"_use_default_values"} >= set(ours.config)
    theirs.save_config(tmp_path / "theirs")
    back = PAIRS[kind][0].from_pretrained(tmp_path / "theirs")
    assert back.config == ours.config
    assert PAIRS[kind][0].from_config(theirs.config).config == ours.config
    with pytest.raises(MissingFileError):
        PAIRS[kind][0].from_pretrained(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_NAME).write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PAIRS[kind][0].from_pretrained(tmp_path / "bad")
