"""``group_norm``: GroupNorm with optional time-embedding modulation and SiLU, as one op.

    y = GroupNorm(x + add) * weight + bias    (statistics over C/G channels x all spatial dims;
                                               add: optional per (sample, channel))
    y = y * (1 + scale) + shift               (optional; scale, shift: (N, C))
    y = silu(y)                               (optional)

Backends: ``triton`` (fused kernels in :mod:`echofast.kernels.group_norm`, forward and backward;
CUDA, or CPU under ``TRITON_INTERPRET=1``), then ``torch`` (the reference below).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._checks import check_devices, check_eps
from ._dispatch import Backend, Op
from ._triton import interpret, kernel_reasons

ACTIVATIONS = (None, "silu")


def _check(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    add: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"group_norm: x must be (N, C) or (N, C, *spatial), got shape {tuple(x.shape)}"
        )
    n, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide C={c}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (c,):
            raise ValueError(f"group_norm: {name} must have shape ({c},), got {tuple(p.shape)}")
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None and tuple(p.shape) != (n, c):
            raise ValueError(f"group_norm: {name} must have shape ({n}, {c}), got {tuple(p.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if add is not None and (
        add.dim() != 2 or add.shape[1] != c or add.shape[0] == 0 or n % add.shape[0]
    ):
        raise ValueError(
            f"group_norm: add must be (M, {c}) with M dividing N = {n}, got {tuple(add.shape)}"
        )
    check_devices("group_norm", "x", x, weight=weight, bias=bias, scale=scale, shift=shift, add=add)
    check_eps("group_norm", eps)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def broadcast_add(add: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``add`` (M, C) as a view broadcastable against x (N, C, *spatial): row ``n // (N / M)``
    for sample n (M = N: one row per sample; M = N / T: one per group of T consecutive samples,
    e.g. the frames of one video)."""
    n, m = x.shape[0], add.shape[0]
    rows = add[:, None, :].expand(m, n // m, add.shape[1]).reshape(n, add.shape[1])
    return rows.reshape(*rows.shape, *(1,) * (x.dim() - 2))


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: ``x + add`` and ``F.group_norm`` in fp32 (fp64 stays fp64), modulation,
    activation."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    if add is not None:
        xf = xf + broadcast_add(add.to(acc), x)
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        # the traced strides of xf may differ from those it has when the graph runs, which
        # CPU's native_group_norm refuses (aot_eager); a clone fixes them (inductor plans
        # its own layouts)
        xf = xf.clone(memory_format=_memory_format(x))
    y = F.group_norm(
        xf,
        num_groups,
        None if weight is None else weight.to(acc),
        None if bias is None else bias.to(acc),
        eps,
    )
    extra = (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.to(acc).reshape(*scale.shape, *extra))
    if shift is not None:
        y = y + shift.to(acc).reshape(*shift.shape, *extra)
    if activation == "silu":
        y = F.silu(y, inplace=y is not xf and not y.requires_grad)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.contiguous(memory_format=_memory_format(x))


def _torch_reasons(x: torch.Tensor, *args, **kwargs) -> list[str]:
    if not x.is_floating_point():
        return [f"x must be floating point, got {x.dtype}"]
    return []


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_reasons(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> list[str]:
    """Why the Triton kernels cannot run this call. The checks of the arguments are cached on
    their metadata (device, dtype, rank, layout, ...), never on the tensors themselves: a cache
    keyed by a tensor would keep every input alive. Whether Triton is there, recent enough and
    imported for this device is asked on every call, not cached here."""
    layout_ok = (
        x.dim() not in (3, 4, 5)
        or x.is_contiguous()
        or (_memory_format(x) != torch.contiguous_format)
    )
    params = tuple(
        (name, p.dtype, p.device)
        for name, p in (
            ("weight", weight),
            ("bias", bias),
            ("scale", scale),
            ("shift", shift),
            ("add", add),
        )
        if p is not None
    )
    reasons = _argument_reasons(
        x.device,
        x.dtype,
        x.dim(),
        x.shape[1] if x.dim() >= 2 else 0,
        x.numel() == 0,
        None if layout_ok else x.stride(),
        num_groups,
        activation,
        params,
        interpret(),
    )
    return kernel_reasons(
        list(reasons), "group_norm", "_gn_fwd_stats_kernel", x.device.type == "cuda"
    )


@functools.cache
def _argument_reasons(
    device: torch.device,
    dtype: torch.dtype,
    dim: int,
    channels: int,
    empty: bool,
    bad_strides: tuple[int, ...] | None,
    num_groups: int,
    activation: str | None,
    params: tuple[tuple[str, torch.dtype, torch.device], ...],
    interpreting: bool,
) -> tuple[str, ...]:
    reasons = []
    if device.type != "cuda" and not interpreting:
        reasons.append(f"x is on {device}, not CUDA (set TRITON_INTERPRET=1 to run on CPU)")
    if dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {dtype} unsupported (float32/float16/bfloat16 only)")
    for name, p_dtype, p_device in params:
        if p_dtype not in _TRITON_DTYPES:
            reasons.append(f"{name} dtype {p_dtype} unsupported (float32/float16/bfloat16 only)")
        if p_device != device:
            reasons.append(f"{name} is on {p_device}, x on {device}")
    if dim not in (3, 4, 5):
        reasons.append(f"x must be 3D, 4D or 5D, got {dim}D")
    elif bad_strides is not None:
        reasons.append(
            f"x layout (strides {bad_strides}) is neither contiguous nor "
            "channels_last (4D) / channels_last_3d (5D)"
        )
    if empty:
        reasons.append("x is empty")
    if dim >= 2 and num_groups > 0 and channels // num_groups > 1024:
        reasons.append(f"C/G = {channels // num_groups} channels per group > 1024")
    if activation not in ACTIVATIONS:
        reasons.append(f"activation {activation!r} unsupported")
    return tuple(reasons)


class _GroupNormTriton(torch.autograd.Function):
    """Forward: the fused Triton kernels; backward: the Triton backward kernels (dx, and the
    per-(n, c) sums from which the parameter gradients are formed)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, activation):
        from echofast.kernels.group_norm import group_norm_fwd

        y, mean, rstd = group_norm_fwd(
            x, num_groups, weight, bias, eps, activation, scale, shift, _memory_format(x)
        )
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups = num_groups
        ctx.activation = activation
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _drstd):
        from echofast.kernels.group_norm import group_norm_bwd

        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        if not (dy.is_contiguous() or dy.is_contiguous(memory_format=_memory_format(dy))):
            dy = dy.contiguous(memory_format=_memory_format(x))  # e.g. expanded or permuted
        dx, ds, dg = group_norm_bwd(
            dy, x, mean, rstd, ctx.num_groups, weight, bias, ctx.activation, scale, shift
        )
        need = ctx.needs_input_grad
        one_plus = None if scale is None else 1 + scale.float()
        dw = db = dsc = dsh = None
        if need[1]:
            dw = (dg if one_plus is None else dg * one_plus).sum(0).to(weight.dtype)
        if need[2]:
            db = (ds if one_plus is None else ds * one_plus).sum(0).to(bias.dtype)
        if need[3]:
            dsc = dg if weight is None else dg * weight.float()
            if bias is not None:
                dsc = dsc + ds * bias.float()
            dsc = dsc.to(scale.dtype)
        if need[4]:
            dsh = ds.to(shift.dtype)
        return (dx if need[0] else None), dw, db, dsc, dsh, None, None, None


def group_norm_triton(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``triton`` backend: same contract as :func:`group_norm_reference`, differentiable.

    ``add`` is folded into the forward kernels (added in fp32 as x is loaded: no pass over x for
    it); under autograd ``x + add`` is formed first and differentiated by PyTorch."""
    tensors = (x, weight, bias, scale, shift, add)
    if (
        add is not None
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors)
    ):
        x, add = (x + broadcast_add(add, x)).to(x.dtype), None
    if add is not None:
        from echofast.kernels.group_norm import group_norm_fwd

        y, _, _ = group_norm_fwd(
            x, num_groups, weight, bias, eps, activation, scale, shift, _memory_format(x), add=add
        )
        return y
    y, _, _ = _GroupNormTriton.apply(x, weight, bias, scale, shift, num_groups, eps, activation)
    return y


def _example(device: str) -> tuple[tuple, dict]:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    x = torch.empty(1, 64, 8, 8, device=device, dtype=dtype)
    return (x, 32), {"activation": "silu"}


_op = Op(
    "group_norm",
    [
        Backend(
            "triton",
            group_norm_triton,
            _triton_reasons,
            "fused Triton GroupNorm + modulation + SiLU, fp32 statistics, forward and backward",
            traceable=False,
        ),
        Backend(
            "torch",
            group_norm_reference,
            _torch_reasons,
            "F.group_norm in fp32 + modulation + activation (reference)",
        ),
    ],
    _example,
)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """GroupNorm (+ ``y * (1 + scale) + shift``) (+ SiLU) of ``x`` (+ ``add``) (N, C, *spatial).

    Args:
        x: (N, C, *spatial), e.g. (N, C, L), (N, C, H, W) or (N, C, T, H, W), a group spanning
            all spatial dims; or (N, C), as ``torch.nn.GroupNorm`` takes it (normalised as
            (N, C, 1)).
        num_groups: G, dividing C.
        weight, bias: (C,) affine parameters, or None.
        eps: added to the variance.
        activation: None or ``"silu"``, applied last.
        scale, shift: (N, C) modulation applied after the affine, or None.
        add: (M, C), M dividing N, added to x before normalising (row ``n // (N / M)`` to
            sample n: a resnet's time-embedding projection, one row per sample or per video of
            N / M frames), or None. The Triton backend adds it as x is read.
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        Tensor of x's shape, dtype and memory format. Statistics are computed in fp32.
    """
    _check(x, num_groups, weight, bias, activation, scale, shift, add, eps)
    flat = x.dim() == 2
    y = _op(
        x[..., None] if flat else x,
        num_groups,
        weight,
        bias,
        eps,
        activation=activation,
        scale=scale,
        shift=shift,
        add=add,
        backend=backend,
    )
    return y[..., 0] if flat else y
