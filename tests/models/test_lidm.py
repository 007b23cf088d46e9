"""LIDM parity with diffusers' UNet2DModel, both directions, plus the full config."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from support.configs import LIDM_FULL_CONFIG, LIDM_SMALL_CONFIG
from support.models import build_diffusers, rel_err, save_diffusers

from echofast.models import LIDM

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lidm")
    ref = save_diffusers(UNet2DModel, LIDM_SMALL_CONFIG, folder)
    return ref, LIDM.from_pretrained(folder)


@pytest.mark.parametrize(
    "timestep", [0, 945, 15.7, torch.tensor(15), torch.tensor([3]), torch.tensor([3, 999, 500])]
)
@pytest.mark.parametrize("size", [16, 8])
def test_forward_matches_diffusers(pair, timestep, size):
    ref, ours = pair
    x = torch.randn(3, 4, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        a = ref(x, timestep).sample
        b = ours(x, timestep).sample
    assert b.shape == a.shape == x.shape
    assert rel_err(b, a) <= TOL


def test_default_layout_is_channels_last_and_nchw_matches_too(pair):
    ref, ours = pair
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(x, 99).sample
        fast = ours(x, 99).sample
        ours.use_channels_last(False)
        try:
            nchw = ours(x, 99).sample
        finally:
            ours.use_channels_last(True)
    assert fast.is_contiguous() and rel_err(fast, expected) <= TOL
    assert rel_err(nchw, expected) <= TOL


def test_return_dict_false(pair):
    _, ours = pair
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        out = ours(x, 10, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == x.shape


@pytest.mark.parametrize(
    "variant",
    [
        {"downsample_type": "conv", "upsample_type": "conv"},
        {"resnet_time_scale_shift": "scale_shift", "attention_head_dim": None},
        {
            "mid_block_type": None,
            "freq_shift": 1,
            "flip_sin_to_cos": False,
            "center_input_sample": True,
        },
        {"attn_norm_num_groups": 4, "time_embedding_dim": 48, "mid_block_scale_factor": 1.4142},
    ],
)
def test_config_variants(variant, tmp_path):
    ref = save_diffusers(UNet2DModel, {**LIDM_SMALL_CONFIG, **variant}, tmp_path)
    ours = LIDM.from_pretrained(tmp_path)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(ours(x, 321).sample, ref(x, 321).sample) <= TOL


def test_save_pretrained_loads_in_diffusers(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    back = UNet2DModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert rel_err(back(x, 77).sample, ours(x, 77).sample) <= TOL


def test_full_config_parameter_count_and_parity():
    ref = build_diffusers(UNet2DModel, LIDM_FULL_CONFIG)
    ours = LIDM.from_config(LIDM_FULL_CONFIG)
    assert ours.num_parameters() == 73_548_804
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(ours(x, 945).sample, ref(x, 945).sample) <= TOL
