"""The ``triton`` group_norm backend, run by the Triton interpreter on CPU.

Forward and every gradient (x, weight, bias, scale, shift) against the torch reference
(``group_norm_reference``) in fp32 and against an fp64 oracle in fp16; the dispatcher's choice with
and without ``TRITON_INTERPRET``. Shapes are small: the interpreter pays per program and per op.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from support.dispatch import CountOps
from support.triton_interp import interpreted_kernels

from echofast.errors import BackendUnavailable
from echofast.ops import group_norm, group_norm_reference
from echofast.ops.group_norm import _op

kernels = interpreted_kernels("group_norm", "_gn_fwd_stats_kernel")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(
    shape, groups, dtype=torch.float32, fmt=None, affine=(True, True), mod=(True, True), seed=0
):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = torch.randn(shape, generator=g) * 3 + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w = torch.randn(c, generator=g) if affine[0] else None
    b = torch.randn(c, generator=g) if affine[1] else None
    scale = torch.randn(n, c, generator=g) * 0.5 if mod[0] else None
    shift = torch.randn(n, c, generator=g) if mod[1] else None
    dy = torch.randn(shape, generator=g)
    return [None if t is None else t.to(dtype) for t in (x, w, b, scale, shift)], dy.to(dtype)


def _run(fn, tensors, groups, activation, dy, **kw):
    """Output and the gradients of <y, dy> wrt every tensor input (None where absent)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    x, w, b, scale, shift = leaves
    y = fn(x, groups, w, b, 1e-5, activation=activation, scale=scale, shift=shift, **kw)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def _rel(a, ref, floor=0.0):
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / max(ref.abs().max().item(), floor)).item()


def _dx_floor(x, dy):
    """Natural scale of dx (|dy| / std(x)): dx of a 2-element group is pure cancellation."""
    return dy.double().abs().max().item() / max(x.double().std().item(), 1e-12)


SHAPES = [
    ((1, 2, 1, 1), 1),
    ((2, 63, 5, 7), 21),  # odd H*W, 3 channels per group
    ((2, 12, 1, 3, 5), 4),  # 5D with T=1
    ((1, 64, 4, 6, 6), 32),  # echo-like temporal GroupNorm (C/32 = 2 channels, T*H*W spatial)
]
NAMES = ("x", "weight", "bias", "scale", "shift")


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("shape", "groups"), SHAPES)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_fp32_forward_and_grads_match_reference(shape, groups, activation):
    tensors, dy = _inputs(shape, groups, seed=len(shape) * 100 + groups)
    y, grads = _run(group_norm, tensors, groups, activation, dy, backend="triton")
    y_ref, grads_ref = _run(group_norm_reference, tensors, groups, activation, dy)
    assert y.dtype == torch.float32 and y.shape == tensors[0].shape and y.is_contiguous()
    assert _rel(y, y_ref) <= 1e-5
    for name, gr, gr_ref in zip(NAMES, grads, grads_ref):
        floor = _dx_floor(tensors[0], dy) if name == "x" else 0.0
        assert _rel(gr, gr_ref, floor) <= 1e-5, name


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("shape", "groups", "fmt"),
    [((2, 16, 5, 7), 4, torch.channels_last), ((1, 32, 3, 4, 5), 8, torch.channels_last_3d)],
)
def test_channels_last(shape, groups, fmt):
    tensors, dy = _inputs(shape, groups, fmt=fmt, seed=7)
    y, grads = _run(group_norm, tensors, groups, "silu", dy, backend="triton")
    y_ref, grads_ref = _run(group_norm_reference, tensors, groups, "silu", dy)
    assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    assert _rel(y, y_ref) <= 1e-5
    for name, gr, gr_ref in zip(NAMES, grads, grads_ref):
        assert _rel(gr, gr_ref) <= 1e-5, name


def _reference_unit_weight(x, groups, w, b, eps, **kw):
    """The reference with weight=None replaced by constant ones: torch's CPU autograd of
    F.group_norm(weight=None, bias=b) fails ("tensor does not have a device")."""
    if w is None and b is not None:
        w = torch.ones_like(b)
    return group_norm_reference(x, groups, w, b, eps, **kw)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("affine", "mod"),
    [
        ((False, False), (False, False)),
        ((True, False), (False, True)),
        ((False, True), (True, False)),
    ],
)
def test_optional_parameters(affine, mod):
    shape, groups = (2, 8, 3, 5), 2
    tensors, dy = _inputs(shape, groups, affine=affine, mod=mod, seed=3)
    y, grads = _run(group_norm, tensors, groups, "silu", dy, backend="triton")
    y_ref, grads_ref = _run(_reference_unit_weight, tensors, groups, "silu", dy)
    assert _rel(y, y_ref) <= 1e-5
    for name, gr, gr_ref in zip(NAMES, grads, grads_ref):
        assert (gr is None) == (gr_ref is None), name
        if gr is not None:
            assert _rel(gr, gr_ref) <= 1e-5, name


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_multi_chunk_two_stage_reduction(fmt):
    """Several chunks per group and several tiles per chunk (the GPU's split for small N*G)."""
    shape, groups = (1, 8, 3, 7, 9), 2
    tensors, dy = _inputs(shape, groups, fmt=fmt, seed=11)
    x, w, b, scale, shift = tensors
    x = x * 10 + 100  # |mean| >> std: the chunk merge must not lose the variance
    plan = {"block_s": 16, "num_chunks": 5}
    p = kernels.Plan(x, groups, **plan)
    assert p.num_chunks == 4 and p.chunk_s == 48  # S = 189: 4 chunks of 3 tiles (last: 2, ragged)
    y, mean, rstd = kernels.group_norm_fwd(x, groups, w, b, 1e-5, "silu", scale, shift, fmt, **plan)
    y_ref = group_norm_reference(x, groups, w, b, activation="silu", scale=scale, shift=shift)
    assert _rel(y, y_ref) <= 1e-5
    xg = x.double().reshape(1, groups, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        rstd.double(), (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0
    )
    dx, ds, dg = kernels.group_norm_bwd(
        dy, x, mean, rstd, groups, w, b, "silu", scale, shift, **plan
    )
    _, grads_ref = _run(group_norm_reference, [x, w, b, scale, shift], groups, "silu", dy)
    assert _rel(dx, grads_ref[0]) <= 1e-5
    assert _rel(ds, grads_ref[4]) <= 1e-5  # d shift = sum_s dz


class _Refuse:
    """Stands in for a kernel that must not be launched."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} was launched")


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("block_s", [64, 8], ids=["one-tile-group", "looped-group"])
def test_unsplit_groups_take_one_launch_with_the_split_values(block_s, monkeypatch):
    """num_chunks == 1: the fused kernel alone (statistics then y in one program per group),
    whether the group is one tile or several; same y, mean and rstd as the two-stage split."""
    shape, groups = (2, 12, 5, 7), 3  # S = 35, 4 channels per group
    tensors, _ = _inputs(shape, groups, seed=21)
    x, w, b, scale, shift = tensors
    args = (x, groups, w, b, 1e-5, "silu", scale, shift, torch.contiguous_format)
    split = kernels.group_norm_fwd(*args, block_s=8, num_chunks=3)
    for name in ("_gn_fwd_stats_kernel", "_gn_fwd_apply_kernel"):
        monkeypatch.setattr(kernels, name, _Refuse(name))
    assert kernels.Plan(x, groups, block_s=block_s, num_chunks=1).num_chunks == 1
    fused = kernels.group_norm_fwd(*args, block_s=block_s, num_chunks=1)
    for got, want in zip(fused, split):
        assert _rel(got, want) <= 1e-6
    y_ref = group_norm_reference(x, groups, w, b, activation="silu", scale=scale, shift=shift)
    assert _rel(fused[0], y_ref) <= 1e-5


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("rows", [6, 2], ids=["per-sample", "per-video-of-3"])
@pytest.mark.parametrize("plan", [{}, {"block_s": 8, "num_chunks": 3}], ids=["fused", "split"])
@pytest.mark.parametrize("strided", [False, True], ids=["add_contiguous", "add_row_strided"])
def test_input_add_folded_into_the_forward(rows, plan, strided):
    """GroupNorm(x + add) with ``add`` read by the kernels as x is loaded (no pass for the add):
    the one-launch and the split forward, one add row per sample or per 3 samples; an add whose
    rows are strided (a slice of the packed time projections) is read in place, not copied."""
    shape, groups = (6, 12, 5, 7), 3
    tensors, _ = _inputs(shape, groups, seed=31 + rows)
    x, w, b, scale, shift = tensors
    add = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows)) * 2
    add = add[:, 20:32] if strided else add[:, :12].contiguous()
    assert add.is_contiguous() != strided
    fmt = torch.contiguous_format
    with CountOps() as ops:
        y, mean, rstd = kernels.group_norm_fwd(
            x, groups, w, b, 1e-5, "silu", scale, shift, fmt, add=add, **plan
        )
    assert ops.counts["clone"] == 0, ops.counts  # (the interpreter itself runs copy_)
    ref_kw = dict(activation="silu", scale=scale, shift=shift, add=add)
    assert _rel(y, group_norm_reference(x, groups, w, b, **ref_kw)) <= 1e-5
    full = x + add.repeat_interleave(6 // rows, dim=0)[:, :, None, None]
    xg = full.double().reshape(6, groups, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("interpret")
def test_input_add_under_autograd_takes_the_differentiable_path():
    """With gradients wanted, ``x + add`` is formed first and the backward kernels run on it:
    gradients for x, add and the affine match the reference's."""
    shape, groups = (4, 8, 3, 5), 2
    tensors, dy = _inputs(shape, groups, mod=(False, False), seed=41)
    x, w, b, _, _ = tensors
    add = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))

    def run(fn, **kw):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, add)]
        y = fn(leaves[0], groups, leaves[1], leaves[2], activation="silu", add=leaves[3], **kw)
        return y.detach(), torch.autograd.grad(y, leaves, dy)

    y, grads = run(group_norm, backend="triton")
    y_ref, grads_ref = run(group_norm_reference)
    assert _rel(y, y_ref) <= 1e-5
    for name, gr, gr_ref in zip(("x", "weight", "bias", "add"), grads, grads_ref):
        assert _rel(gr, gr_ref, _dx_floor(x, dy) if name == "x" else 0.0) <= 1e-5, name


def _fp16_torch(x, groups, w, b, eps, *, activation, scale, shift):
    """Plain PyTorch with every op in fp16 arithmetic (F.group_norm on fp16 inputs)."""
    y = F.group_norm(x, groups, w, b, eps)
    y = y * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
    return F.silu(y) if activation == "silu" else y


@pytest.mark.usefixtures("interpret")
def test_fp16_error_within_twice_torch_fp16():
    """Kernel (fp16 in/out, fp32 math) vs torch in fp16 arithmetic, both against fp64."""
    shape, groups = (1, 64, 4, 6, 6), 32
    tensors, dy = _inputs(shape, groups, dtype=torch.float16, seed=5)
    y, grads = _run(group_norm, tensors, groups, "silu", dy, backend="triton")
    y16, grads16 = _run(_fp16_torch, tensors, groups, "silu", dy)
    y64, grads64 = _run(
        group_norm_reference, [t.double() for t in tensors], groups, "silu", dy.double()
    )
    assert y.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    assert _rel(y, y64) <= 2 * _rel(y16, y64)
    for name, gr, gr16, gr64 in zip(NAMES, grads, grads16, grads64):
        assert _rel(gr, gr64) <= 2 * _rel(gr16, gr64), name


def test_automatic_choice_on_cpu_without_interpreter_is_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 8, 4, 4)
    assert _op.select(x, 4, activation="silu").name == "torch"
    out = group_norm(x, 4, activation="silu")
    torch.testing.assert_close(out, group_norm_reference(x, 4, activation="silu"))


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64).permute(0, 1, 3, 2)
    with pytest.raises(BackendUnavailable) as err:
        group_norm(x, 4, backend="triton")
    text = str(err.value)
    assert "not CUDA" in text and "TRITON_INTERPRET" in text
    assert "float64" in text and "channels_last" in text
    assert err.value.backend == "triton"


@pytest.mark.usefixtures("interpret")
def test_interpreter_allows_cpu_and_auto_picks_triton():
    x = torch.randn(1, 8, 4, 4)
    assert _op.select(x, 4).name == "triton"
    assert _op.select(x.double(), 4).name == "torch"  # fp64: falls back quietly
    out = group_norm(x, 4, activation="silu", backend="triton")
    torch.testing.assert_close(out, group_norm_reference(x, 4, activation="silu"))


def test_import_echofast_does_not_import_triton():
    import subprocess

    code = "import sys, echofast, echofast.ops, echofast.nn; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- the channels-last rows kernel ---------------------------------------------------------------

ROWS_CASES = [
    # (shape, groups): S ragged over several row tiles (BLOCK_S = 8 for C = 512, G = 32);
    # CG not a power of two; G not a power of two; 5D channels_last_3d
    ((3, 512, 5, 7), 32),
    ((2, 30, 4, 9), 3),
    ((2, 12, 3, 3), 3),
    ((2, 64, 3, 4, 5), 32),
]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("shape", "groups"), ROWS_CASES, ids=str)
@pytest.mark.parametrize("with_add", [False, True], ids=["no_add", "add"])
@pytest.mark.parametrize("chunks", [1, 3], ids=["one-launch", "split"])
def test_rows_kernel_matches_the_reference_and_the_group_kernels(shape, groups, with_add, chunks):
    """Whole-row tiles, in one launch per sample or split into 3 chunks per sample (stats, then
    apply; 4-position tiles so that chunks span several tiles and the last one is ragged)."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    tensors, _ = _inputs(shape, groups, fmt=fmt, seed=len(shape) + groups)
    x, w, b, scale, shift = tensors
    n, c = shape[:2]
    add = None
    if with_add:  # row-strided, one row per sample
        add = (torch.randn(n, c + 9, generator=torch.Generator().manual_seed(3)) * 2)[:, 4 : 4 + c]
    args = (x, groups, w, b, 1e-5, "silu", scale, shift, fmt)
    plan = {"num_chunks": chunks, "block_s": 4 if chunks > 1 else None}
    rows_plan = kernels.RowsPlan(kernels.Plan(x, groups), x, **plan)
    assert rows_plan.num_chunks == chunks
    rows = kernels.group_norm_fwd(*args, add=add, use_rows=True, **plan)
    per_group = kernels.group_norm_fwd(*args, add=add, use_rows=False)
    ref = group_norm_reference(
        x, groups, w, b, activation="silu", scale=scale, shift=shift, add=add
    )
    assert rows[0].is_contiguous(memory_format=fmt)
    assert _rel(rows[0], ref) <= 1e-5
    for got, want in zip(rows, per_group):
        assert _rel(got, want) <= 1e-5
    full = x if add is None else x + add[(...,) + (None,) * (x.dim() - 2)]
    xg = full.double().reshape(n, groups, -1)
    torch.testing.assert_close(rows[1].double(), xg.mean(-1), rtol=1e-5, atol=1e-6)
    var = xg.var(-1, unbiased=False)
    torch.testing.assert_close(rows[2].double(), (var + 1e-5).rsqrt(), rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("chunks", [1, 5], ids=["one-launch", "split"])
def test_rows_kernels_launch_count_and_large_mean(chunks, monkeypatch):
    """One chunk: the rows kernel alone; several: stats + apply and never the one-launch kernel
    (nor a per-group kernel). |mean| >> std over 5 chunks of unequal length: the chunk merge
    keeps the variance."""
    shape, groups = (2, 16, 3, 5, 7), 4  # S = 105: chunks of 24, 24, 24, 24, 9 positions
    tensors, _ = _inputs(shape, groups, fmt=torch.channels_last_3d, seed=41)
    x, w, b, _, _ = tensors
    x = (x * 10 + 100).contiguous(memory_format=torch.channels_last_3d)
    launched = []
    names = [
        "_gn_fwd_rows_kernel",
        "_gn_fwd_rows_stats_kernel",
        "_gn_fwd_rows_apply_kernel",
        "_gn_fwd_fused_kernel",
        "_gn_fwd_stats_kernel",
        "_gn_fwd_apply_kernel",
    ]
    for name in names:
        kernel = getattr(kernels, name)

        class Spy:
            def __getitem__(self, grid, name=name, kernel=kernel):
                launched.append((name, tuple(grid)))
                return kernel[grid]

        monkeypatch.setattr(kernels, name, Spy())
    args = (x, groups, w, b, 1e-5, None, None, None, torch.channels_last_3d)
    y, mean, rstd = kernels.group_norm_fwd(*args, use_rows=True, num_chunks=chunks, block_s=8)
    if chunks == 1:
        assert launched == [("_gn_fwd_rows_kernel", (2,))]
    else:
        assert launched == [
            ("_gn_fwd_rows_stats_kernel", (2, 5)),
            ("_gn_fwd_rows_apply_kernel", (2, 5)),
        ]
    assert _rel(y, group_norm_reference(x, groups, w, b)) <= 1e-5
    xg = x.double().reshape(2, groups, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        rstd.double(), (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0
    )


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("chunks", [1, 3], ids=["one-launch", "split"])
def test_rows_kernels_welford_over_many_positions(chunks):
    """The rows kernels' per-element Welford accumulators over hundreds of positions each
    (S = 1000 in 2-position tiles) with |mean| = 1000 std: the statistics of fp64."""
    shape, groups = (2, 8, 40, 25), 2
    g = torch.Generator().manual_seed(77)
    x = (torch.randn(shape, generator=g) * 0.1 + 100.0).contiguous(
        memory_format=torch.channels_last
    )
    args = (x, groups, None, None, 1e-6, None, None, None, torch.channels_last)
    y, mean, rstd = kernels.group_norm_fwd(*args, use_rows=True, num_chunks=chunks, block_s=2)
    xg = x.double().reshape(2, groups, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-6, atol=0)  # a few fp32 ulps
    torch.testing.assert_close(
        rstd.double(), (xg.var(-1, unbiased=False) + 1e-6).rsqrt(), rtol=1e-4, atol=0
    )
    assert _rel(y, group_norm_reference(x.double(), groups, eps=1e-6)) <= 1e-4


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("chunks", [1, 3], ids=["one-launch", "split"])
@pytest.mark.parametrize(
    "channels, groups, dense",
    [(8, 2, False), (48, 4, False), (96, 2, False), (32, 2, True), (96, 3, True), (64, 1, True)],
    ids=["cg4", "cg12", "cg48", "cg16", "cg32", "cg64-one-group"],
)
def test_rows_kernels_moment_forms(channels, groups, dense, chunks, monkeypatch):
    """The rows kernels' two forms of the statistics: per-tile moments (CG not a multiple of 16:
    4, 12, 48: not a power of two) and per-element Welford with contiguous columns (DENSE: CG a
    power of two and a multiple of 16). Every one over |mean| = 100 std, S = 37 in 4-position
    tiles (a ragged last tile, unequal chunks), with a time-embedding add, against fp64."""
    shape = (2, channels, 37, 1)
    g = torch.Generator().manual_seed(channels + groups)
    x = torch.randn(shape, generator=g) * 0.5 + 50.0
    add = torch.randn(2, channels, generator=g)
    w, b = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    seen = []
    for name in ("_gn_fwd_rows_kernel", "_gn_fwd_rows_stats_kernel", "_gn_fwd_rows_apply_kernel"):
        kernel = getattr(kernels, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel):
                def launch(*args, **kw):
                    seen.append(kw["DENSE"])
                    return kernel[grid](*args, **kw)

                return launch

        monkeypatch.setattr(kernels, name, Spy())
    args = (x_cl, groups, w, b, 1e-5, None, None, None, torch.channels_last)
    y, mean, rstd = kernels.group_norm_fwd(
        *args, add=add, use_rows=True, num_chunks=chunks, block_s=4
    )
    assert seen == [dense] * (1 if chunks == 1 else 2)
    h = x.double() + add.double()[:, :, None, None]
    hg = h.reshape(2, groups, -1)
    torch.testing.assert_close(mean.double(), hg.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        rstd.double(), (hg.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4, atol=0
    )
    ref = F.group_norm(h, groups, w.double(), b.double(), 1e-5)
    assert _rel(y, ref) <= 1e-5


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("use_rows", [True, False], ids=["rows", "per-group"])
@pytest.mark.parametrize("chunks", [1, 3], ids=["one-launch", "split"])
def test_forward_eps_on_a_low_variance_input(use_rows, chunks):
    """var(x) ~ 1e-4 (x·1e-2 + 0.5), eps = 1e-5: eps moves rstd by ~5%, so rstd = 1/sqrt(var +
    eps) must add eps itself, once (elsewhere var >= 1e-2 hides eps under the tolerance). The
    rows kernels, one launch and split (stats, then apply from the merged partials), and the
    per-group kernels on the same channels-last input, against fp64 F.group_norm."""
    shape, groups, eps = (2, 16, 4, 6), 4, 1e-5  # S = 24: 3 chunks of 8 positions when split
    tensors, _ = _inputs(shape, groups, mod=(False, False), seed=61)
    _, w, b, _, _ = tensors
    g = torch.Generator().manual_seed(62)
    x = (torch.randn(shape, generator=g) * 1e-2 + 0.5).contiguous(memory_format=torch.channels_last)
    plan = {"num_chunks": chunks, "block_s": 4 if chunks > 1 else None}
    p = kernels.Plan(x, groups, **plan)
    assert (kernels.RowsPlan(p, x, **plan) if use_rows else p).num_chunks == chunks
    args = (x, groups, w, b, eps, None, None, None, torch.channels_last)
    y, mean, rstd = kernels.group_norm_fwd(*args, use_rows=use_rows, **plan)
    var = x.double().reshape(2, groups, -1).var(-1, unbiased=False)
    assert ((var + eps / 10).rsqrt() / (var + eps).rsqrt()).min() > 1.03  # eps matters here
    torch.testing.assert_close(rstd.double(), (var + eps).rsqrt(), rtol=1e-5, atol=0)
    y_ref = F.group_norm(x.double(), groups, w.double(), b.double(), eps)
    assert _rel(y, y_ref) <= 1e-5


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rows_kernel_half_precision(dtype):
    tensors, _ = _inputs((4, 64, 6, 6), 32, dtype=dtype, fmt=torch.channels_last, seed=9)
    x, w, b, scale, shift = tensors
    args = (x, 32, w, b, 1e-5, None, None, None, torch.channels_last)
    y = kernels.group_norm_fwd(*args, use_rows=True)[0]
    ref = group_norm_reference(x.float(), 32, w.float(), b.float())
    assert y.dtype == dtype
    assert _rel(y, ref) <= {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype] * 2


@pytest.mark.usefixtures("interpret")
def test_rows_kernel_choice(monkeypatch):
    """Chosen only for channels-last x and y on a GPU (never on CPU): one launch when the N
    samples fill its multiprocessors, else about PROGRAMS_PER_SM programs per multiprocessor,
    at most MAX_ROW_PARTIALS // BLOCK_G chunks, unless the per-group kernel needs one launch
    and reads whole sectors or a small tensor; forcing it on a channels-first tensor is an
    error."""
    x = torch.randn(2, 64, 4, 4)
    with pytest.raises(ValueError, match="channels-last"):
        kernels.group_norm_fwd(
            x, 32, None, None, 1e-5, None, None, None, torch.contiguous_format, use_rows=True
        )
    p = kernels.Plan(x, 32)
    cl = x.contiguous(memory_format=torch.channels_last)
    sx = kernels.ncs_strides(cl)
    assert kernels.RowsPlan.of(p, sx, sx, cl) is None  # CPU
    frames = torch.empty(8, 320, 16, 16)
    rows = kernels.RowsPlan(kernels.Plan(frames, 32), frames)
    assert (rows.BLOCK_G, rows.BLOCK_CG, rows.BLOCK_S, rows.num_warps) == (32, 16, 8, 8)
    # as on an H100/H200 (132 multiprocessors)
    monkeypatch.setattr(kernels, "multiprocessors", lambda t: 132)
    monkeypatch.setattr(kernels, "target_programs", lambda t: 132 * kernels.PROGRAMS_PER_SM)
    frames = torch.empty(320, 128, 16, 16).contiguous(memory_format=torch.channels_last)
    sx = kernels.ncs_strides(frames)
    assert kernels.RowsPlan.of(kernels.Plan(frames, 32), sx, sx, frames).num_chunks == 1
    videos = torch.empty(5, 128, 64, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    sx = kernels.ncs_strides(videos)
    split = kernels.RowsPlan.of(kernels.Plan(videos, 32), sx, sx, videos)
    # 528 programs wanted, 106 chunks per sample: capped at 2048 // 32 = 64 chunks of 256 rows
    assert (split.BLOCK_S, split.num_chunks, split.chunk_s, split.BLOCK_K) == (32, 64, 256, 64)
    videos = torch.empty(40, 128, 64, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    sx = kernels.ncs_strides(videos)
    split = kernels.RowsPlan.of(kernels.Plan(videos, 32), sx, sx, videos)
    assert (split.num_chunks, split.chunk_s) == (14, 1184)
    sx = kernels.ncs_strides(videos.contiguous())
    assert kernels.RowsPlan.of(kernels.Plan(videos, 32), sx, sx, videos) is None
    # the per-group kernel's one launch is kept for small tensors (the LIDM at one image) and for
    # groups of whole 32-byte sectors (512 channels in half precision)
    for shape, dtype in (((1, 128, 16, 16), torch.float32), ((40, 512, 64, 2, 2), torch.float16)):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        t = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
        sx = kernels.ncs_strides(t)
        assert kernels.Plan(t, 32).num_chunks == 1
        assert kernels.RowsPlan.of(kernels.Plan(t, 32), sx, sx, t) is None, shape


@pytest.mark.usefixtures("interpret")
def test_flat_input_runs_the_kernels():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 12, generator=g, requires_grad=True)
    w = torch.randn(12, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True)
    y = group_norm(x, 4, w, b, activation="silu", backend="triton")
    ref = F.silu(F.group_norm(x, 4, w, b))
    assert y.shape == (5, 12)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(y.square().sum(), (x, w, b))
    expected = torch.autograd.grad(ref.square().sum(), (x, w, b))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---- backward split, strided parameters and inputs, the add path under autograd ----------------


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("shape", "groups", "fmt", "plan"),
    [
        ((2, 9, 5, 7), 3, torch.channels_last, {"block_s": 4, "num_chunks": 3}),
        ((1, 6, 3, 11), 2, torch.contiguous_format, {"block_s": 8, "num_chunks": 5}),
    ],
    ids=["cl-3-chunks", "contiguous-5-chunks"],
)
def test_backward_split_into_unequal_chunks(shape, groups, fmt, plan):
    """The backward kernels over a number of chunks that is not a power of two (the partials'
    [BLOCK_K] tile is masked), a ragged last chunk and tile, dy in the other layout than x:
    dx, ds = sum dz and dg = sum dz * xhat against fp64 autograd of the reference."""
    tensors, dy = _inputs(shape, groups, fmt=fmt, seed=71)
    x, w, b, scale, shift = tensors
    p = kernels.Plan(x, groups, **plan)
    assert p.num_chunks == plan["num_chunks"] and p.num_chunks * p.chunk_s > p.S
    y, mean, rstd = kernels.group_norm_fwd(x, groups, w, b, 1e-5, "silu", scale, shift, fmt, **plan)
    dy_other = dy.contiguous() if fmt == torch.channels_last else dy
    dx, ds, dg = kernels.group_norm_bwd(
        dy_other, x, mean, rstd, groups, w, b, "silu", scale, shift, **plan
    )
    _, ref = _run(group_norm_reference, [t.double() for t in tensors], groups, "silu", dy.double())
    assert dx.is_contiguous(memory_format=fmt)
    assert _rel(dx, ref[0], _dx_floor(x, dy)) <= 1e-5
    assert _rel(ds, ref[4]) <= 1e-5  # d shift
    assert _rel(dg * w + ds * b, ref[3]) <= 1e-5  # d scale = dg * w + ds * b


@pytest.mark.usefixtures("interpret")
def test_strided_parameters_are_read_as_their_values():
    """weight/bias views with a step and (N, C) modulation that is a transposed (C, N) tensor:
    the kernels read the values, not the storage order."""
    shape, groups = (3, 8, 3, 5), 4
    tensors, dy = _inputs(shape, groups, seed=81)
    g = torch.Generator().manual_seed(82)
    x = tensors[0]
    w, b = torch.randn(2 * 8, generator=g)[::2], torch.randn(3 * 8, generator=g)[1::3]
    scale = torch.randn(8, 3, generator=g).t() * 0.5
    shift = torch.randn(8, 3, generator=g).t()
    assert not any(t.is_contiguous() for t in (w, b, scale, shift))
    strided = [x, w, b, scale, shift]
    y, grads = _run(group_norm, strided, groups, "silu", dy, backend="triton")
    y_ref, grads_ref = _run(group_norm_reference, strided, groups, "silu", dy)
    assert _rel(y, y_ref) <= 1e-5
    for name, gr, gr_ref in zip(NAMES, grads, grads_ref):
        floor = _dx_floor(x, dy) if name == "x" else 0.0
        assert _rel(gr, gr_ref, floor) <= 1e-5, name


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_input_add_with_strided_channels(fmt):
    """An add whose channels are not adjacent (a transposed (C, M) tensor), with the fused and
    the split forward, contiguous and channels-last x: the same y as the reference and y in
    x's memory format."""
    shape, groups = (4, 6, 3, 5), 3
    tensors, _ = _inputs(shape, groups, fmt=fmt, seed=91)
    x, w, b, scale, shift = tensors
    add = torch.randn(6, 2, generator=torch.Generator().manual_seed(92)).t() * 2
    assert add.stride(1) != 1
    ref = group_norm_reference(
        x, groups, w, b, activation="silu", scale=scale, shift=shift, add=add
    )
    for plan in ({}, {"block_s": 4, "num_chunks": 3}):
        y = kernels.group_norm_fwd(
            x, groups, w, b, 1e-5, "silu", scale, shift, fmt, add=add, use_rows=False, **plan
        )[0]
        assert _rel(y, ref) <= 1e-5, plan
    with torch.no_grad():
        y = group_norm(
            x, groups, w, b, activation="silu", scale=scale, shift=shift, add=add, backend="triton"
        )
    assert y.is_contiguous(memory_format=fmt)
    assert _rel(y, ref) <= 1e-5


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_input_add_under_autograd_keeps_x_dtype_and_reaches_add_alone(dtype):
    """Only ``add`` (fp32) wants a gradient, x is half precision: y keeps x's dtype and the
    gradient of add matches the reference's (x + add formed first, as under autograd)."""
    shape, groups = (4, 8, 3, 5), 2
    tensors, dy = _inputs(shape, groups, dtype=dtype, mod=(False, False), seed=101)
    x, w, b, _, _ = tensors
    add = torch.randn(2, 8, generator=torch.Generator().manual_seed(102))

    def run(fn, **kw):
        leaf = add.clone().requires_grad_()
        y = fn(x, groups, w, b, activation="silu", add=leaf, **kw)
        return y, torch.autograd.grad(y, leaf, dy)[0]

    y, grad = run(group_norm, backend="triton")
    y_ref, grad_ref = run(group_norm_reference)
    assert y.dtype == dtype and grad.dtype == torch.float32
    tol = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype] * 2
    assert _rel(y, y_ref) <= tol
    assert _rel(grad, grad_ref) <= 4 * tol


# ---- launch plans ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "groups", "ask", "block_c", "block_s", "chunk_s"),
    [
        ((1, 4, 33), 2, {"block_s": 16, "num_chunks": 2}, 2, 16, 32),
        ((1, 4, 33), 1, {"num_chunks": 1}, 4, 64, 64),
        ((2, 12, 5, 7), 3, {"num_chunks": 9}, 4, 64, 64),
        ((1, 2048, 3, 3), 1, {"num_chunks": 1}, 2048, 2, 10),
        ((1, 8, 100), 8, {"block_s": 8, "num_chunks": 3}, 1, 8, 40),
    ],
)
def test_plan_tiles_and_chunks(shape, groups, ask, block_c, block_s, chunk_s):
    """BLOCK_C = next_pow2(C/G); BLOCK_S = MAX_TILE // BLOCK_C capped at next_pow2(S) (at least
    1); a requested split gives that many chunks of whole tiles unless S has fewer tiles."""
    p = kernels.Plan(torch.empty(shape), groups, **ask)
    want_chunks = -(-p.S // chunk_s)
    assert (p.BLOCK_C, p.BLOCK_S, p.chunk_s, p.num_chunks) == (
        block_c,
        block_s,
        chunk_s,
        want_chunks,
    )
    assert p.num_chunks <= ask["num_chunks"] and p.chunk_s % p.BLOCK_S == 0
    assert p.BLOCK_K == 1 << (p.num_chunks - 1).bit_length()
    assert p.grid == (shape[0] * groups, p.num_chunks)
    assert p.inv_count == 1.0 / (shape[1] // groups * p.S)


def test_rows_plan_choice_at_its_boundaries(monkeypatch):
    """RowsPlan.of at each limit: a padded row of exactly MAX_TILE channels fits; N equal to the
    multiprocessors is one launch; y channels-first is never rows; a tensor of exactly
    ROWS_SPLIT_MIN_BYTES is not small; whole sectors keep the per-group kernel only where that
    kernel needs a single launch."""
    sms = {"n": 4}
    monkeypatch.setattr(kernels, "multiprocessors", lambda t: sms["n"])
    monkeypatch.setattr(kernels, "target_programs", lambda t: sms["n"] * kernels.PROGRAMS_PER_SM)

    def choice(shape, groups, dtype=torch.float32, y_format=None):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        t = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
        sy = kernels.ncs_strides(torch.empty(shape) if y_format else t)
        return kernels.RowsPlan.of(kernels.Plan(t, groups), kernels.ncs_strides(t), sy, t)

    assert choice((4, 4096, 1, 2), 32).num_chunks == 1  # 32 x 128 = MAX_TILE
    assert choice((4, 8192, 1, 2), 32) is None
    assert choice((4, 64, 8, 8), 32).num_chunks == 1  # N == multiprocessors
    assert choice((4, 64, 8, 8), 32, y_format=torch.contiguous_format) is None
    sms["n"] = 132
    monkeypatch.setattr(kernels, "target_programs", lambda t: 1)
    exact = choice((1, 64, 128, 128), 32)  # 4 MiB, one per-group launch, 8-byte group rows
    assert exact is not None and exact.num_chunks == 1
    assert choice((1, 64, 128, 127), 32) is None  # just under 4 MiB
    monkeypatch.setattr(kernels, "target_programs", lambda t: 132 * kernels.PROGRAMS_PER_SM)
    wide = (2, 512, 16, 16, 16)  # 16 fp16 channels per group: whole sectors, but a split plan
    t = torch.empty(wide)
    assert kernels.Plan(t, 32).num_chunks > 1
    assert choice(wide, 32, torch.float16).num_chunks > 1


@pytest.mark.parametrize(
    ("shape", "groups", "ask", "block_s", "chunks", "chunk_s"),
    [
        ((1, 4, 33, 1), 2, {"block_s": 16, "num_chunks": 2}, 16, 2, 32),
        ((2, 12, 5, 7), 3, {"num_chunks": 1}, 64, 1, 64),
        ((1, 64, 300, 1), 32, {"num_chunks": 3}, 64, 3, 128),
    ],
)
def test_rows_plan_tiles_and_chunks(shape, groups, ask, block_s, chunks, chunk_s):
    """Row tiles of BLOCK_G x BLOCK_CG channels and MAX_TILE // that positions (capped at
    next_pow2(S)); the positions split into the requested chunks of whole tiles."""
    t = torch.empty(shape)
    rows = kernels.RowsPlan(kernels.Plan(t, groups), t, **ask)
    assert (rows.BLOCK_S, rows.num_chunks, rows.chunk_s) == (block_s, chunks, chunk_s)
    assert rows.BLOCK_K == 1 << (rows.num_chunks - 1).bit_length()


@pytest.mark.usefixtures("interpret")
def test_input_add_without_grad_mode_is_folded_into_the_kernels():
    """Parameters that require grad but ``torch.no_grad()``: no autograd, so ``add`` is still read
    by the kernels (no ``x + add`` tensor) and y is the reference's."""
    shape, groups = (4, 8, 3, 5), 2
    tensors, _ = _inputs(shape, groups, mod=(False, False), seed=111)
    x, w, b, _, _ = tensors
    w.requires_grad_()
    add = torch.randn(2, 8, generator=torch.Generator().manual_seed(112))
    with torch.no_grad(), CountOps() as ops:
        y = group_norm(x, groups, w, b, activation="silu", add=add, backend="triton")
    assert ops.counts["add"] == 0, ops.counts
    with torch.no_grad():
        assert _rel(y, group_norm_reference(x, groups, w, b, activation="silu", add=add)) <= 1e-5
