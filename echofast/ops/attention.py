"""``attention``: softmax(scale · Q Kᵀ) V over (N, heads, L, D) tensors, or (N1, N2, heads, L, D)
ones (two batch dims: attention along the frames of frame-major (B, T, S, C) tokens, whose
(b, s) sequences are not one stride; the Triton kernel reads them in place, the other backends
merge the batch dims, copying where that is not a view).

Backends, in automatic order:

* ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): :mod:`echofast.kernels.attention`, one
  persistent launch for many short sequences, fp32 softmax statistics, D ∈ {8, 16, 32, 64}. It
  reads Q/K/V through their strides and writes a token-major output. Its backward recomputes the
  attention with the reference under autograd (the forward is the fast part at inference; training
  works with every backend).
* ``xformers`` (CUDA, when ``xformers`` is importable): ``xformers.ops.memory_efficient_attention``.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.
* ``torch``: the reference, explicit softmax(QKᵀ)V with fp32 scores.

Every backend accepts strided views, e.g. (B, L, heads·D) projections viewed as
(B, heads, L, D). ``triton``, ``xformers`` and ``sdpa`` (CPU, CUDA flash/efficient) return
token-major outputs: ``out.transpose(1, 2).reshape(B, L, heads·D)`` is then a view.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys

import torch
import torch.nn.functional as F

from ._checks import check_devices
from ._dispatch import Backend, Op
from ._triton import interpret, kernel_reasons

#: head dims the Triton kernel supports (Q/K and V)
TRITON_HEAD_DIMS = (8, 16, 32, 64)
#: longest sequence the Triton backend takes (it is tiled for short ones; sdpa is better beyond)
TRITON_MAX_LEN = 1024
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() not in (4, 5) or not (q.dim() == k.dim() == v.dim()):
        raise ValueError(
            "attention: q, k, v must be (N, heads, L, D) (or (N1, N2, heads, L, D)); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "attention: shapes disagree: need q (N, H, Lq, D), k (N, H, Lk, D), v (N, H, Lk, Dv);"
            " got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    check_devices("attention", "q", q, k=k, v=v)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch: explicit softmax(scale · Q Kᵀ) V with fp32 (or fp64) scores, cast back."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * _scale(q, scale)
    out = torch.matmul(scores.softmax(dim=-1), v.to(acc))
    return out.to(q.dtype)


# ---- sdpa ------------------------------------------------------------------------------------


def _merged_batch(fn):
    """``fn`` (4-D inputs) applied to 5-D inputs by merging their two batch dims (a copy where
    that is not a view), the output split back."""

    @functools.wraps(fn)
    def run(q, k, v, *, scale=None):
        if q.dim() == 4:
            return fn(q, k, v, scale=scale)
        out = fn(*(t.flatten(0, 1) for t in (q, k, v)), scale=scale)
        return out.unflatten(0, q.shape[:2])

    return run


@_merged_batch
def _attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _any_reasons(q: torch.Tensor, *args, **kwargs) -> list[str]:
    if not q.is_floating_point():
        return [f"q must be floating point, got {q.dtype}"]
    return []


# ---- xformers --------------------------------------------------------------------------------


@functools.cache
def _installed(name: str) -> bool:
    try:
        return name in sys.modules or importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _xformers_import_error() -> str | None:
    """None when ``xformers.ops`` imports, else why not (imported once, on first use)."""
    try:
        importlib.import_module("xformers.ops")
    except Exception as e:  # noqa: BLE001 - any import failure means the backend cannot run
        return f"xformers not importable ({type(e).__name__}: {e})"
    return None


def _common_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    reasons = []
    if q.dtype not in _FLOATS:
        reasons.append(f"dtype {q.dtype} unsupported (float32/float16/bfloat16 only)")
    if not (q.device == k.device == v.device):
        reasons.append(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    return reasons


def _xformers_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> list[str]:
    reasons = _common_reasons(q, k, v)
    if not q.is_cuda:
        reasons.append(f"q is on {q.device}, xformers needs CUDA")
    if not _installed("xformers"):
        reasons.insert(0, "xformers is not installed")
        return reasons
    if reasons:  # cheap checks first: do not import xformers for a call that cannot use it
        return reasons
    error = _xformers_import_error()
    return [error] if error else []


@_merged_batch
def _attention_xformers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """xformers takes and returns (N, L, heads, D): transposed views, no copies."""
    import xformers.ops as xops

    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=_scale(q, scale)
    )
    return out.transpose(1, 2)


# ---- triton ----------------------------------------------------------------------------------


def _triton_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> list[str]:
    reasons = _common_reasons(q, k, v)
    if not q.is_cuda and not interpret():
        reasons.append(f"q is on {q.device}, not CUDA (set TRITON_INTERPRET=1 to run on CPU)")
    d, dv = q.shape[-1], v.shape[-1]
    for name, dim in (("head dim D", d), ("value head dim Dv", dv)):
        if dim not in TRITON_HEAD_DIMS:
            reasons.append(f"{name} = {dim} unsupported (powers of two {TRITON_HEAD_DIMS} only)")
    longest = max(q.shape[-2], k.shape[-2])
    if longest > TRITON_MAX_LEN:
        reasons.append(
            f"sequence length {longest} > {TRITON_MAX_LEN} (the kernel is tiled for short "
            "sequences)"
        )
    if q.numel() == 0 or k.numel() == 0:
        reasons.append("empty input")
    return kernel_reasons(reasons, "attention", "_attn_fwd_kernel", q.is_cuda)


class _AttentionTriton(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: the gradients of :func:`attention_reference`,
    recomputed from the saved inputs (no attention matrix is kept by the forward)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        from echofast.kernels.attention import attention_fwd

        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return attention_fwd(q, k, v, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            needs = ctx.needs_input_grad
            leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), needs)]
            out = attention_reference(*leaves, scale=ctx.scale)
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if t.requires_grad else None for t in leaves), None)


def _attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    return _AttentionTriton.apply(q, k, v, _scale(q, scale))


def _example(device: str) -> tuple[tuple, dict]:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    q = torch.empty(256, 8, 64, 16, device=device, dtype=dtype)
    return (q, q, q), {}


_op = Op(
    "attention",
    [
        Backend(
            "triton",
            _attention_triton,
            _triton_reasons,
            "Triton: packed short sequences, persistent 1-D grid, fp32 softmax, strided I/O "
            "(backward via the reference)",
            traceable=False,
        ),
        Backend(
            "xformers",
            _attention_xformers,
            _xformers_reasons,
            "xformers.ops.memory_efficient_attention",
            traceable=False,
        ),
        Backend(
            "sdpa",
            _attention_sdpa,
            _any_reasons,
            "torch.nn.functional.scaled_dot_product_attention",
        ),
        Backend(
            "torch", attention_reference, _any_reasons, "explicit fp32 softmax(QK^T)V (reference)"
        ),
    ],
    _example,
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention without mask or dropout.

    Args:
        q: (N, heads, Lq, D); may be a strided view (e.g. of a fused QKV projection). Or
            (N1, N2, heads, Lq, D): two batch dims (e.g. (B, S, heads, T, D) views of frame-major
            (B, T, S, ·) projections), and k, v likewise.
        k: (N, heads, Lk, D).
        v: (N, heads, Lk, Dv).
        scale: multiplier of QKᵀ; default 1/sqrt(D).
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        (N, heads, Lq, Dv) (or (N1, N2, heads, Lq, Dv)) in q's dtype. Its strides depend on the
        backend (the fast ones return a transposed view of a token-major (N, Lq, heads, Dv)
        tensor; Triton's 5-D output is a view of a (N1, Lq, N2, heads, Dv) tensor).
    """
    _check(q, k, v)
    return _op(q, k, v, scale=scale, backend=backend)
