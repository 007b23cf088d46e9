"""Triton GEGLU: ``out = x * gelu(gate)`` with ``[x, gate] = h.chunk(2, -1)``, forward and backward.

Design
------
* Why fused. Unfused, a GEGLU is ``gelu(gate)`` (reads D, writes D per row) then ``x * g``
  (reads 2D, writes D): 5·D element transfers per row over the projection's output h (R, 2D).
  One pass reads x and gate once and writes out once: 3·D, and one launch instead of two. The
  backward likewise reads h and dy and writes dh (R, 2D) in one pass (5·D), where autograd runs
  a mul backward and a gelu backward over saved temporaries.
* Indexing. h is viewed as (R, 2D) with a row stride and unit stride along the last dim (the
  launcher reshapes, and copies only when the leading dims cannot be collapsed or the last dim is
  strided). x is ``h[r, c]`` and gate ``h[r, D + c]``. A program works on one [BLOCK_R, BLOCK_D]
  tile, grid (cdiv(R, BLOCK_R), cdiv(D, BLOCK_D)): rows on the first grid axis (no 65,535 limit),
  columns contiguous in memory so loads and stores vectorise (Triton specialises integer
  arguments divisible by 16, so for the model's D and row strides it can prove alignment).
  BLOCK_D is a power of two that divides D when one >= 64 does (no masked lanes for the model's
  D = 4·C), else next_pow2(D) capped at 256; BLOCK_R fills a tile of ``TILE`` elements.
  Row offsets are int64, so tensors above 2**31 elements index correctly.
* Precision. Loads are converted to fp32 and all arithmetic is fp32; out / dh are rounded to h's
  dtype (fp32/fp16/bf16) once, at the store (eager PyTorch rounds after the gelu and again after
  the product). Exact GELU as ``F.gelu(approximate="none")`` computes it:
  gelu(g) = g·Φ(g), Φ(g) = (1 + erf(g/√2)) / 2, gelu'(g) = Φ(g) + g·φ(g), φ(g) = exp(-g²/2)/√(2π).
  The erf form loses relative accuracy of Φ for g << 0 (1 + erf ≈ 0), exactly as PyTorch's own
  kernels do; the absolute error stays ~1e-7·|g|. ``APPROX_TANH``: gelu(g) = g·σ(2u) with
  u = √(2/π)·(g + 0.044715·g³) (the identity (1 + tanh u)/2 = σ(2u)), derivative
  σ(2u) + g·σ(2u)·(1 - σ(2u))·2u'.
* The backward recomputes gelu(gate) from h (saved by the caller) instead of keeping the forward's
  activation: one read of h replaces one read of a saved (R, D) tensor, and nothing extra is kept.

Kernel arguments (all tensors on one device):
  h_ptr        (R, 2D) input, fp32/fp16/bf16, row stride ``stride_h``, unit stride along 2D
  out_ptr      (R, D) output, h's dtype, contiguous
  dy_ptr       (R, D) upstream gradient, h's dtype, row stride ``stride_dy``, unit last stride
  dh_ptr       (R, 2D) gradient of h, h's dtype, contiguous
  R, D         rows and output width (h has 2·D columns)
  stride_h, stride_dy   row strides in elements
  BLOCK_R, BLOCK_D      tile sizes (powers of two)
  APPROX_TANH  constexpr: tanh approximation instead of the exact erf GELU
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TILE = 4096
#: the interpreter pays per program: bigger tiles on CPU
TILE_INTERPRETED = 16384
MAX_BLOCK_D = 256
# constants read inside the kernels must be constexpr globals (kept on the right of products:
# the interpreter cannot multiply a constexpr by a tensor from the left)
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)  # 2·√(2/π)
_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _gelu(g, APPROX_TANH: tl.constexpr):
    """gelu(g) for fp32 g."""
    if APPROX_TANH:
        return g * tl.sigmoid((g + g * g * g * _TANH_CUBIC) * _TWO_SQRT_2_OVER_PI)
    return g * (0.5 * (1.0 + tl.erf(g * _SQRT1_2)))


@triton.jit
def _gelu_and_grad(g, APPROX_TANH: tl.constexpr):
    """(gelu(g), gelu'(g)) for fp32 g."""
    if APPROX_TANH:
        s = tl.sigmoid((g + g * g * g * _TANH_CUBIC) * _TWO_SQRT_2_OVER_PI)
        du = (1.0 + g * g * (3.0 * _TANH_CUBIC)) * _TWO_SQRT_2_OVER_PI
        return g * s, s + g * s * (1.0 - s) * du
    cdf = 0.5 * (1.0 + tl.erf(g * _SQRT1_2))
    return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * _INV_SQRT_2PI


@triton.jit
def _geglu_fwd_kernel(
    h_ptr,
    out_ptr,
    R,
    D,
    stride_h,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    APPROX_TANH: tl.constexpr,
):
    """out[r, c] = h[r, c] * gelu(h[r, D + c]) on one [BLOCK_R, BLOCK_D] tile."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    hx = h_ptr + r64 * stride_h + cols[None, :]
    x = tl.load(hx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(hx + D, mask=mask, other=0.0).to(tl.float32)
    y = x * _gelu(g, APPROX_TANH)
    tl.store(out_ptr + r64 * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    h_ptr,
    dy_ptr,
    dh_ptr,
    R,
    D,
    stride_h,
    stride_dy,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    APPROX_TANH: tl.constexpr,
):
    """dh[r, c] = dy·gelu(g), dh[r, D + c] = dy·x·gelu'(g) on one tile (x, g from h)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    hx = h_ptr + r64 * stride_h + cols[None, :]
    x = tl.load(hx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(hx + D, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gl, dgl = _gelu_and_grad(g, APPROX_TANH)
    dhx = dh_ptr + r64 * (2 * D) + cols[None, :]
    tl.store(dhx, (dy * gl).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dhx + D, (dy * x * dgl).to(dh_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------- launchers


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D (rows, last dim) with unit stride along the last dim: a view when the leading
    dims collapse to one row stride, else a contiguous copy."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class Plan:
    """Tile sizes and grid for an (R, 2D) -> (R, D) problem."""

    def __init__(
        self,
        rows: int,
        d: int,
        *,
        interpreted: bool,
        block_r: int | None = None,
        block_d: int | None = None,
    ):
        self.R, self.D = rows, d
        if block_d is None:
            block_d = min(triton.next_power_of_2(d), MAX_BLOCK_D)
            if interpreted:
                block_d = triton.next_power_of_2(d)
            elif d % block_d:
                block_d = next((b for b in (128, 64) if d % b == 0), block_d)
        tile = TILE_INTERPRETED if interpreted else TILE
        if block_r is None:
            block_r = min(triton.next_power_of_2(rows), max(1, tile // block_d))
        self.BLOCK_R, self.BLOCK_D = block_r, block_d
        self.num_warps = 4 if block_r * block_d <= 2048 else 8

    @property
    def grid(self) -> tuple[int, int]:
        return (triton.cdiv(self.R, self.BLOCK_R), triton.cdiv(self.D, self.BLOCK_D))


def _plan(h2: torch.Tensor, **blocks: int | None) -> Plan:
    interpreted = type(_geglu_fwd_kernel).__name__ == "InterpretedFunction"
    return Plan(h2.shape[0], h2.shape[1] // 2, interpreted=interpreted, **blocks)


def geglu_fwd(
    h2: torch.Tensor,
    approximate: str = "none",
    *,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """out (R, D), h2's dtype, contiguous, for ``h2`` (R, 2D) with unit stride along 2D."""
    out = torch.empty(h2.shape[0], h2.shape[1] // 2, dtype=h2.dtype, device=h2.device)
    if out.numel():
        p = _plan(h2, block_r=block_r, block_d=block_d)
        _geglu_fwd_kernel[p.grid](
            h2,
            out,
            p.R,
            p.D,
            h2.stride(0),
            BLOCK_R=p.BLOCK_R,
            BLOCK_D=p.BLOCK_D,
            APPROX_TANH=approximate == "tanh",
            num_warps=p.num_warps,
        )
    return out


def geglu_bwd(
    h2: torch.Tensor,
    dy2: torch.Tensor,
    approximate: str = "none",
    *,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """dh (R, 2D), h2's dtype, contiguous, for ``h2`` (R, 2D) and ``dy2`` (R, D), both with unit
    stride along the last dim."""
    dh = torch.empty(h2.shape, dtype=h2.dtype, device=h2.device)
    if dh.numel():
        p = _plan(h2, block_r=block_r, block_d=block_d)
        _geglu_bwd_kernel[p.grid](
            h2,
            dy2,
            dh,
            p.R,
            p.D,
            h2.stride(0),
            dy2.stride(0),
            BLOCK_R=p.BLOCK_R,
            BLOCK_D=p.BLOCK_D,
            APPROX_TANH=approximate == "tanh",
            num_warps=p.num_warps,
        )
    return dh
