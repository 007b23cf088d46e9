"""Triton GroupNorm (+ ``y * (1 + scale) + shift``) (+ SiLU), forward and backward, 3D/4D/5D.

Design
------
* Indexing. x (N, C, *spatial) is viewed as (N, C, S), S = prod(spatial), with one stride per
  axis: contiguous -> (C*S, S, 1), channels_last(_3d) -> (S*C, 1, C). Group g of sample n is the
  (C/G, S) slab ``x[n, g*CG:(g+1)*CG, :]``; a program works on [BLOCK_C, BLOCK_S] tiles of it
  (BLOCK_C = next_pow2(CG) covers every channel of the group, BLOCK_S spans spatial positions).
  Triton specialises integer arguments equal to 1, so the unit stride (s for contiguous, c for
  channels_last) is a compile-time constant and loads vectorise along it in both layouts.
* Work split (two-stage reduction). The grid is (N*G, num_chunks): the spatial axis of every group
  is cut into ``num_chunks`` chunks of ``chunk_s`` positions (a multiple of BLOCK_S). When N*G is
  small -- the LVDM's temporal GroupNorm has N*G = 32 (or 64) groups of (C/32)*T*H*W elements --
  the launcher picks num_chunks so that about 4 programs per SM exist and the GPU fills. Stage 1
  writes one partial result per (group, chunk); stage 2 (the elementwise pass) first finalises
  the group's statistics from those partials in its prologue (a tiny [BLOCK_K] reduction that every
  program of the group repeats, so no separate finalize launch), then processes its chunk.
  Forward = 2 launches (stats, apply) when a group is split; when it is not (num_chunks == 1: the
  UNets' spatial GroupNorms, whose groups are one tile, and any N*G that fills the GPU alone)
  one launch (``_gn_fwd_fused_kernel``: statistics, then y, in one program per group; a one-tile
  group's second read hits the cache). Backward = 2 launches (per-channel partial sums, dx).
* Channels-last rows kernels (``_gn_fwd_rows_kernel``; split: ``_gn_fwd_rows_stats_kernel`` +
  ``_gn_fwd_rows_apply_kernel``; forward only, GPU only). In channels-last memory a group's CG
  channels at one position are 8-80 contiguous bytes, and the per-group programs above read only
  those: a fraction of every 32-byte sector, many requests for few bytes (the H200 measured 10-28
  % of copy bandwidth on the LVDM's shapes). When x and y are channels-last, a program reads tiles
  of whole rows [BLOCK_S positions, BLOCK_G * BLOCK_CG channel columns] (contiguous) and keeps
  per-channel moments, merged at the end into a group's (equal counts), in one of two forms
  (``DENSE``). Tiles: per-channel accumulators, each tile's moments from one reduction along the
  positions, merged across tiles; the loads are per element where CG is not a multiple of 16.
  Where it is (``DENSE``: CG == BLOCK_CG, a multiple of 16) the compiler vectorizes the loads
  (16 bytes per thread) and spreads the positions across warps, so that reduction would cross
  warps at every tile (the H100 measured it at 14 % of copy bandwidth, C = 512); there a Welford
  accumulator per tile element takes elementwise updates (no reduction inside the loop) and the
  [BLOCK_S] partials of each channel are merged once at the end. On the H100 (fp16, graph
  timings, LVDM shapes) the element form with 16-byte loads everywhere CG is a power of two was
  3.2x faster at C = 512 (8x8 maps at 512 frames) but 1.2-3.8x slower at C = 128-384 and 768 than
  the tile form, hence the split by CG. (A first form reduced [BLOCK_S, BLOCK_G, BLOCK_CG] tiles
  to per-group moments at every tile: 160-255 registers per thread for sm_90.) When the N
  samples alone fill the device (N >= multiprocessors: the LVDM's spatial GroupNorms over B·T
  frames) one program per sample takes its statistics and then writes y (its rows are still in L2:
  one sample is S·C elements). Fewer samples (the temporal GroupNorms over B·windows videos of
  T·H·W positions) split each sample's positions into chunks, as the per-group kernels split
  groups: stage 1 stores every group's partial moments per (sample, chunk) in the per-group
  layout, stage 2 merges a [BLOCK_G, BLOCK_K] tile of them in its prologue and writes y.
  Trade-off: the per-group kernels fill the device with fewer launches (one when N*G alone fills
  it), the rows kernels read whole sectors. Their statistics are the two-pass tiles below or
  Welford's per element (as stable for |mean| >> std), the per-element arithmetic of y the same
  as the group kernels'.
* Statistics in fp32, parallel Welford (Chan et al.): each tile's mean and M2 = sum((x - mean)^2)
  are computed exactly two-pass in registers, tiles and then chunks are merged with Chan's
  formula. This reads x once for the statistics (a global two-pass would read it twice) while
  keeping the accuracy of two-pass: no E[x^2] - E[x]^2 cancellation when |mean| >> std.
* Precision. Every load is converted to fp32 and all arithmetic is fp32; y/dx are rounded to the
  output dtype (fp32/fp16/bf16) once, at the store. mean and rstd are stored fp32 (N*G,) for the
  backward, which recomputes xhat (and the SiLU input) from x instead of keeping activations.
* Forward per element: y = act((x - mean) * A[c] + B[c]) with A = rstd * w * (1 + scale),
  B = b * (1 + scale) + shift (per (n, c), computed once per program). With an input add,
  statistics are those of x + add (added in fp32 at load) and y uses x - (mean - add[c]).
* Backward: with gamma = w * (1 + scale), z the pre-activation and dz = dy * act'(z):
  stage 1 stores per-channel partials ds = sum_s dz and dg = sum_s dz * xhat per chunk;
  stage 2 sums them over chunks (and stores ds, dg as (N, C) fp32 for the parameter gradients,
  which the caller forms from these tiny tensors), then
  dx = rstd * (gamma * dz - mean_group(gamma * dz) - xhat * mean_group(gamma * dz * xhat)).
* Block sizes: tiles of at most ``MAX_TILE`` = 4096 elements (BLOCK_S = 4096 // BLOCK_C, capped at
  next_pow2(S)); 4 warps up to 2048 elements, 8 above. CG must be <= ``MAX_GROUP_CHANNELS``.
  Offsets are int64 so tensors above 2**31 elements index correctly.

Kernel arguments (all tensors on one device; "fp32" buffers are scratch/outputs made here):
  x_ptr, dy_ptr        input / upstream gradient, (N, C, S) with strides (s*n, s*c, s*s)
  y_ptr, dx_ptr        output / input gradient, (N, C, S), x's dtype, own strides
  w_ptr, b_ptr         (C,) affine weight / bias, any float dtype (read if HAS_W / HAS_B)
  scale_ptr, shift_ptr (N, C) contiguous modulation (read if HAS_SCALE / HAS_SHIFT)
  add_ptr, add_rep     (N / add_rep, C) with unit stride along C and row stride
  stride_add           ``stride_add``, added to x before normalising, row n // add_rep for
                       sample n (forward only, read if HAS_ADD): the resnets'
                       time-embedding add folded into the GroupNorm that follows it
  mean_part_ptr, m2_part_ptr  fp32 (N*G, num_chunks): per-chunk mean and M2 (both families)
  mean_ptr, rstd_ptr   fp32 (N*G,): group mean and 1/sqrt(var + eps)
  ds_part_ptr, dg_part_ptr    fp32 (N*C, num_chunks): per-chunk sum dz, sum dz*xhat
  ds_ptr, dg_ptr       fp32 (N, C): the same summed over chunks
  C, S, G, CG          channels, spatial size, groups, channels per group (CG = C // G)
  chunk_s, num_chunks  spatial positions per chunk (multiple of BLOCK_S) and chunk count
  inv_count            1 / (CG * S) as a float
  eps                  variance epsilon
  BLOCK_C, BLOCK_S, BLOCK_K   tile sizes (powers of two); BLOCK_K = next_pow2(num_chunks)
  BLOCK_G, BLOCK_CG    rows kernels: next_pow2(G), next_pow2(CG) (a row tile is BLOCK_G·BLOCK_CG)
  DENSE                rows kernels: CG == BLOCK_CG and a multiple of 16 (the tile's columns
                       are the channels, in order: 16-byte loads; per-element Welford moments)
  chunk_s, num_chunks  rows kernels: the same per-sample split of the positions
  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACT_SILU   constexpr switches
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_TILE = 4096
MAX_GROUP_CHANNELS = 1024
PROGRAMS_PER_SM = 4
MAX_ROW_PARTIALS = 2048
SECTOR_BYTES = 32
#: the rows kernels' DENSE form (16-byte loads, per-element Welford) where CG is a power of two
#: and a multiple of this (the module docstring's H100 measurement)
DENSE_MULTIPLE = 16
ROWS_SPLIT_MIN_BYTES = 4 << 20


@triton.jit
def _group_coeffs(
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    n,
    c,
    mask_c,
    C,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    """At channels ``c`` (any shape, masked by ``mask_c``) of sample n: gamma = w * (1 + scale),
    beta = b * (1 + scale) + shift (fp32, c's shape)."""
    w = tl.full(c.shape, 1.0, tl.float32)
    b = tl.zeros(c.shape, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=mask_c, other=1.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(scale_ptr + n * C + c, mask=mask_c, other=0.0).to(tl.float32)
        w = w * s1
        b = b * s1
    if HAS_SHIFT:
        b = b + tl.load(shift_ptr + n * C + c, mask=mask_c, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _add_vector(add_ptr, n, add_rep, c, mask_c, stride_add, HAS_ADD: tl.constexpr):
    """Row ``n // add_rep`` (row stride ``stride_add``) of the (N / add_rep, C) input add, at
    channels ``c`` (any shape; fp32, c's shape; zeros without HAS_ADD)."""
    if HAS_ADD:
        row = (n // add_rep).to(tl.int64) * stride_add
        return tl.load(add_ptr + row + c, mask=mask_c, other=0.0).to(tl.float32)
    return tl.zeros(c.shape, tl.float32)


@triton.jit
def _moments(
    xrow, addv, s_start, s_end, sxs, mask_c, CG, BLOCK_S: tl.constexpr, HAS_ADD: tl.constexpr
):
    """(mean, M2) in fp32 of the tile rows ``xrow`` ([BLOCK_C, 1] pointers of the group's
    channels), plus ``addv`` ([BLOCK_C] fp32, per channel) if HAS_ADD, over spatial positions
    [s_start, s_end): tile by tile, each tile two-pass in registers, merged with Chan's formula."""
    offs_s = tl.arange(0, BLOCK_S)
    mean = 0.0
    m2 = 0.0
    cnt = 0.0
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + offs_s
        mask = mask_c[:, None] & (s < s_end)[None, :]
        xv = tl.load(xrow + s.to(tl.int64)[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            xv = tl.where(mask, xv + addv[:, None], 0.0)
        n_t = (tl.minimum(s_end - s0, BLOCK_S) * CG).to(tl.float32)
        m_t = tl.sum(xv) / n_t
        d = tl.where(mask, xv - m_t, 0.0)
        m2_t = tl.sum(d * d)
        cnt_new = cnt + n_t
        delta = m_t - mean
        mean = mean + delta * (n_t / cnt_new)
        m2 = m2 + m2_t + delta * delta * (cnt * n_t / cnt_new)
        cnt = cnt_new
    return mean, m2


@triton.jit
def _normalize(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    add_ptr,
    add_rep,
    stride_add,
    n,
    g,
    mean,
    rstd,
    C,
    CG,
    s_start,
    s_end,
    sxn,
    sxc,
    sxs,
    syn,
    syc,
    sys,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """y = act((x + add - mean) * rstd * gamma + beta) of group g of sample n, positions
    [s_start, s_end), rounded once to y's dtype."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    mask_c = offs_c < CG
    c = g * CG + offs_c
    gamma, beta = _group_coeffs(
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        n,
        c,
        mask_c,
        C,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
    )
    a = (gamma * rstd)[:, None]
    bb = beta[:, None]
    # x + add - mean = x - (mean - add): one per-channel centre
    centre = (mean - _add_vector(add_ptr, n, add_rep, c, mask_c, stride_add, HAS_ADD))[:, None]
    c64 = c.to(tl.int64)[:, None]
    xrow = x_ptr + n.to(tl.int64) * sxn + c64 * sxc
    yrow = y_ptr + n.to(tl.int64) * syn + c64 * syc
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + offs_s
        s64 = s.to(tl.int64)[None, :]
        mask = mask_c[:, None] & (s < s_end)[None, :]
        xv = tl.load(xrow + s64 * sxs, mask=mask, other=0.0).to(tl.float32)
        z = (xv - centre) * a + bb
        if ACT_SILU:
            z = z * tl.sigmoid(z)
        tl.store(yrow + s64 * sys, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_partials(mean_part_ptr, m2_part_ptr, idx, offs_k, mask, S, CG, chunk_s, inv_count, eps):
    """Mean and rstd of groups from their chunks' (mean, M2) partials at ``idx`` ([..., BLOCK_K]
    offsets into the (N*G, num_chunks) partials, read where ``mask``; chunk ``offs_k`` along the
    last axis): Chan's merge along that axis, one result per leading index (a scalar for a
    [BLOCK_K] ``idx``)."""
    pm = tl.load(mean_part_ptr + idx, mask=mask, other=0.0)
    pm2 = tl.load(m2_part_ptr + idx, mask=mask, other=0.0)
    cnt = tl.where(mask, (tl.minimum(S - offs_k * chunk_s, chunk_s) * CG).to(tl.float32), 0.0)
    mean = tl.sum(cnt * pm, axis=-1) * inv_count
    dm = pm - tl.expand_dims(mean, -1)
    var = tl.maximum(tl.sum(pm2 + cnt * dm * dm, axis=-1) * inv_count, 0.0)
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _gn_fwd_stats_kernel(
    x_ptr,
    add_ptr,
    mean_part_ptr,
    m2_part_ptr,
    add_rep,
    stride_add,
    C,
    S,
    G,
    CG,
    chunk_s,
    num_chunks,
    sxn,
    sxc,
    sxs,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """Stage 1: mean and M2 of chunk ``program_id(1)`` of group ``program_id(0)`` (= n*G + g)."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid % G
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CG
    row = x_ptr + n.to(tl.int64) * sxn + (g * CG + offs_c).to(tl.int64)[:, None] * sxc
    addv = _add_vector(add_ptr, n, add_rep, g * CG + offs_c, mask_c, stride_add, HAS_ADD)
    s_start = k * chunk_s
    s_end = tl.minimum(s_start + chunk_s, S)
    mean, m2 = _moments(row, addv, s_start, s_end, sxs, mask_c, CG, BLOCK_S, HAS_ADD)
    tl.store(mean_part_ptr + pid * num_chunks + k, mean)
    tl.store(m2_part_ptr + pid * num_chunks + k, m2)


@triton.jit
def _gn_fwd_apply_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    add_ptr,
    mean_part_ptr,
    m2_part_ptr,
    mean_ptr,
    rstd_ptr,
    add_rep,
    stride_add,
    C,
    S,
    G,
    CG,
    chunk_s,
    num_chunks,
    inv_count,
    eps,
    sxn,
    sxc,
    sxs,
    syn,
    syc,
    sys,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """Stage 2: finalise the group's statistics from the chunk partials, then write y."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid % G
    # finalize (Chan's merge of all chunks; repeated by every program of the group)
    offs_k = tl.arange(0, BLOCK_K)
    idx = pid * num_chunks + offs_k
    mean, rstd = _merge_partials(
        mean_part_ptr, m2_part_ptr, idx, offs_k, offs_k < num_chunks, S, CG, chunk_s, inv_count, eps
    )
    if k == 0:
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
    s_start = k * chunk_s
    s_end = tl.minimum(s_start + chunk_s, S)
    _normalize(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        add_ptr,
        add_rep,
        stride_add,
        n,
        g,
        mean,
        rstd,
        C,
        CG,
        s_start,
        s_end,
        sxn,
        sxc,
        sxs,
        syn,
        syc,
        sys,
        BLOCK_C,
        BLOCK_S,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
        ACT_SILU,
        HAS_ADD,
    )


@triton.jit
def _gn_fwd_fused_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    add_ptr,
    mean_ptr,
    rstd_ptr,
    add_rep,
    stride_add,
    C,
    S,
    G,
    CG,
    inv_count,
    eps,
    sxn,
    sxc,
    sxs,
    syn,
    syc,
    sys,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """One launch when a group needs no split (num_chunks == 1): program ``program_id(0)`` (=
    n*G + g) takes its group's statistics, then writes y. When the group is one tile (S <=
    BLOCK_S, the spatial GroupNorms of the UNets) the second read of x hits the cache the first
    one filled."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CG
    row = x_ptr + n.to(tl.int64) * sxn + (g * CG + offs_c).to(tl.int64)[:, None] * sxc
    addv = _add_vector(add_ptr, n, add_rep, g * CG + offs_c, mask_c, stride_add, HAS_ADD)
    mean, m2 = _moments(row, addv, 0, S, sxs, mask_c, CG, BLOCK_S, HAS_ADD)
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 * inv_count, 0.0) + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    _normalize(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        add_ptr,
        add_rep,
        stride_add,
        n,
        g,
        mean,
        rstd,
        C,
        CG,
        0,
        S,
        sxn,
        sxc,
        sxs,
        syn,
        syc,
        sys,
        BLOCK_C,
        BLOCK_S,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
        ACT_SILU,
        HAS_ADD,
    )


@triton.jit
def _row_channels(G, CG, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, DENSE: tl.constexpr):
    """Channel index c = g * CG + j of a row tile's [BLOCK_G * BLOCK_CG] columns (column
    i = g * BLOCK_CG + j), and its mask. ``DENSE`` (CG == BLOCK_CG): c = i,
    written so that the compiler sees the columns contiguous and loads 16 bytes per thread
    (computed from a run-time CG it issues one 2-byte load per half-precision element)."""
    i = tl.arange(0, BLOCK_G * BLOCK_CG)
    if DENSE:
        c = i
        mask = i < G * BLOCK_CG
    else:
        g = i // BLOCK_CG
        j = i % BLOCK_CG
        c = g * CG + j
        mask = (g < G) & (j < CG)
    return c, mask


@triton.jit
def _per_channel(v, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    """A per-group [BLOCK_G] vector spread over the row tile's [BLOCK_G * BLOCK_CG] columns."""
    full = tl.broadcast_to(v[:, None], (BLOCK_G, BLOCK_CG))
    return tl.reshape(full, (BLOCK_G * BLOCK_CG,))


@triton.jit
def _row_tile(xbase, addv, s, s_end, sxs, mask_c, HAS_ADD: tl.constexpr):
    """The fp32 tile [BLOCK_S, columns] of x (+ ``addv``) at positions ``s``, and its mask
    (positions before ``s_end``, columns in ``mask_c``): 0 where masked."""
    mask = (s < s_end)[:, None] & mask_c[None, :]
    xv = tl.load(xbase[None, :] + s.to(tl.int64)[:, None] * sxs, mask=mask, other=0.0)
    xv = xv.to(tl.float32)
    if HAS_ADD:
        xv = tl.where(mask, xv + addv[None, :], 0.0)
    return xv, mask


@triton.jit
def _row_moments(
    xbase,
    addv,
    s_start,
    s_end,
    sxs,
    mask_c,
    CG,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    DENSE: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """Every group's (mean, M2) ([BLOCK_G] fp32) of x (+ ``addv``) over positions [s_start,
    s_end), from tiles of whole rows ``xbase + s * sxs`` ([BLOCK_G * BLOCK_CG] pointers of one
    position's channels). First per channel: ``DENSE``, Welford per element of the tile,
    accumulator (r, c) taking positions s_start + r, s_start + r + BLOCK_S, ... of channel c
    (elementwise updates, no reduction in the loop, so the compiler may lay the tile out for
    16-byte loads with warps along the positions at no cost), the [BLOCK_S] partials of a
    channel merged once at the end with Chan's formula; else each tile's moments exact two-pass
    in registers (one reduction along the positions), merged across tiles with Chan's formula.
    Then the channels of a group (equal counts: mean of means, M2 = sum M2 + count * sum
    (mean_c - mean)^2)."""
    offs_s = tl.arange(0, BLOCK_S)
    if DENSE:
        mean = tl.zeros([BLOCK_S, BLOCK_G * BLOCK_CG], tl.float32)
        m2 = tl.zeros([BLOCK_S, BLOCK_G * BLOCK_CG], tl.float32)
        cnt = tl.zeros([BLOCK_S], tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + offs_s
            xv, mask = _row_tile(xbase, addv, s, s_end, sxs, mask_c, HAS_ADD)
            in_s = s < s_end
            cnt = cnt + in_s.to(tl.float32)
            inv = tl.where(in_s, 1.0 / tl.maximum(cnt, 1.0), 0.0)  # rows past the end: unchanged
            delta = xv - mean
            mean = mean + delta * inv[:, None]
            m2 = m2 + tl.where(mask, delta * (xv - mean), 0.0)
        total = tl.sum(cnt, axis=0)
        mean_c = tl.sum(mean * (cnt / total)[:, None], axis=0)
        dr = mean - mean_c[None, :]
        m2_c = tl.sum(m2 + dr * dr * cnt[:, None], axis=0)
    else:
        mean_c = tl.zeros([BLOCK_G * BLOCK_CG], tl.float32)
        m2_c = tl.zeros([BLOCK_G * BLOCK_CG], tl.float32)
        total = 0.0
        for s0 in range(s_start, s_end, BLOCK_S):
            xv, mask = _row_tile(xbase, addv, s0 + offs_s, s_end, sxs, mask_c, HAS_ADD)
            n_t = tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
            m_t = tl.sum(xv, axis=0) / n_t
            d = tl.where(mask, xv - m_t[None, :], 0.0)
            cnt_new = total + n_t
            delta = m_t - mean_c
            mean_c = mean_c + delta * (n_t / cnt_new)
            m2_c = m2_c + tl.sum(d * d, axis=0) + delta * delta * (total * n_t / cnt_new)
            total = cnt_new
    valid = tl.reshape(mask_c, (BLOCK_G, BLOCK_CG))
    mean_gc = tl.reshape(mean_c, (BLOCK_G, BLOCK_CG))
    group_mean = tl.sum(tl.where(valid, mean_gc, 0.0), axis=1) / CG
    dm = tl.where(valid, mean_gc - group_mean[:, None], 0.0)
    group_m2 = tl.sum(tl.where(valid, tl.reshape(m2_c, (BLOCK_G, BLOCK_CG)), 0.0), axis=1)
    return group_mean, group_m2 + total * tl.sum(dm * dm, axis=1)


@triton.jit
def _row_normalize(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    addv,
    n,
    c,
    mask_c,
    mean,
    rstd,
    C,
    s_start,
    s_end,
    sxn,
    sxs,
    syn,
    sys,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
):
    """y = act((x + add - mean) * rstd * gamma + beta) of sample n at positions [s_start,
    s_end), whole rows per tile (``mean``, ``rstd``: [BLOCK_G] per group, spread into
    per-channel coefficient vectors once)."""
    gamma, beta = _group_coeffs(
        w_ptr, b_ptr, scale_ptr, shift_ptr, n, c, mask_c, C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT
    )
    a = gamma * _per_channel(rstd, BLOCK_G, BLOCK_CG)
    # x + add - mean = x - (mean - add): one per-channel centre
    centre = _per_channel(mean, BLOCK_G, BLOCK_CG) - addv
    c64 = c.to(tl.int64)
    xbase = x_ptr + n.to(tl.int64) * sxn + c64
    ybase = y_ptr + n.to(tl.int64) * syn + c64
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(s_start, s_end, BLOCK_S):
        s64 = (s0 + offs_s).to(tl.int64)[:, None]
        mask = (s0 + offs_s < s_end)[:, None] & mask_c[None, :]
        xv = tl.load(xbase[None, :] + s64 * sxs, mask=mask, other=0.0).to(tl.float32)
        z = (xv - centre[None, :]) * a[None, :] + beta[None, :]
        if ACT_SILU:
            z = z * tl.sigmoid(z)
        tl.store(ybase[None, :] + s64 * sys, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_fwd_rows_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    add_ptr,
    mean_ptr,
    rstd_ptr,
    add_rep,
    stride_add,
    C,
    S,
    G,
    CG,
    inv_count,
    eps,
    sxn,
    sxs,
    syn,
    sys,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    DENSE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """Channels-last forward, one program per sample n: every group's statistics from tiles of
    whole rows [BLOCK_S positions, all C channels] (contiguous in memory), then y."""
    n = tl.program_id(0)
    c, mask_c = _row_channels(G, CG, BLOCK_G, BLOCK_CG, DENSE)
    addv = _add_vector(add_ptr, n, add_rep, c, mask_c, stride_add, HAS_ADD)
    xbase = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64)
    mean, m2 = _row_moments(
        xbase, addv, 0, S, sxs, mask_c, CG, BLOCK_S, BLOCK_G, BLOCK_CG, DENSE, HAS_ADD
    )
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 * inv_count, 0.0) + eps)
    offs_g = tl.arange(0, BLOCK_G)
    tl.store(mean_ptr + n * G + offs_g, mean, mask=offs_g < G)
    tl.store(rstd_ptr + n * G + offs_g, rstd, mask=offs_g < G)
    _row_normalize(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        addv,
        n,
        c,
        mask_c,
        mean,
        rstd,
        C,
        0,
        S,
        sxn,
        sxs,
        syn,
        sys,
        BLOCK_S,
        BLOCK_G,
        BLOCK_CG,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
        ACT_SILU,
    )


@triton.jit
def _gn_fwd_rows_stats_kernel(
    x_ptr,
    add_ptr,
    mean_part_ptr,
    m2_part_ptr,
    add_rep,
    stride_add,
    G,
    CG,
    chunk_s,
    num_chunks,
    S,
    sxn,
    sxs,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    DENSE: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """Channels-last stage 1: every group's mean and M2 over chunk ``program_id(1)`` of sample
    ``program_id(0)``, from whole-row tiles (partials laid out as the per-group kernels')."""
    n = tl.program_id(0)
    k = tl.program_id(1)
    c, mask_c = _row_channels(G, CG, BLOCK_G, BLOCK_CG, DENSE)
    addv = _add_vector(add_ptr, n, add_rep, c, mask_c, stride_add, HAS_ADD)
    xbase = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64)
    s_start = k * chunk_s
    s_end = tl.minimum(s_start + chunk_s, S)
    mean, m2 = _row_moments(
        xbase, addv, s_start, s_end, sxs, mask_c, CG, BLOCK_S, BLOCK_G, BLOCK_CG, DENSE, HAS_ADD
    )
    offs_g = tl.arange(0, BLOCK_G)
    idx = (n * G + offs_g) * num_chunks + k
    tl.store(mean_part_ptr + idx, mean, mask=offs_g < G)
    tl.store(m2_part_ptr + idx, m2, mask=offs_g < G)


@triton.jit
def _gn_fwd_rows_apply_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    add_ptr,
    mean_part_ptr,
    m2_part_ptr,
    mean_ptr,
    rstd_ptr,
    add_rep,
    stride_add,
    C,
    S,
    G,
    CG,
    chunk_s,
    num_chunks,
    inv_count,
    eps,
    sxn,
    sxs,
    syn,
    sys,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    DENSE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """Channels-last stage 2: every group's statistics from its [BLOCK_K] chunk partials
    (repeated by each program of the sample: a [BLOCK_G, BLOCK_K] L2-resident read), then y of
    chunk ``program_id(1)`` of sample ``program_id(0)``, whole rows per tile."""
    n = tl.program_id(0)
    k = tl.program_id(1)
    c, mask_c = _row_channels(G, CG, BLOCK_G, BLOCK_CG, DENSE)
    offs_g = tl.arange(0, BLOCK_G)
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    idx = ((n * G + offs_g) * num_chunks)[:, None] + offs_k
    mask = (offs_g < G)[:, None] & (offs_k < num_chunks)
    mean, rstd = _merge_partials(
        mean_part_ptr, m2_part_ptr, idx, offs_k, mask, S, CG, chunk_s, inv_count, eps
    )
    if k == 0:
        tl.store(mean_ptr + n * G + offs_g, mean, mask=offs_g < G)
        tl.store(rstd_ptr + n * G + offs_g, rstd, mask=offs_g < G)
    s_start = k * chunk_s
    s_end = tl.minimum(s_start + chunk_s, S)
    _row_normalize(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        _add_vector(add_ptr, n, add_rep, c, mask_c, stride_add, HAS_ADD),
        n,
        c,
        mask_c,
        mean,
        rstd,
        C,
        s_start,
        s_end,
        sxn,
        sxs,
        syn,
        sys,
        BLOCK_S,
        BLOCK_G,
        BLOCK_CG,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
        ACT_SILU,
    )


@triton.jit
def _gn_bwd_partial_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    ds_part_ptr,
    dg_part_ptr,
    C,
    S,
    G,
    CG,
    chunk_s,
    num_chunks,
    sxn,
    sxc,
    sxs,
    sdn,
    sdc,
    sds,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
):
    """Backward stage 1: per channel, sum over the chunk of dz and dz * xhat."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid % G
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    mask_c = offs_c < CG
    c = g * CG + offs_c
    gamma, beta = _group_coeffs(
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        n,
        c,
        mask_c,
        C,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
    )
    gm = gamma[:, None]
    bt = beta[:, None]
    c64 = c.to(tl.int64)[:, None]
    xrow = x_ptr + n.to(tl.int64) * sxn + c64 * sxc
    drow = dy_ptr + n.to(tl.int64) * sdn + c64 * sdc
    s_start = k * chunk_s
    s_end = tl.minimum(s_start + chunk_s, S)
    ds = tl.zeros([BLOCK_C], tl.float32)
    dg = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + offs_s
        s64 = s.to(tl.int64)[None, :]
        mask = mask_c[:, None] & (s < s_end)[None, :]
        xv = tl.load(xrow + s64 * sxs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(drow + s64 * sds, mask=mask, other=0.0).to(tl.float32)
        xhat = (xv - mean) * rstd
        if ACT_SILU:
            z = xhat * gm + bt
            sig = tl.sigmoid(z)
            dz = dz * (sig * (1.0 + z * (1.0 - sig)))
        dz = tl.where(mask, dz, 0.0)
        ds += tl.sum(dz, axis=1)
        dg += tl.sum(dz * xhat, axis=1)
    out = (n * C + c) * num_chunks + k
    tl.store(ds_part_ptr + out, ds, mask=mask_c)
    tl.store(dg_part_ptr + out, dg, mask=mask_c)


@triton.jit
def _gn_bwd_dx_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    ds_part_ptr,
    dg_part_ptr,
    ds_ptr,
    dg_ptr,
    C,
    S,
    G,
    CG,
    chunk_s,
    num_chunks,
    inv_count,
    sxn,
    sxc,
    sxs,
    sdn,
    sdc,
    sds,
    sgn,
    sgc,
    sgs,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT_SILU: tl.constexpr,
):
    """Backward stage 2: reduce the partials over chunks, then write dx for this chunk."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid % G
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    mask_c = offs_c < CG
    c = g * CG + offs_c
    part = (n * C + c)[:, None] * num_chunks + offs_k[None, :]
    pmask = mask_c[:, None] & (offs_k < num_chunks)[None, :]
    ds = tl.sum(tl.load(ds_part_ptr + part, mask=pmask, other=0.0), axis=1)
    dg = tl.sum(tl.load(dg_part_ptr + part, mask=pmask, other=0.0), axis=1)
    if k == 0:
        tl.store(ds_ptr + n * C + c, ds, mask=mask_c)
        tl.store(dg_ptr + n * C + c, dg, mask=mask_c)
    gamma, beta = _group_coeffs(
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        n,
        c,
        mask_c,
        C,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
    )
    c1 = tl.sum(tl.where(mask_c, gamma * ds, 0.0)) * inv_count
    c2 = tl.sum(tl.where(mask_c, gamma * dg, 0.0)) * inv_count
    gm = gamma[:, None]
    bt = beta[:, None]
    c64 = c.to(tl.int64)[:, None]
    xrow = x_ptr + n.to(tl.int64) * sxn + c64 * sxc
    drow = dy_ptr + n.to(tl.int64) * sdn + c64 * sdc
    grow = dx_ptr + n.to(tl.int64) * sgn + c64 * sgc
    s_start = k * chunk_s
    s_end = tl.minimum(s_start + chunk_s, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + offs_s
        s64 = s.to(tl.int64)[None, :]
        mask = mask_c[:, None] & (s < s_end)[None, :]
        xv = tl.load(xrow + s64 * sxs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(drow + s64 * sds, mask=mask, other=0.0).to(tl.float32)
        xhat = (xv - mean) * rstd
        if ACT_SILU:
            z = xhat * gm + bt
            sig = tl.sigmoid(z)
            dz = dz * (sig * (1.0 + z * (1.0 - sig)))
        dx = rstd * (gm * dz - c1 - xhat * c2)
        tl.store(grow + s64 * sgs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------- launchers


def ncs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_s) of ``t`` (N, C, *spatial) viewed as (N, C, S).

    ``t`` must be contiguous, or channels_last (4D) / channels_last_3d (5D).
    """
    n, c = t.shape[:2]
    s = t.numel() // max(n * c, 1)
    if t.is_contiguous():
        return c * s, s, 1
    if (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return s * c, 1, c
    raise ValueError(
        f"group_norm (triton): tensor of shape {tuple(t.shape)} and strides {t.stride()} is "
        "neither contiguous nor channels_last(_3d)"
    )


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(x: torch.Tensor) -> int:
    """Programs a forward should have to fill the device: ``PROGRAMS_PER_SM`` per SM on CUDA; 1
    elsewhere (the interpreter pays per program: one chunk per group)."""
    if x.is_cuda:
        return _sm_count(x.device.index) * PROGRAMS_PER_SM
    return 1


class Plan:
    """Tile sizes and the chunking of the spatial axis for one (N, C, S, G) problem."""

    def __init__(
        self,
        x: torch.Tensor,
        num_groups: int,
        *,
        block_s: int | None = None,
        num_chunks: int | None = None,
    ):
        n, c = x.shape[:2]
        self.N, self.C, self.G = n, c, num_groups
        self.CG = c // num_groups
        self.S = x.numel() // (n * c)
        self.BLOCK_C = triton.next_power_of_2(self.CG)
        if block_s is None:
            block_s = min(triton.next_power_of_2(self.S), max(1, MAX_TILE // self.BLOCK_C))
        self.BLOCK_S = block_s
        max_chunks = triton.cdiv(self.S, block_s)
        if num_chunks is None:
            num_chunks = triton.cdiv(target_programs(x), n * num_groups)
        num_chunks = max(1, min(num_chunks, max_chunks))
        self.chunk_s = triton.cdiv(triton.cdiv(self.S, num_chunks), block_s) * block_s
        self.num_chunks = triton.cdiv(self.S, self.chunk_s)
        self.BLOCK_K = triton.next_power_of_2(self.num_chunks)
        self.inv_count = 1.0 / (self.CG * self.S)
        self.num_warps = 4 if self.BLOCK_C * self.BLOCK_S <= 2048 else 8

    @property
    def grid(self) -> tuple[int, int]:
        return (self.N * self.G, self.num_chunks)


def multiprocessors(x: torch.Tensor) -> int | None:
    """Multiprocessors of x's CUDA device; None off CUDA (the rows kernels are a GPU choice)."""
    return _sm_count(x.device.index) if x.is_cuda else None


class RowsPlan:
    """Tiles of the channels-last rows kernels, [BLOCK_S positions, BLOCK_G groups, BLOCK_CG
    channels] of at most ``MAX_TILE`` elements, and the split of each sample's positions into
    ``num_chunks`` chunks of ``chunk_s`` (a multiple of BLOCK_S): about ``target_programs`` (N,
    num_chunks) programs, at most ``MAX_ROW_PARTIALS // BLOCK_G`` chunks (the apply stage reads
    a [BLOCK_G, BLOCK_K] tile of partials). One chunk: one launch, one program per sample."""

    def __init__(
        self,
        p: Plan,
        x: torch.Tensor,
        num_chunks: int | None = None,
        block_s: int | None = None,
    ):
        self.BLOCK_G = triton.next_power_of_2(p.G)
        self.BLOCK_CG = triton.next_power_of_2(p.CG)
        width = self.BLOCK_G * self.BLOCK_CG
        if block_s is None:
            block_s = max(1, min(triton.next_power_of_2(p.S), MAX_TILE // width))
        self.BLOCK_S = block_s
        self.num_warps = 4 if self.BLOCK_S * width <= 2048 else 8
        if num_chunks is None:
            num_chunks = triton.cdiv(target_programs(x), p.N)
        most = min(triton.cdiv(p.S, self.BLOCK_S), max(1, MAX_ROW_PARTIALS // self.BLOCK_G))
        num_chunks = max(1, min(num_chunks, most))
        self.chunk_s = triton.cdiv(triton.cdiv(p.S, num_chunks), self.BLOCK_S) * self.BLOCK_S
        self.num_chunks = triton.cdiv(p.S, self.chunk_s)
        self.BLOCK_K = triton.next_power_of_2(self.num_chunks)

    @classmethod
    def of(cls, p: Plan, sx: tuple, sy: tuple, x: torch.Tensor) -> RowsPlan | None:
        """The plan when the rows kernels apply: on a GPU (:func:`multiprocessors`), x and y
        channels-last (a row of C channels is contiguous) and the padded row fits a tile. The
        per-group kernels read only CG channels (8-80 bytes) per position of a channels-last
        tensor, a fraction of each memory sector; these kernels read whole rows. Samples that
        fill the device alone (N >= multiprocessors: the LVDM's spatial GroupNorms over B·T
        frames) take one launch. Fewer (its temporal GroupNorms over B·windows videos) are
        split into chunks, two launches, unless the per-group plan needs one launch and either
        reads whole ``SECTOR_BYTES`` sectors (CG channels of at least 32 bytes: the 512-channel
        levels in half precision) or x is under ``ROWS_SPLIT_MIN_BYTES`` (the LIDM's maps at one
        image: a second launch costs more than partial sectors of an L2-resident tensor), which
        then runs instead."""
        if sx[1] != 1 or sy[1] != 1 or multiprocessors(x) is None:
            return None
        if triton.next_power_of_2(p.G) * triton.next_power_of_2(p.CG) > MAX_TILE:
            return None
        if p.N >= multiprocessors(x):
            return cls(p, x, 1)
        whole_sectors = p.CG * x.element_size() >= SECTOR_BYTES
        if p.num_chunks == 1 and (whole_sectors or x.nbytes < ROWS_SPLIT_MIN_BYTES):
            return None  # the per-group kernel's one launch
        return cls(p, x)


def _flags(weight, bias, scale, shift, activation) -> dict:
    return {
        "HAS_W": weight is not None,
        "HAS_B": bias is not None,
        "HAS_SCALE": scale is not None,
        "HAS_SHIFT": shift is not None,
        "ACT_SILU": activation == "silu",
    }


def _ptrs(x, weight, bias, scale, shift):
    """Absent parameters are passed as ``x`` (never read: their HAS_* flag is off)."""
    return tuple(x if p is None else p.contiguous() for p in (weight, bias, scale, shift))


def _rows_fwd(
    p: Plan,
    rows: RowsPlan,
    x: torch.Tensor,
    y: torch.Tensor,
    params: tuple,
    add_ptr: torch.Tensor,
    add_rep: int,
    stride_add: int,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    flags: dict,
) -> None:
    """The channels-last forward: one rows launch, or the split stats + apply launches."""
    sx, sy = ncs_strides(x), ncs_strides(y)
    tiles = {
        "BLOCK_S": rows.BLOCK_S,
        "BLOCK_G": rows.BLOCK_G,
        "BLOCK_CG": rows.BLOCK_CG,
        "DENSE": p.CG == rows.BLOCK_CG and p.CG % DENSE_MULTIPLE == 0,
    }
    if rows.num_chunks == 1:
        _gn_fwd_rows_kernel[(p.N,)](
            x,
            y,
            *_ptrs(x, *params),
            add_ptr,
            mean,
            rstd,
            add_rep,
            stride_add,
            p.C,
            p.S,
            p.G,
            p.CG,
            p.inv_count,
            float(eps),
            sx[0],
            sx[2],
            sy[0],
            sy[2],
            **tiles,
            **flags,
            num_warps=rows.num_warps,
        )
        return
    grid = (p.N, rows.num_chunks)
    f32 = {"dtype": torch.float32, "device": x.device}
    mean_part = torch.empty(p.N * p.G, rows.num_chunks, **f32)
    m2_part = torch.empty(p.N * p.G, rows.num_chunks, **f32)
    _gn_fwd_rows_stats_kernel[grid](
        x,
        add_ptr,
        mean_part,
        m2_part,
        add_rep,
        stride_add,
        p.G,
        p.CG,
        rows.chunk_s,
        rows.num_chunks,
        p.S,
        sx[0],
        sx[2],
        **tiles,
        HAS_ADD=flags["HAS_ADD"],
        num_warps=rows.num_warps,
    )
    _gn_fwd_rows_apply_kernel[grid](
        x,
        y,
        *_ptrs(x, *params),
        add_ptr,
        mean_part,
        m2_part,
        mean,
        rstd,
        add_rep,
        stride_add,
        p.C,
        p.S,
        p.G,
        p.CG,
        rows.chunk_s,
        rows.num_chunks,
        p.inv_count,
        float(eps),
        sx[0],
        sx[2],
        sy[0],
        sy[2],
        **tiles,
        BLOCK_K=rows.BLOCK_K,
        **flags,
        num_warps=rows.num_warps,
    )


def group_norm_fwd(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    out_format: torch.memory_format,
    *,
    add: torch.Tensor | None = None,
    block_s: int | None = None,
    num_chunks: int | None = None,
    use_rows: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (x's shape/dtype, ``out_format``), mean and rstd (fp32, (N, G)) of GroupNorm(x + add):
    ``add`` (N / k, C), row ``n // k`` added to sample n (e.g. one row per video of k frames).

    ``use_rows``: force (True) or forbid (False) the channels-last rows kernels; None chooses
    (:meth:`RowsPlan.of`). ``block_s`` and ``num_chunks`` override the plan's tile length and
    split (tests)."""
    p = Plan(x, num_groups, block_s=block_s, num_chunks=num_chunks)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_format)
    f32 = {"dtype": torch.float32, "device": x.device}
    mean = torch.empty(p.N, p.G, **f32)
    rstd = torch.empty(p.N, p.G, **f32)
    sx, sy = ncs_strides(x), ncs_strides(y)
    if add is None:
        add_ptr, add_rep, stride_add = x, 1, 0
    else:  # rows may be strided (a slice of the packed time projections): read in place
        add_ptr = add if add.stride(1) == 1 else add.contiguous()
        add_rep, stride_add = p.N // add.shape[0], add_ptr.stride(0)
    flags = {**_flags(weight, bias, scale, shift, activation), "HAS_ADD": add is not None}
    if use_rows is None:
        rows = RowsPlan.of(p, sx, sy, x)
    else:
        rows = RowsPlan(p, x, num_chunks, block_s) if use_rows else None
    if rows is not None:
        if sx[1] != 1 or sy[1] != 1:
            raise ValueError("group_norm_fwd: the rows kernels need channels-last x and y")
        _rows_fwd(
            p,
            rows,
            x,
            y,
            (weight, bias, scale, shift),
            add_ptr,
            add_rep,
            stride_add,
            mean,
            rstd,
            eps,
            flags,
        )
        return y, mean, rstd
    if p.num_chunks == 1:
        _gn_fwd_fused_kernel[(p.N * p.G,)](
            x,
            y,
            *_ptrs(x, weight, bias, scale, shift),
            add_ptr,
            mean,
            rstd,
            add_rep,
            stride_add,
            p.C,
            p.S,
            p.G,
            p.CG,
            p.inv_count,
            float(eps),
            *sx,
            *sy,
            BLOCK_C=p.BLOCK_C,
            BLOCK_S=p.BLOCK_S,
            **flags,
            num_warps=p.num_warps,
        )
        return y, mean, rstd
    mean_part = torch.empty(p.N * p.G, p.num_chunks, **f32)
    m2_part = torch.empty(p.N * p.G, p.num_chunks, **f32)
    _gn_fwd_stats_kernel[p.grid](
        x,
        add_ptr,
        mean_part,
        m2_part,
        add_rep,
        stride_add,
        p.C,
        p.S,
        p.G,
        p.CG,
        p.chunk_s,
        p.num_chunks,
        *sx,
        BLOCK_C=p.BLOCK_C,
        BLOCK_S=p.BLOCK_S,
        HAS_ADD=add is not None,
        num_warps=p.num_warps,
    )
    _gn_fwd_apply_kernel[p.grid](
        x,
        y,
        *_ptrs(x, weight, bias, scale, shift),
        add_ptr,
        mean_part,
        m2_part,
        mean,
        rstd,
        add_rep,
        stride_add,
        p.C,
        p.S,
        p.G,
        p.CG,
        p.chunk_s,
        p.num_chunks,
        p.inv_count,
        float(eps),
        *sx,
        *sy,
        BLOCK_C=p.BLOCK_C,
        BLOCK_S=p.BLOCK_S,
        BLOCK_K=p.BLOCK_K,
        **flags,
        num_warps=p.num_warps,
    )
    return y, mean, rstd


def group_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    *,
    block_s: int | None = None,
    num_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (x's dtype and layout), ds = sum_s dz and dg = sum_s dz * xhat (fp32, (N, C)).

    ``dy`` must be contiguous or channels_last(_3d); dz is dy times the activation's derivative.
    """
    p = Plan(x, num_groups, block_s=block_s, num_chunks=num_chunks)
    dx = torch.empty_like(x)
    f32 = {"dtype": torch.float32, "device": x.device}
    ds_part = torch.empty(p.N * p.C, p.num_chunks, **f32)
    dg_part = torch.empty(p.N * p.C, p.num_chunks, **f32)
    ds = torch.empty(p.N, p.C, **f32)
    dg = torch.empty(p.N, p.C, **f32)
    sx, sd, sg = ncs_strides(x), ncs_strides(dy), ncs_strides(dx)
    params = _ptrs(x, weight, bias, scale, shift)
    flags = _flags(weight, bias, scale, shift, activation)
    _gn_bwd_partial_kernel[p.grid](
        x,
        dy,
        *params,
        mean,
        rstd,
        ds_part,
        dg_part,
        p.C,
        p.S,
        p.G,
        p.CG,
        p.chunk_s,
        p.num_chunks,
        *sx,
        *sd,
        BLOCK_C=p.BLOCK_C,
        BLOCK_S=p.BLOCK_S,
        **flags,
        num_warps=p.num_warps,
    )
    _gn_bwd_dx_kernel[p.grid](
        x,
        dy,
        dx,
        *params,
        mean,
        rstd,
        ds_part,
        dg_part,
        ds,
        dg,
        p.C,
        p.S,
        p.G,
        p.CG,
        p.chunk_s,
        p.num_chunks,
        p.inv_count,
        *sx,
        *sd,
        *sg,
        BLOCK_C=p.BLOCK_C,
        BLOCK_S=p.BLOCK_S,
        BLOCK_K=p.BLOCK_K,
        **flags,
        num_warps=p.num_warps,
    )
    return dx, ds, dg
