"""Training configs: reference defaults, file formats, round trips, and errors that name keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from echofast.errors import ConfigError
from echofast.train.config import (
    REFERENCE_ARCHITECTURES,
    config_changes,
    config_from_dict,
    default_config,
    load_config,
    save_config,
)

# the source tree's examples (the installed package carries them only as package data)
CONFIGS = Path(__file__).resolve().parents[2] / "echofast" / "train" / "configs"


def test_reference_defaults():
    lidm, lvdm, vae = (default_config(k) for k in ("lidm", "lvdm", "vae"))
    for cfg in (lidm, lvdm):
        assert cfg.optim.betas == [0.9, 0.999]
        assert (cfg.optim.weight_decay, cfg.optim.eps) == (1e-2, 1e-8)
        assert (cfg.optim.max_grad_norm, cfg.optim.warmup_steps) == (1.0, 500)
        assert cfg.ema.enabled and cfg.ema.decay == 0.9999 and cfg.ema.use_warmup
        assert cfg.ema.power == pytest.approx(2 / 3) and cfg.ema.inv_gamma == 1.0
        assert cfg.scheduler_config()["prediction_type"] == "v_prediction"
        assert cfg.vae is None
    assert (lidm.optim.lr, lidm.train.batch_size, lidm.diffusion.noise_offset) == (3e-4, 256, 0.0)
    assert (lvdm.optim.lr, lvdm.train.batch_size, lvdm.diffusion.noise_offset) == (1e-4, 16, 0.1)
    assert (lvdm.data.frames, lvdm.data.target_fps) == (64, 32.0)
    assert vae.diffusion is None
    assert (vae.vae.kl_weight, vae.vae.disc_start, vae.vae.disc_weight) == (1e-6, 50001, 0.5)
    assert lidm.architecture() == REFERENCE_ARCHITECTURES["lidm"]


def test_round_trip_json(tmp_path):
    for kind in ("vae", "lidm", "lvdm"):
        cfg = config_from_dict(
            {
                "model": {"type": kind, "config": {"sample_size": 6}},
                "train": {"max_steps": 7},
                "data": {"root": ["a", "b"]},
            }
        )
        path = save_config(cfg, tmp_path / f"{kind}.json")
        again = load_config(path)
        assert again == cfg
        assert again.to_dict() == json.loads(path.read_text())
        assert config_from_dict(cfg.to_dict()) == cfg
        assert config_changes(cfg.to_dict(), again.to_dict()) == []


@pytest.mark.parametrize("name", ["vae", "lidm", "lvdm"])
def test_example_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.toml", name)
    assert cfg.model.type == name
    ref = default_config(name)
    for section in ("optim", "ema"):
        assert getattr(cfg, section) == getattr(ref, section), section
    assert cfg.train.batch_size == ref.train.batch_size


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'output_dir = "x"\n[model]\ntype = "lvdm"\n[model.config]\nnum_frames = 8\n'
        '[data]\nroot = "d"\n[optim]\nlr = 1\nbetas = [0.5, 0.9]\n'
    )
    cfg = load_config(
        path,
        None,
        [
            "train.max_steps=12",
            "data.split=VAL",
            "seed=3",
            'diffusion.scheduler.prediction_type="epsilon"',
        ],
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.5, 0.9]
    assert (cfg.train.max_steps, cfg.data.split, cfg.seed) == (12, "VAL", 3)
    assert cfg.architecture()["num_frames"] == 8
    assert cfg.architecture()["block_out_channels"] == [128, 256, 256, 512]
    assert cfg.scheduler_config()["prediction_type"] == "epsilon"


def test_yaml_if_available(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": {"type": "lidm"}, "data": {"root": "r"}, "train": {"batch_size": 3}}
        )
    )
    assert load_config(path).train.batch_size == 3


@pytest.mark.parametrize(
    "data, named",
    [
        ({"optim": {"lrr": 1e-4}}, "optim.lrr"),
        ({"trian": {}}, "trian"),
        ({"ema": {"decay": 0.9, "powr": 1}}, "ema.powr"),
        ({"train": {"max_step": 1}, "data": {"roots": "x"}}, "train.max_step"),
    ],
)
def test_unknown_keys_are_named(data, named):
    with pytest.raises(ConfigError, match="unknown config key") as err:
        config_from_dict({"model": {"type": "lidm"}, **data})
    assert repr(named) in str(err.value)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"model": {"type": "vae"}, "diffusion": {}}, "section 'diffusion' does not apply"),
        ({"model": {"type": "lidm"}, "vae": {}}, "section 'vae' does not apply"),
        ({"model": {"type": "gan"}}, "'model.type'"),
        ({}, "model.type is not set"),
        ({"model": {"type": "lidm"}, "optim": {"lr": "fast"}}, "'optim.lr': expected a number"),
        ({"model": {"type": "lidm"}, "train": {"batch_size": 2.5}}, "'train.batch_size'"),
        ({"model": {"type": "lidm"}, "train": {"batch_size": 0}}, "'train.batch_size'"),
        ({"model": {"type": "lidm"}, "train": {"compile": 1}}, "'train.compile'"),
        ({"model": {"type": "lidm"}, "optim": {"betas": [0.9]}}, "'optim.betas'"),
        ({"model": {"type": "lidm"}, "optim": {"betas": [0.9, 1.0]}}, r"'optim\.betas\[1\]'"),
        ({"model": {"type": "lidm"}, "train": {"mixed_precision": "fp8"}}, "mixed_precision"),
        ({"model": {"type": "lidm"}, "ema": {"decay": 1.5}}, "'ema.decay'"),
        ({"model": {"type": "lidm"}, "data": {"source": "files", "root": ""}}, "'data.root'"),
        ({"model": {"type": "vae"}, "vae": {"perceptual_weight": 1.0}}, "lpips_model"),
        ({"model": {"type": "vae"}, "vae": {"lpips_model": "/nonexistent.pt"}}, "not a file"),
        ({"model": {"type": "vae"}, "vae": {"reconstruction": "l3"}}, "'vae.reconstruction'"),
        (
            {"model": {"type": "lidm"}, "diffusion": {"scheduler": {"beta_schedul": "x"}}},
            "beta_schedul",
        ),
    ],
)
def test_invalid_values_are_named(data, match):
    data = {**data, "data": {"root": "r", **data.get("data", {})}}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_type_mismatch_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="trains 'lvdm'"):
        config_from_dict({"model": {"type": "lidm"}}, "lvdm")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    other = tmp_path / "c.ini"
    other.write_text("")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_config(other)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(CONFIGS / "lidm.toml", "lidm", ["train.max_steps"])


def test_architecture_sources(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "a": 1}))
    cfg = config_from_dict(
        {
            "model": {
                "type": "lidm",
                "config_file": str(folder / "config.json"),
                "config": {"b": 2},
            },
            "data": {"root": "r"},
        }
    )
    assert cfg.architecture() == {"a": 1, "b": 2}
    cfg = config_from_dict(
        {"model": {"type": "lidm", "init_from": str(folder)}, "data": {"root": "r"}}
    )
    assert cfg.architecture() == {"a": 1}
    cfg.model.config = {"b": 2}
    with pytest.raises(ConfigError, match="init_from"):
        cfg.architecture()


def test_lr_schedule_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.optimization import get_constant_schedule_with_warmup

    from echofast.train.loop import _lr_lambda

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(12):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(5)))
    theirs = lrs(lambda o: get_constant_schedule_with_warmup(o, num_warmup_steps=5))
    assert ours == theirs
    assert ours[0] == 0.0 and ours[5:] == [0.5] * 7
