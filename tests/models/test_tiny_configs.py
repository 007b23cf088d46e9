"""The tiny configs (``echofast.models.tiny``) are what their docstring says, and diffusers builds
each into the same state-dict layout as echofast."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel

from echofast.models import LIDM, LVDM, VAE
from echofast.models.tiny import TINY_CONFIGS, TINY_LIDM, TINY_LVDM, TINY_VAE


@pytest.mark.parametrize(
    ("name", "ours", "theirs"),
    [
        ("vae", VAE, AutoencoderKL),
        ("lidm", LIDM, UNet2DModel),
        ("lvdm", LVDM, UNetSpatioTemporalConditionModel),
    ],
)
def test_diffusers_builds_the_same_layout(name, ours, theirs):
    cfg = TINY_CONFIGS[name]
    mine = {k: tuple(v.shape) for k, v in ours.from_config(cfg).state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in theirs(**cfg).state_dict().items()}
    assert mine == ref


def test_documented_shapes():
    """12×12 frames ↔ 4×6×6 latents; LIDM latents 6×6 (padded to 8 by the samplers); LVDM
    windows of 8 frames of noisy + conditioning latents, head dim 16, the EF as one token."""
    torch.manual_seed(0)
    vae = VAE.from_config(TINY_VAE).eval()
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, 12, 12) * 2 - 1).latent_dist.mean
        assert z.shape == (1, 4, 6, 6)
        assert vae.decode(z).sample.shape == (1, 3, 12, 12)
    assert TINY_LIDM["sample_size"] == 6
    assert TINY_LIDM["in_channels"] == TINY_LIDM["out_channels"] == TINY_VAE["latent_channels"]
    assert TINY_LVDM["num_frames"] == 8 and TINY_LVDM["sample_size"] == 6
    assert TINY_LVDM["in_channels"] == 2 * TINY_LVDM["out_channels"] == 8
    heads = TINY_LVDM["num_attention_heads"]
    assert [c // h for c, h in zip(TINY_LVDM["block_out_channels"], heads)] == [16] * len(heads)
    assert TINY_LVDM["cross_attention_dim"] == 1
