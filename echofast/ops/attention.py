"""``attention``: softmax(scale · Q Kᵀ) V over (N, heads, L, D) tensors.

Backends, in automatic order: ``sdpa`` (``F.scaled_dot_product_attention``) and ``torch`` (the
reference: explicit fp32 softmax(QKᵀ)V). Triton and xformers backends plug in ahead of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import Backend, Op


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention: q, k, v must be (N, heads, L, D); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "attention: shapes disagree: need q (N, H, Lq, D), k (N, H, Lk, D), v (N, H, Lk, Dv);"
            " got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch: explicit softmax(scale · Q Kᵀ) V with fp32 (or fp64) scores, cast back."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * s
    out = torch.matmul(scores.softmax(dim=-1), v.to(acc))
    return out.to(q.dtype)


def _attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _any_reasons(q: torch.Tensor, *args, **kwargs) -> list[str]:
    if not q.is_floating_point():
        return [f"q must be floating point, got {q.dtype}"]
    return []


def _example(device: str) -> tuple[tuple, dict]:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    q = torch.empty(256, 8, 64, 16, device=device, dtype=dtype)
    return (q, q, q), {}


_op = Op(
    "attention",
    [
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
        q: (N, heads, Lq, D); may be a strided view (e.g. of a fused QKV projection).
        k: (N, heads, Lk, D).
        v: (N, heads, Lk, Dv).
        scale: multiplier of QKᵀ; default 1/sqrt(D).
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        (N, heads, Lq, Dv) in q's dtype.
    """
    _check(q, k, v)
    return _op(q, k, v, scale=scale, backend=backend)
