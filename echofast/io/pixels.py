"""The native pixel path: checked calls into ``echofast._C`` for batches of frames.

Conversions (the same on CPU and CUDA, bit for bit; formulas in
``csrc/include/echofast_video.h``):

- :func:`yuv_to_frames`: 8-bit planar YUV (BT.601, full or limited range, chroma subsampled by
  2 or not per axis; 4:2:0 is ``chroma_shift=(1, 1)``) → gray or RGB frames, optionally resized,
  as uint8 pixel values or ``x / 128 − 1`` in float32 / float16 / bfloat16.
- :func:`packed_to_frames`: 8-bit gray (T, H, W) or RGB (T, H, W, 3) → the same outputs.
- :func:`frames_to_yuv`: gray or RGB frames (uint8, or float in [−1, 1] made uint8 with the
  reference's ``uint8(clamp((x + 1) * 128, 0, 255))``, truncating) → yuvj420p planes for the
  MJPEG encoder.

Gray is the luma plane (limited range expanded with ``round((Y − 16) · 255 / 219)``), as FFmpeg's
``gray`` conversion. RGB takes the chroma sample covering each pixel (nearest), as FFmpeg's
unscaled path, but rounds the exact BT.601 result where FFmpeg's tables truncate (FFmpeg is up
to 2 levels lower in full range, 3 in limited range). Resizing (``"area"``: adaptive average
pooling, equal to ``torch.nn.functional.interpolate(mode="area")``; ``"bilinear"``: half-pixel
centres, no antialiasing, as ``mode="bilinear", align_corners=False``) runs in fp32 on the
converted 8-bit values.

Every function checks devices, dtypes, shapes and strides before the call and raises
:class:`PixelFormatError` with the actual values; CUDA work is queued on the current stream of
the tensors' device and writes into the given output tensor.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .. import _ext
from ..errors import BackendUnavailable, EchofastError

__all__ = [
    "DTYPES",
    "RESIZE_MODES",
    "PixelFormatError",
    "cuda_usable",
    "default_threads",
    "frames_to_yuv",
    "native_status",
    "packed_to_frames",
    "yuv420_buffer",
    "yuv_to_frames",
]

DTYPES = {torch.uint8: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
"""Output (decode) and input (encode) dtypes and their codes in the C API."""

RESIZE_MODES = {"area": 0, "bilinear": 1}
LAYOUT_YUV = 0
LAYOUT_PACKED = 1


class PixelFormatError(EchofastError, ValueError):
    """Tensors handed to the pixel path have the wrong device, dtype, shape or strides."""


def native_status() -> dict[str, Any]:
    """Whether the extension is loadable (``cpu``), whether it was built with CUDA (``cuda``),
    and why not (``reason``; None when both are available)."""
    info = _ext.build_info()
    if not info["built"]:
        return {"cpu": False, "cuda": False, "reason": info["reason"]}
    reason = None if info["cuda"] else "echofast._C was built without CUDA"
    return {"cpu": True, "cuda": bool(info["cuda"]), "reason": reason}


_cuda_probe: tuple[bool, str | None] | None = None


def cuda_usable() -> tuple[bool, str | None]:
    """Whether the extension's CUDA kernels can run here (built with CUDA and its runtime sees
    a device: the statically linked runtime may need a newer driver than PyTorch's), and why
    not. Queried once per process, on first use."""
    global _cuda_probe
    if _cuda_probe is None:
        status = native_status()
        if not status["cuda"]:
            _cuda_probe = (False, status["reason"])
        else:
            module = _ext.load()
            try:
                count = module.cuda_device_count()
                _cuda_probe = (count > 0, None if count > 0 else "no CUDA device")
            except module.CudaError as err:
                _cuda_probe = (False, f"echofast._C cannot use CUDA: {err}")
    return _cuda_probe


def _module(device: torch.device):
    try:
        module = _ext.load()
    except _ext.ExtensionUnavailable as err:
        raise BackendUnavailable("video pixels", "native", [err.reason]) from err
    if device.type == "cuda" and not module.build_info()["cuda"]:
        raise BackendUnavailable(
            "video pixels",
            "native",
            [f"echofast._C was built without CUDA; tensors are on {device}"],
        )
    if device.type not in ("cpu", "cuda"):
        raise PixelFormatError(f"tensors must be on CPU or CUDA, got {device}")
    return module


def _threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if threads < 1:
        raise PixelFormatError(f"threads must be >= 1, got {threads}")
    return int(threads)


def _device_args(device: torch.device) -> tuple[int, int]:
    if device.type == "cpu":
        return -1, 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def _same_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise PixelFormatError(f"tensors must be on one device, got {devices}")
    return next(iter(devices.values()))


def _frames_desc(name: str, frames: torch.Tensor, *, output: bool) -> dict[str, Any]:
    """Descriptor of (T, H, W) or (T, H, W, 3) frames; outputs must be contiguous."""
    if not isinstance(frames, torch.Tensor):
        raise PixelFormatError(f"{name} must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype not in DTYPES:
        raise PixelFormatError(
            f"{name} dtype must be one of {[str(d) for d in DTYPES]}, got {frames.dtype}"
        )
    shape = tuple(frames.shape)
    if frames.dim() == 3:
        channels = 1
    elif frames.dim() == 4 and shape[3] == 3:
        channels = 3
    else:
        raise PixelFormatError(f"{name} must be (T, H, W) or (T, H, W, 3), got shape {shape}")
    if min(shape[1:3]) < 1:
        raise PixelFormatError(f"{name} needs H, W >= 1, got shape {shape}")
    if output and not frames.is_contiguous():
        raise PixelFormatError(f"{name} must be contiguous, got strides {frames.stride()}")
    stride = list(frames.stride()) + ([0] if channels == 1 else [])
    if any(s < 0 for s in stride):
        raise PixelFormatError(f"{name} has negative strides {frames.stride()}")
    return {
        "data": frames.data_ptr(),
        "dtype": DTYPES[frames.dtype],
        "frames": shape[0],
        "height": shape[1],
        "width": shape[2],
        "channels": channels,
        "stride": tuple(stride),
    }


def _plane(name: str, plane: torch.Tensor, rows: int, cols: int, count: int) -> None:
    if not isinstance(plane, torch.Tensor):
        raise PixelFormatError(f"{name} must be a torch.Tensor, got {type(plane).__name__}")
    if plane.dtype != torch.uint8:
        raise PixelFormatError(f"{name} must be uint8, got {plane.dtype}")
    if tuple(plane.shape) != (count, rows, cols):
        raise PixelFormatError(
            f"{name} must have shape {(count, rows, cols)}, got {tuple(plane.shape)}"
        )
    if plane.stride(2) != 1 or plane.stride(1) < cols or plane.stride(0) < 0:
        raise PixelFormatError(
            f"{name} rows must be contiguous (strides (>= 0, >= {cols}, 1)), "
            f"got strides {plane.stride()}"
        )


def _check_out(out: torch.Tensor, frames: int, channels_ok: tuple[int, ...]) -> dict[str, Any]:
    desc = _frames_desc("out", out, output=True)
    if desc["frames"] != frames:
        raise PixelFormatError(f"out has {desc['frames']} frames, the input {frames}")
    if desc["channels"] not in channels_ok:
        raise PixelFormatError(
            f"out has {desc['channels']} channel(s); this input converts to {channels_ok}"
        )
    return desc


def _resize_code(resize: str) -> int:
    if resize not in RESIZE_MODES:
        raise PixelFormatError(f"resize must be one of {list(RESIZE_MODES)}, got {resize!r}")
    return RESIZE_MODES[resize]


def yuv_to_frames(
    y: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    full_range: bool,
    chroma_shift: tuple[int, int] = (1, 1),
    resize: str = "area",
    threads: int | None = None,
) -> torch.Tensor:
    """Convert planar YUV frames into ``out`` and return it.

    Args:
        y: uint8 (T, H, W) luma; rows contiguous, row / frame strides free (views of padded
            or packed buffers are fine).
        u, v: uint8 (T, ceil(H / 2^sy), ceil(W / 2^sx)) chroma with ``chroma_shift = (sx, sy)``.
        out: contiguous (T, H', W') gray or (T, H', W', 3) RGB of uint8 / float32 / float16 /
            bfloat16 on the planes' device; resized from H x W with ``resize`` when sizes differ.
        full_range: True for JPEG-range (yuvj*) samples, False for limited range.
        threads: CPU threads (default ``torch.get_num_threads()``); ignored on CUDA.
    """
    device = _same_device({"y": y, "u": u, "v": v, "out": out})
    module = _module(device)
    sx, sy = chroma_shift
    if sx not in (0, 1) or sy not in (0, 1):
        raise PixelFormatError(f"chroma_shift must be 0 or 1 per axis, got {chroma_shift}")
    if y.dim() != 3:
        raise PixelFormatError(f"y must be (T, H, W), got shape {tuple(y.shape)}")
    t, h, w = y.shape
    _plane("y", y, h, w, t)
    for name, plane in (("u", u), ("v", v)):
        _plane(name, plane, -(-h // (1 << sy)), -(-w // (1 << sx)), t)
    dst = _check_out(out, t, (1, 3))
    src = {
        "data": (y.data_ptr(), u.data_ptr(), v.data_ptr()),
        "frame_stride": (y.stride(0), u.stride(0), v.stride(0)),
        "row_stride": (y.stride(1), u.stride(1), v.stride(1)),
        "table": 0,
        "frames": t,
        "height": h,
        "width": w,
        "layout": LAYOUT_YUV,
        "channels": 3,
        "full_range": bool(full_range),
        "chroma_shift": (sx, sy),
    }
    module.planes_to_frames(
        src, dst, _resize_code(resize), _threads(threads), *_device_args(device)
    )
    return out


def packed_to_frames(
    pixels: torch.Tensor, out: torch.Tensor, *, resize: str = "area", threads: int | None = None
) -> torch.Tensor:
    """Resize / normalise 8-bit gray (T, H, W) or RGB (T, H, W, 3) ``pixels`` into ``out``.

    ``pixels`` needs contiguous rows (pixels and channels packed); gray may fill an RGB ``out``
    (replicated), RGB may not fill a gray one. Other arguments as :func:`yuv_to_frames`.
    """
    device = _same_device({"pixels": pixels, "out": out})
    module = _module(device)
    desc = _frames_desc("pixels", pixels, output=False)
    if pixels.dtype != torch.uint8:
        raise PixelFormatError(f"pixels must be uint8, got {pixels.dtype}")
    channels = desc["channels"]
    _, row_stride, x_stride, c_stride = desc["stride"]
    if x_stride != channels or (channels == 3 and c_stride != 1):
        raise PixelFormatError(
            f"pixels must have packed rows (strides (any, any, {channels}"
            f"{', 1' if channels == 3 else ''})), got {pixels.stride()}"
        )
    dst = _check_out(out, desc["frames"], (1, 3) if channels == 1 else (3,))
    src = {
        "data": (pixels.data_ptr(), 0, 0),
        "frame_stride": (pixels.stride(0), 0, 0),
        "row_stride": (row_stride, 0, 0),
        "table": 0,
        "frames": desc["frames"],
        "height": desc["height"],
        "width": desc["width"],
        "layout": LAYOUT_PACKED,
        "channels": channels,
        "full_range": True,
        "chroma_shift": (0, 0),
    }
    module.planes_to_frames(
        src, dst, _resize_code(resize), _threads(threads), *_device_args(device)
    )
    return out


def yuv420_buffer(frames: int, height: int, width: int, device: torch.device | str = "cpu"):
    """An empty uint8 (T, 3H/2, W) buffer in the layout of PyAV's
    ``VideoFrame.from_numpy_buffer(..., format="yuvj420p")``: Y rows, then U, then V packed."""
    return torch.empty(frames, height * 3 // 2, width, dtype=torch.uint8, device=device)


def frames_to_yuv(
    frames: torch.Tensor, out: torch.Tensor | None = None, *, threads: int | None = None
) -> torch.Tensor:
    """Gray (T, H, W) or RGB (T, H, W, 3) frames → yuvj420p planes (T, 3H/2, W) uint8.

    Float frames (float32 / float16 / bfloat16, nominally in [−1, 1]) become uint8 with the
    reference's ``uint8(clamp((x + 1) * 128, 0, 255))`` computed in fp32 (truncating; NaN → 0);
    uint8 frames are used as they are. Gray frames give Y = gray and Cb = Cr = 128 (what FFmpeg
    makes of gray); RGB frames give BT.601 full-range Y per pixel and Cb / Cr of each 2x2 block's
    mean. H and W must be even. ``out``: optional buffer from :func:`yuv420_buffer` on the
    frames' device. Any strides are accepted for ``frames``.
    """
    desc = _frames_desc("frames", frames, output=False)
    t, h, w = desc["frames"], desc["height"], desc["width"]
    if h % 2 or w % 2:
        raise PixelFormatError(f"frames need even H and W for 4:2:0, got {h}x{w}")
    if out is None:
        out = yuv420_buffer(t, h, w, frames.device)
    device = _same_device({"frames": frames, "out": out})
    module = _module(device)
    if out.dtype != torch.uint8 or tuple(out.shape) != (t, h * 3 // 2, w):
        raise PixelFormatError(
            f"out must be uint8 {(t, h * 3 // 2, w)}, got {out.dtype} {tuple(out.shape)}"
        )
    if not out.is_contiguous():
        raise PixelFormatError(f"out must be contiguous, got strides {out.stride()}")
    base, frame_stride = out.data_ptr(), out.stride(0)
    dst = {
        "data": (base, base + h * w, base + h * w + (h // 2) * (w // 2)),
        "frame_stride": (frame_stride,) * 3,
        "row_stride": (w, w // 2, w // 2),
        "table": 0,
        "frames": t,
        "height": h,
        "width": w,
        "layout": LAYOUT_YUV,
        "channels": 3,
        "full_range": True,
        "chroma_shift": (1, 1),
    }
    module.frames_to_planes(desc, dst, _threads(threads), *_device_args(device))
    return out


def planes_to_frames_table(
    table_address: int,
    frames: int,
    height: int,
    width: int,
    *,
    layout: int,
    channels: int,
    full_range: bool,
    chroma_shift: tuple[int, int],
    out: torch.Tensor,
    resize: str,
    threads: int | None,
) -> torch.Tensor:
    """CPU conversion of frames whose planes live in separate buffers (decoded AVFrames).

    ``table_address`` points at ``frames`` rows of 6 int64: the addresses of planes 0, 1, 2 and
    their row strides. The caller (:mod:`echofast.io.video`) has checked every plane against its
    buffer size and keeps the buffers alive during the call.
    """
    if out.device.type != "cpu":
        raise PixelFormatError(f"a plane table is CPU-only; out is on {out.device}")
    module = _module(out.device)
    dst = _check_out(out, frames, (1, 3) if (layout == LAYOUT_YUV or channels == 1) else (3,))
    src = {
        "data": (0, 0, 0),
        "frame_stride": (0, 0, 0),
        "row_stride": (0, 0, 0),
        "table": table_address,
        "frames": frames,
        "height": height,
        "width": width,
        "layout": layout,
        "channels": channels,
        "full_range": bool(full_range),
        "chroma_shift": tuple(chroma_shift),
    }
    module.planes_to_frames(src, dst, _resize_code(resize), _threads(threads), -1, 0)
    return out


def default_threads() -> int:
    """CPU threads the pixel path uses by default: ``torch.get_num_threads()``, at most the
    number of CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus))
