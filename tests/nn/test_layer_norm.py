"""``echofast.nn.LayerNorm``: under autocast a reduced-precision input stays in its dtype
(normalised with the fp32 affine by :func:`echofast.ops.layer_norm`: PyTorch's mixed-dtype kernel
on CPU, the Triton kernel on CUDA) instead of autocast's fp32 round trip, with the fp32 result's
values up to the last rounding; otherwise it is ``nn.LayerNorm``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.dispatch import CountOps

from echofast.nn import LayerNorm


def _norm(dim: int) -> LayerNorm:
    ln = LayerNorm(dim)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.3)
        ln.bias.normal_(0.0, 0.3)
    return ln


ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 77, 320), (1, 5), (1280, 63)])
def test_autocast_keeps_the_input_dtype_with_fp32_values(dtype, shape):
    torch.manual_seed(0)
    ln = _norm(shape[-1])
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    with torch.autocast("cpu", dtype=dtype), CountOps() as ops:
        y = ln(x)
    assert y.dtype == dtype
    assert ops.counts["_to_copy"] == 0, ops.counts  # no cast in or out
    ref = F.layer_norm(x.float(), shape[-1:], ln.weight, ln.bias, ln.eps)
    err = (y.float() - ref).abs() / ref.abs().clamp_min(1.0)
    assert err.max() <= ULP[dtype]  # at most one rounding step from the fp32 result
    assert (y != ref.to(dtype)).float().mean() <= 0.002  # and almost always the rounded value


def test_outside_autocast_it_is_nn_layer_norm():
    torch.manual_seed(0)
    ln = _norm(48)
    plain = torch.nn.LayerNorm(48)
    plain.load_state_dict(ln.state_dict())
    x = torch.randn(6, 48)
    assert torch.equal(ln(x), plain(x))
    # autocast to another dtype than the input's: nn.LayerNorm's behaviour
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ln(x.half()), plain(x.half()))


def test_gradients_under_autocast_match_fp32():
    torch.manual_seed(0)
    ln = _norm(64)
    ref_ln = _norm(64)
    ref_ln.load_state_dict(ln.state_dict())
    x = torch.randn(32, 64)
    dy = torch.randn(32, 64)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ln(xb).float().backward(dy)
    xr = x.bfloat16().float().requires_grad_()
    ref_ln(xr).backward(dy)
    # the incoming gradient is rounded to bf16 (the output's dtype): bf16-level agreement
    for got, want in ((xb.grad, xr.grad), (ln.weight.grad, ref_ln.weight.grad)):
        assert (got.float() - want).norm() / want.norm() <= 1e-2
    assert ln.weight.grad.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_autocast_skips_the_fp32_round_trip(dtype):
    """In inference, on CUDA autocast runs nn.LayerNorm in fp32 (fp32 out, casts around it); ours
    stays in the input's dtype with no cast kernel (the Triton backend) and the fp32 values up to
    one rounding. (With autograd on the CUDA path is the reference: CUDA's torch has no
    mixed-dtype layer_norm, the Triton kernel no backward.)"""
    pytest.importorskip("triton", reason="the CUDA path is the Triton backend")
    torch.manual_seed(0)
    ln = _norm(320).cuda()
    x = (torch.randn(5, 4096, 320, device="cuda") * 3 + 1).to(dtype)
    with torch.autocast("cuda", dtype=dtype), torch.no_grad():
        assert torch.nn.LayerNorm.forward(ln, x).dtype == torch.float32
        with CountOps() as ops:
            y = ln(x)
    assert y.dtype == dtype and ops.counts["_to_copy"] == 0, ops.counts
    # the output's allocation at most (the launcher's reshapes to rows and back are views)
    assert sum(ops.without_views().values()) <= 1, ops.counts
    ref = F.layer_norm(x.float(), (320,), ln.weight, ln.bias, ln.eps)
    err = (y.float() - ref).abs() / ref.abs().clamp_min(1.0)
    assert err.max() <= ULP[dtype]


def test_counting_without_views_keeps_allocations_and_kernels():
    """The helper the CUDA test above relies on: views (no memory, no kernel) drop out, anything
    that allocates or computes stays, however often it ran."""
    x = torch.randn(4, 6)
    with CountOps() as ops:
        y = torch.empty(24).view(4, 6)
        y.transpose(0, 1).add_(x.t())
        x.clone()
    assert ops.counts["view"] == ops.counts["transpose"] == ops.counts["t"] == 1
    assert ops.without_views() == {"empty": 1, "add_": 1, "clone": 1}


def test_without_fast_backends_it_is_the_reference(monkeypatch):
    """A PyTorch whose layer_norm refuses fp32 affine with a half input on this device (and no
    Triton): the op's reference, fp32 values rounded to the input's dtype, as autocast's own path
    gives after the next Linear's cast."""
    import sys

    ops_ln = sys.modules["echofast.ops.layer_norm"]
    assert ops_ln.mixed_layer_norm_works("cpu", torch.bfloat16)
    torch.manual_seed(0)
    ln = _norm(32)
    x = torch.randn(4, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ln(x)
        monkeypatch.setattr(ops_ln, "mixed_layer_norm_works", lambda device_type, dtype: False)
        with CountOps() as ops:
            fallback = ln(x)
        autocast_path = torch.nn.LayerNorm.forward(ln, x)
    assert ops.counts["_to_copy"] >= 2  # the reference's fp32 copies
    assert fallback.dtype == torch.bfloat16
    assert torch.equal(fallback, autocast_path.to(torch.bfloat16))
    assert (fallback.float() - mixed.float()).abs().max() <= 2.0**-7 * mixed.abs().max()


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_add_forward_is_the_sum_then_the_norm_and_shifts_only_the_sum(grad):
    """``(h, norm(h))`` for h = x + residual + add (one row per group), and with ``shift`` the h
    returned is h + shift while the norm reads h: in inference and under autograd alike."""
    torch.manual_seed(1)
    ln = _norm(12)
    x, residual, shift = torch.randn(4, 3, 12), torch.randn(4, 3, 12), torch.randn(12)
    add = torch.randn(2, 12)
    h = x + residual + add.repeat_interleave(6, 0).view(4, 3, 12)
    with torch.set_grad_enabled(grad):
        got_h, got_y = ln.add_forward(x, residual.clone(), add=add, shift=shift)
    torch.testing.assert_close(got_y, torch.nn.LayerNorm.forward(ln, h))
    torch.testing.assert_close(got_h, h + shift)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_add_forward_of_mixed_dtypes_is_pytorchs_add_then_the_norm(grad):
    """Outside autocast a bf16 input with an fp32 residual is not the fused op's case: PyTorch
    adds, then nn.LayerNorm; the shift goes to the sum returned (rounded to its dtype) only."""
    torch.manual_seed(2)
    ln = _norm(16)
    x, residual, shift = torch.randn(5, 16).bfloat16(), torch.randn(5, 16), torch.randn(16)
    with torch.set_grad_enabled(grad):
        h, y = ln.add_forward(x, residual.clone(), shift=shift)
    want_h = residual + x
    assert torch.equal(y, torch.nn.LayerNorm.forward(ln, want_h))
    assert h.dtype == want_h.dtype and torch.equal(h, want_h + shift)


def _spy(monkeypatch, name):
    """Records each call of ``echofast.ops.<name>`` (as echofast.nn's norms reach it)."""
    import echofast.ops

    calls, op = [], getattr(echofast.ops, name)
    monkeypatch.setattr(echofast.ops, name, lambda *a, **k: calls.append(a[0].dtype) or op(*a, **k))
    return calls


@pytest.mark.parametrize(
    "x_dtype, autocast, taken",
    [
        (torch.bfloat16, torch.bfloat16, True),
        (torch.float16, torch.float16, True),
        (torch.float16, torch.bfloat16, False),  # autocast to another dtype than the input's
        (torch.bfloat16, None, False),  # no autocast: fp32 affine with a bf16 input
        (torch.float32, torch.bfloat16, False),
    ],
)
def test_forward_takes_the_op_only_for_an_input_in_autocasts_dtype(
    monkeypatch, x_dtype, autocast, taken
):
    """The documented dispatch, whose value differences show on CUDA only (CPU's mixed-dtype
    kernel and nn.LayerNorm agree bit for bit here)."""
    calls = _spy(monkeypatch, "layer_norm")
    ln, x = _norm(24), torch.randn(3, 24).to(x_dtype)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        ln(x)
    assert calls == ([x_dtype] if taken else [])


BF16 = torch.bfloat16


@pytest.mark.parametrize(
    "x_dtype, residual_dtype, affine_dtype, autocast, taken",
    [
        (BF16, BF16, BF16, False, True),
        (torch.float32, torch.float32, torch.float32, False, True),
        (BF16, BF16, torch.float32, False, False),  # the affine's dtype differs
        (BF16, torch.float32, torch.float32, False, False),
        (BF16, None, BF16, False, True),
        (BF16, BF16, torch.float32, True, True),  # autocast: an input in its dtype
        (BF16, torch.float32, torch.float32, True, False),  # the residual's dtype differs
    ],
)
def test_add_forward_takes_the_fused_op_only_where_dtypes_agree(
    monkeypatch, x_dtype, residual_dtype, affine_dtype, autocast, taken
):
    """x and the residual in one dtype, and either the affine in it too (no autocast) or autocast
    to it, go to the fused op; any other mix is PyTorch's add, then :meth:`forward`."""
    calls = _spy(monkeypatch, "add_layer_norm")
    ln = _norm(20).to(affine_dtype)
    x, add = torch.randn(4, 20).to(x_dtype), torch.randn(1, 20).to(x_dtype)
    residual = None if residual_dtype is None else torch.randn(4, 20).to(residual_dtype)
    want = x + add if residual is None else residual + x + add  # h is written over the residual
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        h, _ = ln.add_forward(x, residual, add=add)
    torch.testing.assert_close(h, want)
    assert calls == ([x_dtype] if taken else [])
