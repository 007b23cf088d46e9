"""Configs of other diffusers scheduler classes (PNDM, Euler, DPMSolver, ...) load as diffusers'
``DDIMScheduler.from_config`` / ``DDPMScheduler.from_config`` load them: the keys our class knows
kept (and validated), the others dropped with one warning, ``_use_default_values`` honoured.

Random but valid source configs; the converted configs and a few steps are compared with
diffusers' own conversion of the same config: in memory (with the ``_class_name`` a pipeline
loaded by ``from_pretrained`` carries, or the ``_use_default_values`` of a scheduler built in
code) and as a saved folder (``from_pretrained``).
"""

from __future__ import annotations

import inspect
import json
import random
import warnings

import diffusers
import pytest
import torch

from echofast.errors import ConfigError
from echofast.schedulers import CONFIG_NAME, DDIMScheduler, DDPMScheduler

SHAPE = (2, 3, 4, 4)
SOURCES = [
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "SASolverScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "DDIMParallelScheduler",
    "DDPMParallelScheduler",
]
TARGETS = ((DDIMScheduler, diffusers.DDIMScheduler), (DDPMScheduler, diffusers.DDPMScheduler))


def _keys(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def _random_source(rng: random.Random, name: str):
    """A diffusers ``name`` scheduler built from random valid values of the keys it shares with
    DDPM/DDIM, each passed or left to the class's default (then in ``_use_default_values``)."""
    cls = getattr(diffusers, name)
    n = rng.choice([100, 1000])
    zero_snr = rng.random() < 0.3
    values = {
        "num_train_timesteps": n,
        "beta_start": rng.uniform(5e-5, 1e-3),
        "beta_end": rng.uniform(0.01, 0.03),
        "beta_schedule": rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
        "trained_betas": (
            [0.0001 + 0.02 * i / n for i in range(n)] if rng.random() < 0.15 else None
        ),
        "prediction_type": rng.choice(
            ["v_prediction", "sample"] if zero_snr else ["epsilon", "v_prediction", "sample"]
        ),
        "clip_sample": rng.random() < 0.5,
        "clip_sample_range": rng.choice([0.5, 1.0, 2.0]),
        "thresholding": rng.random() < 0.3,
        "dynamic_thresholding_ratio": rng.uniform(0.6, 1.0),
        "sample_max_value": rng.uniform(1.0, 3.0),
        "timestep_spacing": rng.choice(["leading", "trailing", "linspace"]),
        "steps_offset": rng.choice([0, 1]),
        "rescale_betas_zero_snr": zero_snr,
        "set_alpha_to_one": rng.random() < 0.5,
    }
    if "variance_type" in _keys(cls):
        ddpm = name.startswith("DDPM")  # the DPMSolver family has None (no learned variance)
        fixed = ["fixed_small", "fixed_small_log", "fixed_large"] if ddpm else [None]
        values["variance_type"] = rng.choice([*fixed, "learned", "learned_range"])
    passed = {k: v for k, v in values.items() if k in _keys(cls) and rng.random() < 0.7}
    if passed.get("trained_betas") is not None:
        passed["num_train_timesteps"] = n
    if name == "PNDMScheduler" and passed.get("prediction_type") == "sample":
        passed["prediction_type"] = "epsilon"  # PNDM's step refuses "sample"
    return cls(**passed)


def _forms(source, tmp_path) -> dict:
    """The source's config as our from_config / from_pretrained meet it."""
    name = type(source).__name__
    source.save_pretrained(tmp_path)
    loaded = type(source).from_pretrained(tmp_path)
    return {
        "built in code": {**source.config, "_class_name": name},
        "pipeline.from_pretrained": loaded.config,
        "folder": tmp_path,
    }


def _convert(cls, form):
    return cls.from_config(form) if isinstance(form, dict) else cls.from_pretrained(form)


def _read(form) -> dict:
    return dict(form) if isinstance(form, dict) else json.loads((form / CONFIG_NAME).read_text())


def _steps_match(ours, theirs, seed: int) -> None:
    """A few steps of both on the same inputs and noise."""
    variance_type = ours.config.get("variance_type")
    steps = 7 if ours.config.timestep_spacing == "leading" else 6
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()[:steps]
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=data)
    for t in ours.timesteps.tolist()[:3]:
        m = 3 * torch.randn(SHAPE, generator=data)
        if variance_type in ("learned", "learned_range"):
            v = torch.rand(SHAPE, generator=data)
            m = torch.cat([m, 0.02 * v if variance_type == "learned" else 2 * v - 1], dim=1)
        noise_seed = int(torch.randint(0, 2**31, (1,), generator=data))
        want = theirs.step(m, t, x, generator=torch.Generator().manual_seed(noise_seed))
        got = ours.step(m, t, x, generator=torch.Generator().manual_seed(noise_seed))
        for a, b in ((got.prev_sample, want.prev_sample), (got[1], want[1])):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
        x = want.prev_sample


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")  # diffusers
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("source_name", SOURCES)
def test_other_scheduler_configs_convert_as_in_diffusers(source_name, seed, tmp_path):
    rng = random.Random(f"{source_name}-{seed}")
    source = _random_source(rng, source_name)
    for form_name, form in _forms(source, tmp_path).items():
        for ours_cls, theirs_cls in TARGETS:
            theirs = _convert(theirs_cls, form)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ours = _convert(ours_cls, form)
            what = f"{source_name} ({form_name}) -> {ours_cls.__name__}"
            assert dict(ours.config) == {k: theirs.config[k] for k in ours.config}, what
            assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod), what
            # the keys dropped (those our class lacks) are named in one warning, with the class
            config = _read(form)
            given = {k for k in config if not k.startswith("_")}
            dropped = given - set(config.get("_use_default_values", [])) - _keys(theirs_cls)
            assert len(caught) == (1 if dropped else 0), (what, [str(w.message) for w in caught])
            if dropped:
                message = str(caught[0].message)
                assert repr(source_name) in message and str(sorted(dropped)) in message, what
                assert caught[0].filename == __file__, what
            _steps_match(ours, theirs, seed)


def test_values_and_overrides_stay_validated_and_own_configs_strict():
    pndm = dict(diffusers.PNDMScheduler(skip_prk_steps=True).config)  # as a file holds it:
    pndm.update(_class_name="PNDMScheduler", _use_default_values=[])  # every key given
    with pytest.warns(UserWarning, match="skip_prk_steps"):
        ddim = DDIMScheduler.from_config(pndm, timestep_spacing="trailing")
    assert ddim.config.timestep_spacing == "trailing"
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="'timestep_spacing'"):
        DDIMScheduler.from_config({**pndm, "timestep_spacing": "karras"})
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="skip_prk_step"):
        DDIMScheduler.from_config(pndm, skip_prk_step=False)  # overrides are never dropped
    # no class: an unknown key is refused, a diffusers one too; our own class: a key no
    # diffusers scheduler has is refused (a typo, most likely), others' keys are dropped
    # (tests/schedulers/test_diffusers_keys.py)
    with pytest.raises(ConfigError, match="skip_prk_steps"):
        DDIMScheduler.from_config({"beta_start": 0.001, "skip_prk_steps": True})
    for config in (
        {"skip_prk_step": True},
        {"skip_prk_step": True, "_class_name": "DDIMScheduler"},
    ):
        with pytest.raises(ConfigError, match="skip_prk_step"):
            DDIMScheduler.from_config(config)
    # the sibling's config: its own keys go silently, a third class's with the warning
    ddpm = {**DDPMScheduler().config, "_class_name": "DDPMScheduler", "skip_prk_steps": True}
    with pytest.warns(UserWarning, match=r"'DDPMScheduler' config's key\(s\) \['skip_prk_steps'\]"):
        assert DDIMScheduler.from_config(ddpm).config == DDIMScheduler().config
    # metadata that is not what diffusers writes
    with pytest.raises(ConfigError, match="UNet2DModel.*no scheduler"):
        DDPMScheduler.from_config({"_class_name": "UNet2DModel", "in_channels": 4})
    with pytest.raises(ConfigError, match="'_class_name'"):
        DDPMScheduler.from_config({"_class_name": ["DDPMScheduler"]})
    with pytest.raises(ConfigError, match="'_use_default_values'"):
        DDPMScheduler.from_config({"_use_default_values": "beta_start"})
