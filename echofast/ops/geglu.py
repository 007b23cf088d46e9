"""``geglu``: the gated GELU of a feed-forward, ``x * gelu(gate)``, ``[x, gate] = h.chunk(2, -1)``.

    out[..., c] = h[..., c] * gelu(h[..., D + c])        h (..., 2·D) -> out (..., D)

Backends: ``triton`` (one fused kernel forward, one backward, :mod:`echofast.kernels.geglu`;
CUDA, or CPU under ``TRITON_INTERPRET=1``), then ``torch`` (the reference below: diffusers'
``GEGLU`` after its projection). The Triton launcher takes any layout: it views h as (rows, 2·D)
when the leading dims collapse to one row stride and the last dim has unit stride, and copies h to
a contiguous tensor otherwise (the model's projections always give a contiguous h).

``geglu_linear`` is the projection and the GEGLU together, ``geglu(F.linear(x, weight, bias))``:
``triton`` (one GEMM with the GEGLU in its epilogue, :mod:`echofast.kernels.geglu_linear`; h is
never written; forward only), then ``torch`` (the reference: cuBLAS's GEMM, then :func:`geglu`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import Backend, Op
from ._triton import interpret, kernel_reasons

APPROXIMATIONS = ("none", "tanh")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(h: torch.Tensor, approximate: str) -> None:
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(
            f"geglu: h must be (..., 2·D) with an even last dim, got shape {tuple(h.shape)}"
        )
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def geglu_reference(h: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """Plain PyTorch in h's dtype, as diffusers' ``GEGLU``: ``x * F.gelu(gate)``.

    Without autograd and outside ``torch.compile`` the product is taken in place in gelu's fresh
    output (``gelu(gate).mul_(x)``, the same values: one temporary less).
    """
    d = h.shape[-1] // 2
    x, gate = h[..., :d], h[..., d:]
    g = F.gelu(gate, approximate=approximate)
    if g.requires_grad or torch.compiler.is_compiling():
        return x * g
    return g.mul_(x)


def _torch_reasons(h: torch.Tensor, **kwargs) -> list[str]:
    if not h.is_floating_point():
        return [f"h must be floating point, got {h.dtype}"]
    return []


def _triton_reasons(h: torch.Tensor, *, approximate: str = "none") -> list[str]:
    reasons = []
    if not h.is_cuda and not interpret():
        reasons.append(f"h is on {h.device}, not CUDA (set TRITON_INTERPRET=1 to run on CPU)")
    if h.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {h.dtype} unsupported (float32/float16/bfloat16 only)")
    rows = math.prod(h.shape[:-1])
    if rows >= 2**31:
        reasons.append(f"{rows} rows (>= 2^31: the kernels index rows in int32)")
    return kernel_reasons(reasons, "geglu", "_geglu_fwd_kernel", h.is_cuda)


def _out_shape(h: torch.Tensor) -> tuple[int, ...]:
    return (*h.shape[:-1], h.shape[-1] // 2)


class _GegluTriton(torch.autograd.Function):
    """Forward and backward: the fused Triton kernels. Saves h (as its (rows, 2·D) view) only;
    the backward recomputes gelu(gate) from it."""

    @staticmethod
    def forward(ctx, h, approximate):
        from echofast.kernels.geglu import geglu_fwd, rows_view

        h2 = rows_view(h)
        ctx.save_for_backward(h2)
        ctx.approximate = approximate
        ctx.shape = h.shape
        return geglu_fwd(h2, approximate).view(_out_shape(h))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from echofast.kernels.geglu import geglu_bwd, rows_view

        (h2,) = ctx.saved_tensors
        dh = geglu_bwd(h2, rows_view(dy), ctx.approximate)
        return dh.view(ctx.shape), None


def geglu_triton(h: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """The ``triton`` backend: same contract as :func:`geglu_reference`, differentiable."""
    if h.requires_grad and torch.is_grad_enabled():
        return _GegluTriton.apply(h, approximate)
    from echofast.kernels.geglu import geglu_fwd, rows_view

    return geglu_fwd(rows_view(h), approximate).view(_out_shape(h))


def _example(device: str) -> tuple[tuple, dict]:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    return (torch.empty(2, 16, 128, device=device, dtype=dtype),), {}


_op = Op(
    "geglu",
    [
        Backend(
            "triton",
            geglu_triton,
            _triton_reasons,
            "one fused Triton pass x * gelu(gate) (fp32 math), forward and backward",
            traceable=False,
        ),
        Backend(
            "torch",
            geglu_reference,
            _torch_reasons,
            "x * F.gelu(gate) in h's dtype, as diffusers' GEGLU (reference)",
        ),
    ],
    _example,
)


def geglu(
    h: torch.Tensor, *, approximate: str = "none", backend: str | None = None
) -> torch.Tensor:
    """``x * gelu(gate)`` where ``[x, gate] = h.chunk(2, dim=-1)``.

    Args:
        h: (..., 2·D) floating point, any layout: a feed-forward projection's output.
        approximate: ``"none"`` (exact erf GELU, as diffusers' GEGLU) or ``"tanh"``.
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        (..., D) in h's dtype. The triton backend computes in fp32, rounds once, and returns a
        contiguous tensor.

    Raises:
        ValueError: h's last dim is odd (or h is 0-D), or ``approximate`` is unknown.
    """
    _check(h, approximate)
    return _op(h, approximate=approximate, backend=backend)


# ---- geglu_linear -------------------------------------------------------------------------------


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if (
        x.dim() == 0
        or weight.dim() != 2
        or weight.shape[0] % 2
        or weight.shape[1] != x.shape[-1]
        or (bias is not None and tuple(bias.shape) != (weight.shape[0],))
    ):
        raise ValueError(
            "geglu_linear: need x (..., K), weight (2·N, K) and bias (2·N,) or None; got x "
            f"{tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
            f"{None if bias is None else tuple(bias.shape)}"
        )


def geglu_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    approximate: str = "none",
) -> torch.Tensor:
    """The projection (``F.linear``, cuBLAS on CUDA), then :func:`geglu` (dispatched): what a
    feed-forward's ``GEGLU`` module computes."""
    return geglu(F.linear(x, weight, bias), approximate=approximate)


def _linear_triton_reasons(x, weight, bias=None, *, approximate="none") -> list[str]:
    reasons = []
    if not x.is_cuda and not interpret():
        reasons.append(f"x is on {x.device}, not CUDA (set TRITON_INTERPRET=1 to run on CPU)")
    if x.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {x.dtype} unsupported (float32/float16/bfloat16 only)")
    if weight.dtype != x.dtype:
        reasons.append(f"weight is {weight.dtype}, x is {x.dtype} (one GEMM dtype)")
    if weight.stride(-1) != 1:
        reasons.append("weight has no unit stride along K")
    if math.prod(x.shape[:-1]) >= 2**31:
        reasons.append("too many rows (>= 2^31)")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        reasons.append("autograd: the fused GEGLU projection is forward only (inference)")
    return kernel_reasons(reasons, "geglu_linear", "_geglu_linear_kernel", x.is_cuda)


def geglu_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    approximate: str = "none",
) -> torch.Tensor:
    """The ``triton`` backend: one GEMM with the GEGLU in its epilogue (no autograd)."""
    from echofast.kernels.geglu import rows_view
    from echofast.kernels.geglu_linear import geglu_linear_fwd

    b = None if bias is None else bias.contiguous()
    out = geglu_linear_fwd(rows_view(x), weight, b, approximate)
    return out.view(*x.shape[:-1], weight.shape[0] // 2)


def _linear_example(device: str) -> tuple[tuple, dict]:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    x = torch.empty(2, 16, 64, device=device, dtype=dtype)
    return (x, torch.empty(256, 64, device=device, dtype=dtype)), {}


_linear_op = Op(
    "geglu_linear",
    [
        Backend(
            "triton",
            geglu_linear_triton,
            _linear_triton_reasons,
            "one Triton GEMM over both halves, bias and x * gelu(gate) in its epilogue "
            "(fp32 accumulation, forward only)",
            traceable=False,
        ),
        Backend(
            "torch",
            geglu_linear_reference,
            lambda x, *args, **kwargs: _torch_reasons(x),
            "F.linear, then geglu (reference)",
        ),
    ],
    _linear_example,
)


def geglu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    approximate: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """A GEGLU feed-forward's projection and gate: ``geglu(F.linear(x, weight, bias))``.

    Args:
        x: (..., K) floating point (rows with unit stride along K, or copied).
        weight: (2·N, K): the rows of the x half, then those of the gate half (``GEGLU.proj``).
        bias: (2·N,) or None.
        approximate: ``"none"`` (exact erf GELU) or ``"tanh"``.
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        (..., N) in x's dtype. The triton backend accumulates in fp32 and rounds once (the
        reference rounds the projection first).

    Raises:
        ValueError: the shapes do not fit, or ``approximate`` is unknown.
    """
    _check_linear(x, weight, bias)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return _linear_op(x, weight, bias, approximate=approximate, backend=backend)
