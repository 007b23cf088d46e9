"""Triton attention forward, softmax(scale · Q Kᵀ) V, for many short sequences with small heads.

Design
------
* Target. The video UNet's attention: head dim D = 16 (8 in the image UNet), sequences of a few
  to a few hundred tokens (temporal: T = 64 frames; spatial: 256/64/16/4 tokens), and very many of
  them (N·heads up to several hundred thousand). Generic flash kernels round D up to 32 or more
  and tile for long sequences, so such calls are mostly padding and launch overhead.
* Tiles. A tile holds ``BLOCK_M = G·SUB_M`` query rows and ``BLOCK_N = G·SUB_N`` key rows: ``G``
  sequences packed side by side, SUB_M (SUB_N) rows each. Short sequences (both lengths ≤ 64)
  are packed until a tile has 64 rows (G = 64 / next_pow2(L)): Q Kᵀ of the packed tile is one
  ``tl.dot`` whose off-diagonal (cross-sequence) blocks are masked to -inf. The waste is in the
  tensor-core product, which is cheap at D ≤ 64, instead of in launches or in 16-row minimum
  tiles holding one 4-token sequence. Long sequences use G = 1 and loop over 64-row query tiles
  and 64-row key tiles with the online softmax (flash attention); a short sequence is one
  iteration of the same loops, so there is one code path.
* Work split. The grid is 1-D and persistent: ``min(num_groups, SMs · PROGRAMS_PER_SM)``
  programs each walk the groups of G whole sequences ``pid, pid + P, ...``. No grid axis grows
  with N·heads beyond the (2^31 - 1) limit of axis 0, and every program handles several whole
  sequences (one launch, no per-sequence work on the host).
* Layouts. Q, K, V and O are addressed through five strides each, (n1, n2, h, l, d), so Q/K/V
  can be strided views of the projections' (B, L, heads·D) outputs (also of one fused QKV GEMM)
  and O can be written straight into the (B, L, heads·D) layout the output projection reads.
  The second batch level n2 takes attention along the frames of frame-major (B, T, S, heads·D)
  tokens (sequence (b, s), positions t, one fused QKV GEMM's output) without a transposed copy:
  (b, s) is not one stride there. 4-D inputs have N2 = 1. Triton specialises strides equal to 1,
  so the unit-stride d axis is vectorised. Offsets are int64.
* Head dim. D and Dv are padded to ``BLOCK_D = max(16, D)`` (masked loads): ``tl.dot`` needs
  K ≥ 16, so D = 8 costs a 2× larger (still tiny) Q Kᵀ product and nothing in memory traffic.
* Precision. Scores, the running max m, the running sum l and the accumulator are fp32. The
  softmax uses exp2 with ``scale · log2(e)`` folded into one multiply of the scores. fp32 inputs
  use IEEE fp32 products (no TF32); for fp16/bf16 the probabilities P are rounded to the input
  dtype for the P·V tensor-core product (as flash attention does), accumulation stays fp32, and
  O is rounded once at the store.
* Backward is not here: the op's autograd Function recomputes through the reference.

Kernel arguments (all tensors on one device):
  q_ptr        Q (N1, N2, H, Lq, D) with strides (sqn, sqn2, sqh, sql, sqd)
  k_ptr        K (N1, N2, H, Lk, D) with strides (skn, skn2, skh, skl, skd)
  v_ptr        V (N1, N2, H, Lk, Dv) with strides (svn, svn2, svh, svl, svd)
  o_ptr        O (N1, N2, H, Lq, Dv) output, Q's dtype, strides (son, son2, soh, sol, sod)
  NH, H, N2    number of sequences N1·N2·H, heads H and the inner batch N2 (sequence s is
               n = s // H, h = s % H, n1 = n // N2, n2 = n % N2)
  Lq, Lk       query and key lengths
  num_groups   cdiv(NH, G): groups of G sequences, walked persistently by the programs
  qk_scale     scale · log2(e) as a float
  D, DV        head dims of Q/K and of V (constexpr)
  BLOCK_D, BLOCK_DV   max(16, D), max(16, Dv)
  SUB_M, SUB_N        query / key rows per sequence in a tile (powers of two)
  G            sequences per tile (power of two); BLOCK_M = G·SUB_M, BLOCK_N = G·SUB_N ≥ 16
  IEEE         constexpr: fp32 inputs, use IEEE fp32 products in tl.dot
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

#: packed tile height for short sequences, and the query / key tile for long ones
TILE = 64
#: persistent programs per SM
PROGRAMS_PER_SM = 8
#: supported head dims (Q/K and V)
HEAD_DIMS = (8, 16, 32, 64)
_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    NH,
    H,
    N2,
    Lq,
    Lk,
    num_groups,
    qk_scale,
    sqn,
    sqn2,
    sqh,
    sql,
    sqd,
    skn,
    skn2,
    skh,
    skl,
    skd,
    svn,
    svn2,
    svh,
    svl,
    svd,
    son,
    son2,
    soh,
    sol,
    sod,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SUB_M: tl.constexpr,
    SUB_N: tl.constexpr,
    G: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Each program walks groups of G whole sequences; per group, query tiles × key tiles."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    BLOCK_M: tl.constexpr = G * SUB_M
    BLOCK_N: tl.constexpr = G * SUB_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_seq = rows // SUB_M  # which packed sequence a query row belongs to
    row_pos = rows % SUB_M
    col_seq = cols // SUB_N
    col_pos = cols % SUB_N
    same_seq = row_seq[:, None] == col_seq[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    for grp in range(pid, num_groups, nprog):
        seq_r = (grp * G + row_seq).to(tl.int64)
        seq_c = (grp * G + col_seq).to(tl.int64)
        ok_r = seq_r < NH
        ok_c = seq_c < NH
        n_r, h_r = seq_r // H, seq_r % H
        n_c, h_c = seq_c // H, seq_c % H
        n1_r, n2_r = n_r // N2, n_r % N2
        n1_c, n2_c = n_c // N2, n_c % N2
        q_row = q_ptr + n1_r * sqn + n2_r * sqn2 + h_r * sqh
        o_row = o_ptr + n1_r * son + n2_r * son2 + h_r * soh
        k_row = k_ptr + n1_c * skn + n2_c * skn2 + h_c * skh
        v_row = v_ptr + n1_c * svn + n2_c * svn2 + h_c * svh
        for m0 in range(0, Lq, SUB_M):
            qm = m0 + row_pos
            mask_q = ok_r & (qm < Lq)
            q = tl.load(
                q_row[:, None] + qm.to(tl.int64)[:, None] * sql + offs_d[None, :] * sqd,
                mask=mask_q[:, None] & mask_d[None, :],
                other=0.0,
            )
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            for n0 in range(0, Lk, SUB_N):
                kn = n0 + col_pos
                in_seq = kn < Lk
                mask_k = ok_c & in_seq
                kn64 = kn.to(tl.int64)[:, None]
                k = tl.load(
                    k_row[:, None] + kn64 * skl + offs_d[None, :] * skd,
                    mask=mask_k[:, None] & mask_d[None, :],
                    other=0.0,
                )
                v = tl.load(
                    v_row[:, None] + kn64 * svl + offs_dv[None, :] * svd,
                    mask=mask_k[:, None] & mask_dv[None, :],
                    other=0.0,
                )
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                # keys past Lk and keys of another packed sequence do not exist for this row
                s = tl.where(same_seq & in_seq[None, :], s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if IEEE:
                    pv = tl.dot(p, v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
            out = acc / l_i[:, None]
            tl.store(
                o_row[:, None] + qm.to(tl.int64)[:, None] * sol + offs_dv[None, :] * sod,
                out.to(o_ptr.dtype.element_ty),
                mask=mask_q[:, None] & mask_dv[None, :],
            )


# ----------------------------------------------------------------------------------- launchers


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class Plan:
    """Tile shape and program count for one (N·H, Lq, Lk, D, Dv) problem (N: every batch dim).

    ``tile`` overrides the packed tile height / long-sequence tile (a power of two ≥ 16);
    ``max_programs`` caps the persistent grid (default: SMs · PROGRAMS_PER_SM on CUDA, one
    program per group in the interpreter).
    """

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        tile: int | None = None,
        max_programs: int | None = None,
    ):
        *batch, h, lq, d = q.shape
        n = math.prod(batch)
        lk, dv = k.shape[-2], v.shape[-1]
        tile = TILE if tile is None else tile
        if tile < 16 or tile & (tile - 1):
            raise ValueError(f"tile must be a power of two >= 16, got {tile}")
        self.NH, self.H, self.Lq, self.Lk, self.D, self.DV = n * h, h, lq, lk, d, dv
        self.BLOCK_D = max(16, d)
        self.BLOCK_DV = max(16, dv)
        pq, pk = triton.next_power_of_2(lq), triton.next_power_of_2(lk)
        if max(pq, pk) <= tile:
            # short: pack G sequences into one tile of `tile` rows
            self.G = tile // max(pq, pk)
            self.SUB_M = max(pq, 16 // self.G)
            self.SUB_N = max(pk, 16 // self.G)
        else:
            self.G = 1
            self.SUB_M = min(max(pq, 16), tile)
            self.SUB_N = min(max(pk, 16), tile)
        self.num_groups = triton.cdiv(self.NH, self.G)
        if max_programs is None:
            max_programs = (
                _sm_count(q.device.index) * PROGRAMS_PER_SM if q.is_cuda else self.num_groups
            )
        self.num_programs = max(1, min(self.num_groups, max_programs))
        self.num_warps = 4 if self.G * self.SUB_M * self.G * self.SUB_N <= 64 * 64 else 8

    @property
    def grid(self) -> tuple[int]:
        return (self.num_programs,)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    tile: int | None = None,
    max_programs: int | None = None,
) -> torch.Tensor:
    """softmax(scale · Q Kᵀ) V.

    Args:
        q: (N, H, Lq, D), k: (N, H, Lk, D), v: (N, H, Lk, Dv); or with two batch dims
            (N1, N2, H, L, ·); any strides, one dtype (fp32/fp16/bf16), D and Dv in
            :data:`HEAD_DIMS`.
        scale: multiplier of Q Kᵀ.
        tile, max_programs: see :class:`Plan` (tests and benchmarks).

    Returns:
        (N, H, Lq, Dv) in q's dtype: a transposed view of a token-major (N, Lq, H, Dv) tensor, so
        ``out.transpose(1, 2).reshape(N, Lq, H * Dv)`` is free. With two batch dims,
        (N1, N2, H, Lq, Dv): a permuted view of a (N1, Lq, N2, H, Dv) tensor, so
        ``out.permute(0, 3, 1, 2, 4).reshape(N1, Lq, N2, H * Dv)`` is free (frame-major tokens).
    """
    if q.dim() not in (4, 5):
        raise ValueError(f"attention_fwd: q must be 4-D or 5-D, got {tuple(q.shape)}")
    p = Plan(q, k, v, tile=tile, max_programs=max_programs)
    if q.dim() == 4:
        n, h, lq, _ = q.shape
        out = torch.empty(n, lq, h, p.DV, dtype=q.dtype, device=q.device).transpose(1, 2)
        strides = [(t.stride(0), 0, *t.stride()[1:]) for t in (q, k, v, out)]
        n2 = 1
    else:
        n1, n2, h, lq, _ = q.shape
        out = torch.empty(n1, lq, n2, h, p.DV, dtype=q.dtype, device=q.device)
        out = out.permute(0, 2, 3, 1, 4)
        strides = [t.stride() for t in (q, k, v, out)]
    if out.numel() == 0:
        return out
    _attn_fwd_kernel[p.grid](
        q,
        k,
        v,
        out,
        p.NH,
        p.H,
        n2,
        p.Lq,
        p.Lk,
        p.num_groups,
        float(scale) * _LOG2E,
        *strides[0],
        *strides[1],
        *strides[2],
        *strides[3],
        D=p.D,
        DV=p.DV,
        BLOCK_D=p.BLOCK_D,
        BLOCK_DV=p.BLOCK_DV,
        SUB_M=p.SUB_M,
        SUB_N=p.SUB_N,
        G=p.G,
        IEEE=q.dtype == torch.float32,
        num_warps=p.num_warps,
    )
    return out
