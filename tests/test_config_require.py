"""echofast.config: ``Config`` reads keys as attributes like diffusers' ``FrozenDict`` (a
missing one is an AttributeError, so ``getattr``/``hasattr`` work); ``require`` names what it
refuses."""

from __future__ import annotations

import traceback

import pytest
from diffusers.configuration_utils import FrozenDict

from echofast.config import Config, require
from echofast.errors import ConfigError


def test_config_attributes_behave_like_a_diffusers_frozen_dict():
    data = {"scaling_factor": 0.18215, "in_channels": 4}
    ours, theirs = Config(data), FrozenDict(data)
    assert ours.scaling_factor == theirs.scaling_factor and ours["in_channels"] == 4
    for cfg in (ours, theirs):
        assert getattr(cfg, "missing", "default") == "default" and not hasattr(cfg, "missing")
        with pytest.raises(AttributeError, match="missing") as info:
            _ = cfg.missing
        assert "KeyError" not in "".join(traceback.format_exception(info.value))


def test_require_accepts_allowed_values_from_any_iterable():
    require("act_fn", "silu", ["silu", "gelu"])
    require("clip_sample", False, (x for x in (True, False)))


def test_require_names_key_value_and_every_supported_value():
    with pytest.raises(ConfigError) as info:
        require("prediction_type", "x0", (p for p in ("epsilon", "v_prediction", "sample")))
    assert str(info.value) == (
        "config key 'prediction_type': value 'x0' is not supported "
        "(supported: ['epsilon', 'v_prediction', 'sample'])"
    )
    assert isinstance(info.value, ValueError)
