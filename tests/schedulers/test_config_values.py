"""Config values: numeric keys refuse booleans, non-numbers and negatives (naming the key), while
every value diffusers honours loads and steps as diffusers steps it."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler as DiffusersDDPM

from echofast.errors import ConfigError
from echofast.schedulers import DDIMScheduler, DDPMScheduler

SHAPE = (3, 2, 5, 3)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "key, value",
    [
        ("num_train_timesteps", 100.0),
        ("num_train_timesteps", True),
        ("steps_offset", 1.0),
        ("steps_offset", -1),
        ("beta_start", True),
        ("beta_end", "0.02"),
        ("clip_sample_range", -1.0),
        ("clip_sample_range", "4"),
        ("clip_sample_range", False),
        ("sample_max_value", -0.5),
        ("sample_max_value", None),
        ("dynamic_thresholding_ratio", -0.1),
    ],
)
def test_numeric_keys_refuse_booleans_strings_floats_for_ints_and_negatives(cls, key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        cls(**{key: value})


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_thresholding_quantile_of_one_steps_as_diffusers(kind):
    """A ratio of 1 (the maximum of |x̂_0|) is a valid quantile; above 1 it only matters, and is
    only refused, when thresholding is on (diffusers never reads it otherwise)."""
    ours_cls, theirs_cls = (
        (DDPMScheduler, DiffusersDDPM) if kind == "ddpm" else (DDIMScheduler, DiffusersDDIM)
    )
    config = {"thresholding": True, "dynamic_thresholding_ratio": 1.0, "sample_max_value": 2.5}
    ours, theirs = ours_cls(**config), theirs_cls(**config)
    ours.set_timesteps(7)
    theirs.set_timesteps(7)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SHAPE, generator=g)
    for t in theirs.timesteps[:3]:
        m = 4 * torch.randn(SHAPE, generator=g)
        want = theirs.step(m, t, x, generator=torch.Generator().manual_seed(int(t)))
        got = ours.step(m, t, x, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            got.pred_original_sample, want.pred_original_sample, rtol=1e-6, atol=1e-6
        )
        x = want.prev_sample
    off = ours_cls(dynamic_thresholding_ratio=1.5)
    assert off.config.dynamic_thresholding_ratio == 1.5
    assert dict(off.config) == {
        k: theirs_cls(dynamic_thresholding_ratio=1.5).config[k] for k in off.config
    }
