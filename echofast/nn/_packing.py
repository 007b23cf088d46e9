"""Parameters of several linear layers stored as adjacent rows of one tensor, so that one GEMM
computes all of them: the concatenated weight is a view of the live parameters (never a stale
copy). The parameters stay separate ``nn.Parameter`` objects with their own state-dict keys; only
their storage moves. Used by fused QKV (:mod:`echofast.nn.attention`) and by the models' single
GEMM of every resblock's time projection (:class:`echofast.nn.embeddings.TimeProjections`).
"""

from __future__ import annotations

import torch


def adjacent(ps: list[torch.Tensor] | None) -> bool:
    """Whether ``ps`` are contiguous, same-dtype tensors lying back to back in one storage."""
    if not ps or any(not p.is_contiguous() or p.is_meta for p in ps):
        return False
    first = ps[0]
    ptr = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for p in ps:
        if (
            p.dtype != first.dtype
            or p.device != first.device
            or p.shape[1:] != first.shape[1:]
            or p.untyped_storage().data_ptr() != ptr
            or p.storage_offset() != offset
        ):
            return False
        offset += p.numel()
    return True


def concat_view(ps: list[torch.Tensor]) -> torch.Tensor:
    """The concatenation (dim 0) of adjacent tensors (see :func:`adjacent`) as one view."""
    first = ps[0]
    rows = sum(p.shape[0] for p in ps)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def pack_rows(ps: list[torch.Tensor] | None) -> None:
    """Store the parameters ``ps`` (same trailing shape, dtype and device) as adjacent slices of
    one new tensor, values and ``requires_grad`` unchanged. Mixed dtypes/devices, meta tensors
    and already packed lists are left alone."""
    if ps is None or adjacent(ps):
        return
    if len({(p.dtype, p.device, p.shape[1:]) for p in ps}) != 1 or any(p.is_meta for p in ps):
        return
    with torch.no_grad():
        packed = torch.cat([p.detach() for p in ps])
        start = 0
        for p in ps:
            p.data = packed[start : start + p.shape[0]]
            start += p.shape[0]


def packed_linear(
    weights: list[torch.Tensor] | None, biases: list[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(concatenated weight, concatenated bias or None) as views of the live parameters, or None
    when they are not packed (or only some layers have a bias)."""
    if not adjacent(weights):
        return None
    if biases is None:
        return concat_view(weights), None
    if not adjacent(biases):
        return None
    return concat_view(weights), concat_view(biases)
