"""``Attention.along_frames``: temporal self-attention of frame-major (B, T, S, C) tokens, the
values of the module's forward on the (B·S, T, C) sequences (transposed copies)."""

from __future__ import annotations

import pytest
import torch

import echofast.nn.attention as attention_nn
from echofast.nn import Attention


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused_qkv"])
@torch.no_grad()
def test_along_frames_is_forward_on_sequences(fused, monkeypatch):
    devices = frozenset({"cpu"}) if fused else frozenset()
    monkeypatch.setattr(attention_nn, "FUSED_QKV_DEVICES", devices)
    torch.manual_seed(0)
    attn = Attention(24, heads=3, dim_head=8).eval()
    for p in attn.parameters():
        p.normal_(0, 0.3)
    b, t, s = 2, 7, 5
    x = torch.randn(b, t, s, 24)
    got = attn.along_frames(x)
    assert attn.last_qkv == ("fused" if fused else "separate")
    seqs = x.transpose(1, 2).reshape(b * s, t, 24)
    want = attn(seqs).view(b, s, t, 24).transpose(1, 2)
    assert got.shape == (b, t, s, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_along_frames_is_for_plain_self_attention():
    attn = Attention(32, heads=2, dim_head=16, norm_num_groups=8)
    with pytest.raises(ValueError, match="plain self-attention"):
        attn.along_frames(torch.randn(1, 2, 3, 32))


@pytest.mark.parametrize(
    "kw", [dict(residual_connection=True), dict(rescale_output_factor=2.0)], ids=str
)
def test_along_frames_refuses_a_residual_or_a_rescale(kw):
    attn = Attention(32, heads=2, dim_head=16, **kw)
    with pytest.raises(ValueError, match="plain self-attention"):
        attn.along_frames(torch.randn(1, 2, 3, 32))
