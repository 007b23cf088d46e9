"""``layer_norm``: LayerNorm over the last dim that returns the input's dtype, computed in fp32.

    y = ((x - mean) / sqrt(var + eps)) · weight + bias      statistics over x's last dim C

x may be in a lower precision than the weight and bias (fp16/bf16 activations with fp32 affine,
as under autocast): the result is the fp32 LayerNorm of x's values with the fp32 affine, rounded
once to x's dtype — what autocast gives after the next Linear casts its fp32 output down, without
the fp32 round trip.

Backends, fastest first:
  ``triton``  one fused forward kernel (:mod:`echofast.kernels.layer_norm`; CUDA, or CPU under
              ``TRITON_INTERPRET=1``); inference only (no autograd);
  ``mixed``   PyTorch's own mixed-dtype ``layer_norm`` kernel (half input, fp32 affine), where
              this PyTorch has one for the device (CPU does, CUDA 2.11 does not:
              :func:`mixed_layer_norm_works`), or plain ``F.layer_norm`` when x and the affine
              share a dtype; differentiable;
  ``torch``   the reference: ``F.layer_norm`` on fp32 copies, cast back to x's dtype.

``add_layer_norm`` is the residual form of a transformer block: ``h = x + residual (+ add, one
row per group of rows)`` and ``LayerNorm(h)``, one Triton pass (``triton``), or the adds in x's
dtype followed by :func:`layer_norm` (``torch``, the reference). Its ``shift`` (C,) is added to
the returned h only (after the norm read it): the next branch's output bias, so that branch's
residual add can run inside its GEMM.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._checks import check_eps
from ._dispatch import Backend, Op
from ._triton import interpret, kernel_reasons

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: widest C the kernel holds in registers (echofast.kernels.layer_norm.MAX_C; a test keeps them
#: equal without importing Triton here)
MAX_C = 16384


def _check(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> None:
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dim (the normalised one), got 0-D")
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(
                f"layer_norm: {name} must be ({c},) for x of shape {tuple(x.shape)}, "
                f"got {tuple(t.shape)}"
            )
        if t is not None and t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device}, x on {x.device}")
    check_eps("layer_norm", eps)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm`` of fp32 copies of x, weight and bias over the last dim (fp64 stays
    fp64), in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(x.to(acc), x.shape[-1:], _to(weight, acc), _to(bias, acc), eps)
    return y.to(x.dtype)


@functools.cache
def mixed_layer_norm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``F.layer_norm`` takes a ``dtype`` input with fp32 weight and bias on this device
    type (PyTorch's mixed-dtype kernels; probed once with a tiny call)."""
    x = torch.ones(2, 8, device=device_type, dtype=dtype)
    w = torch.ones(8, device=device_type)
    try:
        with torch.autocast(device_type, enabled=False):
            F.layer_norm(x, (8,), w, w)
    except RuntimeError:
        return False
    return True


def _affine_dtypes(weight: torch.Tensor | None, bias: torch.Tensor | None) -> set[torch.dtype]:
    return {t.dtype for t in (weight, bias) if t is not None}


def layer_norm_mixed(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The ``mixed`` backend: ``F.layer_norm`` as is (autocast off), x's dtype out."""
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _torch_reasons(x: torch.Tensor, weight=None, bias=None, eps=1e-5) -> list[str]:
    if not x.is_floating_point():
        return [f"x must be floating point, got {x.dtype}"]
    return []


def _mixed_reasons(x: torch.Tensor, weight=None, bias=None, eps=1e-5) -> list[str]:
    reasons = _torch_reasons(x)
    affine = _affine_dtypes(weight, bias)
    if reasons or affine <= {x.dtype}:
        return reasons
    if len(affine) > 1:
        return [f"weight and bias differ in dtype ({sorted(map(str, affine))})"]
    (a,) = affine
    if a != torch.float32 or x.dtype not in (torch.float16, torch.bfloat16):
        return [f"{x.dtype} input with {a} affine (mixed kernels: fp16/bf16 input, fp32 affine)"]
    if not mixed_layer_norm_works(x.device.type, x.dtype):
        return [
            f"this PyTorch's {x.device.type} layer_norm takes no {x.dtype} input with fp32 affine"
        ]
    return []


def _triton_reasons(x: torch.Tensor, weight=None, bias=None, eps=1e-5) -> list[str]:
    reasons = []
    if not x.is_cuda and not interpret():
        reasons.append(f"x is on {x.device}, not CUDA (set TRITON_INTERPRET=1 to run on CPU)")
    if x.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {x.dtype} unsupported (float32/float16/bfloat16 only)")
    if x.dim() and x.shape[-1] > MAX_C:
        reasons.append(f"C = {x.shape[-1]} > {MAX_C} (a row must fit in registers)")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        reasons.append("autograd: the Triton LayerNorm is forward only (inference)")
    return kernel_reasons(reasons, "layer_norm", "_layer_norm_fwd_kernel", x.is_cuda)


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The ``triton`` backend: same contract as :func:`layer_norm_reference`, no autograd."""
    from echofast.kernels.layer_norm import layer_norm_fwd, rows_view

    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    return layer_norm_fwd(rows_view(x), w, b, eps).view(x.shape)


def _example(device: str) -> tuple[tuple, dict]:
    dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
    x = torch.empty(2, 16, 320, device=device, dtype=dtype)
    w = torch.empty(320, device=device)
    return (x, w, w), {}


_op = Op(
    "layer_norm",
    [
        Backend(
            "triton",
            layer_norm_triton,
            _triton_reasons,
            "one Triton pass: fp32 statistics and affine, x's dtype out (forward only)",
            traceable=False,
        ),
        Backend(
            "mixed",
            layer_norm_mixed,
            _mixed_reasons,
            "PyTorch's layer_norm with half input and fp32 affine (where it has that kernel)",
        ),
        Backend(
            "torch",
            layer_norm_reference,
            _torch_reasons,
            "F.layer_norm on fp32 copies, cast to x's dtype (reference)",
        ),
    ],
    _example,
)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm of x over its last dim, returned in x's dtype, statistics and affine in fp32.

    Args:
        x: (..., C) floating point, any layout (fp16/bf16 activations, or fp32).
        weight, bias: (C,) or None, on x's device; any float dtype (fp32 under autocast).
        eps: added to the variance.
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        (..., C) in x's dtype: the fp32 LayerNorm rounded once (triton: contiguous).

    Raises:
        ValueError: x is 0-D, or weight/bias are not (C,) on x's device.
    """
    _check(x, weight, bias, eps)
    return _op(x, weight, bias, eps, backend=backend)


# ---- add_layer_norm -----------------------------------------------------------------------------


def _check_add(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    add: torch.Tensor | None,
    shift: torch.Tensor | None = None,
    add_group: int | None = None,
) -> None:
    c = x.shape[-1]
    if residual is None and add is None:
        raise ValueError("add_layer_norm: nothing to add (residual and add are both None)")
    if shift is not None and (tuple(shift.shape) != (c,) or shift.device != x.device):
        raise ValueError(
            f"add_layer_norm: shift must be ({c},) on {x.device}, got {tuple(shift.shape)} on "
            f"{shift.device}"
        )
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise ValueError(
            f"add_layer_norm: residual must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got ({tuple(residual.shape)}, {residual.dtype}, {residual.device})"
        )
    if add is None:
        return
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        add.dim() != 2
        or add.shape[1] != x.shape[-1]
        or add.shape[0] == 0
        or rows % add.shape[0]
        or add.device != x.device
    ):
        raise ValueError(
            f"add_layer_norm: add must be (M, {x.shape[-1]}) on {x.device} with M dividing the "
            f"{rows} rows of x {tuple(x.shape)}, got {tuple(add.shape)} on {add.device}"
        )
    if add_group is not None and (add_group < 1 or rows % (add_group * add.shape[0])):
        raise ValueError(
            f"add_layer_norm: add_group = {add_group} must be >= 1 with add_group·M "
            f"(M = {add.shape[0]}) dividing the {rows} rows of x {tuple(x.shape)}"
        )


def _rows_add(
    h: torch.Tensor, add: torch.Tensor, inplace: bool, group: int | None = None
) -> torch.Tensor:
    """h + add[(r // group) % M] for h (..., C) viewed as R rows and add (M, C) (group default
    R/M), in h's dtype; ``inplace``: written over h whatever its layout (through a view of its
    rows where its strides allow one, else computed apart and copied in)."""
    if h.numel() == 0:
        return h if inplace else h.clone()
    m, c = add.shape
    group = group or h.numel() // (m * c)
    a = add[:, None].to(h.dtype)
    if inplace:
        try:
            h.view(-1, m, group, c).add_(a)
        except RuntimeError:  # strides that no (rows, M, group, C) view can express
            h.copy_((h.reshape(-1, m, group, c) + a).view(h.shape))
        return h
    return (h.reshape(-1, m, group, c) + a).view(h.shape)


def residual_sum(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    add: torch.Tensor | None = None,
    add_group: int | None = None,
) -> torch.Tensor:
    """``h = residual + x``, then ``h + add`` per row group (add (M, C), see
    :func:`add_layer_norm`), each rounded to x's dtype as separate PyTorch adds give it; in place
    in ``residual`` without autograd. Without a residual, ``x + add`` in a new tensor."""
    if residual is None:
        return _rows_add(x, add, False, add_group)
    inplace = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    h = residual.add_(x) if inplace else residual + x
    return h if add is None else _rows_add(h, add, inplace, add_group)


def add_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    add: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    shift: torch.Tensor | None = None,
    add_group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`residual_sum`, then ``layer_norm(h)`` (dispatched: see :func:`layer_norm`), then
    ``h + shift`` rounded to h's dtype (in place without autograd)."""
    h = residual_sum(x, residual, add, add_group)
    y = layer_norm(h, weight, bias, eps)
    if shift is None:
        return h, y
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return h.add_(shift), y
    return (h + shift).to(h.dtype), y


def _add_triton_reasons(
    x, residual, add=None, weight=None, bias=None, eps=1e-5, shift=None, add_group=None
) -> list[str]:
    reasons = _triton_reasons(x, weight, bias)
    grads = (residual, add, shift)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grads):
        reasons.append("autograd: the Triton LayerNorm is forward only (inference)")
    return list(dict.fromkeys(reasons))


def add_layer_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    add: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    shift: torch.Tensor | None = None,
    add_group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``triton`` backend: one pass; h is written over ``residual`` when its rows have unit
    stride along C, else (and without a residual) into a new tensor."""
    from echofast.kernels.layer_norm import layer_norm_fwd, rows_view

    x2 = rows_view(x)
    r2 = None if residual is None else rows_view(residual)
    in_place = r2 is not None and r2.data_ptr() == residual.data_ptr()
    h2 = r2 if in_place else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    a2 = None if add is None else (add if add.stride(-1) == 1 else add.contiguous())
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    s = None if shift is None else shift.contiguous()
    y2 = layer_norm_fwd(x2, w, b, eps, residual=r2, add=a2, h_out=h2, shift=s, add_group=add_group)
    h = residual if in_place else h2.view(x.shape)
    return h, y2.view(x.shape)


def _add_example(device: str) -> tuple[tuple, dict]:
    (x, w, b), _ = _example(device)
    return (x, torch.empty_like(x), x[:, 0], w, b), {}


_add_op = Op(
    "add_layer_norm",
    [
        Backend(
            "triton",
            add_layer_norm_triton,
            _add_triton_reasons,
            "one Triton pass: h = x + residual (+ rows) (+ shift) stored once, LayerNorm of h "
            "in fp32",
            traceable=False,
        ),
        Backend(
            "torch",
            add_layer_norm_reference,
            lambda x, *args, **kwargs: _torch_reasons(x),
            "PyTorch adds in x's dtype, then layer_norm (reference)",
        ),
    ],
    _add_example,
)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    add: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    shift: torch.Tensor | None = None,
    add_group: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the LayerNorm that follows it: ``h = x + residual + add[row group]``,
    ``y = layer_norm(h, weight, bias, eps)``; with ``shift``, ``h + shift`` is returned for h.

    Args:
        x: (..., C) floating point.
        residual: x's shape, dtype and device; a temporary of the caller: without autograd h is
            written over it (when its rows have unit stride along C; always in the reference).
            None: h = x + add, in a new tensor.
        add: (M, C) or None; x's rows (all dims but the last, flattened) form consecutive
            groups of ``add_group`` rows (default R/M: M groups, one row per video, say), and
            group j adds ``add[j % M]`` (with ``add_group`` = S for frame-major (B, T, S, C)
            tokens and M = T, one row per frame).
        weight, bias, eps: as :func:`layer_norm`.
        shift: (C,) or None, on x's device: added (in fp32, rounded once) to the h returned,
            not to the h the norm reads (a following Linear's bias, so that its residual add
            ``h + g·Wᵀ`` is one GEMM with beta = 1).
        backend: force a backend by name (see :mod:`echofast.ops`).

    Returns:
        (h, y), both x's shape and dtype; y is the LayerNorm of h as stored (rounded); h then
        includes ``shift``.

    Raises:
        ValueError: residual does not match x, add is not (M, C) with M dividing x's rows, or
            weight/bias/shift are not (C,) on x's device.
    """
    _check(x, weight, bias, eps)
    _check_add(x, residual, add, shift, add_group)
    return _add_op(x, residual, add, weight, bias, eps, shift, add_group, backend=backend)
