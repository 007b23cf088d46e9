"""Every norm layer of the three models has diffusers' kind, group count and eps: parity tests
with default eps values cannot see an eps that is read from the wrong place."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel
from support.configs import LIDM_SMALL_CONFIG, LVDM_SMALL_CONFIG, VAE_SMALL_CONFIG

from echofast.models import LIDM, LVDM, VAE

CASES = {
    "vae": (VAE, AutoencoderKL, VAE_SMALL_CONFIG),
    "lidm": (LIDM, UNet2DModel, LIDM_SMALL_CONFIG),
    "lidm_eps": (
        LIDM,
        UNet2DModel,
        {**LIDM_SMALL_CONFIG, "norm_eps": 0.05, "attn_norm_num_groups": 4},
    ),
    "lidm_scale_shift": (
        LIDM,
        UNet2DModel,
        {**LIDM_SMALL_CONFIG, "norm_eps": 1e-3, "resnet_time_scale_shift": "scale_shift"},
    ),
    "lvdm": (LVDM, UNetSpatioTemporalConditionModel, LVDM_SMALL_CONFIG),
}


def _norms(model: torch.nn.Module) -> dict[str, tuple]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            out[name] = ("group", m.num_groups, m.num_channels, m.eps, m.affine)
        elif isinstance(m, torch.nn.LayerNorm):
            out[name] = ("layer", tuple(m.normalized_shape), m.eps, m.elementwise_affine)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_norm_layers_match_diffusers(case):
    ours_cls, ref_cls, config = CASES[case]
    with torch.device("meta"):
        ours = ours_cls.from_config(config)
        ref = ref_cls(**config)
    expected = _norms(ref)
    assert expected
    assert _norms(ours) == expected
