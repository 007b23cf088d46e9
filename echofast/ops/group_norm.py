"""``group_norm``: GroupNorm with optional time-embedding modulation and SiLU, as one op.

    y = GroupNorm(x) * weight + bias          (statistics over C/G channels x all spatial dims)
    y = y * (1 + scale) + shift               (optional; scale, shift: (N, C))
    y = silu(y)                               (optional)

Backends: ``torch`` (the reference below). Fused Triton kernels plug in ahead of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import Backend, Op

ACTIVATIONS = (None, "silu")


def _check(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> None:
    if x.dim() < 3:
        raise ValueError(f"group_norm: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
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


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


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
) -> torch.Tensor:
    """Plain PyTorch: ``F.group_norm`` in fp32 (fp64 stays fp64), modulation, activation."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
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


def _example(device: str) -> tuple[tuple, dict]:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    x = torch.empty(1, 64, 8, 8, device=device, dtype=dtype)
    return (x, 32), {"activation": "silu"}


_op = Op(
    "group_norm",
    [
        Backend(
            "torch",
            group_norm_reference,
            _torch_reasons,
            "F.group_norm in fp32 + modulation + activation (reference)",
        )
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
    backend: str | None = None,
) -> torch.Tensor:
    """GroupNorm (+ ``y * (1 + scale) + shift``) (+ SiLU) of ``x`` (N, C, *spatial).

    Args:
        x: (N, C, *spatial): 4D (N, C, H, W) or 5D (N, C, T, H, W); a group spans all spatial dims.
        num_groups: G, dividing C.
        weight, bias: (C,) affine parameters, or None.
        eps: added to the variance.
        activation: None or ``"silu"``, applied last.
        scale, shift: (N, C) modulation applied after the affine, or None.
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        Tensor of x's shape, dtype and memory format. Statistics are computed in fp32.
    """
    _check(x, num_groups, weight, bias, activation, scale, shift)
    return _op(
        x,
        num_groups,
        weight,
        bias,
        eps,
        activation=activation,
        scale=scale,
        shift=shift,
        backend=backend,
    )
