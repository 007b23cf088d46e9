"""scheduler_config.json files: what ``save_config`` writes is what diffusers writes (every key,
``null`` ones included, and the format version), and a file that cannot be loaded raises
:class:`ConfigError` naming the file."""

from __future__ import annotations

import json

import pytest
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler as DiffusersDDPM

from echofast.errors import ConfigError
from echofast.schedulers import CONFIG_NAME, DDIMScheduler, DDPMScheduler

PAIRS = [(DDPMScheduler, DiffusersDDPM), (DDIMScheduler, DiffusersDDIM)]


@pytest.mark.parametrize("ours_cls, theirs_cls", PAIRS)
def test_saved_file_holds_every_key_diffusers_saves(ours_cls, theirs_cls, tmp_path):
    config = {"beta_schedule": "scaled_linear", "steps_offset": 1, "prediction_type": "sample"}
    ours = json.loads(ours_cls(**config).save_config(tmp_path / "ours").read_text())
    theirs_cls(**config).save_config(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / CONFIG_NAME).read_text())
    assert ours.pop("_echofast_version")
    assert ours.keys() == theirs.keys() and ours["trained_betas"] is None
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == {
        k: v for k, v in theirs.items() if not k.startswith("_")
    }
    assert (
        isinstance(ours["_diffusers_version"], str) and ours["_class_name"] == theirs_cls.__name__
    )
    nested = tmp_path / "pipeline" / "scheduler"  # folders are made, as diffusers makes them
    assert ours_cls(**config).save_pretrained(nested) == nested / CONFIG_NAME
    assert theirs_cls.from_pretrained(nested).config.prediction_type == "sample"


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_unloadable_config_files_raise_config_error_naming_the_file(cls, tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_bytes(b'{"beta_start": "\xff\xfe"}')  # not UTF-8
    with pytest.raises(ConfigError, match="not valid JSON"):
        cls.from_pretrained(tmp_path)
    path.write_text(json.dumps({"_class_name": cls.__name__, "prediction_type": "flow"}))
    with pytest.raises(ConfigError, match=f"{CONFIG_NAME}.*'prediction_type'"):
        cls.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="^scheduler config: .*'clip_sample'"):
        cls.from_config({"clip_sample": "yes"})
