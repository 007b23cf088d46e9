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


def test_a_directory_given_as_the_config_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "c.toml"
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot read the config file") as err:
        load_config(path, "lidm")
    assert str(err.value).startswith(f"{path}: ")
