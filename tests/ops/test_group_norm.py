"""group_norm reference vs an independent fp64 computation; shapes, layouts, dtypes, errors."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from echofast.ops import group_norm, group_norm_reference


def _oracle(x, g, weight, bias, eps, activation, scale, shift):
    """Mean/variance written out in fp64 — no F.group_norm."""
    n, c = x.shape[:2]
    xd = x.double().reshape(n, g, -1)
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = ((xd - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    extra = (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(c, *extra) + bias.double().reshape(c, *extra)
    if scale is not None:
        y = y * (1 + scale.double().reshape(n, c, *extra)) + shift.double().reshape(n, c, *extra)
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y


SHAPES = [
    ((1, 2, 1, 1), 1),
    ((2, 63, 5, 7), 21),
    ((3, 32, 9, 11), 8),
    ((2, 64, 1, 4, 4), 32),
    ((1, 64, 8, 16, 16), 32),
    ((2, 12, 3, 5, 7), 4),
]


@pytest.mark.parametrize(("shape", "groups"), SHAPES)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("modulated", [False, True])
def test_matches_fp64_oracle(shape, groups, activation, modulated):
    """Within 1e-5 of the output's scale, or twice the error of fp32 torch.nn.functional (a group
    of two close values is ill-conditioned in fp32 for every implementation)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, activation, modulated)).encode()))
    n, c = shape[:2]
    extra = (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=g) * 3 + 1
    w = torch.randn(c, generator=g)
    b = torch.randn(c, generator=g)
    scale = torch.randn(n, c, generator=g) if modulated else None
    shift = torch.randn(n, c, generator=g) if modulated else None
    out = group_norm(x, groups, w, b, 1e-5, activation=activation, scale=scale, shift=shift)
    ref = _oracle(x, groups, w, b, 1e-5, activation, scale, shift)
    torch_fp32 = F.group_norm(x, groups, w, b, 1e-5)
    if modulated:
        torch_fp32 = torch_fp32 * (1 + scale.reshape(*scale.shape, *extra)) + shift.reshape(
            *shift.shape, *extra
        )
    if activation == "silu":
        torch_fp32 = F.silu(torch_fp32)
    assert out.dtype == x.dtype and out.shape == x.shape
    error = (out.double() - ref).abs().max().item()
    torch_error = (torch_fp32.double() - ref).abs().max().item()
    assert error <= max(1e-5 * ref.abs().max().item(), 2 * torch_error)


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d])
def test_memory_format_preserved(fmt):
    shape = (2, 16, 5, 6) if fmt == torch.channels_last else (2, 16, 3, 5, 6)
    x = torch.randn(shape).contiguous(memory_format=fmt)
    out = group_norm(x, 4, activation="silu")
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, group_norm(x.contiguous(), 4, activation="silu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_rounding(dtype):
    x = torch.randn(2, 32, 6, 6).to(dtype)
    w, b = torch.randn(32).to(dtype), torch.randn(32).to(dtype)
    out = group_norm(x, 8, w, b, activation="silu")
    assert out.dtype == dtype
    ref = _oracle(x, 8, w, b, 1e-5, "silu", None, None)
    eps = torch.finfo(dtype).eps
    assert (out.double() - ref).abs().max().item() <= 2 * eps * ref.abs().max().item()


def test_gradients_flow_to_every_input():
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)

    def f(x, w, b, s, t):
        return group_norm_reference(x, 3, w, b, 1e-5, activation="silu", scale=s, shift=t)

    assert torch.autograd.gradcheck(f, (x, w, b, s, t))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(x=torch.randn(6)), r"\(N, C\) or \(N, C, \*spatial\), got shape \(6,\)"),
        (dict(num_groups=4), "num_groups=4 must divide C=6"),
        (dict(weight=torch.ones(5)), r"weight must have shape \(6,\), got \(5,\)"),
        (dict(scale=torch.ones(6)), r"scale must have shape \(2, 6\), got \(6,\)"),
        (dict(activation="gelu"), "activation must be one of"),
        (dict(add=torch.ones(3, 6)), r"add must be \(M, 6\) with M dividing N = 2, got \(3, 6\)"),
        (dict(add=torch.ones(2, 5)), r"add must be \(M, 6\)"),
        (dict(num_groups=0), "num_groups=0 must divide C=6"),
        (dict(add=torch.ones(0, 6)), r"add must be \(M, 6\) .*got \(0, 6\)"),
        (dict(add=torch.ones(2, 6, 1)), r"add must be \(M, 6\) .*got \(2, 6, 1\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = dict(x=torch.randn(2, 6, 3, 3), num_groups=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        group_norm(**args)


@pytest.mark.parametrize(("n", "c", "groups"), [(2, 6, 3), (5, 9, 3), (1, 4, 1), (3, 8, 2)])
def test_flat_input_is_normalised_as_torch_does(n, c, groups):
    """(N, C), which torch.nn.GroupNorm takes: normalised as (N, C, 1), shape kept."""
    g = torch.Generator().manual_seed(n * c + groups)
    x = torch.randn(n, c, generator=g) * 3 + 1
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    scale, shift = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    out = group_norm(x, groups, w, b, activation="silu", scale=scale, shift=shift)
    assert out.shape == (n, c) and out.is_contiguous()
    ref = _oracle(x, groups, w, b, 1e-5, "silu", scale, shift)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    torch.testing.assert_close(
        group_norm(x, groups, w, b), torch.nn.functional.group_norm(x, groups, w, b)
    )


@pytest.mark.parametrize("rows", [6, 2, 1], ids=["per-sample", "per-video-of-3", "shared"])
def test_input_add_is_added_before_normalising(rows):
    """``add`` (M, C): row n // (N / M) added to sample n before the statistics (a resnet's
    time embedding, per sample, per video of N / M frames, or shared); gradients reach it."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(6, 8, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    add = torch.randn(rows, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    y = group_norm(x, 4, w, None, activation="silu", add=add)
    full = add.repeat_interleave(6 // rows, dim=0)[:, :, None, None]
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x + full, 4, w))
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda xx, aa: group_norm(xx, 4, w, None, activation="silu", add=aa), (x, add)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounds_once(dtype):
    """A float16/bfloat16 input with an ``add``, affine and modulation is computed in fp32 and
    rounded once: within one unit in the last place of the fp64 result, where adding ``add``, or
    modulating, in the input's dtype is off by tens of them."""
    g = torch.Generator().manual_seed(11)
    n, c, frames = 6, 12, 3
    x = (torch.randn(n, c, 5, 7, generator=g) * 2 + 0.5).to(dtype)
    add = (torch.randn(n // frames, c, generator=g) * 4).to(dtype)
    w, b = (torch.randn(c, generator=g).to(dtype) for _ in range(2))
    scale, shift = (torch.randn(n, c, generator=g).to(dtype) for _ in range(2))
    out = group_norm(
        x, 4, w, b, activation="silu", scale=scale, shift=shift, add=add, backend="torch"
    )
    full = x.double() + add.double().repeat_interleave(frames, dim=0)[:, :, None, None]
    ref = _oracle(full, 4, w, b, 1e-5, "silu", scale, shift)
    assert out.dtype == dtype
    ulp = torch.finfo(dtype).eps * ref.abs() + 1e-5
    assert ((out.double() - ref).abs() <= ulp).all()
