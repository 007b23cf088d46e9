"""The ``triton`` geglu backend, run by the Triton interpreter on CPU.

Forward and gradient against an fp64 oracle (the GELU formulas written out, not F.gelu): fp32 to
1e-6 (forward) and 1e-5 (gradient) of max|ref|; fp16/bf16 within 2x plain PyTorch's error at that
precision (floor: half an ulp of max|ref|). Awkward shapes (D = 37, D = 1, ragged tiles), strided
inputs (a row-strided view, a transposed and a non-collapsible one), the dispatcher's choice.
Shapes are small: the interpreter pays per program and per element.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.triton_interp import interpreted_kernels

from echofast.ops import geglu, registered_ops

kernels = interpreted_kernels("geglu", "_geglu_fwd_kernel")
_op = registered_ops()["geglu"]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def oracle(h, dy, approximate="none"):
    """fp64 out and dh: gelu and its derivative written out."""
    h, dy = h.double(), dy.double()
    d = h.shape[-1] // 2
    x, g = h[..., :d], h[..., d:]
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        t = torch.tanh(k * (g + 0.044715 * g**3))
        gelu = 0.5 * g * (1 + t)
        dgelu = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k * (1 + 3 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
        gelu = g * cdf
        dgelu = cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    return x * gelu, torch.cat([dy * gelu, dy * x * dgelu], dim=-1)


def run(fn, h, dy, **kw):
    leaf = h.detach().requires_grad_()  # a view: keeps h's layout
    out = fn(leaf, **kw)
    (dh,) = torch.autograd.grad(out, leaf, dy)
    return out.detach(), dh


def plain_torch(h, approximate="none"):
    """Plain PyTorch at h's precision, as diffusers computes it."""
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate, approximate=approximate)


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g) * 2
    dy = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
    return h.to(dtype), dy.to(dtype)


SHAPES = [(3, 2 * 37), (5, 2), (2 * 16,), (2, 3, 2 * 64), (2, 1, 3, 2 * 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fp32_forward_and_grad_match_fp64(shape, approximate):
    h, dy = inputs(shape, seed=len(shape))
    out, dh = run(geglu, h, dy, approximate=approximate, backend="triton")
    out64, dh64 = oracle(h, dy, approximate)
    assert out.shape == out64.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert dh.shape == h.shape and dh.dtype == torch.float32
    assert rel(out, out64) <= 1e-6
    assert rel(dh, dh64) <= 1e-5


def test_no_grad_path_equals_autograd_path():
    h, dy = inputs((4, 2 * 40), seed=9)
    with torch.no_grad():
        fast = geglu(h, backend="triton")
    out, _ = run(geglu, h, dy, backend="triton")
    assert torch.equal(fast, out)


def test_ragged_tiles_in_both_directions():
    """Several row and column tiles, the last of each partial (R = 7, D = 37, 2 x 16 tiles)."""
    h, dy = inputs((7, 2 * 37), seed=4)
    out64, dh64 = oracle(h, dy)
    out = kernels.geglu_fwd(h, block_r=2, block_d=16)
    dh = kernels.geglu_bwd(h, dy, block_r=2, block_d=16)
    assert rel(out, out64) <= 1e-6 and rel(dh, dh64) <= 1e-5


def test_gpu_tile_choice():
    """The compiled kernels' tiles: BLOCK_D divides the model's D = 4·C (no masked lanes)."""
    cases = [(512, 256, 16), (1024, 256, 16), (320, 64, 64), (37, 64, 64), (96, 128, 32)]
    for d, block_d, block_r in cases:  # D = 96: no power of two >= 64 divides it
        p = kernels.Plan(81920, d, interpreted=False)
        assert (p.BLOCK_D, p.BLOCK_R) == (block_d, block_r), d
        assert p.BLOCK_R * p.BLOCK_D <= kernels.TILE
    assert kernels.Plan(3, 512, interpreted=False).BLOCK_R == 4


def _strided_cases():
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(6, 2 * 24 + 5, generator=g)
    yield "row_strided_view", wide[:, 3 : 3 + 2 * 24], True
    yield "transposed", torch.randn(2 * 24, 6, generator=g).t(), False
    yield "non_collapsible", torch.randn(3, 4, 2 * 24, generator=g)[:, :2], False


STRIDED = list(_strided_cases())


@pytest.mark.parametrize(("name", "h", "is_view"), STRIDED, ids=[c[0] for c in STRIDED])
def test_strided_inputs(name, h, is_view):
    assert not h.is_contiguous()
    assert (kernels.rows_view(h).data_ptr() == h.data_ptr()) == is_view, name
    dy = torch.randn(*h.shape[:-1], h.shape[-1] // 2)
    out, dh = run(geglu, h, dy, backend="triton")
    out64, dh64 = oracle(h, dy)
    assert rel(out, out64) <= 1e-6 and rel(dh, dh64) <= 1e-5


@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_strided_upstream_gradient(layout):
    """dy that is a non-contiguous view: rows strided (read in place) or transposed (copied)."""
    h, _ = inputs((6, 2 * 10), seed=6)
    dy = torch.randn(6, 14)[:, 2:12] if layout == "row_strided" else torch.randn(10, 6).t()
    assert (kernels.rows_view(dy).data_ptr() == dy.data_ptr()) == (layout == "row_strided")
    out, dh = run(geglu, h, dy, backend="triton")
    assert rel(dh, oracle(h, dy)[1]) <= 1e-5


@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (2, 0, 6)], ids=str)
def test_empty(shape):
    h = torch.empty(shape, requires_grad=True)
    out = geglu(h, backend="triton")
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    (dh,) = torch.autograd.grad(out, h, torch.empty_like(out))
    assert dh.shape == h.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_half_precision_within_twice_torch(dtype, approximate):
    """Kernel (half in/out, fp32 math, one rounding) vs PyTorch in half, both against fp64."""
    h, dy = inputs((6, 2 * 48), dtype=dtype, seed=7)
    out, dh = run(geglu, h, dy, approximate=approximate, backend="triton")
    pt_out, pt_dh = run(plain_torch, h, dy, approximate=approximate)
    out64, dh64 = oracle(h, dy, approximate)
    assert out.dtype == dh.dtype == dtype
    for name, got, pt, ref in (("out", out, pt_out, out64), ("dh", dh, pt_dh, dh64)):
        half_ulp = 0.5 * torch.finfo(dtype).eps
        bound = 2 * max(rel(pt, ref), half_ulp)
        assert rel(got, ref) <= bound, (name, rel(got, ref), rel(pt, ref))


def test_dispatch_under_the_interpreter():
    h = torch.randn(2, 16)
    assert _op.select(h).name == "triton"
    assert _op.select(h.double()).name == "torch"  # fp64: falls back quietly
