"""bias_residual reference vs an fp64 formula; errors; dispatch (the Triton kernel is tested under
the interpreter in tests/triton/test_bias_residual_triton.py)."""

from __future__ import annotations

import pytest
import torch
from support.oracles import bias_residual_oracle

from echofast.errors import BackendUnavailable
from echofast.ops import bias_residual, bias_residual_reference, registered_ops

_op = registered_ops()["bias_residual"]


def tensors(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    return (
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
        torch.randn(c, generator=g),
        torch.randn(c, generator=g),
        torch.rand(1, generator=g),
    )


@pytest.mark.parametrize("terms", ["bias+residual", "all", "weight+bias", "bias2 only"])
def test_reference_matches_fp64_and_writes_out(terms):
    y, r, b, b2, w = tensors((2, 6, 3, 5), seed=len(terms))
    kw = {
        "bias+residual": {"residual": r, "bias": b},
        "all": {"residual": r, "bias": b, "bias2": b2, "weight": w},
        "weight+bias": {"bias": b, "weight": w},
        "bias2 only": {"bias2": b2},
    }[terms]
    want = bias_residual_oracle(y, **kw)
    torch.testing.assert_close(bias_residual(y, **kw).double(), want, rtol=1e-6, atol=1e-6)
    target = y.clone()
    with torch.no_grad():
        got = bias_residual(target, **kw, out=target)
    assert got is target
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_reference_is_differentiable():
    y, r, b, b2, w = (t.double().requires_grad_() for t in tensors((2, 3, 2, 2), seed=3))
    assert torch.autograd.gradcheck(
        lambda *a: bias_residual_reference(a[0], residual=a[1], bias=a[2], bias2=a[3], weight=a[4]),
        (y, r, b, b2, w),
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"residual": torch.zeros(2, 4, 3)}, "residual must have y's shape"),
        ({"bias": torch.zeros(5)}, r"bias must be \(4,\)"),
        ({"weight": torch.zeros(2)}, "one element"),
        ({"out": torch.zeros(2, 4)}, "out must have y's shape"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bias_residual(torch.zeros(2, 4, 3, 3), **kwargs)


def test_dispatch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    y = torch.zeros(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert _op.select(y).name == "torch"
    with pytest.raises(BackendUnavailable, match="not CUDA"):
        bias_residual(y, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reasons = _op.backends["triton"].not_supported_reasons(torch.zeros(2, 4, 3, 3), residual=y)
    assert any("y is not channels-last" in r for r in reasons), reasons


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_wider_residual_returns_ys_dtype(dtype):
    """An fp32 residual with a half y (the residual of an fp32 block input under autocast): the
    result is in y's dtype, as the triton backend writes it, within one rounding of the sum (the
    biased y is rounded once before the add, as the unfused modules round it)."""
    y, r, b, b2, _ = tensors((2, 5, 3, 3), seed=7)
    y = y.to(dtype)
    want = bias_residual_oracle(y, r, b.to(dtype), b2)
    got = bias_residual(y, residual=r, bias=b, bias2=b2)
    assert got.dtype == dtype
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert ((got.double() - want).abs() / want.abs().clamp_min(1.0)).max() <= 2 * ulp


def test_one_dim_y_is_named():
    with pytest.raises(ValueError, match=r"y must be \(N, C, \*spatial\), got \(4,\)"):
        bias_residual(torch.zeros(4), bias=torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_y_with_fp32_bias_and_weight_rounds_each_step(dtype):
    """fp32 bias and weight with a half y: each op in y's dtype, as a half conv's bias add and
    the blender's multiply give it (the parameters rounded to y's dtype first)."""
    y, _, b, _, _ = tensors((2, 6, 4, 4), seed=9)
    y = y.to(dtype)
    w = torch.tensor([0.7123456])
    got = bias_residual(y, bias=b, weight=w)
    want = (y + b.to(dtype)[:, None, None]) * w.to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_a_wider_residual_and_bias2_are_summed_before_the_rounding():
    """fp32 residual and bias2 that cancel: the small remainder survives only if neither was
    rounded to y's (fp16) dtype before the sum."""
    y = torch.full((1, 2, 3, 3), 0.01, dtype=torch.float16)
    r = torch.full((1, 2, 3, 3), 1000.3)
    b2 = torch.full((2,), -1000.1)
    got = bias_residual(y, residual=r, bias2=b2)
    want = bias_residual_oracle(y, r, bias2=b2)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)


def test_out_is_left_alone_under_autograd():
    y, r, b, _, _ = tensors((2, 3, 2, 2), seed=10)
    y.requires_grad_()
    out = torch.zeros_like(r)
    got = bias_residual(y, residual=r, bias=b, out=out)
    assert got is not out and got.grad_fn is not None and (out == 0).all()
    torch.testing.assert_close(got.double(), bias_residual_oracle(y.detach(), r, b))
