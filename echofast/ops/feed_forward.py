"""``feed_forward``: a GEGLU feed-forward with its residual, ``[r +] geglu(x W1ᵀ + b1) W2ᵀ [+ b2]``.

    g = geglu(x W1ᵀ + b1)          x (..., C), W1 (2·I, C) -> g (..., I)     (GEGLU.proj)
    out = [residual +] g W2ᵀ [+ b2]             W2 (N, I) -> out (..., N)   (net.2)

as diffusers' ``FeedForward`` (GEGLU, dropout 0, Linear) followed by a transformer block's
residual add. Backends: ``triton`` (one kernel: g stays on chip, :mod:`echofast.kernels.
feed_forward`; fp16/bf16 on CUDA, any float dtype on CPU under ``TRITON_INTERPRET=1``;
C, N <= 256; forward only), then ``torch`` (the reference: F.linear, the GEGLU, F.linear and
the add, each rounded to x's dtype, as the unfused modules compute them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import Backend, Op
from ._triton import interpret, kernel_reasons
from .geglu import APPROXIMATIONS

#: the widest C and N of the ``triton`` backend (= :data:`echofast.kernels.feed_forward.MAX_DIM`;
#: the backend's checks run without importing Triton)
MAX_DIM = 256
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, w1, b1, w2, b2, residual, out) -> None:
    def shape(t):
        return None if t is None else tuple(t.shape)

    c = x.shape[-1] if x.dim() else None
    bad = (
        x.dim() == 0
        or w1.dim() != 2
        or w1.shape[0] % 2
        or w1.shape[1] != c
        or w2.dim() != 2
        or w2.shape[1] != w1.shape[0] // 2
        or (b1 is not None and shape(b1) != (w1.shape[0],))
        or (b2 is not None and shape(b2) != (w2.shape[0],))
    )
    if bad:
        raise ValueError(
            "feed_forward: need x (..., C), w1 (2·I, C), b1 (2·I,) or None, w2 (N, I), b2 (N,) "
            f"or None; got x {shape(x)}, w1 {shape(w1)}, b1 {shape(b1)}, w2 {shape(w2)}, "
            f"b2 {shape(b2)}"
        )
    want = (*x.shape[:-1], w2.shape[0])
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and shape(t) != want:
            raise ValueError(f"feed_forward: {name} must be {want}, got {shape(t)}")
    if out is not None and not out.is_floating_point():
        raise ValueError(f"feed_forward: out must be floating point, got {out.dtype} {shape(out)}")


def feed_forward_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    approximate: str = "none",
) -> torch.Tensor:
    """Plain PyTorch in x's dtype: projection, ``x * F.gelu(gate)``, projection, residual add
    (each result rounded, as diffusers' modules compute them); copied into ``out`` when given
    (without autograd), else returned in x's dtype (a residual of a wider dtype is added in its
    dtype, then the sum rounded once)."""
    h = F.linear(x, w1, b1)
    i = h.shape[-1] // 2
    v = F.linear(h[..., :i] * F.gelu(h[..., i:], approximate=approximate), w2, b2)
    if residual is not None:
        v = residual + v
    if out is None or torch.is_grad_enabled():
        return v.to(x.dtype)
    return out.copy_(v)


def _torch_reasons(x, *args, **kwargs) -> list[str]:
    return [] if x.is_floating_point() else [f"x must be floating point, got {x.dtype}"]


def _rows(t: torch.Tensor) -> bool:
    """Whether t's leading dims collapse to rows of one stride with unit stride along the last."""
    if t.dim() == 1:
        return t.stride(0) == 1
    try:
        t.view(-1, t.shape[-1])
    except RuntimeError:
        return False
    return t.stride(-1) == 1 or t.shape[-1] == 1


def _triton_reasons(x, w1, b1, w2, b2, *, residual=None, out=None, approximate="none") -> list[str]:
    reasons = []
    if not x.is_cuda and not interpret():
        reasons.append(f"x is on {x.device}, not CUDA (set TRITON_INTERPRET=1 to run on CPU)")
    if x.dtype not in _TRITON_DTYPES or (x.is_cuda and x.dtype == torch.float32):
        reasons.append(
            f"dtype {x.dtype} unsupported (float16/bfloat16 on CUDA, where fp32 tiles spill; "
            "float32 too under the interpreter)"
        )
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        reasons.append(f"weights are {w1.dtype}/{w2.dtype}, x is {x.dtype} (one GEMM dtype)")
    if max(x.shape[-1], w2.shape[0]) > MAX_DIM:
        reasons.append(
            f"C = {x.shape[-1]}, N = {w2.shape[0]}: a program holds whole rows up to {MAX_DIM}"
        )
    for name, t in (("x", x), ("w1", w1), ("w2", w2), ("residual", residual), ("out", out)):
        if t is not None and not _rows(t):
            reasons.append(f"{name} has no rows with a unit last stride (strides {t.stride()})")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, residual)
    ):
        reasons.append("autograd: the fused feed-forward is forward only (inference)")
    return kernel_reasons(reasons, "feed_forward", "_ff_fwd_kernel", x.is_cuda)


def feed_forward_triton(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    approximate: str = "none",
) -> torch.Tensor:
    """The ``triton`` backend: one kernel, written into ``out`` (default: a new tensor)."""
    from echofast.kernels.feed_forward import feed_forward_fwd

    n = w2.shape[0]
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    feed_forward_fwd(
        x.reshape(-1, x.shape[-1]),
        w1,
        None if b1 is None else b1.contiguous(),
        w2,
        None if b2 is None else b2.contiguous(),
        None if residual is None else residual.view(-1, n),
        out.view(-1, n),
        approximate,
    )
    return out


def _example(device: str) -> tuple[tuple, dict]:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32

    def empty(*shape):
        return torch.empty(*shape, device=device, dtype=dtype)

    return (empty(2, 16, 64), empty(512, 64), empty(512), empty(64, 256), empty(64)), {}


_op = Op(
    "feed_forward",
    [
        Backend(
            "triton",
            feed_forward_triton,
            _triton_reasons,
            "one Triton kernel: both GEMMs, the GEGLU and the residual add, the GEGLU output "
            "kept on chip (fp32 accumulation, forward only)",
            traceable=False,
        ),
        Backend(
            "torch",
            feed_forward_reference,
            _torch_reasons,
            "F.linear, GEGLU, F.linear, add (reference)",
        ),
    ],
    _example,
)


def feed_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    approximate: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """``[residual +] geglu(x W1ᵀ + b1) W2ᵀ [+ b2]``: a GEGLU feed-forward and its residual add.

    Args:
        x: (..., C) floating point.
        w1, b1: the GEGLU projection (2·I, C) and (2·I,) or None: the x half's rows, then the
            gate half's (``GEGLU.proj``).
        w2, b2: the output projection (N, I) and (N,) or None (``FeedForward.net[2]``).
        residual: (..., N) added to the result, or None.
        out: (..., N) to write the result into without autograd (may be ``residual``: an
            in-place ``residual += ff(x)``); None: a new tensor.
        approximate: ``"none"`` (exact erf GELU) or ``"tanh"``.
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        (..., N) in x's dtype (``out`` itself when given).

    Raises:
        ValueError: the shapes do not fit, or ``approximate`` is unknown.
    """
    _check(x, w1, b1, w2, b2, residual, out)
    if approximate not in APPROXIMATIONS:
        raise ValueError(
            f"feed_forward: approximate must be one of {APPROXIMATIONS}, got {approximate!r}"
        )
    return _op(
        x, w1, b1, w2, b2, residual=residual, out=out, approximate=approximate, backend=backend
    )


def feed_forward_supported(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the ``triton`` backend takes these operands (cheap checks only): what a module
    asks before it leaves its unfused path."""
    return not _triton_reasons(x, w1, None, w2, None)
