"""feed_forward's reference against diffusers' FeedForward (GEGLU) plus the block's residual add,
its errors, and its dispatch on the CPU (the Triton kernel: tests/triton/test_feed_forward_triton.py
under the interpreter, tests/ops/test_feed_forward_cuda.py compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward as DiffusersFeedForward

import echofast.nn.spatiotemporal as st
from echofast.errors import BackendUnavailable
from echofast.ops import (
    feed_forward,
    feed_forward_reference,
    feed_forward_supported,
    registered_ops,
)

_op = registered_ops()["feed_forward"]


def diffusers_ff(dim, dim_out, seed):
    torch.manual_seed(seed)
    ff = DiffusersFeedForward(dim, dim_out, activation_fn="geglu").eval()
    for p in ff.parameters():  # randomised, not the initialisation's
        p.data.normal_(0, 0.5)
    return ff


def weights(ff):
    proj, out = ff.net[0].proj, ff.net[2]
    return proj.weight, proj.bias, out.weight, out.bias


@pytest.mark.parametrize(("dim", "dim_out", "rows"), [(40, 24, (3, 7)), (64, 64, (5,))])
@torch.no_grad()
def test_reference_is_diffusers_feed_forward_plus_the_residual(dim, dim_out, rows):
    ff = diffusers_ff(dim, dim_out, seed=dim)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*rows, dim, generator=g)
    r = torch.randn(*rows, dim_out, generator=g)
    torch.testing.assert_close(feed_forward_reference(x, *weights(ff)), ff(x), rtol=0, atol=0)
    assert _op.select(x, *weights(ff)).name == "torch"  # what feed_forward runs on the CPU
    torch.testing.assert_close(feed_forward(x, *weights(ff), residual=r), r + ff(x))
    # in place: the block's h += ff(norm(h))
    h = r.clone()
    assert feed_forward(x, *weights(ff), residual=h, out=h) is h
    torch.testing.assert_close(h, r + ff(x))


def test_our_feed_forward_module_matches_diffusers():
    ff = diffusers_ff(40, 24, seed=3)
    ours = st.FeedForward(40, 24)
    ours.load_state_dict(ff.state_dict())
    x = torch.randn(2, 9, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ff(x), rtol=1e-6, atol=1e-6)


def test_reference_keeps_autograd():
    ff = diffusers_ff(16, 8, seed=4)
    x = torch.randn(3, 16, requires_grad=True)
    feed_forward(x, *weights(ff)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 8), (31, 8), None, (4, 15), None), r"w1 \(31, 8\)"),  # an odd row count
        (((2, 8), (32, 9), None, (4, 16), None), r"x \(2, 8\)"),
        (((2, 8), (32, 8), (31,), (4, 16), None), r"b1 \(31,\)"),
        (((2, 8), (32, 8), None, (4, 16), (5,)), r"b2 \(5,\)"),
        (((2, 8), (32, 8), None, (4, 17), None), r"w2 \(4, 17\)"),
    ],
)
def test_bad_shapes_are_named(shapes, message):
    x, w1, b1, w2, b2 = (None if s is None else torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        feed_forward(x, w1, b1, w2, b2)


def test_bad_residual_out_and_approximation_are_named():
    x, w1, w2 = torch.randn(2, 3, 8), torch.randn(32, 8), torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"residual must be \(2, 3, 4\), got \(2, 4\)"):
        feed_forward(x, w1, None, w2, None, residual=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"out must be \(2, 3, 4\)"):
        feed_forward(x, w1, None, w2, None, out=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="approximate must be one of"):
        feed_forward(x, w1, None, w2, None, approximate="erf")


def test_on_cpu_is_torch_and_triton_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w1, w2 = torch.randn(2, 300), torch.randn(32, 300).half(), torch.randn(4, 16)
    assert _op.select(x, w1, None, w2, None).name == "torch"
    with pytest.raises(BackendUnavailable) as info:
        feed_forward(x, w1, None, w2, None, backend="triton")
    text = str(info.value)
    assert "not CUDA" in text and "TRITON_INTERPRET" in text
    assert "weights are torch.float16/torch.float32" in text and "C = 300" in text
    w = torch.randn(32, 8, requires_grad=True)
    reasons = _op.backends["triton"].not_supported_reasons(torch.randn(2, 8), w, None, w2, None)
    assert any("autograd" in r for r in reasons)


def test_the_models_take_the_fused_path_on_cuda_where_a_gpu_measured_it_faster():
    """bench/bench_feed_forward.py, H100 2026-11-27: 0.80x the two GEMMs' time at C = 128 (5 and
    40 windows), 2.3-3.4x slower at C = 256."""
    assert st.FUSED_FF_DEVICES == frozenset({"cuda"})
    assert st.FUSED_FF_MAX_DIM == 128


def test_the_ops_width_limit_is_the_kernels():
    import importlib

    from support.triton_interp import kernels_module

    kernel = kernels_module("feed_forward")
    assert importlib.import_module("echofast.ops.feed_forward").MAX_DIM == kernel.MAX_DIM


@torch.no_grad()
def test_a_wider_residual_returns_xs_dtype():
    """An fp32 residual with bf16 x and weights: the sum comes back in x's dtype (as the triton
    backend writes it), the fp32 residual added before the one rounding."""
    ff = diffusers_ff(16, 8, seed=5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, generator=g)
    r = torch.randn(4, 8, generator=g) * 100
    ws = [w.to(torch.bfloat16) for w in weights(ff)]
    got = feed_forward(x.to(torch.bfloat16), *ws, residual=r)
    assert got.dtype == torch.bfloat16
    want = r.double() + feed_forward(x.to(torch.bfloat16), *ws).double()
    assert ((got.double() - want).abs() / want.abs()).max() <= 2.0**-8


@torch.no_grad()
def test_tanh_approximation_reaches_the_gelu():
    """approximate="tanh": the GEGLU with F.gelu's tanh form, in fp64 as the reference."""
    g = torch.Generator().manual_seed(6)
    x, w1, b1 = torch.randn(3, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(12)
    w2, b2 = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    h = F.linear(x.double(), w1.double(), b1.double())
    gated = h[:, :6] * F.gelu(h[:, 6:], approximate="tanh")
    want = F.linear(gated, w2.double(), b2.double())
    got = feed_forward(x, w1, b1, w2, b2, approximate="tanh")
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(feed_forward(x, w1, b1, w2, b2).double(), want, atol=1e-4)


def test_a_weight_of_the_wrong_rank_is_named():
    x, w1 = torch.randn(2, 8), torch.randn(32, 8)
    with pytest.raises(ValueError, match=r"w2 \(4, 16, 1\)"):
        feed_forward(x, w1, None, torch.randn(4, 16, 1), None)


def test_out_is_left_alone_under_autograd():
    """out is written without autograd only: under autograd the result is a new tensor."""
    ff = diffusers_ff(16, 8, seed=7)
    x = torch.randn(3, 16, requires_grad=True)
    r = torch.randn(3, 8)
    out = torch.zeros(3, 8)
    got = feed_forward(x, *weights(ff), residual=r, out=out)
    assert got is not out and got.grad_fn is not None and (out == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(got, r + ff(x))


def test_feed_forward_supported_asks_the_triton_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w1, w2 = torch.randn(2, 8), torch.randn(32, 8), torch.randn(4, 16)
    assert not feed_forward_supported(x, w1, w2)  # CPU without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not feed_forward_supported(torch.randn(2, 300), torch.randn(32, 300), w2)  # C > 256
