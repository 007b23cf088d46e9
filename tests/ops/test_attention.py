"""attention: every backend vs an fp64 oracle, odd shapes, strided inputs, errors."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from echofast.errors import BackendUnavailable
from echofast.ops import attention, registered_ops, use_backend

attn_module = importlib.import_module("echofast.ops.attention")  # the package exports the function

BACKENDS = ["torch", "sdpa"]


def _oracle(q, k, v, scale=None):
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * s, dim=-1)
    return p @ v.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("n", "heads", "lq", "lk", "d"),
    [
        (1, 1, 1, 1, 8),
        (3, 2, 17, 17, 16),
        (2, 4, 64, 64, 16),
        (5, 1, 97, 3, 32),
        (1, 3, 4, 50, 64),
    ],
)
def test_matches_fp64_oracle(backend, n, heads, lq, lk, d):
    g = torch.Generator().manual_seed(n * 1000 + lq)
    q, k, v = (torch.randn(n, heads, L, d, generator=g) for L in (lq, lk, lk))
    out = attention(q, k, v, backend=backend)
    ref = _oracle(q, k, v)
    assert out.shape == (n, heads, lq, d) and out.dtype == q.dtype
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_scale(backend):
    qkv = torch.randn(2, 10, 3 * 4 * 16)
    q, k, v = (t.view(2, 10, 4, 16).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    assert not q.is_contiguous()
    out = attention(q, k, v, scale=0.3, backend=backend)
    ref = _oracle(q, k, v, 0.3)
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_fp16_reference_error_bounded():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 33, 16, generator=g).half() for _ in range(3))
    out = attention(q, k, v, backend="torch")
    ref = _oracle(q, k, v)
    assert out.dtype == torch.float16
    assert (out.double() - ref).abs().max().item() <= 4 * torch.finfo(torch.float16).eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_reference_rounds_once(dtype):
    """The reference's scores, softmax and product are fp32 and the output rounded once: within
    one unit in the last place of the fp64 result, where scores in the input's dtype are off by
    hundreds of them (large scores: q and k of standard deviation 3)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = ((torch.randn(2, 3, 29, 24, generator=g) * s).to(dtype) for s in (3, 3, 1))
    out = attention(q, k, v, backend="torch")
    ref = _oracle(q, k, v)
    assert out.dtype == dtype
    assert ((out.double() - ref).abs() <= torch.finfo(dtype).eps * ref.abs() + 1e-5).all()


def test_context_forcing_reaches_models():
    q = torch.randn(1, 1, 5, 8)
    with use_backend(attention="torch"):
        a = attention(q, q, q)
    torch.testing.assert_close(a, attention(q, q, q, backend="sdpa"))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 3, 8), (2, 3, 8), (2, 3, 8)), r"must be \(N, heads, L, D\)"),
        (((1, 2, 3, 8), (1, 2, 4, 8), (1, 2, 5, 8)), "shapes disagree"),
        (((1, 2, 3, 8), (1, 2, 4, 16), (1, 2, 4, 8)), "shapes disagree"),
        (((1, 2, 2, 3, 8), (1, 2, 4, 8), (1, 2, 4, 8)), r"must be \(N, heads, L, D\)"),
        (((1, 2, 2, 3, 8), (1, 3, 2, 3, 8), (1, 3, 2, 3, 8)), "shapes disagree"),
    ],
)
def test_bad_shapes_are_named(shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v)


@pytest.mark.parametrize("backend", ["sdpa", "torch"])
def test_two_batch_dims(backend):
    """(N1, N2, heads, L, D): frame-major (B, T, S, ·) projections viewed as (B, S, heads, T, D);
    the CPU backends merge the batch dims. Same values as the 4-D call on copies."""
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 6, 5, 3, 2, 8, generator=g)  # (B, T, S, q/k/v, heads, D)
    q, k, v = (qkv[:, :, :, i].permute(0, 2, 3, 1, 4) for i in range(3))
    out = attention(q, k, v, backend=backend)
    assert out.shape == (2, 5, 2, 6, 8)
    flat = attention(*(t.reshape(10, 2, 6, 8) for t in (q, k, v)), backend=backend)
    torch.testing.assert_close(out.reshape(10, 2, 6, 8), flat)
    assert (out.double() - _oracle(q, k, v)).abs().max() <= 1e-5


# ---- backend reasons (triton and xformers cannot run in this CPU process) ----------------------


def _op():
    return registered_ops()["attention"]


def test_triton_reasons_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(2, 2, 8, 16)
    reasons = _op().backends["triton"].not_supported_reasons(q, q, q)
    assert any("not CUDA" in r and "TRITON_INTERPRET" in r for r in reasons)
    assert _op().select(q, q, q).name == "sdpa"  # automatic choice falls back quietly
    with pytest.raises(BackendUnavailable, match="not CUDA"):
        attention(q, q, q, backend="triton")


@pytest.mark.parametrize("d", [4, 12, 24, 128])
def test_triton_names_unsupported_head_dims(monkeypatch, d):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 5, d)
    reasons = _op().backends["triton"].not_supported_reasons(q, q, q)
    assert any(f"head dim D = {d} unsupported" in r for r in reasons)
    q16 = torch.randn(1, 2, 5, 16)
    reasons = _op().backends["triton"].not_supported_reasons(q16, q16, q)
    assert any(f"value head dim Dv = {d} unsupported" in r for r in reasons)
    assert not any("head dim D =" in r for r in reasons)


def test_triton_names_dtype_and_length(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 1100, 16, dtype=torch.float64)
    reasons = _op().backends["triton"].not_supported_reasons(q, q, q)
    assert any("dtype torch.float64 unsupported" in r for r in reasons)
    assert any("sequence length 1100 > 1024" in r for r in reasons)


def test_xformers_reports_why_it_cannot_run():
    q = torch.randn(1, 2, 5, 16)
    reasons = _op().backends["xformers"].not_supported_reasons(q, q, q)
    assert any("xformers needs CUDA" in r for r in reasons)
    if importlib.util.find_spec("xformers") is None:
        assert reasons[0] == "xformers is not installed"
    with pytest.raises(BackendUnavailable) as err:
        attention(q, q, q, backend="xformers")
    assert "xformers needs CUDA" in str(err.value) and "backend= argument" in str(err.value)


def test_xformers_call_uses_token_major_views(monkeypatch):
    """The xformers adapter hands (N, L, heads, D) views to memory_efficient_attention and returns
    its output as an (N, heads, L, D) view (checked with a stand-in module on CPU)."""
    seen = {}

    def memory_efficient_attention(q, k, v, scale):
        seen.update(q=q, k=k, v=v, scale=scale)
        out = _oracle(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
        return out.float().transpose(1, 2).contiguous()

    fake_ops = types.ModuleType("xformers.ops")
    fake_ops.memory_efficient_attention = memory_efficient_attention
    fake = types.ModuleType("xformers")
    fake.ops = fake_ops
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake_ops)
    qkv = torch.randn(2, 9, 3 * 2 * 16)
    q, k, v = (t.view(2, 9, 2, 16).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = attn_module._attention_xformers(q, k, v)
    assert seen["q"].shape == (2, 9, 2, 16) and seen["q"].data_ptr() == qkv.data_ptr()
    assert seen["scale"] == pytest.approx(0.25)
    assert out.shape == (2, 2, 9, 16) and out.transpose(1, 2).is_contiguous()
    assert (out.double() - _oracle(q, k, v)).abs().max().item() <= 1e-5


def test_every_backend_is_registered_in_order():
    assert list(_op().backends) == ["triton", "xformers", "sdpa", "torch"]
    assert _op().reference.name == "torch"


def test_sdpa_output_is_token_major_for_projection_views():
    """What the LVDM relies on: (B, L, heads·D) views in, the output viewed back for free."""
    qkv = torch.randn(3, 11, 3 * 4 * 8)
    q, k, v = (t.view(3, 11, 4, 8).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = attention(q, k, v, backend="sdpa")
    assert out.transpose(1, 2).is_contiguous()


# ---- GPU: the compiled Triton kernel (skipped without CUDA) ------------------------------------


def cuda(test):
    """A GPU test: marked ``gpu`` (the GPU session runs those) and skipped without CUDA/triton."""
    needs = pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="needs CUDA and triton",
    )
    return pytest.mark.gpu(needs(test))


def _sdpa_error(q, k, v, ref):
    """PyTorch's own error at q's precision: SDPA (default backend choice) vs the fp64 oracle."""
    return (F.scaled_dot_product_attention(q, k, v).double() - ref).abs().max().item()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [8, 16, 32, 64])
@pytest.mark.parametrize(("nh", "length"), [(3000, 4), (500, 16), (300, 64), (37, 65), (20, 256)])
def test_gpu_triton_matches_oracle(dtype, d, nh, length):
    g = torch.Generator(device="cuda").manual_seed(nh + d)
    q, k, v = (
        torch.randn(nh, 1, length, d, device="cuda", generator=g).to(dtype) for _ in range(3)
    )
    out = attention(q, k, v, backend="triton")
    ref = _oracle(q, k, v)
    if dtype == torch.float32:
        assert (out.double() - ref).abs().max().item() / ref.abs().max().item() <= 1e-5
    else:
        half_ulp = 0.5 * torch.finfo(dtype).eps * ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 2 * max(_sdpa_error(q, k, v, ref), half_ulp)


@cuda
def test_gpu_many_sequences_and_strided_layout():
    """The LVDM's temporal shape at batch 8 × 5 windows: 256·40 positions × 8 heads = 81,920
    sequences of 64 frames, plus 40,960 more: a 1-D persistent grid, any N·heads. Q/K/V are views
    of one fused QKV output; checked on a sample of sequences against the oracle."""
    b, length, heads, d = 256 * 40 + 5120, 64, 8, 16
    qkv = torch.randn(b, length, 3 * heads * d, device="cuda", dtype=torch.float16)
    q, k, v = (t.view(b, length, heads, d).transpose(1, 2) for t in qkv.split(heads * d, -1))
    assert b * heads > 100_000
    out = attention(q, k, v, backend="triton")
    assert out.transpose(1, 2).is_contiguous()
    idx = torch.randint(0, b, (64,), device="cuda")
    ref = _oracle(q[idx], k[idx], v[idx])
    half_ulp = 0.5 * torch.finfo(torch.float16).eps * ref.abs().max().item()
    err = (out[idx].double() - ref).abs().max().item()
    assert err <= 2 * max(_sdpa_error(q[idx], k[idx], v[idx], ref), half_ulp)


@cuda
def test_gpu_frame_major_temporal_attention():
    """The LVDM's temporal attention at batch 1 × 5 windows on its GPU path: frame-major
    (B, T, S, 3·heads·D) fused QKV viewed as (B, S, heads, T, D) (two batch dims, read in
    place); the output is frame-major tokens. Against the oracle on a sample of positions."""
    b, t, s, heads, d = 5, 64, 256, 8, 16
    qkv = torch.randn(b, t, s, 3, heads, d, device="cuda", dtype=torch.float16)
    q, k, v = (qkv[:, :, :, i].permute(0, 2, 3, 1, 4) for i in range(3))
    out = attention(q, k, v, backend="triton")
    assert out.permute(0, 3, 1, 2, 4).is_contiguous()
    idx = torch.randint(0, s, (32,), device="cuda")
    sub = [x[:, idx] for x in (q, k, v)]
    ref = _oracle(*sub)
    half_ulp = 0.5 * torch.finfo(torch.float16).eps * ref.abs().max().item()
    err = (out[:, idx].double() - ref).abs().max().item()
    assert err <= 2 * max(_sdpa_error(*(x.flatten(0, 1) for x in sub), ref.flatten(0, 1)), half_ulp)


@cuda
def test_gpu_backward_through_reference():
    q, k, v = (torch.randn(4, 2, 33, 16, device="cuda", requires_grad=True) for _ in range(3))
    dy = torch.randn(4, 2, 33, 16, device="cuda")
    got = torch.autograd.grad(attention(q, k, v, backend="triton"), (q, k, v), dy)
    want = torch.autograd.grad(attention(q, k, v, backend="torch"), (q, k, v), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- argument edges, fp64, scale, two batch dims with a scale ----------------------------------


def test_mixed_dtypes_are_named():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="dtypes differ: q torch.float32, k torch.float64"):
        attention(q, q.double(), q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_scale_averages_the_values(backend):
    """scale = 0 is a scale, not "the default": every query weighs the keys equally."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, L, 8, generator=g) for L in (5, 7, 7))
    out = attention(q, k, v, scale=0.0, backend=backend)
    torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand_as(out))


def test_reference_keeps_fp64():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g, dtype=torch.float64) * 4 for _ in range(3))
    out = attention(q, k, v, backend="torch")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _oracle(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_batch_dims_with_a_scale(backend):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 2, 6, 8, generator=g) for _ in range(3))
    out = attention(q, k, v, scale=0.7, backend=backend)
    assert (out.double() - _oracle(q, k, v, 0.7)).abs().max() <= 1e-5


def test_triton_function_backward_is_the_references(monkeypatch):
    """The Triton backend's autograd Function on CPU, its kernel replaced by PyTorch's SDPA: the
    forward gets the resolved scale, the backward gives SDPA's gradients for the inputs that
    need them (and None for the others)."""
    scales = []

    def attention_fwd(q, k, v, scale):
        scales.append(scale)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    fake = types.ModuleType("echofast.kernels.attention")
    fake.attention_fwd = attention_fwd
    monkeypatch.setitem(sys.modules, "echofast.kernels.attention", fake)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, L, 8, generator=g, dtype=torch.float64) for L in (5, 6, 6))
    dy = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    for scale in (None, 0.3):
        leaves = [q.clone().requires_grad_(), k.clone(), v.clone().requires_grad_()]
        out = attn_module._attention_triton(*leaves, scale=scale)
        out.backward(dy)
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        want = F.scaled_dot_product_attention(*ref, scale=scale)
        want.backward(dy)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(leaves[0].grad, ref[0].grad)
        torch.testing.assert_close(leaves[2].grad, ref[2].grad)
        assert leaves[1].grad is None
    assert scales == [pytest.approx(1 / math.sqrt(8)), 0.3]  # the kernel gets a number
