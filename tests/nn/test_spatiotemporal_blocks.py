"""The LVDM's spatio-temporal pieces one at a time against diffusers' modules with the same random
weights (norms and mix factors included), on odd sizes: the transformer
(``TransformerSpatioTemporalModel``) and the resnet (``SpatioTemporalResBlock``) in each of
their three code paths (CPU inference on row chunks, the fused inference path that CPU takes
without chunking, autograd), and the feed-forward's choice between its one-kernel and two-GEMM
forms."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import AlphaBlender as DiffusersAlphaBlender
from diffusers.models.resnet import SpatioTemporalResBlock as DiffusersResBlock
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel as DiffusersTransformer,
)
from support.models import rel_err
from support.threads import one_torch_thread

import echofast.nn.spatiotemporal as st
from echofast import ops
from echofast.nn.embeddings import RunMemo, TimeEmbedding

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

MODES = ["chunked", "fused", "autograd"]
B, T, H, W = 2, 3, 3, 5  # odd frame count and sides


def _run(mode: str, monkeypatch, fn):
    """fn() in one of the three paths; chunks of a few rows make the chunked path loop."""
    monkeypatch.setattr(st, "CPU_CHUNK_BYTES", {"chunked": 2048, "fused": 0}.get(mode, 8 << 20))
    if mode == "autograd":
        return fn().detach()
    with torch.no_grad():
        return fn()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ctx_len", [1, 3])
def test_transformer_matches_diffusers(mode, ctx_len, monkeypatch, random_weights):
    ref = random_weights(
        DiffusersTransformer(2, 16, 32, num_layers=2, cross_attention_dim=6), seed=1
    )
    ours = st.TransformerSpatioTemporalModel(2, 16, 32, num_layers=2, cross_attention_dim=6)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(ctx_len)
    x = torch.randn(B * T, 32, H, W, generator=g)
    ctx = torch.randn(B, ctx_len, 6, generator=g)
    with torch.no_grad():  # diffusers takes the context per frame
        want = ref(x, ctx.repeat_interleave(T, 0), torch.zeros(B, T), return_dict=False)[0]
    got = _run(mode, monkeypatch, lambda: ours(x.clone(), ctx, T))
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("cin", "cout"), [(32, 32), (32, 64)], ids=["same", "shortcut"])
def test_resblock_matches_diffusers(mode, cin, cout, monkeypatch, random_weights):
    ref = random_weights(DiffusersResBlock(cin, cout, temb_channels=12, eps=1e-5), seed=cout)
    ours = st.SpatioTemporalResBlock(cin, cout, 12, 1e-5)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(cin + cout)
    x = torch.randn(B * T, cin, H, W, generator=g)
    temb = torch.randn(B, 12, generator=g)
    with torch.no_grad():  # diffusers takes the embedding per frame
        want = ref(x, temb.repeat_interleave(T, 0), torch.zeros(B, T))
    got = _run(mode, monkeypatch, lambda: ours(x.clone(), temb, T))
    assert got.shape == want.shape == (B * T, cout, H, W)
    assert rel_err(got, want) <= 1e-5


def test_transformer_width_must_be_heads_times_head_dim():
    with pytest.raises(ValueError, match=r"heads·dim_head = 48 must equal in_channels = 32"):
        st.TransformerSpatioTemporalModel(3, 16, 32, num_layers=1, cross_attention_dim=6)


def _feed_forward_calls(monkeypatch, supported: bool | None = None) -> list:
    """The one-kernel feed-forward allowed on the CPU (its reference runs there), and, unless
    ``supported`` is None, the kernel's operand check answering ``supported``; returns the list
    of ops.feed_forward's calls."""
    calls = []
    real = ops.feed_forward
    monkeypatch.setattr(st, "FUSED_FF_DEVICES", frozenset({"cpu"}))
    if supported is not None:
        monkeypatch.setattr(ops, "feed_forward_supported", lambda *a: supported)
    monkeypatch.setattr(ops, "feed_forward", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    return calls


@pytest.mark.parametrize(
    ("dim", "fused"), [(st.FUSED_FF_MAX_DIM, True), (st.FUSED_FF_MAX_DIM + 8, False)]
)
@torch.no_grad()
def test_feed_forward_takes_the_one_kernel_up_to_its_width(dim, fused, monkeypatch, random_weights):
    calls = _feed_forward_calls(monkeypatch, supported=True)
    ff = random_weights(st.FeedForward(dim, mult=1), seed=dim)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, dim, generator=g)
    h = torch.randn(5, dim, generator=g)
    want = ff.net[2](ff.net[0](x))  # the two GEMMs
    torch.testing.assert_close(ff(x), want, rtol=1e-5, atol=1e-5)
    # add_to: h already holds the output bias, the branch adds the rest in place
    acc = h + ff.out_bias
    assert ff.add_to(acc, x) is acc
    torch.testing.assert_close(acc, h + want, rtol=1e-5, atol=1e-5)
    assert len(calls) == (2 if fused else 0)


@torch.no_grad()
def test_feed_forward_keeps_the_two_gemms_where_the_kernel_refuses_the_operands(
    monkeypatch, random_weights
):
    """On a fused device, operands the kernel does not take (here: a CPU without the Triton
    interpreter) go to the two GEMMs instead of failing or taking the op's own fallback."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = _feed_forward_calls(monkeypatch)
    ff = random_weights(st.FeedForward(16, mult=1), seed=2)
    x = torch.randn(4, 16)
    ff(x)
    ff.add_to(torch.zeros(4, 16), x)
    assert calls == []


@torch.no_grad()
def test_feed_forward_adds_into_a_reduced_precision_residual_under_autocast(random_weights):
    """fp32 weights, bf16 activations (autocast): the output GEMM accumulates into h in bf16."""
    ff = random_weights(st.FeedForward(24, mult=1), seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 24, generator=g).bfloat16()
    h = torch.randn(6, 24, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ff.net[2](ff.net[0](x)) - ff.out_bias.bfloat16()
        got = ff.add_to(h.clone(), x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, h.float() + want.float()) <= 2e-2


def test_feed_forward_keeps_the_two_gemms_under_autograd(monkeypatch):
    calls = _feed_forward_calls(monkeypatch, supported=True)
    ff = st.FeedForward(16, mult=1)
    x = torch.randn(3, 16, requires_grad=True)
    ff(x).sum().backward()
    assert calls == [] and x.grad is not None


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_geglu_projects_in_one_op_in_inference_only(grad, monkeypatch, random_weights):
    """On FUSED_GEGLU_DEVICES the projection and gate are one op (geglu_linear) in inference;
    autograd keeps the Linear (the one-GEMM kernel has no backward)."""
    calls = []
    real = ops.geglu_linear
    monkeypatch.setattr(st, "FUSED_GEGLU_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(ops, "geglu_linear", lambda *a, **k: calls.append(a) or real(*a, **k))
    geglu = random_weights(st.GEGLU(12, 7), seed=4)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(4))
    with torch.set_grad_enabled(grad):
        got = geglu(x)
    a, gate = geglu.proj(x).detach().chunk(2, dim=-1)
    torch.testing.assert_close(got.detach(), a * torch.nn.functional.gelu(gate))
    assert len(calls) == (0 if grad else 1)


def test_mix_weights_of_no_or_one_blender():
    """No blenders: an empty weight table; one blender: nothing to pack, its own computation."""
    assert st.MixWeights([]).all(torch.float16).shape == (0,)
    blender = st.AlphaBlender(0.3)
    mix = st.MixWeights([blender])
    mix.pack()
    with torch.no_grad():
        assert mix.compute(torch.float32) is None
        want = 1 - torch.sigmoid(torch.tensor([0.3]))
        torch.testing.assert_close(mix.all(torch.float32), want)


def test_mix_weights_are_per_blender_under_autograd():
    blenders = [st.AlphaBlender(a) for a in (0.1, -2.0)]
    mix = st.MixWeights(blenders)
    mix.pack()
    with torch.no_grad():
        table = mix.compute(torch.bfloat16)
    assert table is not None and set(table) == set(blenders)
    for b in blenders:
        assert torch.equal(table[b], b.temporal_weight(torch.bfloat16))
    assert mix.compute(torch.bfloat16) is None  # grad mode: every blender computes its own


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 256], ids=["one_chunk", "row_chunks"])
@torch.no_grad()
def test_residual_writes_into_its_input_only_when_told(chunk_bytes, monkeypatch, random_weights):
    """CPU inference: ``x + branch(x)`` over row chunks, written into x when ``inplace`` (x is
    the caller's temporary), else into a new tensor with x left as it was."""
    monkeypatch.setattr(st, "CPU_CHUNK_BYTES", chunk_bytes)
    lin = random_weights(torch.nn.Linear(8, 8), seed=5)
    x = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(5))
    want = x + lin(x)
    kept = x.clone()
    out = st._residual(x, lin, inplace=False)
    assert torch.equal(x, kept) and out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, want)
    out = st._residual(x, lin, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@torch.no_grad()
def test_temporal_weight_is_rounded_like_diffusers(dtype):
    """``1 - a`` with a = sigmoid(mix_factor) rounded to the activations' dtype first, as
    diffusers' AlphaBlender mixes: bit for bit, over many mix factors."""
    ref = DiffusersAlphaBlender(0.5, merge_strategy="learned_with_images")
    ours = st.AlphaBlender(0.5)
    factors = torch.linspace(-6, 6, 301) + 0.0137
    x_spatial, x_temporal = torch.zeros(1, 1, 1, dtype=dtype), torch.ones(1, 1, 1, dtype=dtype)
    for f in factors.tolist():
        ref.mix_factor.fill_(f)
        ours.mix_factor.fill_(f)
        want = ref(x_spatial, x_temporal, torch.zeros(1, 1))  # 0·a + 1·(1 - a)
        assert torch.equal(ours.temporal_weight(dtype), want.reshape(1)), f


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
@torch.no_grad()
def test_blocks_leave_their_input_unchanged(kind, monkeypatch, random_weights):
    """Called on its own in CPU inference (row chunks), a transformer block returns a new
    tensor: its input (a tensor of the caller) keeps its values."""
    cls = st.SpatialTransformerBlock if kind == "spatial" else st.TemporalTransformerBlock
    block = random_weights(cls(32, 2, 16, 6), seed=6)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B * 4, T, 32, generator=g)
    ctx = torch.randn(B, 3, 6, generator=g)
    kept = x.clone()
    monkeypatch.setattr(st, "CPU_CHUNK_BYTES", 2048)
    got = block(x, ctx)
    assert torch.equal(x, kept)
    with torch.enable_grad():
        want = block(x, ctx)
    assert rel_err(got, want) <= 1e-5


@torch.no_grad()
def test_frame_embedding_memo_follows_the_frame_count(random_weights):
    """Within a sampling run the frame-position embedding is memoised: a call with another
    number of frames gets its own (the run memo's key holds T)."""
    ours = random_weights(
        st.TransformerSpatioTemporalModel(2, 16, 32, 1, cross_attention_dim=6), seed=7
    )
    memo = RunMemo()
    g = torch.Generator().manual_seed(7)
    ctx = torch.randn(1, 2, 6, generator=g)
    for t in (3, 5, 3):
        x = torch.randn(t, 32, 2, 3, generator=g)
        got = ours(x, ctx, t, TimeEmbedding(torch.zeros(1, 4), memo))
        assert rel_err(got, ours(x, ctx, t)) <= 1e-6
    assert (memo.misses, memo.hits) == (2, 1)
