"""``bias_residual``: a residual block's epilogue, ``out = residual + weight·(y + bias) + bias2``.

y, residual and out are (N, C, *spatial); bias and bias2 are (C,) per-channel vectors (the biases
of the convolutions that produced y and residual, run without them); weight is a one-element
tensor (an AlphaBlender's ``1 - a``). Every term but y is optional.

Backends: ``triton`` (one fused pass, :mod:`echofast.kernels.bias_residual`; channels-last
tensors on CUDA, or CPU under ``TRITON_INTERPRET=1``; inference only), then ``torch`` (the
reference: PyTorch ops in y's dtype, differentiable).
"""

from __future__ import annotations

import torch

from ._checks import check_devices
from ._dispatch import Backend, Op
from ._triton import interpret, kernel_reasons

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) as (1, C, 1, ...) for broadcasting over ``like`` (N, C, *spatial)."""
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def _check(y, residual, bias, bias2, weight, out) -> None:
    if y.dim() < 2:
        raise ValueError(f"bias_residual: y must be (N, C, *spatial), got {tuple(y.shape)}")
    c = y.shape[1]
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and t.shape != y.shape:
            raise ValueError(
                f"bias_residual: {name} must have y's shape {tuple(y.shape)}, got {tuple(t.shape)}"
            )
    for name, t in (("bias", bias), ("bias2", bias2)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"bias_residual: {name} must be ({c},), got {tuple(t.shape)}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"bias_residual: weight must be a one-element tensor, got {type(weight).__name__}"
        )
    if weight is not None and weight.numel() != 1:
        raise ValueError(f"bias_residual: weight must have one element, got {tuple(weight.shape)}")
    if out is not None and not out.is_floating_point():
        raise ValueError(
            f"bias_residual: out must be floating point, got {out.dtype} {tuple(out.shape)}"
        )
    check_devices(
        "bias_residual", "y", y, residual=residual, bias=bias, bias2=bias2, weight=weight, out=out
    )


def bias_residual_reference(
    y: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch ops in y's dtype (each rounded, as the unfused modules compute it); the result is
    copied into ``out`` when given (without autograd), else returned as a new tensor in y's
    dtype (a residual of a wider dtype is added in its dtype, then the sum rounded once)."""
    v = y if bias is None else y + _channel(bias.to(y.dtype), y)
    if weight is not None:
        v = v * weight.to(y.dtype).reshape(())
    if residual is not None:
        v = residual + v
    if bias2 is not None:
        v = v + _channel(bias2.to(v.dtype), y)
    if out is None or torch.is_grad_enabled():
        return v.to(y.dtype)
    return out.copy_(v)


def _torch_reasons(y, **kwargs) -> list[str]:
    return [] if y.is_floating_point() else [f"y must be floating point, got {y.dtype}"]


def _rows(t: torch.Tensor) -> bool:
    """Whether t (N, C, *spatial) is channels-last in memory: (positions, C) rows, unit stride."""
    return t.movedim(1, -1).is_contiguous()


def _triton_reasons(y, *, residual=None, bias=None, bias2=None, weight=None, out=None):
    reasons = []
    if not y.is_cuda and not interpret():
        reasons.append(f"y is on {y.device}, not CUDA (set TRITON_INTERPRET=1 to run on CPU)")
    if y.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {y.dtype} unsupported (float32/float16/bfloat16 only)")
    for name, t in (("y", y), ("residual", residual), ("out", out)):
        if t is not None and not _rows(t):
            reasons.append(f"{name} is not channels-last (strides {t.stride()})")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (y, residual, bias, bias2, weight)
    ):
        reasons.append("autograd: the Triton epilogue is forward only (inference)")
    return kernel_reasons(reasons, "bias_residual", "_bias_residual_kernel", y.is_cuda)


def bias_residual_triton(
    y: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``triton`` backend: one pass into ``out`` (default: y's storage)."""
    from echofast.kernels.bias_residual import bias_residual_fwd, rows_view

    out = y if out is None else out
    bias_residual_fwd(
        rows_view(y),
        rows_view(out),
        residual=None if residual is None else rows_view(residual),
        bias=None if bias is None else bias.contiguous(),
        bias2=None if bias2 is None else bias2.contiguous(),
        weight=weight,
    )
    return out


def _example(device: str) -> tuple[tuple, dict]:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    y = torch.empty(4, 32, 5, 5, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    return (y,), {"residual": torch.empty_like(y), "bias": torch.empty(32, device=device)}


_op = Op(
    "bias_residual",
    [
        Backend(
            "triton",
            bias_residual_triton,
            _triton_reasons,
            "one Triton pass over channels-last rows, fp32 math (forward only)",
            traceable=False,
        ),
        Backend(
            "torch",
            bias_residual_reference,
            _torch_reasons,
            "PyTorch broadcasts and adds in y's dtype (reference)",
        ),
    ],
    _example,
)


def bias_residual(
    y: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``residual + weight·(y + bias) + bias2``, written into ``out`` without autograd.

    Args:
        y: (N, C, *spatial) floating point: a convolution's output without its bias.
        residual: y's shape, or None.
        bias, bias2: (C,) or None, added per channel before / after the weight.
        weight: one element, or None.
        out: where to write the result without autograd (y or residual: temporaries of the
            caller); None: y's storage (triton) or a new tensor (torch).
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        The result, y's shape and dtype (``out`` itself when it is written).

    Raises:
        ValueError: shapes do not match (residual/out vs y, biases vs C, weight not one element).
    """
    _check(y, residual, bias, bias2, weight, out)
    return _op(
        y, residual=residual, bias=bias, bias2=bias2, weight=weight, out=out, backend=backend
    )
