"""The COMPILED Triton group_norm kernels on a CUDA device, against an fp64 oracle.

``tests/triton/test_group_norm_triton.py`` runs the same kernels under the Triton interpreter
(NumPy, no FMA, one chunk per group); this module runs what a GPU actually executes: the compiled
kernels, the two-stage (split) reduction the launcher picks to fill the SMs, vectorised
channels_last loads, fp16/bf16 loads and stores. Forward and every gradient (x, weight, bias,
scale, shift) with random affine/modulation parameters, activation None and SiLU.

Oracle: ``F.group_norm`` in float64 on the same inputs upcast, then the modulation and the
activation in float64; gradients by autograd through that fp64 graph.

Tolerances
----------
* fp32, forward: max error <= 1e-5 x max|ref|. The kernel keeps fp32 throughout; its error is
  a few ulps (~1e-7) of the output plus the statistics' fp32 rounding, well inside 1e-5.
* fp32, gradients: max error <= 1e-4 x max|ref|. The parameter gradients are sums over N*S
  elements (up to 16,384 per channel here) and dx subtracts group means of such sums; an fp32
  sum of n terms has error ~ u * log2(n) * sum|terms| in the worst case, and with random signs
  sum|terms| / |sum| ~ sqrt(n) ~ 100, so 6e-8 * 14 * 100 ~ 1e-4 bounds the worst case (measured
  under the interpreter: <= 2e-6; forward <= 2e-7). dx of a 2-element group is pure
  cancellation (its exact value is ~0), so dx's scale is floored at the natural scale
  max|dy| / std(x).
* fp16/bf16: the kernel's max error vs the oracle must be <= 2x that of plain PyTorch at that
  precision on the same inputs (``F.group_norm`` on the half tensors, modulation and SiLU in half
  arithmetic, its autograd for the gradients), with a floor of half an ulp of max|ref| (the
  error of rounding the exact result once), as the attention GPU tests do. PyTorch rounds
  after every op, so that bound allows a few ulps; the kernel computes everything in fp32 and
  rounds once at the store, so it is also held to one ulp of max|ref| (fp32 error ~1e-6 of the
  value plus at most half an ulp; measured under the interpreter: <= 0.43 ulp in fp16, <= 0.81 ulp
  in bf16, whose stores the interpreter truncates where the compiled kernels round to nearest).
* Statistics: the (N, G) mean and rstd the forward returns (and the backward reuses) are fp32
  and within 1e-5 relative of the fp64 statistics even for bf16 input with |mean| >> std.

Every helper takes the device as an argument so that the logic can be exercised on the CPU
under ``TRITON_INTERPRET=1`` outside pytest; the tests themselves need CUDA and the compiled
kernels, and skip when ``TRITON_INTERPRET`` is set.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.markers import COMPILED_TRITON_ON_GPU

from echofast.ops import group_norm

pytestmark = COMPILED_TRITON_ON_GPU

EPS = 1e-5
NAMES = ("x", "weight", "bias", "scale", "shift")
FP32_FWD_TOL = 1e-5
FP32_GRAD_TOL = 1e-4


def make_inputs(shape, device, dtype, *, fmt=None, offset=1.0, seed=0):
    """x, weight, bias, scale, shift (all of ``dtype``) and dy, drawn on the CPU (the same
    values on every device), x in memory format ``fmt``."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = torch.randn(shape, generator=g) * 3 + offset
    w = torch.randn(c, generator=g)
    b = torch.randn(c, generator=g)
    scale = torch.randn(n, c, generator=g) * 0.5
    shift = torch.randn(n, c, generator=g)
    dy = torch.randn(shape, generator=g)
    x = x.to(device, dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    params = [t.to(device, dtype) for t in (w, b, scale, shift)]
    return [x, *params], dy.to(device, dtype)


def run(fn, tensors, groups, activation, dy, **kw):
    """fn's output and the gradients of <y, dy> wrt (x, weight, bias, scale, shift)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    x, w, b, scale, shift = leaves
    y = fn(x, groups, w, b, EPS, activation=activation, scale=scale, shift=shift, **kw)
    return y.detach(), list(torch.autograd.grad(y, leaves, dy))


def _modulate(y, scale, shift, activation):
    extra = (1,) * (y.dim() - 2)
    y = y * (1 + scale.reshape(*scale.shape, *extra)) + shift.reshape(*shift.shape, *extra)
    return F.silu(y) if activation == "silu" else y


def torch_plain(x, groups, w, b, eps, *, activation, scale, shift):
    """Plain PyTorch at x's precision: F.group_norm, modulation and SiLU in x's dtype."""
    return _modulate(F.group_norm(x, groups, w, b, eps), scale, shift, activation)


def oracle(tensors, groups, activation, dy):
    """fp64: output and gradients of the same computation on the inputs upcast."""
    return run(torch_plain, [t.double() for t in tensors], groups, activation, dy.double())


def max_err(a, ref):
    return (a.double() - ref).abs().max().item()


def dx_floor(x, dy):
    """Natural scale of dx, |dy| / std(x): dx of a 2-element group is pure cancellation."""
    return dy.double().abs().max().item() / max(x.double().std().item(), 1e-12)


def check_group_norm(shape, groups, device, dtype, activation, *, fmt=None, seed=0):
    """Forward and all gradients of the forced triton backend vs the fp64 oracle; returns
    ``{name: {"err", "bound", "scale", "torch_err"}}`` per output (y, then the gradients), every
    error already asserted <= its bound; ``scale`` is the max|ref| the bounds are relative to,
    ``torch_err`` plain PyTorch's error at that precision (None in fp32)."""
    tensors, dy = make_inputs(shape, device, dtype, fmt=fmt, seed=seed)
    x = tensors[0]
    fmt = fmt or torch.contiguous_format
    y, grads = run(group_norm, tensors, groups, activation, dy, backend="triton")
    y64, grads64 = oracle(tensors, groups, activation, dy)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert y.is_contiguous(memory_format=fmt), "output must keep x's memory format"
    assert grads[0].is_contiguous(memory_format=fmt), "dx must keep x's memory format"
    for name, gr, t in zip(NAMES, grads, tensors):
        assert gr.dtype == t.dtype and gr.shape == t.shape, name
    plain = [None] * 6
    if dtype != torch.float32:
        y_pt, grads_pt = run(torch_plain, tensors, groups, activation, dy)
        plain = [y_pt, *grads_pt]
    results = {}
    for name, got, ref, pt in zip(("y", *NAMES), [y, *grads], [y64, *grads64], plain):
        scale = ref.abs().max().item()
        if name == "x":
            scale = max(scale, dx_floor(x, dy))
        err = max_err(got, ref)
        where = f"{name} ({dtype}, {shape}, {activation})"
        torch_err = None
        if dtype == torch.float32:
            bound = (FP32_FWD_TOL if name == "y" else FP32_GRAD_TOL) * scale
            assert err <= bound, f"{where}: error {err:.3g} > {bound:.3g}"
        else:
            ulp = torch.finfo(dtype).eps * scale
            torch_err = max_err(pt, ref)
            torch_bound = 2 * max(torch_err, 0.5 * ulp)
            assert err <= torch_bound, f"{where}: error {err:.3g} > 2x PyTorch's {torch_err:.3g}"
            assert err <= ulp, f"{where}: error {err:.3g} > one ulp of max|ref| {ulp:.3g}"
            bound = min(torch_bound, ulp)
        results[name] = {"err": err, "bound": bound, "scale": scale, "torch_err": torch_err}
    return results


def check_statistics(shape, groups, device, dtype, *, offset, seed=0):
    """The fp32 (N, G) mean/rstd the forward returns vs fp64 statistics of the same input."""
    from echofast.ops.group_norm import _GroupNormTriton

    tensors, _ = make_inputs(shape, device, dtype, offset=offset, seed=seed)
    x, w, b, scale, shift = tensors
    _, mean, rstd = _GroupNormTriton.apply(x, w, b, scale, shift, groups, EPS, "silu")
    assert mean.dtype == rstd.dtype == torch.float32
    assert mean.shape == rstd.shape == (shape[0], groups)
    xg = x.double().reshape(shape[0], groups, -1)
    mean64 = xg.mean(-1)
    rstd64 = (xg.var(-1, unbiased=False) + EPS).rsqrt()
    errs = {
        "mean": ((mean.double() - mean64).abs() / mean64.abs()).max().item(),
        "rstd": ((rstd.double() - rstd64).abs() / rstd64).max().item(),
    }
    for name, err in errs.items():
        assert err <= 1e-5, f"{name}: relative error {err:.3g} > 1e-5"
    return errs


# shape, groups, memory format
SHAPES = {
    "minimal": ((1, 2, 1, 1), 1, None),
    "odd_hw": ((2, 63, 5, 7), 21, None),  # H*W = 35, 3 channels per group (BLOCK_C = 4)
    "5d_t1": ((2, 12, 1, 3, 5), 4, None),  # 5D with T = 1, S = 15
    "echo": ((1, 320, 16, 16, 16), 32, None),  # LVDM-sized: 10 channels per group
    # few groups, big groups: N*G = 32 groups of 2*64*256 = 32,768 elements, so the launcher
    # splits every group into chunks (two-stage reduction) to fill the SMs
    "big_group": ((1, 64, 64, 16, 16), 32, None),
    "channels_last": ((2, 48, 9, 11), 8, torch.channels_last),
    "channels_last_3d": ((2, 64, 3, 10, 13), 32, torch.channels_last_3d),
    # N >= the multiprocessors, channels-last: the rows kernel's forward (whole rows per
    # program; LVDM frames, and an odd CG = 10 with S = 35 over several row tiles)
    "rows_lvdm_frames": ((320, 320, 16, 16), 32, torch.channels_last),
    "rows_odd": ((264, 30, 5, 7), 3, torch.channels_last),
    # N < the multiprocessors, channels-last: the split rows kernels (stats + apply per sample
    # chunk; the LVDM's temporal GroupNorm over 5 windows of 64 frames at the top level)
    "rows_lvdm_temporal": ((5, 128, 64, 16, 16), 32, torch.channels_last_3d),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Each case compiles its own kernel variants (~1 s on a GPU), so: every shape in every dtype with
# SiLU; without activation (only the ACT_SILU branch differs) every dtype on the channels_last_3d
# shape and fp32 on two more.
CASES = [(name, "silu", dtype) for name in SHAPES for dtype in DTYPES]
CASES += [("channels_last_3d", None, dtype) for dtype in DTYPES]
CASES += [(name, None, torch.float32) for name in ("odd_hw", "big_group")]


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    from echofast.kernels import group_norm as kernels

    if type(kernels._gn_fwd_stats_kernel).__name__ == "InterpretedFunction":
        pytest.fail(
            "echofast.kernels.group_norm was imported under TRITON_INTERPRET in this process: "
            "these tests must run the compiled kernels"
        )


@pytest.mark.parametrize(("shape_name", "activation", "dtype"), CASES, ids=str)
def test_gpu_forward_and_grads_match_fp64(shape_name, activation, dtype):
    shape, groups, fmt = SHAPES[shape_name]
    seed = sum(shape) + groups + (activation is None)
    check_group_norm(shape, groups, "cuda", dtype, activation, fmt=fmt, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_statistics_fp32_with_large_mean(dtype):
    """|mean| = 50 >> std = 3 over 32,768-element groups split into chunks: the chunk merge
    (Chan) must keep fp32 accuracy; bf16 input must still give fp32 statistics."""
    shape, groups, _ = SHAPES["big_group"]
    check_statistics(shape, groups, "cuda", dtype, offset=50.0, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", ["rows_lvdm_frames", "rows_lvdm_temporal"])
def test_gpu_rows_kernel_is_chosen_and_matches_the_group_kernels(dtype, shape_name):
    """On the LVDM's channels-last shapes the launcher picks the rows kernels (one launch for
    the frame batch, the split for the 5 videos); with a row-strided time-projection add they
    give the per-group kernels' y, mean and rstd."""
    from echofast.kernels import group_norm as k

    shape, groups, fmt = SHAPES[shape_name]
    tensors, _ = make_inputs(shape, "cuda", dtype, fmt=fmt, seed=5)
    x, w, b, _, _ = tensors
    sx = k.ncs_strides(x)
    plan = k.RowsPlan.of(k.Plan(x, groups), sx, sx, x)
    assert plan is not None
    n, s = shape[0], x.numel() // (shape[0] * shape[1])
    want = 1  # the frame batch fills the device: one launch
    if n < k.multiprocessors(x):  # about PROGRAMS_PER_SM programs per multiprocessor
        cap = min(k.MAX_ROW_PARTIALS // plan.BLOCK_G, -(-s // plan.BLOCK_S))
        want = min(-(-k.target_programs(x) // n), cap)
        assert want > 1
    assert plan.num_chunks == want
    n, c = shape[:2]
    rows_add = max(1, n // 64)
    add = torch.randn(rows_add, 2 * c, device="cuda", dtype=dtype)[:, 7 : 7 + c]
    args = (x, groups, w, b, EPS, "silu", None, None, fmt)
    rows = k.group_norm_fwd(*args, add=add)
    per_group = k.group_norm_fwd(*args, add=add, use_rows=False)
    scale = per_group[0].abs().max().item()
    bound = (1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps) * scale
    assert max_err(rows[0], per_group[0].double()) <= bound
    for got, expected in zip(rows[1:], per_group[1:]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
