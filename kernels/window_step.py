"""Fused sampler step of windowed video sampling (LVDM), in Triton.

One denoising step of echofast's LVDM pipeline, unfused, is: unpad the UNet output, stitch the
windows' predictions into one prediction per frame, the scheduler's update (x̂_0, clip, the
affine combination with the noise), then stack the new latents into windows, concatenate the
conditioning channels and replicate-pad them for the next UNet call: ~15 elementwise kernels
and copies per step. Here it is two kernels that keep every tensor in the layout the UNet and
the sampler use between steps:

* ``_window_step_kernel`` reads each frame's prediction straight from the padded window output
  (through per-frame window/offset tables), applies the step as an affine map
  (``scheduler.step_coefficients``: x̂_0 = clip(c0·x + c1·m), x' = c2·x̂_0 + c3·x + c4·m + c5·z)
  and writes the new latents (B, T, C, H, W);
* ``_window_scatter_kernel`` writes the replicate-padded windows of the new latents into the
  first C channels of the next UNet input buffer (its conditioning channels are left alone).

Trade-offs: one program per (row, tile) with rows = (video, frame, channel) planes of H·W
(14×14 latents: one tile per plane, many programs — the grid's first axis, ≤ 2^31 − 1); the
scatter recomputes no arithmetic, it only gathers (frames in two overlapping windows are read
twice). Precision: all arithmetic in fp32 whatever the input dtypes (the prediction may be
fp16/bf16 from autocast); latents stay fp32; the next input is written in its own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _window_step_kernel(
    pred_ptr,  # (B·n_win, window, C, H + 2p, W + 2p) model output per window, any float dtype
    x_ptr,  # (B, T, C, H, W) float32: x_t
    z_ptr,  # (B, T, C, H, W) float32: the step's noise (read only when HAS_NOISE)
    coef_ptr,  # (B, 6) float32, contiguous: the step's affine coefficients per video
    fwin_ptr,  # (T,) int32: window that frame f takes its prediction from
    foff_ptr,  # (T,) int32: frame f's position inside that window
    out_ptr,  # (B, T, C, H, W) float32, contiguous: x_prev
    T,
    C,
    H,
    W,
    n_win,
    pad,
    sp_n,
    sp_t,
    sp_c,
    sp_h,
    sp_w,  # pred strides (elements)
    sx_b,
    sx_t,
    sx_c,
    sx_h,
    sx_w,  # x strides
    sz_b,
    sz_t,
    sz_c,
    sz_h,
    sz_w,  # z strides
    clip_bound,  # |x̂_0| bound (used when CLIP)
    HAS_NOISE: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # (b, f, c) plane
    b = row // (T * C)
    f = (row // C) % T
    c = row % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    y = offs // W
    xx = offs % W
    kw = tl.load(fwin_ptr + f)
    ko = tl.load(foff_ptr + f)
    pred_row = (b * n_win + kw).to(tl.int64) * sp_n + ko * sp_t + c * sp_c
    m = tl.load(pred_ptr + pred_row + (y + pad) * sp_h + (xx + pad) * sp_w, mask=mask, other=0.0)
    m = m.to(tl.float32)
    x_row = b.to(tl.int64) * sx_b + f * sx_t + c * sx_c
    x = tl.load(x_ptr + x_row + y * sx_h + xx * sx_w, mask=mask, other=0.0).to(tl.float32)
    c0 = tl.load(coef_ptr + b * 6 + 0)
    c1 = tl.load(coef_ptr + b * 6 + 1)
    c2 = tl.load(coef_ptr + b * 6 + 2)
    c3 = tl.load(coef_ptr + b * 6 + 3)
    c4 = tl.load(coef_ptr + b * 6 + 4)
    x0 = c0 * x + c1 * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_bound), clip_bound)
    out = c2 * x0 + c3 * x + c4 * m
    if HAS_NOISE:
        c5 = tl.load(coef_ptr + b * 6 + 5)
        z_row = b.to(tl.int64) * sz_b + f * sz_t + c * sz_c
        z = tl.load(z_ptr + z_row + y * sz_h + xx * sz_w, mask=mask, other=0.0)
        out += c5 * z.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * H * W + offs, out, mask=mask)


@triton.jit
def _window_scatter_kernel(
    lat_ptr,  # (B, T, C, H, W) float32, contiguous: the new latents
    wstart_ptr,  # (n_win,) int32: first frame of each window
    dst_ptr,  # (B·n_win, window, C_in, H + 2p, W + 2p): next UNet input; channels [0, C) written
    n_win,
    window,
    T,
    C,
    H,
    W,
    pad,
    sd_n,
    sd_t,
    sd_c,
    sd_h,
    sd_w,  # dst strides (elements)
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # (b, k, j, c) plane of the destination
    c = row % C
    j = (row // C) % window
    k = (row // (C * window)) % n_win
    b = row // (C * window * n_win)
    hp = H + 2 * pad
    wp = W + 2 * pad
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hp * wp
    y = tl.minimum(tl.maximum(offs // wp - pad, 0), H - 1)
    xx = tl.minimum(tl.maximum(offs % wp - pad, 0), W - 1)
    f = tl.load(wstart_ptr + k) + j
    src = ((b.to(tl.int64) * T + f) * C + c) * H * W
    v = tl.load(lat_ptr + src + y * W + xx, mask=mask, other=0.0)
    dst_row = (b * n_win + k).to(tl.int64) * sd_n + j * sd_t + c * sd_c
    dst = dst_ptr + dst_row + (offs // wp) * sd_h + (offs % wp) * sd_w
    tl.store(dst, v.to(dst_ptr.dtype.element_ty), mask=mask)


def window_step_fwd(
    pred: torch.Tensor,
    latents: torch.Tensor,
    coeffs: torch.Tensor,
    noise: torch.Tensor | None,
    frame_window: torch.Tensor,
    frame_offset: torch.Tensor,
    window_start: torch.Tensor,
    pad: int,
    clip: float | None,
    next_input: torch.Tensor | None,
) -> torch.Tensor:
    """Launch the step (and the scatter into ``next_input`` when given); shapes as in
    :func:`echofast.ops.window_step`. Inputs are validated by the caller."""
    b, t, c, h, w = latents.shape
    n_win = window_start.shape[0]
    out = torch.empty((b, t, c, h, w), device=latents.device, dtype=torch.float32)
    block = max(16, min(1024, triton.next_power_of_2(h * w)))
    z = noise if noise is not None else latents
    _window_step_kernel[(b * t * c, triton.cdiv(h * w, block))](
        pred,
        latents,
        z,
        coeffs,
        frame_window,
        frame_offset,
        out,
        t,
        c,
        h,
        w,
        n_win,
        pad,
        *pred.stride(),
        *latents.stride(),
        *z.stride(),
        float(clip) if clip is not None else 0.0,
        HAS_NOISE=noise is not None,
        CLIP=clip is not None,
        BLOCK=block,
    )
    if next_input is not None:
        window = next_input.shape[1]
        hp, wp = h + 2 * pad, w + 2 * pad
        block2 = max(16, min(1024, triton.next_power_of_2(hp * wp)))
        _window_scatter_kernel[(b * n_win * window * c, triton.cdiv(hp * wp, block2))](
            out,
            window_start,
            next_input,
            n_win,
            window,
            t,
            c,
            h,
            w,
            pad,
            *next_input.stride(),
            BLOCK=block2,
        )
    return out
