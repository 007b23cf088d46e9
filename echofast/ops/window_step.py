"""``window_step``: one sampler step of windowed video sampling, fused with the window bookkeeping.

The LVDM samples a long video as overlapping windows of frames, all in one UNet call. Between two
UNet calls the pipeline (1) takes each frame's prediction from one window (``window_tables``),
(2) applies the scheduler's update, and (3) lays the new latents out as replicate-padded windows
in the next UNet input. The op does all three; the scheduler's update enters as its affine
coefficients (``SchedulerBase.step_coefficients``), so any DDPM/DDIM configuration works.

Backends: ``triton`` (two kernels, :mod:`echofast.kernels.window_step`; CUDA, or CPU under
``TRITON_INTERPRET=1``), then ``torch`` (the reference below). Inference only (no autograd).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import Backend, Op
from ._triton import interpret, kernel_reasons

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def window_tables(total: int, starts: Sequence[int], window: int, overlap: int) -> list[list[int]]:
    """``[frame_window, frame_offset]``: where frame f (of ``total``) takes its prediction.

    Frames ``[0, window)`` come from window 0; window k ≥ 1 (starting at ``starts[k]``)
    provides frames ``[starts[k] + overlap, starts[k] + window)``, later windows winning.
    Raises ValueError when a frame is covered by no window.
    """
    fw, fo = [-1] * total, [-1] * total
    for f in range(min(window, total)):
        fw[f], fo[f] = 0, f
    for k, s in enumerate(starts[1:], start=1):
        for f in range(s + overlap, min(s + window, total)):
            fw[f], fo[f] = k, f - s
    missing = [f for f in range(total) if fw[f] < 0]
    if missing:
        raise ValueError(
            f"window_tables: frames {missing[:8]} of {total} are covered by no window "
            f"(starts {list(starts)}, window {window}, overlap {overlap})"
        )
    return [fw, fo]


def _check(pred, latents, coeffs, noise, frame_window, frame_offset, window_start, pad, nxt):
    def shape(t: torch.Tensor | None) -> tuple | None:
        return None if t is None else tuple(t.shape)

    if latents.dim() != 5:
        raise ValueError(f"window_step: latents must be (B, T, C, H, W), got {shape(latents)}")
    b, t, c, h, w = latents.shape
    if pad < 0:
        raise ValueError(f"window_step: pad must be >= 0, got {pad}")
    n_win = window_start.shape[0] if window_start.dim() == 1 else -1
    if (
        pred.dim() != 5
        or pred.shape[0] != b * n_win
        or pred.shape[2:] != (c, h + 2 * pad, w + 2 * pad)
    ):
        raise ValueError(
            f"window_step: pred must be (B·n_win, window, C, H+2p, W+2p) = "
            f"({b}·{n_win}, window, {c}, {h + 2 * pad}, {w + 2 * pad}), got {shape(pred)}"
        )
    if shape(coeffs) != (b, 6) or coeffs.dtype != torch.float32:
        raise ValueError(
            f"window_step: coeffs must be float32 ({b}, 6), got {coeffs.dtype} {shape(coeffs)}"
        )
    if noise is not None and noise.shape != latents.shape:
        raise ValueError(f"window_step: noise must be {shape(latents)}, got {shape(noise)}")
    for name, table in (("frame_window", frame_window), ("frame_offset", frame_offset)):
        if shape(table) != (t,) or table.dtype != torch.int32:
            raise ValueError(
                f"window_step: {name} must be int32 ({t},), got {table.dtype} {shape(table)}"
            )
    if window_start.dtype != torch.int32 or window_start.dim() != 1:
        raise ValueError(
            f"window_step: window_start must be int32 (n_win,), got "
            f"{window_start.dtype} {shape(window_start)}"
        )
    if nxt is not None and (
        nxt.dim() != 5
        or nxt.shape[0] != b * n_win
        or nxt.shape[2] < c
        or nxt.shape[3:] != (h + 2 * pad, w + 2 * pad)
    ):
        raise ValueError(
            f"window_step: next_input must be (B·n_win, window, C_in >= {c}, H+2p, W+2p) = "
            f"({b * n_win}, window, >= {c}, {h + 2 * pad}, {w + 2 * pad}), got {shape(nxt)}"
        )
    tensors = (pred, latents, coeffs, noise, frame_window, frame_offset, window_start, nxt)
    devices = {str(x.device) for x in tensors if x is not None}
    if len(devices) > 1:
        raise ValueError(f"window_step: all tensors must be on one device, got {sorted(devices)}")


def window_step_reference(
    pred: torch.Tensor,
    latents: torch.Tensor,
    coeffs: torch.Tensor,
    noise: torch.Tensor | None,
    frame_window: torch.Tensor,
    frame_offset: torch.Tensor,
    window_start: torch.Tensor,
    *,
    pad: int = 0,
    clip: float | None = None,
    next_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch, in fp32: unpad + stitch, the affine step, re-window + replicate pad."""
    b, t, c, h, w = latents.shape
    n_win = window_start.shape[0]
    window = pred.shape[1]
    p = pred[..., pad : pad + h, pad : pad + w].float().reshape(b, n_win, window, c, h, w)
    m = p[:, frame_window.long(), frame_offset.long()]
    x = latents.float()
    k = coeffs.reshape(b, 6, 1, 1, 1, 1).unbind(1)
    x0 = k[0] * x + k[1] * m
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = k[2] * x0 + k[3] * x + k[4] * m
    if noise is not None:
        out = out + k[5] * noise.float()
    if next_input is not None:
        frames = window_start.long()[:, None] + torch.arange(window, device=latents.device)
        wins = out[:, frames].reshape(b * n_win * window, c, h, w)
        padded = F.pad(wins, (pad,) * 4, mode="replicate") if pad else wins
        next_input[:, :, :c] = padded.reshape(b * n_win, window, c, h + 2 * pad, w + 2 * pad)
    return out


def _torch_reasons(*args, **kwargs) -> list[str]:
    return []


def _triton_reasons(
    pred: torch.Tensor,
    latents: torch.Tensor,
    coeffs: torch.Tensor,
    noise: torch.Tensor | None,
    *args,
    next_input: torch.Tensor | None = None,
    **kwargs,
) -> list[str]:
    reasons = []
    if not latents.is_cuda and not interpret():
        reasons.append(
            f"tensors are on {latents.device}, not CUDA (set TRITON_INTERPRET=1 for CPU)"
        )
    for name, x in (
        ("pred", pred),
        ("latents", latents),
        ("noise", noise),
        ("next_input", next_input),
    ):
        if x is not None and x.dtype not in _FLOATS:
            reasons.append(f"{name} dtype {x.dtype} unsupported (float32/float16/bfloat16 only)")
    if latents.numel() == 0:
        reasons.append("latents are empty")
    if latents.numel() >= 2**31:
        reasons.append(f"latents have {latents.numel()} elements (>= 2^31)")
    return kernel_reasons(reasons, "window_step", "_window_step_kernel", latents.is_cuda)


def window_step_triton(
    pred: torch.Tensor,
    latents: torch.Tensor,
    coeffs: torch.Tensor,
    noise: torch.Tensor | None,
    frame_window: torch.Tensor,
    frame_offset: torch.Tensor,
    window_start: torch.Tensor,
    *,
    pad: int = 0,
    clip: float | None = None,
    next_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``triton`` backend: same contract as :func:`window_step_reference`."""
    from echofast.kernels.window_step import window_step_fwd

    return window_step_fwd(
        pred,
        latents,
        coeffs.contiguous(),
        noise,
        frame_window.contiguous(),
        frame_offset.contiguous(),
        window_start.contiguous(),
        pad,
        clip,
        next_input,
    )


def _example(device: str) -> tuple[tuple, dict]:
    lat = torch.empty(1, 4, 4, 6, 6, device=device)
    pred = torch.empty(1, 4, 4, 8, 8, device=device)
    table = torch.zeros(4, dtype=torch.int32, device=device)
    coeffs = torch.empty(1, 6, device=device)
    start = torch.zeros(1, dtype=torch.int32, device=device)
    return (pred, lat, coeffs, None, table, table, start), {"pad": 1}


_op = Op(
    "window_step",
    [
        Backend(
            "triton",
            window_step_triton,
            _triton_reasons,
            "two Triton kernels: stitched affine step, then padded windows into the next input",
            traceable=False,
        ),
        Backend(
            "torch",
            window_step_reference,
            _torch_reasons,
            "unpad, gather, affine step and replicate pad in fp32 PyTorch (reference)",
        ),
    ],
    _example,
)


@torch.no_grad()
def window_step(
    pred: torch.Tensor,
    latents: torch.Tensor,
    coeffs: torch.Tensor,
    noise: torch.Tensor | None,
    frame_window: torch.Tensor,
    frame_offset: torch.Tensor,
    window_start: torch.Tensor,
    *,
    pad: int = 0,
    clip: float | None = None,
    next_input: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One sampler step for all frames of B videos sampled as windows.

    Args:
        pred: (B·n_win, window, C, H+2p, W+2p) the UNet's output per window (padded by ``pad``).
        latents: (B, T, C, H, W) x_t of every frame (float).
        coeffs: (B, 6) float32 from ``scheduler.step_coefficients(t, B)`` (on the device).
        noise: (B, T, C, H, W) the step's noise, or None when the step draws none.
        frame_window, frame_offset: (T,) int32, see :func:`window_tables`.
        window_start: (n_win,) int32 first frame of each window.
        pad: replicate padding of the UNet's spatial dims.
        clip: |x̂_0| bound (``scheduler.clip_bound``) or None.
        next_input: optional (B·n_win, window, C_in, H+2p, W+2p) UNet input buffer; its channels
            ``[0, C)`` receive the padded windows of the new latents.
        backend: force a backend by name.

    Returns:
        x_prev, float32 (B, T, C, H, W), contiguous.
    """
    _check(pred, latents, coeffs, noise, frame_window, frame_offset, window_start, pad, next_input)
    return _op(
        pred,
        latents,
        coeffs,
        noise,
        frame_window,
        frame_offset,
        window_start,
        pad=pad,
        clip=clip,
        next_input=next_input,
        backend=backend,
    )
