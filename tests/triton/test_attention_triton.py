"""The ``triton`` attention backend, run by the Triton interpreter on CPU.

The kernel against an fp64 oracle (fp32: ≤ 1e-5 relative; fp16: ≤ 2× PyTorch's own fp16 error,
SDPA's math backend on fp16 inputs) over every supported head dim and awkward lengths (tails of
the packed and of the looped tiles), strided (fused QKV) inputs, the persistent program loop, the
backward through the reference, dispatch, and LVDM/LIDM parity with diffusers with attention forced
to this backend (with a check that Q/K/V reach the kernel as views of one QKV GEMM and that the
kernel's output reaches ``to_out`` without a copy). Shapes are small: the interpreter pays per
program and per op. (bf16 ``tl.dot`` is wrong in the interpreter: bf16 runs in the GPU tests of
``tests/ops/test_attention.py``.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel, UNetSpatioTemporalConditionModel
from support.configs import LIDM_SMALL_CONFIG
from support.models import build_diffusers, rel_err
from support.triton_interp import interpreted_kernels
from support.weights import TINY_LVDM
from torch.nn.attention import SDPBackend, sdpa_kernel

import echofast.nn.attention as attention_nn
import echofast.nn.spatiotemporal as st
from echofast.models import LIDM, LVDM
from echofast.nn import Attention
from echofast.ops import attention, attention_reference, registered_ops, use_backend

kernels = interpreted_kernels("attention", "_attn_fwd_kernel")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _oracle(q, k, v, scale=None):
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * s, dim=-1)
    return p @ v.double()


def _qkv(n, h, lq, lk, d, dtype=torch.float32, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, lq, d, generator=g) * 1.5
    k = torch.randn(n, h, lk, d, generator=g) * 1.5
    v = torch.randn(n, h, lk, dv or d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _err(out, ref):
    return (out.double() - ref).abs().max().item()


# (n, heads, L): short packed tiles (with partial last groups), one-tile and looped long tiles
LENGTHS = [
    (3, 2, 1),
    (40, 3, 4),
    (5, 3, 7),
    (9, 2, 16),
    (3, 1, 50),
    (2, 2, 63),
    (2, 1, 64),
    (1, 2, 65),
    (1, 1, 200),
]


@pytest.mark.parametrize("d", [8, 16, 32, 64])
@pytest.mark.parametrize(("n", "h", "length"), LENGTHS)
def test_fp32_matches_fp64_oracle(n, h, length, d):
    q, k, v = _qkv(n, h, length, length, d, seed=length * d)
    out = attention(q, k, v, backend="triton")
    ref = _oracle(q, k, v)
    assert out.shape == (n, h, length, d) and out.dtype == torch.float32
    assert _err(out, ref) / ref.abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("n", "h", "lq", "lk", "d", "dv"),
    [
        (5, 1, 97, 3, 32, 32),
        (1, 3, 4, 50, 64, 16),
        (2, 1, 256, 1, 16, 16),
        (1, 2, 1, 192, 8, 8),
        (2, 2, 16, 16, 16, 8),
        (1, 1, 192, 64, 16, 64),
    ],
)
def test_cross_lengths_and_value_dims(n, h, lq, lk, d, dv):
    q, k, v = _qkv(n, h, lq, lk, d, dv=dv, seed=lq + lk)
    out = attention(q, k, v, scale=0.37, backend="triton")
    ref = _oracle(q, k, v, 0.37)
    assert out.shape == (n, h, lq, dv)
    assert _err(out, ref) / ref.abs().max().item() <= 1e-5


@pytest.mark.parametrize("d", [8, 16, 32, 64])
@pytest.mark.parametrize(
    ("n", "h", "length"), [(60, 2, 4), (5, 2, 7), (2, 2, 64), (1, 1, 65), (1, 1, 200)]
)
def test_fp16_error_within_twice_pytorch(n, h, length, d):
    q, k, v = _qkv(n, h, length, length, d, dtype=torch.float16, seed=length + d)
    ref = _oracle(q, k, v)  # exact attention of the fp16-rounded inputs
    out = attention(q, k, v, backend="triton")
    with sdpa_kernel(SDPBackend.MATH):
        base = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.float16
    half_ulp = 2.0**-11 * ref.abs().max().item()  # rounding the output alone costs this much
    assert _err(out, ref) <= 2 * max(_err(base, ref), half_ulp)


def test_scores_far_below_zero_keep_the_softmax_exact():
    """Every score near -370 in log2 units (q ≈ -4, k ≈ +4, D = 16): exp2 of a raw score
    underflows fp32, so the softmax must subtract the row's running max from the first key tile
    on (the softmax is shift-invariant: the fp64 oracle is unaffected)."""
    g = torch.Generator().manual_seed(11)
    q = -4 + 0.1 * torch.randn(2, 2, 9, 16, generator=g)
    k = 4 + 0.1 * torch.randn(2, 2, 70, 16, generator=g)
    v = torch.randn(2, 2, 70, 16, generator=g)
    out = attention(q, k, v, scale=1.0, backend="triton")
    ref = _oracle(q, k, v, 1.0)
    assert torch.isfinite(out).all()
    assert _err(out, ref) / ref.abs().max().item() <= 1e-4


def test_strided_fused_qkv_views_in_token_major_out():
    b, length, heads, d = 3, 23, 4, 16
    qkv = torch.randn(b, length, 3 * heads * d, generator=torch.Generator().manual_seed(5))
    q, k, v = (t.view(b, length, heads, d).transpose(1, 2) for t in qkv.split(heads * d, -1))
    assert q.stride() == (length * 3 * heads * d, d, 3 * heads * d, 1)
    out = kernels.attention_fwd(q, k, v, 0.25)
    assert out.transpose(1, 2).is_contiguous()  # (B, L, heads·D) for the output projection
    assert _err(out, _oracle(q, k, v, 0.25)) <= 1e-5


@pytest.mark.parametrize(("b", "t", "s", "heads", "d"), [(2, 7, 5, 3, 16), (3, 64, 2, 2, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_two_batch_dims_read_frame_major_fused_qkv(b, t, s, heads, d, dtype):
    """Attention along the frames of frame-major (B, T, S, 3·heads·D) fused projections: q, k, v
    are (B, S, heads, T, D) views, (b, s) not one stride; the output is a view of a frame-major
    (B, T, S, heads, D) tensor. Same values as the 4-D call on transposed copies."""
    g = torch.Generator().manual_seed(b * t)
    qkv = torch.randn(b, t, s, 3, heads, d, generator=g).to(dtype)
    q, k, v = (qkv[:, :, :, i].permute(0, 2, 3, 1, 4) for i in range(3))
    out = attention(q, k, v, backend="triton")
    assert out.shape == (b, s, heads, t, d) and out.dtype == dtype
    assert out.permute(0, 3, 1, 2, 4).is_contiguous()  # frame-major tokens, no copy
    flat = attention(*(u.reshape(b * s, heads, t, d) for u in (q, k, v)), backend="triton")
    assert torch.equal(out.reshape(b * s, heads, t, d), flat)
    ref = _oracle(q, k, v)
    tol = 1e-5 if dtype == torch.float32 else 2.0**-10
    assert _err(out, ref) <= tol * ref.abs().max().item()
    for backend in ("sdpa", "torch"):  # they merge the batch dims
        other = attention(q, k, v, backend=backend)
        assert other.shape == out.shape and _err(other, ref) <= tol * ref.abs().max().item()


def test_non_unit_head_stride():
    """Arbitrary strides on every axis, including d (a transposed, non-contiguous tensor)."""
    base = torch.randn(2, 16, 9, 3, generator=torch.Generator().manual_seed(6))  # (n, d, l, h)
    q = base.permute(0, 3, 2, 1)  # (n=2, h=3, l=9, d=16), d stride 27
    out = attention(q, q, q, backend="triton")
    assert _err(out, _oracle(q, q, q)) <= 1e-5


@pytest.mark.parametrize(("tile", "programs"), [(16, 3), (32, 2), (64, 1), (128, 5), (32, 0)])
def test_persistent_loop_and_tile_sizes(tile, programs):
    """Few programs walking many groups; packing factors from 1 to 32 sequences per tile. A cap
    of 0 programs still launches one."""
    for length in (3, 16, 33):
        q, k, v = _qkv(5, 3, length, length, 16, seed=tile + length)
        out = kernels.attention_fwd(q, k, v, 0.25, tile=tile, max_programs=programs)
        assert _err(out, _oracle(q, k, v, 0.25)) <= 1e-5


def test_plan_packs_short_sequences_and_tiles_long_ones():
    def plan(length, nh=1000, d=16):
        q = torch.empty(nh, 1, length, d)
        return kernels.Plan(q, q, q, max_programs=64)

    p = plan(4)
    assert (p.G, p.SUB_M, p.SUB_N, p.num_groups, p.grid) == (16, 4, 4, 63, (63,))
    p = plan(64)
    assert (p.G, p.SUB_M, p.SUB_N, p.grid) == (1, 64, 64, (64,))
    p = plan(256)
    assert (p.G, p.SUB_M, p.SUB_N) == (1, 64, 64)
    p = plan(1, d=8)
    assert (p.G, p.SUB_M, p.BLOCK_D) == (64, 1, 16)
    assert plan(64, nh=10**6).grid == (64,)  # a 1-D grid, whatever N·heads


@pytest.mark.parametrize("tile", [16, 64])
@pytest.mark.parametrize(("lq", "lk"), [(64, 1), (1, 64), (16, 2), (3, 1), (200, 1), (1, 200)])
def test_plan_tiles_have_at_least_16_rows_and_keys(lq, lk, tile):
    """tl.dot needs 16 rows and 16 columns (BLOCK_M = G·SUB_M, BLOCK_N = G·SUB_N): a one-key
    or one-query sequence still gets 16-wide tiles, and a sequence's rows fit its sub-tile."""
    q, k = torch.empty(7, 1, lq, 16), torch.empty(7, 1, lk, 16)
    p = kernels.Plan(q, k, k, tile=tile)
    assert p.G * p.SUB_M >= 16 and p.G * p.SUB_N >= 16
    if p.G > 1:
        assert p.SUB_M >= lq and p.SUB_N >= lk


def test_backward_routes_through_the_reference():
    q, k, v = _qkv(2, 3, 19, 19, 16, seed=7)
    dy = torch.randn(2, 3, 19, 16, generator=torch.Generator().manual_seed(8))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, scale=0.3, backend="triton")
    grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(_oracle(*ref_leaves, 0.3), ref_leaves, dy.double())
    for g, r in zip(grads, ref_grads):
        assert _err(g, r) / r.abs().max().item() <= 1e-5
    only_v = v.clone().requires_grad_()
    (gv,) = torch.autograd.grad(attention(q, k, only_v, backend="triton"), [only_v], dy)
    assert _err(gv, torch.autograd.grad(attention_reference(q, k, only_v), [only_v], dy)[0]) < 1e-6


def test_dispatch_under_the_interpreter():
    op = registered_ops()["attention"]
    q = torch.randn(2, 2, 8, 16)
    assert op.select(q, q, q).name == "triton"
    odd = torch.randn(2, 2, 8, 12)
    assert op.select(odd, odd, odd).name == "sdpa"
    reasons = op.backends["triton"].not_supported_reasons(odd, odd, odd)
    assert reasons == [
        "head dim D = 12 unsupported (powers of two (8, 16, 32, 64) only)",
        "value head dim Dv = 12 unsupported (powers of two (8, 16, 32, 64) only)",
    ]


# ---- models with attention on the Triton backend ------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records (q, k, v, out) of every kernel launch."""
    calls = []
    launch = kernels.attention_fwd

    def spy(q, k, v, scale, **kw):
        out = launch(q, k, v, scale, **kw)
        calls.append((q, k, v, out))
        return out

    monkeypatch.setattr(kernels, "attention_fwd", spy)
    return calls


def _pair(diffusers_cls, ours_cls, config):
    ref = build_diffusers(diffusers_cls, config)
    ours = ours_cls.from_config(config).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("frame_major", [False, True], ids=["sequences", "frame_major"])
@pytest.mark.parametrize("fused", [True, False])
@torch.no_grad()
def test_lvdm_parity_and_no_copies_around_the_kernel(kernel_calls, fused, frame_major, monkeypatch):
    """``fused``: one QKV GEMM (the CUDA default, forced here on CPU); else three projections
    (the CPU default). ``frame_major``: the GPU's inference path (no CPU chunking), where the
    temporal attention runs along the frames of frame-major tokens (two batch dims). Either way
    the kernel reads the projections' outputs through strides and writes what ``to_out`` reads:
    no permute/contiguous copies."""
    devices = frozenset({"cpu", "cuda"}) if fused else frozenset()
    monkeypatch.setattr(attention_nn, "FUSED_QKV_DEVICES", devices)
    if frame_major:
        monkeypatch.setattr(st, "CPU_CHUNK_BYTES", 0)
    ref, ours = _pair(UNetSpatioTemporalConditionModel, LVDM, TINY_LVDM)
    to_out_inputs, projected = [], {}
    attns = [m for m in ours.modules() if isinstance(m, Attention) and m.is_self_attention]
    hooks = [
        m.to_out[0].register_forward_pre_hook(lambda _m, a: to_out_inputs.append(a[0]))
        for m in attns
    ]
    for m in attns:
        for name in ("to_q", "to_k", "to_v"):
            hooks.append(
                getattr(m, name).register_forward_hook(
                    lambda _m, _a, out, name=name: projected.setdefault(name, []).append(out)
                )
            )
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 8, 8, 8, generator=g)
    ehs, ids = torch.rand(1, 1, 1, generator=g), torch.zeros(1, 1)
    expected = ref(x, 500, encoder_hidden_states=ehs, added_time_ids=ids).sample
    with use_backend(attention="triton", group_norm="torch"):
        got = ours(x, 500, encoder_hidden_states=ehs, added_time_ids=ids).sample
    for h in hooks:
        h.remove()
    assert rel_err(got, expected) <= 1e-5
    # every self-attention (spatial and temporal, 2 per transformer, 7 transformers) ran the
    # kernel; cross-attention took the single-key path
    assert len(kernel_calls) == len(to_out_inputs) == 2 * 7
    lengths = sorted({q.shape[-2] for q, *_ in kernel_calls})
    assert lengths == [3, 4, 16, 64]  # frames, 2×2 (mid), 4×4 and 8×8 tokens
    assert {m.last_qkv for m in attns} == {"fused" if fused else "separate"}
    # temporal attention: (B, S, heads, T, D) views of frame-major projections on that path
    assert {q.dim() for q, *_ in kernel_calls} == ({4, 5} if frame_major else {4})
    for i, ((q, k, v, out), consumed) in enumerate(zip(kernel_calls, to_out_inputs)):
        inner = q.shape[-3] * q.shape[-1]
        row = q.stride()[-2] if q.dim() == 4 else q.stride()[1]  # one token to the next
        if fused:
            # Q, K, V: strided views into one (B, L, 3·inner) QKV GEMM output
            assert not projected
            assert row == 3 * inner and q.stride()[-1] == 1
            assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
            assert k.data_ptr() - q.data_ptr() == inner * q.element_size()
            assert v.data_ptr() - k.data_ptr() == inner * q.element_size()
        else:
            # Q, K, V: head views of the three projections' (B, L, inner) outputs
            for t, name in ((q, "to_q"), (k, "to_k"), (v, "to_v")):
                assert t.data_ptr() == projected[name][i].data_ptr()
                assert (t.stride()[-2] if t.dim() == 4 else t.stride()[1]) == inner
        # the kernel's output is what the output projection reads, no copy in between
        assert consumed.data_ptr() == out.data_ptr() and consumed.is_contiguous()


@torch.no_grad()
def test_lidm_parity_head_dim_8(kernel_calls):
    ref, ours = _pair(UNet2DModel, LIDM, LIDM_SMALL_CONFIG)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with use_backend(attention="triton", group_norm="torch"):
        got = ours(x, 10).sample
    assert rel_err(got, ref(x, 10).sample) <= 1e-5
    assert kernel_calls and {q.shape[-1] for q, *_ in kernel_calls} == {8}
