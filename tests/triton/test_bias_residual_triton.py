"""The ``triton`` bias_residual backend under the Triton interpreter: fp32 vs an fp64 formula,
half precision within one rounding, in place into y or the residual, channels-last 4D and 5D
views (a transposed (B, C, T, H, W) view of frame-batched activations), odd channel counts."""

from __future__ import annotations

import pytest
import torch
from support.buffers import unchanged_outside
from support.oracles import bias_residual_oracle
from support.triton_interp import interpreted_kernels

from echofast.ops import bias_residual, registered_ops

kernels = interpreted_kernels("bias_residual", "_bias_residual_kernel")
_op = registered_ops()["bias_residual"]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def channels_last(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


@pytest.mark.parametrize("shape", [(3, 37, 4, 5), (2, 64, 3, 2, 5), (1, 1, 2, 2)], ids=str)
def test_fp32_all_terms_in_place(shape):
    y, r = channels_last(shape, 1), channels_last(shape, 2)
    c = shape[1]
    b, b2, w = torch.randn(c), torch.randn(c), torch.rand(1)
    want = bias_residual_oracle(y, r, b, b2, w)
    storage = y.data_ptr()
    with torch.no_grad():
        out = bias_residual(y, residual=r, bias=b, bias2=b2, weight=w, backend="triton")
    assert out.data_ptr() == storage
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


def test_into_the_residual_of_a_transposed_video_view():
    """s5 += w·(g + b) with s5 the (B, C, T, H, W) view of channels-last (B·T, C, H, W) frames."""
    s = channels_last((2 * 3, 8, 4, 4), 3)
    s5 = s.view(2, 3, 8, 4, 4).transpose(1, 2)
    g = channels_last((2, 8, 3, 4, 4), 4)
    b, w = torch.randn(8), torch.rand(1)
    want = bias_residual_oracle(g, s5, b, weight=w)
    with torch.no_grad():
        bias_residual(g, residual=s5, bias=b, weight=w, out=s5, backend="triton")
    torch.testing.assert_close(s5.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_one_rounding(dtype):
    y, r = channels_last((2, 40, 3, 3), 5, dtype), channels_last((2, 40, 3, 3), 6, dtype)
    b = torch.randn(40)
    want = bias_residual_oracle(y, r, b)
    with torch.no_grad():
        out = bias_residual(y, residual=r, bias=b, backend="triton")
    assert out.dtype == dtype
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert ((out.double() - want).abs() / want.abs().clamp_min(1.0)).max() <= ulp


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_wider_residual_agrees_with_the_reference(dtype):
    """An fp32 residual with a half y: both backends return y's dtype, within an ulp of the
    fp64 sum (relative to the larger of the sum and the biased y, <= 8 here)."""
    y = channels_last((2, 24, 3, 3), 8, dtype)
    r = channels_last((2, 24, 3, 3), 9) * 100
    b = torch.randn(24)
    want = bias_residual_oracle(y, r, b)
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    for backend in ("torch", "triton"):
        with torch.no_grad():
            out = bias_residual(y.clone(), residual=r, bias=b, backend=backend)
        assert out.dtype == dtype, backend
        assert ((out.double() - want).abs() / want.abs().clamp_min(8.0)).max() <= ulp, backend


def test_rows_of_three_strides_and_nothing_written_outside_out():
    """The launcher on (R, C) rows: y, the residual and out are column slices of wider buffers
    (three row strides); out's buffer keeps its values outside out's rows and columns (R = 5:
    the last program's rows past R are masked)."""
    g = torch.Generator().manual_seed(10)
    y = torch.randn(5, 30, generator=g)[:, 1:25]
    r = torch.randn(5, 37, generator=g)[:, 9:33]
    buf = torch.randn(6, 27, generator=g)
    out = buf[:5, 2:26]
    b, b2, w = torch.randn(24, generator=g), torch.randn(24, generator=g), torch.rand(1)
    want = bias_residual_oracle(y, r, b, b2, w)
    before = buf.clone()
    kernels.bias_residual_fwd(y, out, residual=r, bias=b, bias2=b2, weight=w)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    assert unchanged_outside(buf, before, slice(None, 5), slice(2, 26))


def test_rows_view_only_of_channels_last_tensors():
    """(positions, C) rows as a view of channels-last memory; None for channels-first and 1-D."""
    t = torch.randn(2, 4, 3, 5)
    assert kernels.rows_view(t) is None
    assert kernels.rows_view(torch.randn(5)) is None
    cl = t.contiguous(memory_format=torch.channels_last)
    rows = kernels.rows_view(cl)
    assert rows.data_ptr() == cl.data_ptr()
    assert torch.equal(rows, t.movedim(1, -1).reshape(-1, 4))


def test_gpu_tiles():
    """Compiled tiles: BLOCK_C divides C where a power of two >= 32 does."""
    for c, block_c in [(320, 64), (640, 128), (1280, 256), (37, 64), (96, 32)]:
        assert kernels.Plan(81920, c, interpreted=False).BLOCK_C == block_c, c


def test_dispatch_needs_channels_last_and_no_autograd():
    y = torch.randn(2, 4, 3, 3)
    assert _op.select(y).name == "torch"  # channels-first
    y = y.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _op.select(y).name == "triton"
    assert _op.select(y.clone().requires_grad_()).name == "torch"
