"""Config edge cases the main tests leave open: value types at their boundaries, overrides
that are not TOML, defaults not shared between configs, and what config_changes compares."""

from __future__ import annotations

import pytest

from echofast.errors import ConfigError
from echofast.train.config import (
    config_changes,
    config_from_dict,
    default_config,
    load_config,
    read_config_file,
)


def _cfg(model_type: str = "lidm", **sections):
    data = {"model": {"type": model_type}, **sections}
    data["data"] = {"root": "r", **sections.get("data", {})}
    return config_from_dict(data)


@pytest.mark.parametrize(
    "sections, match",
    [
        ({"train": {"max_steps": True}}, "'train.max_steps': expected an integer"),
        ({"optim": {"lr": "1e-4x"}}, "'optim.lr': expected a number"),
        ({"optim": {"lr": True}}, "'optim.lr'"),
        ({"optim": {"betas": [0.9, 0.99, 0.9]}}, "'optim.betas': expected a list of two"),
        ({"data": {"root": []}}, "'data.root': expected a string or a non-empty list"),
        ({"data": {"target_fps": 0}}, "'data.target_fps'"),
        ({"data": {"num_workers": -1}}, "'data.num_workers'"),
        ({"ema": {"decay": 0.5, "min_decay": 0.6}}, "'ema.decay'"),
    ],
)
def test_boundary_values_are_refused_by_key(sections, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**sections)


def test_boundary_values_that_are_allowed():
    cfg = _cfg(
        data={"num_workers": 0, "root": ["a", "b"]},
        ema={"decay": 1.0, "min_decay": 1.0},
        optim={"lr": " 2e-4 ", "betas": ["0.5", 0.9]},
    )
    assert cfg.data.num_workers == 0 and cfg.data.root == ["a", "b"]
    assert cfg.ema.decay == 1.0 and cfg.optim.lr == 2e-4 and cfg.optim.betas == [0.5, 0.9]


def test_overrides_that_are_not_toml_are_strings(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"model": {"type": "lidm"}, "data": {"root": "r"}}')
    cfg = load_config(path, None, ["train.device=cpu", "data.root=/some/data dir", "seed=7"])
    assert (cfg.train.device, cfg.data.root, cfg.seed) == ("cpu", "/some/data dir", 7)


def test_type_defaults_are_not_shared_between_configs():
    first = default_config("vae")
    first.optim.betas[0] = 0.1
    first.optim.betas.append(0.3)
    assert default_config("vae").optim.betas == [0.5, 0.9]


def test_tables_are_copied_from_the_input():
    data = {
        "model": {"type": "lidm", "config": {"block_out_channels": [64, 128]}},
        "data": {"root": "r"},
        "diffusion": {"scheduler": {"prediction_type": "v_prediction"}},
    }
    cfg = config_from_dict(data)
    data["model"]["config"]["block_out_channels"].append(256)
    data["model"]["config"]["extra"] = 1
    data["diffusion"]["scheduler"]["prediction_type"] = "sample"
    assert cfg.model.config == {"block_out_channels": [64, 128]}
    assert cfg.diffusion.scheduler == {"prediction_type": "v_prediction"}


def test_config_changes_compares_free_tables_whole():
    old = default_config("lidm").to_dict()
    new = default_config("lidm").to_dict()
    new["diffusion"]["scheduler"] = {"beta_schedule": "linear"}
    new["model"]["config"] = {"sample_size": 8}
    new["train"]["max_steps"] = 1
    assert config_changes(old, new) == ["diffusion.scheduler", "model.config", "train.max_steps"]
    old["diffusion"]["scheduler"] = {"beta_schedule": "squaredcos_cap_v2"}
    assert config_changes(old, new) == ["diffusion.scheduler", "model.config", "train.max_steps"]


def test_an_empty_file_holds_no_settings(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("null\n")
    assert read_config_file(path) == {}
    cfg = load_config(path, "vae", ["data.root=r"])
    assert cfg.model.type == "vae" and cfg.data.root == "r"
