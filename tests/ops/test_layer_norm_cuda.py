"""The COMPILED Triton layer_norm kernel on a CUDA device, against an fp64 oracle.

``tests/triton/test_layer_norm_triton.py`` runs the same kernel under the interpreter; this
module runs the compiled kernel with the GPU tiles on the LVDM's widths (C = 320, 640, 1280 with
~10^5 rows, as in one UNet call) and awkward ones (C = 37, 1), strided and non-affine inputs.

Tolerances (of max|ref|): fp32 <= 1e-5 (a two-pass fp32 reduction over <= 1280 values);
fp16/bf16 input with fp32 affine: <= 2x the error of plain PyTorch at that precision
(``F.layer_norm`` with input and affine in the half dtype), floored at half an ulp, and within one
ulp of the fp32 result elementwise (relative to max(|ref|, 1)).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.markers import COMPILED_TRITON_ON_GPU
from support.oracles import layer_norm_oracle

from echofast.ops import add_layer_norm, layer_norm

pytestmark = COMPILED_TRITON_ON_GPU

ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def inputs(rows, c, dtype, seed):
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(rows, c, generator=g, device="cuda") * 3 + 2
    w = torch.randn(c, generator=g, device="cuda") * 0.5 + 1
    b = torch.randn(c, generator=g, device="cuda") * 0.5
    return x.to(dtype), w, b


def max_err(y, ref):
    return (y.double() - ref).abs().max().item()


SIZES = [(81920, 320), (20480, 640), (5120, 1280), (1001, 37), (300, 1)]


@pytest.mark.parametrize(("rows", "c"), SIZES, ids=str)
def test_fp32(rows, c):
    x, w, b = inputs(rows, c, torch.float32, c)
    y = layer_norm(x, w, b, backend="triton")
    ref = layer_norm_oracle(x, w, b)
    assert y.dtype == torch.float32 and not y.isnan().any()
    assert max_err(y, ref) <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("rows", "c"), SIZES[:4], ids=str)
def test_half_input_fp32_affine(dtype, rows, c):
    x, w, b = inputs(rows, c, dtype, c + 1)
    y = layer_norm(x, w, b, backend="triton")
    assert y.dtype == dtype and not y.isnan().any()
    ref = layer_norm_oracle(x, w, b)
    plain = F.layer_norm(x, (c,), w.to(dtype), b.to(dtype))
    half_ulp = ref.abs().max().item() * ULP[dtype] / 2
    assert max_err(y, ref) <= 2 * max(max_err(plain, ref), half_ulp)
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1.0)).max() <= ULP[dtype]


def test_strided_and_no_affine():
    x, w, _ = inputs(4096, 400, torch.float16, 7)
    view = x[:, 40:360]  # rows strided: read in place
    y = layer_norm(view, None, None, 1e-6, backend="triton")
    ref = layer_norm_oracle(view, eps=1e-6)
    assert max_err(y, ref) <= ULP[torch.float16] * ref.abs().max().item()
    y = layer_norm(view, w[:320], None, backend="triton")
    ref = layer_norm_oracle(view, w[:320])
    assert max_err(y, ref) <= ULP[torch.float16] * ref.abs().max().item()


def test_captured_in_a_cuda_graph():
    x, w, b = inputs(8192, 640, torch.float16, 9)
    layer_norm(x, w, b, backend="triton")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer_norm(x, w, b, backend="triton")
    x.copy_(inputs(8192, 640, torch.float16, 10)[0])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, layer_norm(x, w, b, backend="triton"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("c", [320, 1280])
def test_add_layer_norm(dtype, c):
    """h = x + branch (+ one row per video): the residual-only sum bit-equal to PyTorch's add,
    written over the branch; y the LayerNorm of the stored h within one rounding."""
    x, w, b = inputs(5 * 4096, c, dtype, 11)
    branch = inputs(5 * 4096, c, dtype, 12)[0]
    want = branch + x
    storage = branch.data_ptr()
    with torch.no_grad():
        h, y = add_layer_norm(x, branch, None, w, b, backend="triton")
    assert h.data_ptr() == storage and torch.equal(h, want)
    ref = layer_norm_oracle(h, w, b)
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1.0)).max() <= ULP[dtype]
    rows = inputs(5, c, dtype, 13)[0]
    branch = inputs(5 * 4096, c, dtype, 12)[0]
    with torch.no_grad():
        h, y = add_layer_norm(x, branch, rows, w, b, backend="triton")
    exact = x.double() + inputs(5 * 4096, c, dtype, 12)[0].double()
    exact = (exact.view(5, 4096, c) + rows.double()[:, None]).view(-1, c)
    assert ((h.double() - exact).abs() / exact.abs().clamp_min(1.0)).max() <= ULP[dtype]
    ref = layer_norm_oracle(h, w, b)
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1.0)).max() <= ULP[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_add_layer_norm_shift(dtype):
    """The stored h gets the shift (fp32, rounded once: bit-equal to PyTorch's add of the fp32
    shift), y does not."""
    x, w, b = inputs(3 * 4096, 640, dtype, 21)
    branch = inputs(3 * 4096, 640, dtype, 22)[0]
    shift = torch.randn(640, device="cuda")
    with torch.no_grad():
        plain_h, plain_y = add_layer_norm(x, branch.clone(), None, w, b, backend="triton")
        h, y = add_layer_norm(x, branch.clone(), None, w, b, shift=shift, backend="triton")
    assert torch.equal(y, plain_y)
    assert torch.equal(h, (plain_h.float() + shift).to(dtype))
