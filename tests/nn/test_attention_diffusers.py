"""``echofast.nn.Attention`` against diffusers' ``Attention`` with the same random weights: feature
maps and token sequences, self- and cross-attention, the single-key fast path (a one-token
context) included, with group norm, residual and output rescale."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention as DiffusersAttention

from echofast.nn import Attention

KW = dict(heads=3, dim_head=8, bias=True, norm_num_groups=4, residual_connection=True, eps=1e-4)


def _pair(cross_attention_dim: int | None, rescale: float):
    torch.manual_seed(0)
    kw = dict(KW, cross_attention_dim=cross_attention_dim, rescale_output_factor=rescale)
    ref = DiffusersAttention(12, **kw).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = Attention(12, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize(
    ("shape", "ctx_len", "path"),
    [
        ((2, 12, 5, 3), None, "general"),  # feature-map self-attention (VAE / LIDM)
        ((2, 12, 5, 3), 1, "single_key"),  # feature map, one context token
        ((2, 12, 5, 3), 2, "general"),
        ((2, 7, 12), 1, "single_key"),  # token sequences
        ((2, 7, 12), 3, "general"),
    ],
)
@torch.no_grad()
def test_matches_diffusers_attention(shape, ctx_len, path):
    ref, ours = _pair(None if ctx_len is None else 6, rescale=1.5)
    g = torch.Generator().manual_seed(len(shape) + (ctx_len or 0))
    x = torch.randn(shape, generator=g)
    ctx = None if ctx_len is None else torch.randn(2, ctx_len, 6, generator=g)
    got = ours(x, ctx)
    assert ours.last_path == path
    assert got.shape == x.shape
    torch.testing.assert_close(got, ref(x, ctx), rtol=1e-5, atol=1e-5)
