"""Inputs the models cannot take are ValueErrors naming the input, the layout wanted and what
was given (before, the VAE passed them to its convolutions, whose errors name neither; an empty
batch reached a GroupNorm launcher; a missing added_time_ids was an AttributeError)."""

from __future__ import annotations

import pytest
import torch

from echofast.models import LIDM, LVDM, VAE
from echofast.models.tiny import TINY_CONFIGS


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {k: cls.from_config(TINY_CONFIGS[k]).eval() for k, cls in
            (("vae", VAE), ("lidm", LIDM), ("lvdm", LVDM))}  # fmt: skip


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(3, 24, 24), r"x must be \(N, 3, H, W\), got \(3, 24, 24\)"),
        (torch.randn(2, 3, 24, 24, 1), r"x must be \(N, 3, H, W\), got \(2, 3, 24, 24, 1\)"),
        (torch.randn(2, 1, 24, 24), r"x must be \(N, 3, H, W\), got \(2, 1, 24, 24\)"),
        (torch.zeros(0, 3, 24, 24), r"x holds no sample: a batch of 0, shape \(0, 3, 24, 24\)"),
        (torch.zeros(1, 3, 24, 24, dtype=torch.uint8), "x must be a floating-point tensor, got "),
        ([[0.0]], r"x must be a tensor \(N, 3, H, W\), got list"),
    ],
)
def test_vae_encode(models, x, message):
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        models["vae"].encode(x)


def test_vae_decode(models):
    c = TINY_CONFIGS["vae"]["latent_channels"]
    with torch.no_grad(), pytest.raises(ValueError, match=rf"z must be \(N, {c}, h, w\), got"):
        models["vae"].decode(torch.randn(1, c + 1, 6, 6))
    with torch.no_grad(), pytest.raises(ValueError, match="z holds no sample"):
        models["vae"].decode(torch.randn(0, c, 6, 6))


def test_lidm_empty_batch(models):
    c = TINY_CONFIGS["lidm"]["in_channels"]
    with torch.no_grad(), pytest.raises(ValueError, match="sample holds no sample: a batch of 0"):
        models["lidm"](torch.zeros(0, c, 8, 8), 10)


def test_lvdm_inputs(models):
    lvdm, cfg = models["lvdm"], TINY_CONFIGS["lvdm"]
    x = torch.randn(1, 4, cfg["in_channels"], 8, 8)
    ehs, ids = torch.rand(1, 1, 1), torch.zeros(1, 1)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"added_time_ids must be a \(B, n\) tensor, got"):
            lvdm(x, 10, encoder_hidden_states=ehs, added_time_ids=None)
        with pytest.raises(ValueError, match="sample holds no sample"):
            lvdm(x[:0], 10, encoder_hidden_states=ehs[:0], added_time_ids=ids[:0])
        with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(B, L, D\)"):
            lvdm(x, 10, encoder_hidden_states=ehs[0], added_time_ids=ids)
        lvdm(x, 10, encoder_hidden_states=ehs, added_time_ids=ids)  # the same inputs, well formed
