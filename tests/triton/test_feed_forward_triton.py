"""The ``triton`` feed_forward backend (both GEMMs, the GEGLU and the residual add in one kernel),
run by the Triton interpreter on CPU.

Against an fp64 oracle (the two projections in fp64, the GELU written out): fp32 to 1e-5 of
max|ref|; fp16 within 2x the error of plain PyTorch at fp16 (F.linear, GEGLU, F.linear and the
add in fp16, as diffusers' modules compute them; floor: half an ulp of max|ref|). Awkward shapes:
C, I and N not multiples of the tiles, more rows than a tile, no biases, the tanh GELU, the
residual read and written in place, row-strided x; the model's FeedForward on the fused path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.buffers import unchanged_outside
from support.triton_interp import interpreted_kernels

import echofast.nn.spatiotemporal as st
from echofast.ops import feed_forward

kernels = interpreted_kernels("feed_forward", "_ff_fwd_kernel")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def oracle(x, w1, b1, w2, b2, residual=None, approximate="none"):
    h = F.linear(x.double(), w1.double(), None if b1 is None else b1.double())
    i = w1.shape[0] // 2
    xs, gate = h[..., :i], h[..., i:]
    if approximate == "tanh":
        inner = math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)
        gelu = 0.5 * gate * (1 + torch.tanh(inner))
    else:
        gelu = gate * 0.5 * (1 + torch.erf(gate / math.sqrt(2)))
    out = F.linear(xs * gelu, w2.double(), None if b2 is None else b2.double())
    return out if residual is None else out + residual.double()


def operands(m, c, inner, n, dtype=torch.float32, seed=0, biases=True):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = draw(m, c)
    w1 = draw(2 * inner, c, scale=2 / math.sqrt(c))
    w2 = draw(n, inner, scale=1 / math.sqrt(inner))
    b1 = draw(2 * inner, scale=0.5) if biases else None
    b2 = draw(n, scale=0.5) if biases else None
    return x, w1, b1, w2, b2, draw(m, n)


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no_biases"])
@pytest.mark.parametrize(
    ("m", "c", "inner", "n"),
    [(37, 40, 160, 24), (130, 16, 72, 50), (5, 64, 256, 64), (9, 20, 33, 17)],
    ids=str,
)
def test_fp32_matches_fp64(m, c, inner, n, biases, approximate):
    x, w1, b1, w2, b2, r = operands(m, c, inner, n, seed=m + c, biases=biases)
    out = feed_forward(x, w1, b1, w2, b2, approximate=approximate, backend="triton")
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, oracle(x, w1, b1, w2, b2, approximate=approximate)) <= 1e-5
    with_r = feed_forward(x, w1, b1, w2, b2, residual=r, approximate=approximate, backend="triton")
    assert rel_err(with_r, oracle(x, w1, b1, w2, b2, r, approximate)) <= 1e-5


def test_residual_in_place_and_row_strided_x():
    """h += ff(x) with out = residual = h (each program reads its rows before it writes them),
    x a column slice of a wider buffer (rows strided), over several row tiles and inner chunks."""
    x, w1, b1, w2, b2, r = operands(150, 24, 96, 20, seed=5)
    wide = torch.randn(150, 40)
    wide[:, 8:32] = x
    xs = wide[:, 8:32]
    h = r.clone()
    config = {"BLOCK_M": 16, "BLOCK_I": 16, "num_warps": 4, "num_stages": 1}
    kernels.feed_forward_fwd(xs, w1, b1, w2, b2, h, h, config=config)
    assert rel_err(h, oracle(x, w1, b1, w2, b2, r)) <= 1e-5


def test_leading_dims_and_an_empty_batch():
    x, w1, b1, w2, b2, _ = operands(2 * 3 * 7, 32, 128, 32, seed=6)
    out = feed_forward(x.view(2, 3, 7, 32), w1, b1, w2, b2, backend="triton")
    assert out.shape == (2, 3, 7, 32)
    assert rel_err(out.view(-1, 32), oracle(x, w1, b1, w2, b2)) <= 1e-5
    empty = feed_forward(x[:0], w1, b1, w2, b2, backend="triton")
    assert empty.shape == (0, 32)


def test_fp16_within_twice_plain_pytorch():
    """fp32 accumulation, g rounded once to fp16: the error stays within twice that of PyTorch's
    own fp16 modules. (bf16 tl.dot is wrong in the interpreter: bf16 is tested on a GPU.)"""
    dtype = torch.float16
    x, w1, b1, w2, b2, r = operands(96, 64, 256, 48, dtype, seed=7)
    ref = oracle(x, w1, b1, w2, b2, r)
    out = feed_forward(x, w1, b1, w2, b2, residual=r, backend="triton")
    h = F.linear(x, w1, b1)
    plain = r + F.linear(h[:, :256] * F.gelu(h[:, 256:]), w2, b2)
    floor = 0.5 * torch.finfo(dtype).eps * ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert out.dtype == dtype
    assert err <= 2 * max((plain.double() - ref).abs().max().item(), floor)


def test_a_wider_residual_agrees_with_the_reference():
    """An fp32 residual with fp16 x and weights: both backends return x's dtype."""
    x, w1, b1, w2, b2, _ = operands(40, 32, 64, 24, torch.float16, seed=8)
    r = torch.randn(40, 24) * 100
    want = feed_forward(x, w1, b1, w2, b2, residual=r, backend="torch")
    out = feed_forward(x, w1, b1, w2, b2, residual=r, backend="triton")
    assert out.dtype == want.dtype == torch.float16
    assert rel_err(out, want.double()) <= 2.0**-10


@torch.no_grad()
def test_the_models_feed_forward_on_the_fused_path(monkeypatch):
    """st.FeedForward on FUSED_FF_DEVICES: forward and add_to (h already holding the output
    bias, as the blocks keep it) each one kernel, matching the unfused module."""
    ff = st.FeedForward(40, 24)
    for p in ff.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 9, 40)
    h0 = torch.randn(2, 9, 24)
    plain = ff(x)
    added = ff.add_to(h0 + ff.out_bias, x)
    calls = []
    real = st.ops.feed_forward
    monkeypatch.setattr(st, "FUSED_FF_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(st.ops, "feed_forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.testing.assert_close(ff(x), plain, rtol=1e-5, atol=1e-5)
    h = h0 + ff.out_bias
    assert ff.add_to(h, x) is h
    torch.testing.assert_close(h, added, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 and calls[1]["residual"] is calls[1]["out"]


@torch.no_grad()
@pytest.mark.parametrize("dim", [128, 129, 256])
def test_the_models_fuse_only_up_to_the_measured_width(dim, monkeypatch):
    """Wider feed-forwards than FUSED_FF_MAX_DIM stay on the two GEMMs (slower fused on the
    GPU), though the kernel holds them."""
    ff = st.FeedForward(dim)
    x = torch.randn(3, dim)
    calls = []
    real = st.ops.feed_forward
    monkeypatch.setattr(st, "FUSED_FF_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(st.ops, "feed_forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert st.ops.feed_forward_supported(x, ff.net[0].proj.weight, ff.net[2].weight)
    ff(x)
    ff.add_to(torch.zeros(3, dim), x)
    assert len(calls) == (2 if dim <= st.FUSED_FF_MAX_DIM else 0)


@pytest.mark.parametrize("which", ["b1", "b2"])
def test_one_bias_without_the_other(which):
    x, w1, b1, w2, b2, r = operands(37, 40, 72, 24, seed=9)
    b1, b2 = (b1, None) if which == "b1" else (None, b2)
    out = feed_forward(x, w1, b1, w2, b2, residual=r, backend="triton")
    assert rel_err(out, oracle(x, w1, b1, w2, b2, r)) <= 1e-5


def test_rows_of_three_strides_and_nothing_written_outside_out():
    """x, the residual and out column slices of wider buffers (three row strides); out's buffer
    keeps its values outside out's rows and columns (N = 24 in a 32-wide tile, M = 37)."""
    x, w1, b1, w2, b2, r = operands(37, 40, 72, 24, seed=10)
    xs = torch.cat([torch.randn(37, 3), x, torch.randn(37, 2)], 1)[:, 3:43]
    rs = torch.cat([torch.randn(37, 5), r, torch.randn(37, 1)], 1)[:, 5:29]
    buf = torch.randn(38, 27)
    out = buf[:37, 1:25]
    before = buf.clone()
    kernels.feed_forward_fwd(xs, w1, b1, w2, b2, rs, out)
    assert rel_err(out, oracle(x, w1, b1, w2, b2, r)) <= 1e-5
    assert unchanged_outside(buf, before, slice(None, 37), slice(1, 25))
