"""Triton GEGLU feed-forward projection: ``out = (x Wxᵀ + bx) * gelu(x Wgᵀ + bg)`` in one GEMM.

Design
------
* Why. A feed-forward's GEGLU projects x (M, K) to h (M, 2N) with one GEMM, writes h, and the
  GEGLU pass reads h back and writes out (M, N): 2N + 2N + N element transfers per row besides
  the GEMM's own reads. Here each program computes the same output tile of both halves, x·Wxᵀ
  and x·Wgᵀ (two fp32 accumulators over the same A tiles), and applies the bias and x·gelu(g) in
  registers: only out is written. The trade-off: a Triton GEMM instead of cuBLAS's. It pays only
  if the GEMM stays near cuBLAS at these shapes (K = C = 128–512, N = 4·C, M = tokens); the
  models use it only where :data:`echofast.nn.spatiotemporal.FUSED_GEGLU_DEVICES` says, which a
  GPU benchmark (``bench/bench_geglu.py``, provider ``echofast_fused_gemm``) decides.
* Tiles. Program (pid_m, pid_n) owns out[BLOCK_M rows, BLOCK_N columns]: it loads each
  [BLOCK_M, BLOCK_K] tile of x once and the matching [BLOCK_N, BLOCK_K] tiles of Wx (rows n of
  the weight) and Wg (rows N + n), so x is read cdiv(N, BLOCK_N) times in all, as in a plain
  GEMM over 2N columns with 2·BLOCK_N-wide tiles. Programs are ordered in groups of GROUP_M
  row tiles so that consecutive programs share weight tiles in L2. Row offsets are int64.
* Precision. Products accumulate in fp32 (``tl.dot``; fp32 inputs use IEEE products, no TF32),
  the bias is added in fp32, GELU (exact erf or tanh, as :mod:`echofast.kernels.geglu`) and the
  product are fp32, and out is rounded once to x's dtype. The unfused path rounds h to x's dtype
  first: the fused result is the more exact one, by about one rounding of h.

Kernel arguments (all tensors on one device):
  a_ptr      (M, K) input x, fp32/fp16/bf16, row stride ``stride_am``, unit stride along K
  w_ptr      (2N, K) weight [Wx; Wg], x's dtype, row stride ``stride_wn``, unit stride along K
  b_ptr      (2N,) bias [bx; bg] (any float dtype, read as fp32); unused unless HAS_BIAS
  out_ptr    (M, N) output, x's dtype, row stride ``stride_om``, unit stride along N
  M, N, K    rows, output width (the weight has 2N rows), reduction width
  BLOCK_M, BLOCK_N, BLOCK_K   tile sizes (powers of two, BLOCK_K >= 16)
  GROUP_M    row tiles per program group (L2 reuse of weight tiles)
  HAS_BIAS, APPROX_TANH, IEEE constexpr: add the bias; tanh GELU; IEEE fp32 products
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geglu import _gelu

#: tile configuration for a GPU: 2 × 128 × 64 fp32 accumulators over 8 warps. Compiled for
#: sm_90 with Triton 3.6 (bench/triton_aot.py): BLOCK_K = 32 uses 254 registers and no local
#: memory in fp16/bf16; BLOCK_K = 64 (2 or 3 stages) and 4-warp variants spill 136–1,440 bytes.
#: Not yet timed on a GPU (``bench/bench_geglu.py``).
GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
#: the interpreter pays per program: one large tile
INTERPRETED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
GROUP_M = 8


@triton.jit
def _geglu_linear_kernel(
    a_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    IEEE: tl.constexpr,
):
    """out tile = (a Wxᵀ + bx) * gelu(a Wgᵀ + bg) for one [BLOCK_M, BLOCK_N] tile."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    a_tile = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    wx_tile = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    wg_tile = wx_tile + N * stride_wn
    acc_x = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + rk) < K
        a = tl.load(a_tile, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wx = tl.load(wx_tile, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(wg_tile, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if IEEE:
            acc_x += tl.dot(a, tl.trans(wx), input_precision="ieee")
            acc_g += tl.dot(a, tl.trans(wg), input_precision="ieee")
        else:
            acc_x += tl.dot(a, tl.trans(wx))
            acc_g += tl.dot(a, tl.trans(wg))
        a_tile += BLOCK_K
        wx_tile += BLOCK_K
        wg_tile += BLOCK_K
    if HAS_BIAS:
        acc_x += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = acc_x * _gelu(acc_g, APPROX_TANH)
    o = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------- launchers


def geglu_linear_fwd(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    approximate: str = "none",
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """out (M, N) in a's dtype, contiguous, for ``a`` (M, K) with unit stride along K, ``weight``
    (2N, K) in a's dtype with unit stride along K, ``bias`` (2N,) contiguous or None.
    ``config``: tile sizes, warps and stages (default: :data:`GPU_CONFIG`, or
    :data:`INTERPRETED_CONFIG` under the interpreter)."""
    m, k = a.shape
    n = weight.shape[0] // 2
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if config is None:
        interpreted = type(_geglu_linear_kernel).__name__ == "InterpretedFunction"
        config = INTERPRETED_CONFIG if interpreted else GPU_CONFIG
    c = dict(config)
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
    _geglu_linear_kernel[grid](
        a,
        weight,
        weight if bias is None else bias,
        out,
        m,
        n,
        k,
        a.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=c["BLOCK_M"],
        BLOCK_N=c["BLOCK_N"],
        BLOCK_K=c["BLOCK_K"],
        GROUP_M=GROUP_M,
        HAS_BIAS=bias is not None,
        APPROX_TANH=approximate == "tanh",
        IEEE=a.dtype == torch.float32,
        num_warps=c["num_warps"],
        num_stages=c["num_stages"],
    )
    return out
