"""Triton GEGLU feed-forward in one kernel: ``out = [r +] geglu(x W1ᵀ + b1) W2ᵀ [+ b2]``.

Design
------
* Why. A transformer block's feed-forward projects x (M, C) to g = geglu(x W1ᵀ + b1) (M, I) with
  I = 4·C, then back to (M, N) with W2. g is the widest activation of the block: the GEGLU GEMM
  writes it and the output projection reads it back, 2·I element transfers per row against the
  C + 2·N of x, the residual and out. Here g never leaves the chip: a program owns BLOCK_M rows;
  for each chunk of BLOCK_I inner columns it computes both GEGLU halves (two fp32 accumulators
  over the whole x tile, K = C), applies bias and ``x * gelu(gate)``, rounds g to x's dtype and
  multiplies it into the output accumulator [BLOCK_M, N] with the chunk's W2 columns: the flash
  attention pattern with GELU in place of the softmax. The epilogue adds b2 and the residual in
  fp32 and rounds once. With the residual read from and written to the same rows (``out`` may
  alias ``r``), a block's ``h += ff(norm(h))`` is one kernel.
* Trade-off. Every program keeps an fp32 [BLOCK_M, N] accumulator and a [BLOCK_M, C] x tile:
  C and N are at most :data:`MAX_DIM` (the LVDM's levels 0-2; its mid block, C = 512, stays on
  the two-GEMM path). Its GEMMs are Triton's, not cuBLAS's, with short reductions (K = C, then
  K = BLOCK_I per chunk). The weights are read from L2 by every row tile, as the two GEMMs read
  them. Whether it pays is measured (``bench/bench_feed_forward.py``); the models use it only on
  :data:`echofast.nn.spatiotemporal.FUSED_FF_DEVICES`.
* Precision. Products accumulate in fp32 (fp32 inputs: IEEE products, no TF32); the biases, GELU
  (exact erf or tanh) and the product are fp32; g is rounded to x's dtype before the second
  product, as the unfused path stores it; out is rounded once. Row offsets are int64.

Kernel arguments (all tensors on one device):
  x_ptr     (M, C) input rows, fp32/fp16/bf16, row stride ``stride_xm``, unit stride along C
  w1_ptr    (2·I, C) [W1x; W1g] (GEGLU.proj.weight), x's dtype, row stride ``stride_w1``
  b1_ptr    (2·I,) GEGLU.proj.bias (read as fp32); unused unless HAS_B1
  w2_ptr    (N, I) output projection weight (nn.Linear layout), x's dtype, row stride ``stride_w2``
  b2_ptr    (N,) its bias (read as fp32); unused unless HAS_B2
  r_ptr     (M, N) residual rows, row stride ``stride_rm`` (may be out); unused unless HAS_R
  out_ptr   (M, N) output rows, x's dtype, row stride ``stride_om``
  M, C, INNER, N   rows, input width, inner width I (W1 has 2·I rows), output width
  BLOCK_M, BLOCK_I   rows per program, inner columns per chunk (powers of two, BLOCK_I >= 16)
  BLOCK_C, BLOCK_N   next powers of two (>= 16) of C and N: the whole width in one tile
  HAS_B1, HAS_B2, HAS_R, APPROX_TANH, IEEE   constexpr flags
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geglu import _gelu

#: the widest C and N one program's tiles hold (fp32 accumulator [BLOCK_M, N], x tile [BLOCK_M, C])
MAX_DIM = 256
#: tile configuration on a GPU, per BLOCK_N: 64 fp32 accumulator registers per thread (128 x
#: 128 or 64 x 256 over 8 warps). Compiled for sm_90 (bench/triton_aot.py, Triton 3.9): fp16 and
#: bf16 use 223-226 registers at N = 128 and 173-181 at N = 256, no local memory; shared memory
#: 176 KiB at N = 128 (64-column chunks, 3 pipeline stages), 128 KiB at N = 256 (32 columns, 2
#: stages: 64 columns took 224 of the 227 KiB and 251 registers); fp32 spills (the op leaves
#: fp32 on a GPU to the two-GEMM path). At N = 128, 3 stages ran 3.6-3.8 % faster than 2 on an
#: H100 at the LVDM's level-0 sites (143.6 vs 149.0 us at 81920 rows, 1056 vs 1098 us at 655360;
#: bench/bench_feed_forward.py, 2026-11-27).
GPU_CONFIGS = {
    128: {"BLOCK_M": 128, "BLOCK_I": 64, "num_warps": 8, "num_stages": 3},
    256: {"BLOCK_M": 64, "BLOCK_I": 32, "num_warps": 8, "num_stages": 2},
}
#: the interpreter pays per program: one large tile
INTERPRETED_CONFIG = {"BLOCK_M": 64, "BLOCK_I": 32, "num_warps": 4, "num_stages": 1}


@triton.jit
def _ff_fwd_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    r_ptr,
    out_ptr,
    M,
    C,
    INNER,
    N,
    stride_xm,
    stride_w1,
    stride_w2,
    stride_rm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    HAS_R: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    IEEE: tl.constexpr,
):
    """out[rows] = r[rows] + geglu(x[rows] W1ᵀ + b1) W2ᵀ + b2 for one tile of BLOCK_M rows."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.arange(0, BLOCK_C)
    rn = tl.arange(0, BLOCK_N)
    ri = tl.arange(0, BLOCK_I)
    mask_m = rm < M
    mask_c = rc < C
    mask_n = rn < N
    rows = rm.to(tl.int64)
    x = tl.load(
        x_ptr + rows[:, None] * stride_xm + rc[None, :],
        mask=mask_m[:, None] & mask_c[None, :],
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i0 in range(0, INNER, BLOCK_I):
        mask_i = (i0 + ri) < INNER
        w1x_tile = w1_ptr + (i0 + ri).to(tl.int64)[:, None] * stride_w1 + rc[None, :]
        w1_mask = mask_i[:, None] & mask_c[None, :]
        w1x = tl.load(w1x_tile, mask=w1_mask, other=0.0)
        w1g = tl.load(w1x_tile + INNER * stride_w1, mask=w1_mask, other=0.0)
        if IEEE:
            hx = tl.dot(x, tl.trans(w1x), input_precision="ieee")
            hg = tl.dot(x, tl.trans(w1g), input_precision="ieee")
        else:
            hx = tl.dot(x, tl.trans(w1x))
            hg = tl.dot(x, tl.trans(w1g))
        if HAS_B1:
            hx += tl.load(b1_ptr + i0 + ri, mask=mask_i, other=0.0).to(tl.float32)[None, :]
            hg += tl.load(b1_ptr + INNER + i0 + ri, mask=mask_i, other=0.0).to(tl.float32)[None, :]
        # g rounded to x's dtype, as the unfused path stores it; zero in columns past INNER
        g = (hx * _gelu(hg, APPROX_TANH)).to(x_ptr.dtype.element_ty)
        w2 = tl.load(
            w2_ptr + rn.to(tl.int64)[:, None] * stride_w2 + (i0 + ri)[None, :],
            mask=mask_n[:, None] & mask_i[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(g, tl.trans(w2), input_precision="ieee")
        else:
            acc += tl.dot(g, tl.trans(w2))
    if HAS_B2:
        acc += tl.load(b2_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_R:
        acc += tl.load(r_ptr + rows[:, None] * stride_rm + rn[None, :], mask=mask).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_om + rn[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def block_width(width: int) -> int:
    """The power-of-two tile (>= 16, tl.dot's minimum) that holds ``width`` columns."""
    return max(16, triton.next_power_of_2(width))


def feed_forward_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    approximate: str = "none",
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Write ``[residual +] geglu(x W1ᵀ + b1) W2ᵀ [+ b2]`` into ``out`` and return it.

    ``x`` (M, C), ``residual`` and ``out`` (M, N): rows with unit stride along the last dim
    (``out`` may be ``residual``); ``w1`` (2·I, C) and ``w2`` (N, I) in x's dtype with unit
    stride along their last dim; ``b1`` (2·I,) and ``b2`` (N,) contiguous or None; C, N <=
    :data:`MAX_DIM`. ``config``: BLOCK_M, BLOCK_I, num_warps, num_stages (default: by N's tile
    from :data:`GPU_CONFIGS`, or :data:`INTERPRETED_CONFIG` under the interpreter).
    """
    m, c = x.shape
    inner = w1.shape[0] // 2
    n = w2.shape[0]
    if m == 0:
        return out
    block_c, block_n = block_width(c), block_width(n)
    if config is None:
        if type(_ff_fwd_kernel).__name__ == "InterpretedFunction":
            config = INTERPRETED_CONFIG
        else:
            config = GPU_CONFIGS[max(128, block_n)]
    _ff_fwd_kernel[(triton.cdiv(m, config["BLOCK_M"]),)](
        x,
        w1,
        w1 if b1 is None else b1,
        w2,
        w2 if b2 is None else b2,
        out if residual is None else residual,
        out,
        m,
        c,
        inner,
        n,
        x.stride(0),
        w1.stride(0),
        w2.stride(0),
        out.stride(0) if residual is None else residual.stride(0),
        out.stride(0),
        BLOCK_M=config["BLOCK_M"],
        BLOCK_I=config["BLOCK_I"],
        BLOCK_C=block_c,
        BLOCK_N=block_n,
        HAS_B1=b1 is not None,
        HAS_B2=b2 is not None,
        HAS_R=residual is not None,
        APPROX_TANH=approximate == "tanh",
        IEEE=x.dtype == torch.float32,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out
