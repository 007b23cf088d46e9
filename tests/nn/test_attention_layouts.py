"""``echofast.nn.Attention``'s layouts and projections: channels-last feature maps enter the
projections as a free view and leave in their layout, NCHW ones stay NCHW; self-attention's
fused QKV (on ``FUSED_QKV_DEVICES``) is a view of the live weights, for self-attention in
inference only, and gives the values of the three projections; cross-attention to a context of
another width against diffusers' ``Attention``."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention as DiffusersAttention

import echofast.nn.attention as attention_nn
from echofast.nn import Attention


def test_channels_last_maps_are_tokens_without_a_copy():
    x = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    tok = attention_nn._tokens(x)
    assert tok.shape == (2, 15, 6) and tok.data_ptr() == x.data_ptr()
    assert torch.equal(tok, x.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@torch.no_grad()
def test_feature_map_attention_keeps_the_inputs_layout(layout, random_weights):
    attn = random_weights(Attention(8, heads=2, dim_head=4, norm_num_groups=2, bias=True), seed=1)
    x = torch.randn(2, 8, 3, 5).contiguous(memory_format=layout)
    out = attn(x)
    assert out.is_contiguous(memory_format=layout)
    ref = attn(x.contiguous()).contiguous()
    torch.testing.assert_close(out.contiguous(), ref)


@pytest.fixture
def fuse_on_cpu(monkeypatch):
    monkeypatch.setattr(attention_nn, "FUSED_QKV_DEVICES", frozenset({"cpu"}))


@torch.no_grad()
def test_fused_qkv_gives_the_three_projections_values(fuse_on_cpu, random_weights):
    attn = random_weights(Attention(12, heads=3, dim_head=4, bias=True), seed=2)
    x = torch.randn(2, 7, 12)
    fused = attn(x)
    assert attn.last_qkv == "fused"
    w, b = attn.fused_qkv()
    assert w.data_ptr() == attn.to_q.weight.data_ptr() and b.data_ptr() == attn.to_q.bias.data_ptr()
    separate = random_weights(Attention(12, heads=3, dim_head=4, bias=True), seed=2)
    for lin in (separate.to_q, separate.to_k, separate.to_v):
        lin.weight.data, lin.bias.data = lin.weight.data.clone(), lin.bias.data.clone()
    assert separate.fused_qkv() is None  # not packed: the three projections
    torch.testing.assert_close(separate(x), fused, rtol=1e-5, atol=1e-6)
    assert separate.last_qkv == "separate"


def test_fused_qkv_is_for_self_attention_in_inference(fuse_on_cpu, random_weights):
    self_attn = random_weights(Attention(12, heads=3, dim_head=4), seed=3)
    cross = random_weights(Attention(12, heads=3, dim_head=4, cross_attention_dim=12), seed=3)
    x = torch.randn(1, 5, 12)
    with torch.no_grad():
        assert self_attn.fused_qkv() is not None and cross.fused_qkv() is None
        cross(x, torch.randn(1, 4, 12))
        assert cross.last_qkv == "separate"
        self_attn(x, x)  # an explicit context: projected from it, separately
        assert self_attn.last_qkv == "separate"
    assert self_attn.fused_qkv() is None  # autograd: the three projections
    self_attn(x).sum().backward()
    assert self_attn.last_qkv == "separate" and self_attn.to_k.weight.grad is not None


@pytest.mark.parametrize("ctx_len", [1, 4])
@torch.no_grad()
def test_cross_attention_to_a_wider_context_matches_diffusers(ctx_len, random_weights):
    kw = dict(heads=2, dim_head=5, cross_attention_dim=9, bias=True)
    ref = random_weights(DiffusersAttention(6, **kw), seed=4)
    ours = Attention(6, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(ctx_len)
    x, ctx = torch.randn(3, 7, 6, generator=g), torch.randn(3, ctx_len, 9, generator=g)
    torch.testing.assert_close(ours(x, ctx), ref(x, ctx), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_qkv_stays_packed_after_loading_and_conversions(fuse_on_cpu, random_weights):
    """Loading by assignment and dtype conversions give parameters their own storage; the
    module repacks them, so the fused QKV still applies and follows the new values."""
    attn = Attention(12, heads=3, dim_head=4, bias=True).eval()
    source = random_weights(Attention(12, heads=3, dim_head=4, bias=True), seed=5)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    attn.load_state_dict(state, assign=True)
    w, b = attn.fused_qkv()
    assert torch.equal(w, torch.cat([state[f"to_{n}.weight"] for n in "qkv"]))
    attn.double()
    w, b = attn.fused_qkv()
    assert w.dtype == torch.float64 and w.data_ptr() == attn.to_q.weight.data_ptr()
