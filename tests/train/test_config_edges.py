"""Config edge cases the main tests leave open: value types at their boundaries, overrides
that are not TOML, defaults not shared between configs, and what config_changes compares."""

from __future__ import annotations

import copy
import json

import pytest

from echofast.errors import ConfigError
from echofast.train.config import (
    RESUMABLE_CHANGES,
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


def test_init_from_refuses_a_config_file_too(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    model = {"type": "lidm", "init_from": str(tmp_path), "config_file": str(tmp_path / "c.json")}
    cfg = _cfg(model=model)
    with pytest.raises(ConfigError, match="do not also set model.config_file"):
        cfg.architecture()


def test_architecture_is_a_copy_of_the_overrides():
    cfg = _cfg(model={"type": "lidm", "config": {"block_out_channels": [32, 64]}})
    cfg.architecture()["block_out_channels"].append(128)
    assert cfg.model.config == {"block_out_channels": [32, 64]}
    assert cfg.architecture()["block_out_channels"] == [32, 64]


@pytest.mark.parametrize(
    "data, match",
    [
        ([{"model": {"type": "lidm"}}], "expected a table of settings"),
        ({"model": "lidm"}, "'model' must be a table, got str"),
        ({"model": {"type": "lidm"}, "optim": 5}, "'optim' must be a table, got 5"),
        ({"model": {"type": "lidm"}, "train": [1]}, r"'train' must be a table, got \[1\]"),
        ({"model": {"type": "lidm", "config": [1]}}, "'model.config': expected a table"),
        (
            {"model": {"type": "lidm"}, "diffusion": {"scheduler": "linear"}},
            "'diffusion.scheduler': expected a table",
        ),
        ({"model": {"type": "lidm"}, "data": {"split": 1}}, "'data.split': expected a string"),
        ({"model": {"type": "lidm"}, "output_dir": 3}, "'output_dir': expected a string"),
    ],
)
def test_malformed_files_are_refused_naming_file_and_key(tmp_path, data, match):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    overrides = ["data.root=r"] if isinstance(data, dict) else []
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path, overrides=overrides)
    named = f"{path} with --set data.root=r: " if overrides else f"{path}: "
    assert str(err.value).startswith(named)


def test_settings_that_are_not_a_table_are_refused():
    with pytest.raises(ConfigError, match="run.json: expected a table of settings, got list"):
        config_from_dict([("model", {"type": "lidm"})], source="run.json")


def test_a_list_of_roots_is_copied_from_the_input():
    roots = ["a", "b"]
    cfg = config_from_dict({"model": {"type": "lvdm"}, "data": {"root": roots}})
    roots.append("c")
    assert cfg.data.root == ["a", "b"]


@pytest.mark.parametrize("text", [".5", "+.25e-3", "1.", "1E+2", " 2e-4 ", "3"])
def test_numeric_strings_are_read_as_python_floats(text):
    cfg = _cfg(optim={"eps": text, "lr": text})
    assert cfg.optim.eps == float(text) == cfg.optim.lr
    with pytest.raises(ConfigError, match="'optim.lr': value .* must be positive"):
        _cfg(optim={"lr": "-" + text.strip().lstrip("+")})


@pytest.mark.parametrize("text", ["1e", "e3", ".", "0x10", "inf", "nan", "1_0", "1.2.3", ""])
def test_strings_that_are_not_decimal_numbers_are_refused(text):
    with pytest.raises(ConfigError, match="'optim.eps': expected a number"):
        _cfg(optim={"eps": text})


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_numbers_that_are_not_finite_are_refused(tmp_path, text):
    """TOML has nan and inf (JSON files read by Python too): a float key refuses them."""
    path = tmp_path / "c.toml"
    path.write_text(f'[data]\nroot = "r"\n[optim]\nlr = {text}\n')
    with pytest.raises(ConfigError, match="config key 'optim.lr': expected a finite") as err:
        load_config(path, "lidm")
    assert str(err.value).startswith(f"{path}: ")


_POSITIVE = [
    "data.size",
    "data.frames",
    "data.random_items",
    "train.max_steps",
    "train.batch_size",
    "train.grad_accum",
    "train.checkpoint_every",
    "train.log_every",
    "data.target_fps",
    "optim.lr",
    "optim.eps",
    "ema.inv_gamma",
    "ema.power",
]
_NON_NEGATIVE = [
    "data.num_workers",
    "data.frames_per_video",
    "train.keep_checkpoints",
    "optim.weight_decay",
    "optim.max_grad_norm",
    "optim.warmup_steps",
    "ema.update_after_step",
    "diffusion.noise_offset",
]
_VAE_NON_NEGATIVE = ["vae.kl_weight", "vae.disc_weight", "vae.disc_lr", "vae.perceptual_weight"]
_VAE_POSITIVE = ["vae.disc_layers", "vae.disc_channels"]


def _with(key: str, value, model_type: str = "lidm"):
    section, name = key.split(".")
    if isinstance(getattr(default_config(model_type), section).__dict__[name], float):
        value = float(value)
    return _cfg(model_type, **{section: {name: value}})


@pytest.mark.parametrize(
    "key, model_type",
    [(k, "lidm") for k in _POSITIVE] + [(k, "vae") for k in _VAE_POSITIVE],
)
def test_zero_is_refused_where_a_key_must_be_positive(key, model_type):
    with pytest.raises(ConfigError, match=rf"'{key}': value 0(\.0)? must be positive"):
        _with(key, 0, model_type)
    assert getattr(getattr(_with(key, 1, model_type), key.split(".")[0]), key.split(".")[1]) == 1


@pytest.mark.parametrize(
    "key, model_type",
    [(k, "lidm") for k in _NON_NEGATIVE]
    + [(k, "vae") for k in [*_VAE_NON_NEGATIVE, "vae.disc_start"]],
)
def test_negative_values_are_refused_where_zero_is_allowed(key, model_type):
    with pytest.raises(ConfigError, match=rf"'{key}': value -1(\.0)? must be non-negative"):
        _with(key, -1, model_type)
    if key != "vae.perceptual_weight":  # 0 turns it off; > 0 needs vae.lpips_model
        section, name = key.split(".")
        assert getattr(getattr(_with(key, 0, model_type), section), name) == 0


@pytest.mark.parametrize(
    "sections, match",
    [
        ({"data": {"source": "webdataset"}}, r"'data.source': value 'webdataset' is not supp"),
        ({"train": {"device": "mps"}}, r"'train.device': value 'mps' is not supported"),
        ({"output_dir": ""}, "'output_dir': value '' must name a folder"),
        ({"optim": {"betas": [-0.1, 0.9]}}, r"'optim.betas\[0\]': value -0.1 must be in \[0, 1\)"),
        ({"optim": {"betas": [0.9, 1.5]}}, r"'optim.betas\[1\]'"),
        ({"ema": {"min_decay": -0.1, "decay": 0.5}}, r"'ema.decay': .*ema.min_decay=-0.1"),
        ({"ema": {"decay": -0.5}}, "'ema.decay'"),
    ],
)
def test_out_of_range_values_are_refused_by_key(sections, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": {"type": "lidm"}, "data": {"root": "r"}, **sections})


def test_values_at_the_edge_of_their_range_are_allowed():
    cfg = _cfg(
        data={"source": "random", "root": ""},
        optim={"betas": [0.0, 0.0]},
        ema={"decay": 0.0, "min_decay": 0.0},
        train={"device": "cuda", "mixed_precision": "bf16"},
    )
    assert cfg.optim.betas == [0.0, 0.0] and cfg.data.root == "" and cfg.ema.decay == 0.0


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("c.json", '{"model": {"type": "lidm"},}', "not valid JSON"),
        ("c.yaml", "model: [lidm\n", "not valid YAML"),
        ("c.yml", "- 1\n- 2\n", "expected a table of settings at the top level"),
        ("c.json", '["model"]', "expected a table of settings at the top level"),
        ("c.toml", "seed = 1\nseed = 2\n", "not valid TOML"),
    ],
)
def test_unreadable_files_are_config_errors_naming_the_file(tmp_path, name, text, match):
    if name.endswith((".yaml", ".yml")):
        pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path, "lidm")
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("name", ["c.TOML", "c.Json", "c.yml"])
def test_file_format_follows_the_suffix_in_any_case(tmp_path, name):
    if name.endswith(".yml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    toml = 'seed = 5\n[data]\nroot = "r"\n'
    path.write_text(toml if name.lower().endswith("toml") else '{"seed": 5, "data": {"root": "r"}}')
    assert load_config(path, "lidm").seed == 5


@pytest.mark.parametrize(
    "what, key, text",
    [
        ("a broken file", "config_file", "{not json"),
        ("a JSON list", "config_file", "[1, 2]"),
        ("a missing file", "config_file", None),
        ("a broken folder", "init_from", "{not json"),
    ],
)
def test_architecture_files_that_cannot_be_read_name_the_key(tmp_path, what, key, text):
    folder = tmp_path / "m"
    folder.mkdir()
    if text is not None:
        (folder / "config.json").write_text(text)
    value = str(folder if key == "init_from" else folder / "config.json")
    cfg = _cfg(model={"type": "lidm", key: value})
    with pytest.raises(ConfigError, match=f"config key 'model.{key}': .*config.json"):
        cfg.architecture()


@pytest.mark.parametrize(
    "item, key, value",
    [
        ("data.root=a=b", "root", "a=b"),
        ("data.root =  /x y  ", "root", "/x y"),
        ("data.split= VAL ", "split", "VAL"),
        ("data.frames = 8", "frames", 8),
    ],
)
def test_override_values(tmp_path, item, key, value):
    path = tmp_path / "c.json"
    path.write_text('{"data": {"root": "r"}}')
    assert getattr(load_config(path, "lvdm", [item]).data, key) == value


@pytest.mark.parametrize(
    "item, match",
    [("=5", "expected KEY=VALUE"), ("seed.x=1", "'seed' is not a table"), ("a", "KEY=VALUE")],
)
def test_malformed_overrides_are_refused(tmp_path, item, match):
    path = tmp_path / "c.json"
    path.write_text('{"data": {"root": "r"}, "seed": 3}')
    with pytest.raises(ConfigError, match=match):
        load_config(path, "lidm", [item])


def test_config_changes_lists_sections_only_one_side_has():
    lidm, vae = default_config("lidm").to_dict(), default_config("vae").to_dict()
    changes = config_changes(lidm, vae)
    assert "diffusion.noise_offset" in changes and "vae.kl_weight" in changes
    assert "vae" not in lidm and "diffusion" not in vae


_RUN_SETTINGS = {
    "output_dir": "elsewhere",
    "data.root": ["moved", "data"],
    "data.num_workers": 0,
    "train.max_steps": 9,
    "train.compile": True,
    "train.checkpoint_every": 3,
    "train.keep_checkpoints": 0,
    "train.log_every": 5,
    "train.progress": False,
    "train.export_at_end": False,
    "train.device": "cpu",
}
_RECIPE_SETTINGS = {
    "seed": 1,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 0,
    "train.batch_size": 2,
    "train.grad_accum": 3,
    "train.mixed_precision": "no",
    "ema.decay": 0.99,
    "data.frames": 16,
    "diffusion.noise_offset": 0.2,
    "model.config": {"sample_size": 8},
    "diffusion.scheduler": {"prediction_type": "epsilon"},
}


@pytest.mark.parametrize(
    "key, value, resumable",
    [(k, v, True) for k, v in _RUN_SETTINGS.items()]
    + [(k, v, False) for k, v in _RECIPE_SETTINGS.items()],
)
def test_only_where_and_how_long_a_run_goes_may_change_on_resume(key, value, resumable):
    """Keys that place, lengthen or log a run may differ from the checkpoint's config; the
    recipe (anything that changes the trained weights) may not."""
    before = _cfg("lvdm").to_dict()
    after = copy.deepcopy(before)
    node = after
    *parents, name = key.split(".")
    for part in parents:
        node = node[part]
    node[name] = value
    changes = config_changes(before, config_from_dict(after).to_dict())
    assert changes == [key]
    assert (key in RESUMABLE_CHANGES) is resumable
