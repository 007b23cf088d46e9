"""Triton LayerNorm forward over the last dim: reduced-precision activations, fp32 statistics and
affine, one rounding to the activations' dtype.

Design
------
* Why. Under CUDA autocast ``layer_norm`` runs in fp32: the fp16/bf16 input is cast up (one
  kernel, 2 + 4 bytes per element), normalised in fp32 (4 + 4 bytes) and returned in fp32, which
  the next Linear casts back down (4 + 2 bytes): 20 bytes and three launches per element where
  the minimum is 4 bytes and one launch (read x, write y). PyTorch's CUDA ``layer_norm`` takes no
  half input with fp32 weights, which is what keeping the activations in half precision needs.
  Measured on an H200 (git 75dfbdc): the LVDM's 80 LayerNorms took 18 % of a UNet call's GPU
  time in ``vectorized_layer_norm_kernel<float, float>``, plus 160 of its 456 copy kernels.
* Layout. x is viewed as (R, C) with unit stride along C and a row stride (the launcher copies
  only when the leading dims cannot be collapsed). One program normalises BLOCK_R whole rows held
  in registers: BLOCK_C = next_pow2(C) columns (masked past C; C <= ``MAX_C``), BLOCK_R fills a
  tile of ``TILE`` elements, grid (cdiv(R, BLOCK_R),). Rows are contiguous, so loads and stores
  vectorise; row offsets are int64 (tensors above 2**31 elements index correctly).
* Precision. Loads are converted to fp32. Two-pass statistics over the registers (mean, then the
  mean of squared deviations: no cancellation, unlike E[x²] - E[x]²), ``rstd = 1/sqrt(var +
  eps)``, ``y = (x - mean)·rstd·w + b`` in fp32 with the fp32 (or upcast) weight and bias, one
  rounding at the store to y's dtype. That is autocast's result after the next Linear's cast,
  up to the order of the fp32 reduction.
* Residual adds (``add_layer_norm``). A transformer block's residual ``h = x + branch`` (and,
  after a single-key cross-attention, ``+ c`` with c one row per video) is followed by the next
  LayerNorm of h. Unfused that is one add kernel per addend (read 2, write 1 each) and the norm
  (read 1, write 1); fused, one pass reads x, the branch and the row and writes h and LN(h):
  the adds are taken in fp32, h is rounded once to its dtype and stored, and the statistics are
  taken over the stored (rounded) h, so LN(h) is exactly the LayerNorm of the h returned.
  h may be written over the branch's storage (each program reads its tile before writing it).
* Shift (``add_layer_norm(shift=)``). The block's next residual add is ``h + Linear(...)`` with
  the Linear's bias b; storing h + b instead of h (b added in fp32 to the rounded h, rounded
  once) lets that add run inside the Linear's GEMM (``h += g·Wᵀ``, cuBLAS with beta = 1) with no
  bias pass and no add kernel. The statistics and y still read the rounded h.
* Forward only (inference): training takes the PyTorch backends, whose autograd is exact.

Kernel arguments (all tensors on one device):
  x_ptr     (R, C) input, fp32/fp16/bf16, row stride ``stride_x``, unit stride along C
  w_ptr     (C,) weight (any float dtype, read as fp32); unused when HAS_W is False
  b_ptr     (C,) bias (any float dtype, read as fp32); unused when HAS_B is False
  y_ptr     (R, C) output, contiguous, its own dtype (the op gives x's)
  R, C      rows and normalised width
  stride_x  x's row stride in elements
  eps       added to the variance (fp32)
  r_ptr     (R, C) residual addend, x's dtype, row stride ``stride_r``, unit stride along C;
            unused when HAS_R is False
  a_ptr     (M, C) row addend, row stride ``stride_a``, unit stride along C; row r of x adds
            a[(r // rows_per_a) % M] (consecutive groups of rows_per_a rows, cycling through
            the M rows: one row per video, or one per frame of frame-major tokens); unused
            when HAS_A is False
  h_ptr     (R, C) the sum x + r + a (+ s when HAS_S), x's dtype, row stride ``stride_h``
            (may be r_ptr's storage); unused unless HAS_R or HAS_A
  s_ptr     (C,) shift added to the stored h only (any float dtype, read as fp32); unused
            unless HAS_S
  rows_per_a        rows of x per row of a
  M_a               rows of a (M)
  BLOCK_R, BLOCK_C  rows per program and padded width (powers of two, BLOCK_C >= C)
  HAS_W, HAS_B      constexpr: apply the weight / the bias
  HAS_R, HAS_A      constexpr: add the residual / the row addend (and store h)
  HAS_S             constexpr: store h + s (needs HAS_R or HAS_A)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TILE = 4096
#: the interpreter pays per program: bigger tiles on CPU
TILE_INTERPRETED = 16384
#: widest row held in registers (fp32: 64 KiB per row across the program's threads)
MAX_C = 16384


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    R,
    C,
    stride_x,
    eps,
    r_ptr,
    a_ptr,
    h_ptr,
    stride_r,
    stride_a,
    stride_h,
    rows_per_a,
    M_a,
    s_ptr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_S: tl.constexpr,
):
    """h = x + r + a[(row // rows_per_a) % M_a] (h + s stored, when HAS_R or HAS_A); y[r] =
    (h[r] - mean)·rstd·w + b for BLOCK_R rows r, statistics over C in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < R)[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        x += tl.load(r_ptr + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_A:
        a_row = ((rows // rows_per_a) % M_a).to(tl.int64)[:, None]
        x += tl.load(a_ptr + a_row * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_R or HAS_A:
        x = x.to(h_ptr.dtype.element_ty).to(tl.float32)  # h as stored: the norm reads it
        h = x
        if HAS_S:
            h += tl.load(s_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(h_ptr + r64 * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + r64 * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------- launchers


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D (rows, last dim) with unit stride along the last dim: a view when the leading
    dims collapse to one row stride, else a contiguous copy."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class Plan:
    """Tile sizes, warps and grid for an (R, C) LayerNorm."""

    def __init__(self, rows: int, c: int, *, interpreted: bool, block_r: int | None = None):
        self.R, self.C = rows, c
        self.BLOCK_C = triton.next_power_of_2(c)
        tile = TILE_INTERPRETED if interpreted else TILE
        if block_r is None:
            block_r = min(triton.next_power_of_2(max(rows, 1)), max(1, tile // self.BLOCK_C))
        self.BLOCK_R = block_r
        self.num_warps = 4 if block_r * self.BLOCK_C <= 2048 else 8

    @property
    def grid(self) -> tuple[int]:
        return (triton.cdiv(self.R, self.BLOCK_R),)


def layer_norm_fwd(
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    add_group: int | None = None,
    block_r: int | None = None,
) -> torch.Tensor:
    """y (R, C) in x2's dtype, contiguous, for ``x2`` (R, C) with unit stride along C and
    ``weight``/``bias`` (C,) contiguous or None.

    With ``residual`` (R, C) and/or ``add`` (M, C, M dividing R), both with unit stride along C:
    h = x2 + residual + add[(r // add_group) % M] (``add_group`` default R/M) is written to
    ``h_out`` (R, C), unit stride along C (it may be ``residual`` itself), plus ``shift`` (C,)
    contiguous when given, and y is the LayerNorm of h (without the shift)."""
    y = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    fused = residual is not None or add is not None
    if fused and h_out is None:
        raise ValueError("layer_norm_fwd: residual/add need h_out")
    if shift is not None and not fused:
        raise ValueError("layer_norm_fwd: shift applies to the stored h (needs residual/add)")
    if y.numel():
        interpreted = type(_layer_norm_fwd_kernel).__name__ == "InterpretedFunction"
        p = Plan(x2.shape[0], x2.shape[1], interpreted=interpreted, block_r=block_r)
        _layer_norm_fwd_kernel[p.grid](
            x2,
            x2 if weight is None else weight,
            x2 if bias is None else bias,
            y,
            p.R,
            p.C,
            x2.stride(0),
            float(eps),
            x2 if residual is None else residual,
            x2 if add is None else add,
            h_out if fused else x2,
            0 if residual is None else residual.stride(0),
            0 if add is None else add.stride(0),
            h_out.stride(0) if fused else 0,
            1 if add is None else (add_group or x2.shape[0] // add.shape[0]),
            1 if add is None else add.shape[0],
            x2 if shift is None else shift,
            BLOCK_R=p.BLOCK_R,
            BLOCK_C=p.BLOCK_C,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            HAS_R=residual is not None,
            HAS_A=add is not None,
            HAS_S=shift is not None,
            num_warps=p.num_warps,
        )
    return y
