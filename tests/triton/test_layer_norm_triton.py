"""The ``triton`` layer_norm backend, run by the Triton interpreter on CPU.

Against an fp64 oracle (the formula written out, not F.layer_norm): fp32 to 1e-5 of max|ref|;
fp16/bf16 input with fp32 affine within one rounding of the fp32 result and within 2x the error
of plain PyTorch at that precision (``F.layer_norm`` with the input and affine in the half dtype).
Awkward widths (C = 1, 37, 1280), ragged row tiles, strided inputs, no affine, the dispatcher's
choice. Shapes are small: the interpreter pays per program and per element.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.buffers import unchanged_outside
from support.oracles import layer_norm_oracle
from support.triton_interp import interpreted_kernels

from echofast.ops import add_layer_norm, layer_norm, registered_ops
from echofast.ops.layer_norm import MAX_C

kernels = interpreted_kernels("layer_norm", "_layer_norm_fwd_kernel")
_op = registered_ops()["layer_norm"]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 2
    w = torch.randn(shape[-1], generator=g) * 0.5 + 1
    b = torch.randn(shape[-1], generator=g) * 0.5
    return x.to(dtype), w, b


def max_err(y, ref):
    return (y.double() - ref).abs().max().item()


SHAPES = [(3, 37), (2, 5, 320), (7, 1280), (2, 3, 4, 8), (5, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_fp64(shape):
    x, w, b = inputs(shape, seed=len(shape))
    y = layer_norm(x, w, b, backend="triton")
    ref = layer_norm_oracle(x, w, b)
    assert y.dtype == torch.float32 and y.shape == x.shape and y.is_contiguous()
    assert max_err(y, ref) <= 1e-5 * ref.abs().max().item()


def test_one_column_rows_give_the_bias():
    x, w, b = inputs((4, 1), seed=3)
    assert torch.equal(layer_norm(x, w, b, backend="triton"), b.expand(4, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("c", [37, 320, 1280])
def test_half_input_fp32_affine_within_2x_plain_pytorch(dtype, c):
    x, w, b = inputs((6, c), dtype, seed=c)
    y = layer_norm(x, w, b, backend="triton")
    assert y.dtype == dtype
    ref = layer_norm_oracle(x, w, b)
    plain = F.layer_norm(x, (c,), w.to(dtype), b.to(dtype))
    half_ulp = ref.abs().max().item() * {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    assert max_err(y, ref) <= 2 * max(max_err(plain, ref), half_ulp)
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1.0)).max() <= ulp


def test_ragged_row_tiles():
    """Several programs, the last one partial (R = 7 in tiles of 2)."""
    x, w, b = inputs((7, 37), seed=4)
    y = kernels.layer_norm_fwd(x, w, b, 1e-5, block_r=2)
    assert max_err(y, layer_norm_oracle(x, w, b)) <= 1e-5 * 10


def test_no_affine_and_other_eps():
    x, _, _ = inputs((5, 24), seed=5)
    y = layer_norm(x, None, None, 1e-3, backend="triton")
    assert max_err(y, layer_norm_oracle(x, eps=1e-3)) <= 1e-5 * 10
    w = torch.randn(24)
    y = layer_norm(x, w, None, backend="triton")
    assert max_err(y, layer_norm_oracle(x, w)) <= 1e-5 * 10


@pytest.mark.parametrize("layout", ["row_strided", "non_collapsible", "transposed"])
def test_strided_inputs(layout):
    g = torch.Generator().manual_seed(6)
    if layout == "row_strided":
        x = torch.randn(6, 40, generator=g)[:, 3:27]
    elif layout == "non_collapsible":
        x = torch.randn(3, 4, 24, generator=g)[:, :2]
    else:
        x = torch.randn(24, 6, generator=g).t()
    view = kernels.rows_view(x)
    assert (view.data_ptr() == x.data_ptr()) == (layout == "row_strided")
    w, b = torch.randn(24, generator=g), torch.randn(24, generator=g)
    y = layer_norm(x, w, b, backend="triton")
    assert y.shape == x.shape and max_err(y, layer_norm_oracle(x, w, b)) <= 1e-4


def test_empty_input():
    y = layer_norm(torch.empty(0, 8), torch.ones(8), None, backend="triton")
    assert y.shape == (0, 8)


def test_dispatch_prefers_triton_for_inference_and_falls_back_for_autograd():
    x, w, b = inputs((4, 16), torch.bfloat16)
    with torch.no_grad():
        assert _op.select(x, w, b).name == "triton"
    xg = x.clone().requires_grad_()
    assert _op.select(xg, w, b).name == "mixed"
    layer_norm(xg, w, b).float().sum().backward()
    assert xg.grad is not None


def test_the_ops_width_limit_is_the_kernels():
    assert MAX_C == kernels.MAX_C


def test_gpu_tile_choice():
    """Compiled tiles: a whole row per program row, TILE elements per program."""
    for c, block_c, block_r, warps in [(320, 512, 8, 8), (1280, 2048, 2, 8), (37, 64, 64, 8)]:
        p = kernels.Plan(81920, c, interpreted=False)
        assert (p.BLOCK_C, p.BLOCK_R, p.num_warps) == (block_c, block_r, warps), c
    assert kernels.Plan(3, 320, interpreted=False).BLOCK_R == 4
    assert kernels.Plan(1, 16384, interpreted=False).BLOCK_R == 1


# ---- add_layer_norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("rows_add", [False, True], ids=["residual", "residual+rows"])
@pytest.mark.parametrize("shape", [(2, 6, 37), (3, 4, 320), (1, 5, 8)], ids=str)
def test_add_layer_norm_fp32(shape, rows_add):
    x, w, b = inputs(shape, seed=11)
    g = torch.Generator().manual_seed(12)
    r = torch.randn(shape, generator=g)
    a = torch.randn(shape[0], shape[-1], generator=g) if rows_add else None
    want_h = x + r + (a[:, None] if rows_add else 0)
    storage = r.data_ptr()
    with torch.no_grad():
        h, y = add_layer_norm(x, r, a, w, b, backend="triton")
    assert h.data_ptr() == storage  # written over the residual
    torch.testing.assert_close(h, want_h, rtol=1e-6, atol=1e-6)
    ref = layer_norm_oracle(want_h, w, b)
    assert max_err(y, ref) <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_add_layer_norm_half(dtype):
    """h rounded once (fp16: the residual-only sum is bit-equal to PyTorch's add; the
    interpreter rounds fp32 -> bf16 toward zero, so bf16 is held to one ulp here and to bit
    equality on the GPU), y the LayerNorm of the stored h within one rounding."""
    x, w, b = inputs((4, 9, 320), dtype, seed=13)
    r = (torch.randn(4, 9, 320, generator=torch.Generator().manual_seed(14)) * 2).to(dtype)
    with torch.no_grad():
        h, y = add_layer_norm(x, r.clone(), None, w, b, backend="triton")
    if dtype == torch.float16:
        assert torch.equal(h, r + x)
    exact = x.double() + r.double()
    assert ((h.double() - exact).abs() / exact.abs().clamp_min(1.0)).max() <= 2.0**-7
    ref = layer_norm_oracle(h, w, b)
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1.0)).max() <= {
        torch.float16: 2.0**-10,
        torch.bfloat16: 2.0**-7,
    }[dtype]
    a = torch.randn(4, 320).to(dtype)
    with torch.no_grad():
        h2, _ = add_layer_norm(x, r.clone(), a, w, b, backend="triton")
    exact = exact + a.double()[:, None]
    assert ((h2.double() - exact).abs() / exact.abs().clamp_min(1.0)).max() <= 2.0**-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_add_layer_norm_shift(dtype):
    """shift reaches the stored h (h as the norm read it, + shift in fp32, rounded once), not y:
    the same h and y as the reference backend, whose adds are PyTorch's."""
    x, w, b = inputs((3, 7, 37), dtype, seed=16)
    g = torch.Generator().manual_seed(17)
    r = torch.randn(3, 7, 37, generator=g).to(dtype)
    shift = torch.randn(37, generator=g)
    with torch.no_grad():
        plain_h, plain_y = add_layer_norm(x, r.clone(), None, w, b, backend="triton")
        h, y = add_layer_norm(x, r.clone(), None, w, b, shift=shift, backend="triton")
        ref_h, _ = add_layer_norm(x, r.clone(), None, w, b, shift=shift, backend="torch")
    assert torch.equal(y, plain_y)
    assert torch.equal(h, (plain_h.float() + shift).to(dtype))
    assert torch.equal(h, ref_h)
    with pytest.raises(ValueError, match="needs residual/add"):
        kernels.layer_norm_fwd(x.view(-1, 37), w, b, 1e-5, shift=shift)


def test_add_layer_norm_strided_residual_gets_a_new_h():
    x, w, b = inputs((6, 24), seed=15)
    r = torch.randn(24, 6).t()  # no unit stride along C: h goes to a new tensor
    with torch.no_grad():
        h, y = add_layer_norm(x, r, None, w, b, backend="triton")
    assert h.data_ptr() != r.data_ptr()
    torch.testing.assert_close(h, x + r)
    assert max_err(y, layer_norm_oracle(x + r, w, b)) <= 1e-4


def test_add_layer_norm_kernel_needs_an_h_output():
    x, w, b = inputs((2, 8))
    with pytest.raises(ValueError, match="need h_out"):
        kernels.layer_norm_fwd(x, w, b, 1e-5, residual=x)


def test_add_layer_norm_frame_major_add_group():
    """Frame-major (B, T, S, C) tokens with one row of ``add`` per frame: groups of S rows cycle
    through the T rows of add (add_group = S), not R/M consecutive rows."""
    b, t, s, c = 2, 3, 5, 37
    x, w, bias = inputs((b, t, s, c), seed=18)
    g = torch.Generator().manual_seed(19)
    r = torch.randn(b, t, s, c, generator=g)
    a = torch.randn(t, c, generator=g)
    want_h = x + r + a[None, :, None, :]
    with torch.no_grad():
        h, y = add_layer_norm(x, r.clone(), a, w, bias, add_group=s, backend="triton")
    torch.testing.assert_close(h, want_h, rtol=1e-6, atol=1e-6)
    ref = layer_norm_oracle(want_h, w, bias)
    assert max_err(y, ref) <= 1e-5 * ref.abs().max().item()


def test_add_layer_norm_row_strided_operands_in_place():
    """x, residual and add rows of three different strides (column slices of wider buffers): h
    is written over the residual's rows in place, and nothing else of its buffer changes (the
    last program's rows past R = 6 and the columns past C are left alone)."""
    g = torch.Generator().manual_seed(20)
    x = torch.randn(6, 29, generator=g)[:, 2:26]
    r_buf = torch.randn(7, 31, generator=g)
    r = r_buf[:6, 3:27]
    a = torch.randn(2, 40, generator=g)[:, 5:29]
    w, b = torch.randn(24, generator=g), torch.randn(24, generator=g)
    want_h = x + r + a.repeat_interleave(3, 0)
    before = r_buf.clone()
    with torch.no_grad():
        h, y = add_layer_norm(x, r, a, w, b, backend="triton")
    assert h.data_ptr() == r.data_ptr()
    torch.testing.assert_close(h, want_h, rtol=1e-6, atol=1e-6)
    assert max_err(y, layer_norm_oracle(want_h, w, b)) <= 1e-4
    assert unchanged_outside(r_buf, before, slice(None, 6), slice(3, 27))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_add_layer_norm_normalises_the_rounded_h(dtype):
    """y is the LayerNorm of the h returned (rounded to the half dtype), bit for bit the plain
    LayerNorm of that h, not of the unrounded fp32 sum."""
    x, w, b = inputs((5, 7, 320), dtype, seed=21)
    r = (torch.randn(5, 7, 320, generator=torch.Generator().manual_seed(22)) * 3).to(dtype)
    with torch.no_grad():
        h, y = add_layer_norm(x, r, None, w, b, backend="triton")
        assert torch.equal(y, layer_norm(h, w, b, backend="triton"))


def test_add_layer_norm_rows_only_without_a_residual():
    """residual None: h = x + add[row group] in a new tensor, y its LayerNorm."""
    x, w, b = inputs((3, 4, 37), seed=23)
    a = torch.randn(3, 37, generator=torch.Generator().manual_seed(24))
    want_h = x + a[:, None]
    with torch.no_grad():
        h, y = add_layer_norm(x, None, a, w, b, backend="triton")
    torch.testing.assert_close(h, want_h, rtol=1e-6, atol=1e-6)
    ref = layer_norm_oracle(want_h, w, b)
    assert max_err(y, ref) <= 1e-5 * ref.abs().max().item()
