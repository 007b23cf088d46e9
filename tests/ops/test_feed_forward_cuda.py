"""The COMPILED one-kernel feed-forward on a CUDA device, against an fp64 oracle, at the LVDM's
feed-forward shapes (levels 0-2 at one 5-window call: C = 128/256, I = 4·C) and an awkward one.

fp16/bf16: the kernel's max error (relative to max|ref|) must be <= 2x that of plain PyTorch at
that precision on the same inputs (cuBLAS F.linear, the GEGLU, F.linear and the residual add in
the dtype, as diffusers' modules compute them), floored at half an ulp of max|ref|. The model's
FeedForward on the fused path matches its two-GEMM path. fp32 is not the kernel's (its tiles
spill): the op sends it to the reference, which is checked here too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.markers import COMPILED_TRITON_ON_GPU

import echofast.nn.spatiotemporal as st
from echofast.ops import feed_forward, registered_ops

pytestmark = COMPILED_TRITON_ON_GPU


def operands(m, c, inner, n, dtype, seed):
    g = torch.Generator("cuda").manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    x = draw(m, c)
    w1, b1 = draw(2 * inner, c, scale=1 / math.sqrt(c)), draw(2 * inner, scale=0.1)
    w2, b2 = draw(n, inner, scale=1 / math.sqrt(inner)), draw(n, scale=0.1)
    return x, w1, b1, w2, b2, draw(m, n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    ("m", "c", "inner", "n"), [(81920, 128, 512, 128), (20480, 256, 1024, 256), (1000, 40, 160, 24)]
)
def test_gpu_feed_forward_within_twice_pytorch(m, c, inner, n, dtype):
    x, w1, b1, w2, b2, r = operands(m, c, inner, n, dtype, seed=m + c)
    with torch.no_grad():
        h = r.clone()
        out = feed_forward(x, w1, b1, w2, b2, residual=h, out=h, backend="triton")
        g = F.linear(x, w1, b1)
        plain = r + F.linear(g[:, :inner] * F.gelu(g[:, inner:]), w2, b2)
    hd = F.linear(x.double(), w1.double(), b1.double())
    ref = r.double() + F.linear(hd[:, :inner] * F.gelu(hd[:, inner:]), w2.double(), b2.double())
    floor = 0.5 * torch.finfo(dtype).eps * ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert out is h
    assert err <= 2 * max((plain.double() - ref).abs().max().item(), floor)


def test_gpu_fp32_goes_to_the_reference():
    x, w1, b1, w2, b2, _ = operands(64, 128, 512, 128, torch.float32, seed=1)
    assert registered_ops()["feed_forward"].select(x, w1, b1, w2, b2).name == "torch"


@torch.no_grad()
def test_gpu_the_models_feed_forward_on_the_fused_path(monkeypatch):
    ff = st.FeedForward(128, 128).to("cuda", torch.float16)
    for p in ff.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(4, 1000, 128, device="cuda", dtype=torch.float16)
    h0 = torch.randn(4, 1000, 128, device="cuda", dtype=torch.float16)
    unfused = ff.add_to(h0 + ff.out_bias, x)
    monkeypatch.setattr(st, "FUSED_FF_DEVICES", frozenset({"cuda"}))
    h = h0 + ff.out_bias
    assert ff.add_to(h, x) is h
    torch.testing.assert_close(h, unfused, rtol=2e-2, atol=2e-2)
