"""The reference recipes: every default of every model type, as the schema in
echofast/train/config.py documents it and as EchoNet-Synthetic trained (spec, "Training" and
"Models"), and the example configs in echofast/train/configs/ spelling out those defaults."""

from __future__ import annotations

import inspect

import pytest
import torch
from train.test_config import CONFIGS

from echofast.train.config import REFERENCE_ARCHITECTURES, default_config, flatten, load_config

# (LIDM, LVDM, VAE) where the documented defaults differ
_PER_TYPE = {
    "optim.lr": (3e-4, 1e-4, 5e-4),
    "optim.betas": ([0.9, 0.999], [0.9, 0.999], [0.5, 0.9]),
    "optim.weight_decay": (0.01, 0.01, 0.0),
    "optim.max_grad_norm": (1.0, 1.0, 0.0),
    "optim.warmup_steps": (500, 500, 0),
    "train.max_steps": (500_000, 60_000, 100_000),
    "train.batch_size": (256, 16, 32),
    "train.grad_accum": (1, 1, 2),
    "train.mixed_precision": ("auto", "auto", "no"),
    "train.checkpoint_every": (10_000, 10_000, 5_000),
    "ema.enabled": (True, True, False),
}
_SHARED = {
    "seed": 42,
    "model.config_file": "",
    "model.init_from": "",
    "model.config": {},
    "data.source": "files",
    "data.root": "",
    "data.split": "TRAIN",
    "data.size": 112,
    "data.frames_per_video": 0,
    "data.frames": 64,
    "data.target_fps": 32.0,
    "data.random_window": True,
    "data.num_workers": 4,
    "data.random_items": 64,
    "optim.eps": 1e-8,
    "train.compile": False,
    "train.gradient_checkpointing": False,
    "train.allow_tf32": True,
    "train.device": "auto",
    "train.keep_checkpoints": 3,
    "train.log_every": 1,
    "train.progress": True,
    "train.export_at_end": True,
    "ema.decay": 0.9999,
    "ema.min_decay": 0.0,
    "ema.update_after_step": 0,
    "ema.use_warmup": True,
    "ema.inv_gamma": 1.0,
    "ema.power": 2 / 3,
}
_DIFFUSION = {"diffusion.noise_offset": (0.0, 0.1), "diffusion.scheduler": ({}, {})}
_VAE_LOSS = {
    "vae.reconstruction": "l1",
    "vae.kl_weight": 1e-6,
    "vae.sample_posterior": True,
    "vae.disc_start": 50_001,
    "vae.disc_weight": 0.5,
    "vae.disc_layers": 3,
    "vae.disc_channels": 64,
    "vae.disc_lr": 0.0,
    "vae.perceptual_weight": 0.0,
    "vae.lpips_model": "",
}


def _documented_defaults(kind: str) -> dict:
    column = ("lidm", "lvdm", "vae").index(kind)
    out = {"output_dir": f"runs/{kind}", "model.type": kind, **_SHARED}
    out.update({key: values[column] for key, values in _PER_TYPE.items()})
    if kind == "vae":
        out.update(_VAE_LOSS)
    else:
        out.update({key: values[column] for key, values in _DIFFUSION.items()})
    return out


@pytest.mark.parametrize("kind", ["lidm", "lvdm", "vae"])
def test_every_default_is_the_documented_recipe(kind):
    resolved = flatten(default_config(kind).to_dict())
    # model.config is an empty table: flatten keeps it as one key
    assert resolved == _documented_defaults(kind)
    assert all(type(resolved[k]) is type(v) for k, v in _documented_defaults(kind).items())


# spec, "Models": the architectures and their parameter counts (millions)
_SPEC_MODELS = {
    "vae": ("AutoencoderKL", 62.41, {"sample_size": 112, "latent_channels": 4}),
    "lidm": (
        "UNet2DModel",
        73.55,
        {"sample_size": 14, "attention_head_dim": 8, "freq_shift": 0, "flip_sin_to_cos": True},
    ),
    "lvdm": (
        "UNetSpatioTemporalConditionModel",
        143.83,
        {"sample_size": 14, "num_frames": 64, "in_channels": 8, "out_channels": 4},
    ),
}


@pytest.mark.parametrize("kind", ["vae", "lidm", "lvdm"])
def test_reference_architectures_build_the_published_models(kind):
    import diffusers

    name, millions, keys = _SPEC_MODELS[kind]
    cls = getattr(diffusers, name)
    arch = default_config(kind).architecture()
    assert {k: arch[k] for k in keys} == keys
    with torch.device("meta"):
        model = cls(**arch)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=5e-3)
    if kind == "vae":  # diffusers' default, which the published config.json keeps
        default = inspect.signature(cls.__init__).parameters["scaling_factor"].default
        assert arch["scaling_factor"] == default
    assert arch == REFERENCE_ARCHITECTURES[kind]


@pytest.mark.parametrize("name", ["vae", "lidm", "lvdm"])
def test_example_configs_spell_out_the_defaults(name):
    """Every key an example sets is its type's default, except where a run is placed and how
    it reads and logs (the examples say so in their comments)."""
    example = flatten(load_config(CONFIGS / f"{name}.toml", name).to_dict())
    defaults = flatten(default_config(name).to_dict())
    differ = sorted(k for k in example if example[k] != defaults[k])
    assert set(differ) - {"output_dir"} == {"data.num_workers", "data.root", "train.log_every"}
