"""Model parity with diffusers when GroupNorm(+SiLU) runs on the Triton backend.

The LVDM's 5D GroupNorm shapes are covered op by op in test_group_norm_triton.py (a whole LVDM
forward costs about a minute in the interpreter)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel
from support.configs import LIDM_SMALL_CONFIG, VAE_SMALL_CONFIG
from support.models import build_diffusers, rel_err
from support.triton_interp import interpreted_kernels

from echofast.models import LIDM, VAE
from echofast.ops import registered_ops, use_backend

interpreted_kernels("group_norm", "_gn_fwd_stats_kernel")

TOL = 1e-5


@pytest.fixture(autouse=True)
def triton_group_norm():
    with use_backend(group_norm="triton"):
        yield


def _pair(diffusers_cls, ours_cls, config):
    ref = build_diffusers(diffusers_cls, config)
    ours = ours_cls.from_config(config).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@torch.no_grad()
def test_vae_decode():
    ref, ours = _pair(AutoencoderKL, VAE, VAE_SMALL_CONFIG)
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert registered_ops()["group_norm"].select(z, 1).name == "triton"
    assert rel_err(ours.decode(z).sample, ref.decode(z).sample) <= TOL


@torch.no_grad()
def test_lidm():
    ref, ours = _pair(UNet2DModel, LIDM, LIDM_SMALL_CONFIG)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert rel_err(ours(x, 10).sample, ref(x, 10).sample) <= TOL
