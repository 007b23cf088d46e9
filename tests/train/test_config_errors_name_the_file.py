"""Every config error a user can make in a file is a ConfigError that names the file."""

from __future__ import annotations

import pytest

from echofast.errors import ConfigError
from echofast.train.config import load_config


def test_a_file_that_is_not_utf8_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b'output_dir = "caf\xe9"\n')  # Latin-1, not UTF-8 as TOML requires
    with pytest.raises(ConfigError) as err:
        load_config(path, "lidm")
    assert str(err.value).startswith(f"{path}: ")


def test_an_unknown_model_type_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"model": {"type": "gan"}, "data": {"root": "r"}}')
    with pytest.raises(ConfigError, match="'model.type': value 'gan' is not supported") as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "settings, message",
    [
        ('"optim": {"lr": -1}', "config key 'optim.lr': value -1.0 must be positive"),
        (
            '"diffusion": {"scheduler": {"thresholding": true}}',
            "config key 'diffusion.scheduler.thresholding': value True is not supported",
        ),
    ],
)
def test_a_value_out_of_range_in_a_file_names_the_file(tmp_path, settings, message):
    path = tmp_path / "c.json"
    path.write_text(f'{{"data": {{"root": "r"}}, {settings}}}')
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, "lidm")
    assert str(err.value).startswith(f"{path}: ")


def test_a_directory_given_as_the_config_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "c.toml"
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot read the config file") as err:
        load_config(path, "lidm")
    assert str(err.value).startswith(f"{path}: ")


def test_an_unknown_key_from_set_names_the_file_and_the_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"model": {"type": "lidm"}, "data": {"root": "r"}}')
    with pytest.raises(ConfigError) as err:
        load_config(path, "lidm", ["train.max_step=4", "train.max_steps=2"])
    assert str(err.value) == (
        f"{path} with --set train.max_step=4 train.max_steps=2: unknown config key(s) "
        "['train.max_step']"
    )


@pytest.mark.parametrize("name", ["lidm", "lidm.toml"])
def test_a_packaged_config_is_found_by_name_from_anywhere(tmp_path, monkeypatch, name):
    from echofast.train.config import PACKAGED_CONFIGS, read_config_file

    monkeypatch.chdir(tmp_path)
    cfg = load_config(name, "lidm")
    packaged = read_config_file(PACKAGED_CONFIGS / "lidm.toml")
    assert cfg.output_dir == packaged["output_dir"] and cfg.data.root == packaged["data"]["root"]


def test_a_file_of_that_name_wins_over_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lidm").write_text("")  # neither .toml nor .json: the file is read, and refused
    with pytest.raises(ConfigError, match=r"^lidm: unknown config format") as err:
        load_config("lidm", "lidm")
    assert "packaged" not in str(err.value)  # the file exists: its own error, nothing more


def test_a_name_that_is_neither_lists_the_packaged_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("lidn", "lidm")
    assert str(err.value) == (
        "lidn: config file does not exist (nor is it a packaged config: lidm, lvdm, reid, "
        "reid_phantom, vae)"
    )
    with pytest.raises(ConfigError, match=r"^sub/lidm: config file does not exist$"):
        load_config("sub/lidm", "lidm")


@pytest.mark.parametrize(
    "command, settings, message",
    [
        ("lidm", '"model": {"type": "lidm"}, "optim": {"lr": -1}', "'optim.lr'"),
        ("reid", '"optim": {"lr": -1}', "'optim.lr'"),
    ],
)
@pytest.mark.parametrize("user_set", [[], ["seed=3"]])
def test_no_progress_is_not_named_as_a_set_value(tmp_path, command, settings, message, user_set):
    """``--no-progress`` is the command's own option: a config error names the file and the
    user's ``--set`` values only (it said 'c.json with --set train.progress=false' to a user who
    had typed no --set)."""
    from echofast.train import main_train

    path = tmp_path / "c.json"
    path.write_text(f'{{"data": {{"root": "r"}}, {settings}}}')
    sets = [arg for value in user_set for arg in ("--set", value)]
    with pytest.raises(ConfigError, match=message) as err:
        main_train([command, "--config", str(path), *sets, "--no-progress"])
    named = f"{path} with --set {' '.join(user_set)}: " if user_set else f"{path}: "
    assert str(err.value).startswith(named)
