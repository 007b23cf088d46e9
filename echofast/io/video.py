"""Video files: FFmpeg (through PyAV) for containers and codecs, echofast's pixel path for pixels.

Reading (:func:`read_video`): the file is demuxed with the container its suffix names (never
probed, see ``CONTAINERS``), decoded by FFmpeg (codecs in ``READ_CODECS``), and the decoded
planes go in chunks of ``CHUNK_FRAMES`` frames to the native pixel path
(:mod:`echofast.io.pixels`, the compiled extension, on CPU threads or as CUDA kernels writing
into the output tensor on the GPU). Without the extension (``ECHOFAST_SKIP_EXT=1`` or not
built), or with ``backend="pyav"``, pixels are converted by FFmpeg itself
(``VideoFrame.to_ndarray``) and resized / normalised with PyTorch: gray frames are identical
either way, RGB differs by at most 2 levels in full range and 3 in limited range (FFmpeg's
tables truncate; the native path rounds), resized values by at most 1 uint8 level.

Writing (:func:`write_video`): MJPEG in AVI, yuvj420p, best quality, written atomically. Native
path: frames → yuvj420p planes by the extension (on the frames' device), handed to the encoder
without another conversion; fallback: FFmpeg converts gray / RGB uint8 frames. Gray uint8 frames
give byte-identical files on both paths.

Bad input (missing, truncated, corrupted or non-video files, other codecs or containers, frame
sizes or counts beyond the limits below, decoding beyond the time limit) raises
:class:`VideoDecodeError` naming the file and the reason.
"""

from __future__ import annotations

import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailable, EchofastError
from ..fsutil import atomic_write
from . import pixels

__all__ = [
    "AVI_MAX_FPS",
    "BACKENDS",
    "CHUNK_FRAMES",
    "CONTAINERS",
    "DEFAULT_TIME_LIMIT_S",
    "MAX_FRAMES",
    "MAX_FRAME_PIXELS",
    "MAX_OUTPUT_BYTES",
    "MAX_SIDE",
    "MJPEG_QSCALE",
    "READ_CODECS",
    "VideoDecodeError",
    "VideoEncodeError",
    "convert_frames",
    "read_video",
    "reference_uint8",
    "stored_fps",
    "video_backend",
    "write_video",
]

MJPEG_QSCALE = 1
"""JPEG quantiser scale of written MJPEG frames: 1 is the best quality FFmpeg offers
(the reference asks imageio for quality 10, i.e. ``-qscale:v 1``)."""

AVI_MAX_FPS = 1000
"""Highest frame rate an AVI holds: FFmpeg's AVI muxer stores a higher video rate as 600."""

READ_CODECS = ("mjpeg", "h264", "ffv1", "rawvideo", "png", "gif")
"""Video codecs :func:`read_video` decodes."""

CONTAINERS = {
    ".avi": "avi",
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".gif": "gif",
    ".nut": "nut",
}
"""File suffix → the only FFmpeg demuxer used for it (no probing: a crafted file cannot pick
a playlist or concat demuxer that would open other files)."""

MAX_SIDE = 16384
"""Largest accepted frame width or height."""
MAX_FRAME_PIXELS = 1 << 26
"""Largest accepted frame area (8192 x 8192)."""
MAX_FRAMES = 1_000_000
"""Most frames decoded from one file when ``max_frames`` is not given."""
MAX_OUTPUT_BYTES = 16 << 30
"""Largest output tensor :func:`read_video` allocates."""
DEFAULT_TIME_LIMIT_S = 600.0
"""Default wall-clock budget of one :func:`read_video` call, checked after every packet."""
CHUNK_FRAMES = 32
"""Decoded frames handed to the pixel path per call (fewer when frames are large)."""
BACKENDS = ("auto", "native", "pyav")

READ_DTYPES = tuple(pixels.DTYPES)

# 8-bit planar YUV formats the native path reads directly → (chroma shift x, chroma shift y).
_YUV_SHIFTS = {
    "yuv420p": (1, 1),
    "yuvj420p": (1, 1),
    "yuv422p": (1, 0),
    "yuvj422p": (1, 0),
    "yuv440p": (0, 1),
    "yuvj440p": (0, 1),
    "yuv444p": (0, 0),
    "yuvj444p": (0, 0),
}
# AVColorSpace values FFmpeg converts with BT.601 coefficients: unspecified, BT470BG, SMPTE170M.
# Frames tagged otherwise (e.g. BT.709) get RGB from FFmpeg itself, which honours the tag.
_BT601_SPACES = (2, 5, 6)
_AVCOL_RANGE_JPEG = 2


class VideoDecodeError(EchofastError, ValueError):
    """A file is not a readable video of a supported codec; the message names file and reason."""


class VideoEncodeError(EchofastError, ValueError):
    """Frames cannot be written (bad shape, dtype or fps); nothing is left on disk."""


def video_backend() -> dict[str, Any]:
    """The pixel path ``backend="auto"`` uses: ``{"backend": "native" | "pyav", "cuda": bool,
    "cuda_built": bool, "reason": str | None}``.

    ``cuda_built``: the extension was built with CUDA kernels. ``cuda``: they can run here, so
    CUDA frames are converted on the GPU: built with CUDA, the extension's CUDA runtime sees a
    device (it may need a newer driver than PyTorch's) and PyTorch has CUDA. ``reason``: why the
    path is not native, or why it has no usable CUDA (None when it has)."""
    status = pixels.native_status()
    if not status["cpu"]:
        return {"backend": "pyav", "cuda": False, "cuda_built": False, "reason": status["reason"]}
    usable, why = pixels.cuda_usable()
    reasons = [] if usable else [why]
    if not torch.cuda.is_available():
        build = (
            "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        )
        reasons.append(f"torch ({build}) has no usable CUDA device")
    return {
        "backend": "native",
        "cuda": not reasons,
        "cuda_built": status["cuda"],
        "reason": "; ".join(reasons) or None,
    }


def _use_native(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pyav":
        return False
    status = pixels.native_status()
    if not status["cpu"]:
        if backend == "native":
            raise BackendUnavailable("video pixels", "native", [status["reason"]])
        return False
    return True


def _native_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and pixels.cuda_usable()[0]


def _chunk_frames(height: int, width: int) -> int:
    """Frames per conversion call: ``CHUNK_FRAMES``, fewer for big frames (<= ~64 MiB held)."""
    return max(1, min(CHUNK_FRAMES, (64 << 20) // (3 * height * width)))


# ---- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ReadOptions:
    size: tuple[int, int] | None
    grayscale: bool
    dtype: torch.dtype
    device: torch.device
    max_frames: int | None
    resize: str
    threads: int | None
    time_limit: float | None


def _read_options(
    size, grayscale, dtype, device, max_frames, resize, threads, time_limit
) -> _ReadOptions:
    if size is not None:
        pair = (size, size) if isinstance(size, int) else tuple(size)
        if len(pair) != 2 or not all(isinstance(s, int) and 1 <= s <= MAX_SIDE for s in pair):
            raise ValueError(
                f"size must be an int or (height, width) in 1..{MAX_SIDE}, got {size!r}"
            )
        size = (int(pair[0]), int(pair[1]))
    if dtype not in READ_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in READ_DTYPES]}, got {dtype}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but torch has no usable CUDA")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be None or an int >= 1, got {max_frames!r}")
    if resize not in pixels.RESIZE_MODES:
        raise ValueError(f"resize must be one of {list(pixels.RESIZE_MODES)}, got {resize!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be None or > 0 seconds, got {time_limit!r}")
    return _ReadOptions(
        size, bool(grayscale), dtype, device, max_frames, resize, threads, time_limit
    )


class _Output:
    """The growing output tensor (frames appended in chunks)."""

    def __init__(self, path: Path, opts: _ReadOptions, height: int, width: int, hint: int):
        self.path, self.opts = path, opts
        out_h, out_w = opts.size or (height, width)
        self.frame_shape = (out_h, out_w) if opts.grayscale else (out_h, out_w, 3)
        itemsize = torch.empty((), dtype=opts.dtype).element_size()
        self.frame_bytes = math.prod(self.frame_shape) * itemsize
        self.limit = opts.max_frames if opts.max_frames is not None else MAX_FRAMES
        self._check(1)
        capacity = min(max(hint, CHUNK_FRAMES), self.limit, 4096)
        capacity = max(1, min(capacity, MAX_OUTPUT_BYTES // self.frame_bytes))
        self.buffer = torch.empty(
            (capacity, *self.frame_shape), dtype=opts.dtype, device=opts.device
        )
        self.count = 0

    def _check(self, frames: int) -> None:
        if frames > self.limit:
            raise VideoDecodeError(f"{self.path}: more than {self.limit} frames")
        if frames * self.frame_bytes > MAX_OUTPUT_BYTES:
            raise VideoDecodeError(
                f"{self.path}: {frames} frames of {self.frame_shape} {self.opts.dtype} would take "
                f"{frames * self.frame_bytes / 2**30:.1f} GiB, more than MAX_OUTPUT_BYTES"
            )

    def reserve(self, frames: int) -> torch.Tensor:
        """The output slice for the next ``frames`` frames."""
        need = self.count + frames
        self._check(need)
        if need > len(self.buffer):
            capacity = min(max(2 * len(self.buffer), need), self.limit)
            capacity = max(need, min(capacity, MAX_OUTPUT_BYTES // self.frame_bytes))
            grown = torch.empty(
                (capacity, *self.frame_shape), dtype=self.opts.dtype, device=self.opts.device
            )
            grown[: self.count].copy_(self.buffer[: self.count])
            self.buffer = grown
        return self.buffer[self.count : need]

    def commit(self, frames: int) -> None:
        self.count += frames

    def result(self) -> torch.Tensor:
        if self.count == len(self.buffer):
            return self.buffer
        return self.buffer[: self.count].clone()


@dataclass
class _Entry:
    """One decoded frame ready for the native path: its layout key, what keeps its memory
    alive, and per used plane (address, row stride, bytes per row, rows, numpy buffer)."""

    key: tuple[int, int, bool, tuple[int, int]]
    holder: Any
    planes: list[tuple[int, int, int, int, Any]] = field(default_factory=list)


def _plane_entry(path: Path, index: int, plane, rows: int, row_bytes: int):
    line = plane.line_size
    if line < row_bytes or plane.buffer_size < line * (rows - 1) + row_bytes:
        raise VideoDecodeError(
            f"{path}: frame {index} has a plane of {plane.buffer_size} bytes with rows of {line} "
            f"bytes, too small for {rows} rows of {row_bytes} bytes"
        )
    return (plane.buffer_ptr, line, row_bytes, rows, plane)


def _ffmpeg_ndarray(path: Path, index: int, frame, fmt: str) -> np.ndarray:
    """FFmpeg's own conversion of a frame; its failures become VideoDecodeError."""
    try:
        return frame.to_ndarray(format=fmt)
    except _decode_errors() as err:
        raise VideoDecodeError(
            f"{path}: frame {index} ({frame.format.name}) cannot be converted to {fmt} "
            f"({type(err).__name__}: {err})"
        ) from err


def _native_rgb(frame, shifts: tuple[int, int]) -> bool:
    """Whether the native RGB conversion is FFmpeg's too: BT.601 frames whose chroma FFmpeg's
    unscaled path also samples nearest (4:4:4; 4:2:0 and 4:2:2 of even size). FFmpeg
    interpolates chroma for odd sizes and 4:4:0, and honours other colour matrices: those
    frames get FFmpeg's conversion."""
    if frame.colorspace not in _BT601_SPACES:
        return False
    return shifts == (0, 0) or (shifts != (0, 1) and frame.height % 2 == 0 and frame.width % 2 == 0)


def _classify(path: Path, index: int, frame, grayscale: bool) -> _Entry:
    """How the native path reads ``frame``: its planes directly when they are 8-bit YUV (or
    gray for gray output), else FFmpeg's own gray / rgb24 conversion of it."""
    name = frame.format.name
    height, width = frame.height, frame.width
    shifts = _YUV_SHIFTS.get(name)
    if shifts is not None and (grayscale or _native_rgb(frame, shifts)):
        sx, sy = shifts
        full = name.startswith("yuvj") or frame.color_range == _AVCOL_RANGE_JPEG
        chroma = (-(-height // (1 << sy)), -(-width // (1 << sx)))
        dims = [(height, width), chroma, chroma]
        planes = frame.planes
        if len(planes) != 3:
            raise VideoDecodeError(f"{path}: frame {index} ({name}) has {len(planes)} planes")
        entry = _Entry((pixels.LAYOUT_YUV, 3, full, shifts), frame)
        for plane, (rows, cols) in zip(planes, dims):
            entry.planes.append(_plane_entry(path, index, plane, rows, cols))
        return entry
    if name == "gray" and grayscale:
        entry = _Entry((pixels.LAYOUT_PACKED, 1, True, (0, 0)), frame)
        entry.planes.append(_plane_entry(path, index, frame.planes[0], height, width))
        return entry
    fmt = "gray" if grayscale else "rgb24"
    array = np.ascontiguousarray(_ffmpeg_ndarray(path, index, frame, fmt))
    channels = 1 if grayscale else 3
    if array.shape[:2] != (height, width):
        raise VideoDecodeError(
            f"{path}: frame {index} converted to {array.shape}, expected {height}x{width}"
        )
    entry = _Entry((pixels.LAYOUT_PACKED, channels, True, (0, 0)), array)
    row_bytes = width * channels
    entry.planes.append((array.ctypes.data, row_bytes, row_bytes, height, array))
    return entry


class _Converter(ABC):
    """Receives decoded frames one by one and fills an :class:`_Output` chunk by chunk."""

    def __init__(self, path: Path, opts: _ReadOptions, height: int, width: int, hint: int):
        self.path, self.opts = path, opts
        self.height, self.width = height, width
        self.out = _Output(path, opts, height, width, hint)
        self.chunk = _chunk_frames(height, width)

    @abstractmethod
    def add(self, index: int, frame) -> None:
        """Take decoded frame number ``index`` (same size as the first)."""

    @abstractmethod
    def finish(self) -> torch.Tensor:
        """Convert what is pending and return the frames."""


class _PyAVConverter(_Converter):
    """FFmpeg's own conversion (``to_ndarray``), then PyTorch for resize and dtype."""

    def __init__(self, *args):
        super().__init__(*args)
        self.pending: list[np.ndarray] = []

    def add(self, index: int, frame) -> None:
        fmt = "gray" if self.opts.grayscale else "rgb24"
        self.pending.append(_ffmpeg_ndarray(self.path, index, frame, fmt))
        if len(self.pending) == self.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        k = len(self.pending)
        view = self.out.reserve(k)
        chunk = torch.from_numpy(np.stack(self.pending)).to(view.device)
        view.copy_(_postprocess(chunk, self.opts))
        self.out.commit(k)
        self.pending.clear()

    def finish(self) -> torch.Tensor:
        self._flush()
        return self.out.result()


def _postprocess(chunk: torch.Tensor, opts: _ReadOptions) -> torch.Tensor:
    """uint8 gray (k, H, W) / RGB (k, H, W, 3) → resized, in ``opts.dtype`` (PyTorch)."""
    import torch.nn.functional as F

    height, width = chunk.shape[1:3]
    if opts.size is not None and opts.size != (height, width):
        x = chunk.float()
        x = x[:, None] if opts.grayscale else x.permute(0, 3, 1, 2)
        if opts.resize == "bilinear":
            x = F.interpolate(x, size=opts.size, mode="bilinear", align_corners=False)
        else:
            x = F.interpolate(x, size=opts.size, mode="area")
        x = x[:, 0] if opts.grayscale else x.permute(0, 2, 3, 1)
        if opts.dtype == torch.uint8:
            return x.round_().clamp_(0, 255).to(torch.uint8)
        return (x / 128 - 1).to(opts.dtype)
    if opts.dtype == torch.uint8:
        return chunk
    return (chunk.float() / 128 - 1).to(opts.dtype)


class _NativeCPUConverter(_Converter):
    """Plane addresses of decoded frames go straight to the extension (no copy); with a CUDA
    target but no CUDA in the extension, chunks are converted on the CPU and uploaded."""

    def __init__(self, *args):
        super().__init__(*args)
        self.pending: list[_Entry] = []

    def add(self, index: int, frame) -> None:
        entry = _classify(self.path, index, frame, self.opts.grayscale)
        if self.pending and entry.key != self.pending[0].key:
            self._flush()
        self.pending.append(entry)
        if len(self.pending) == self.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        k = len(self.pending)
        layout, channels, full, shifts = self.pending[0].key
        table = np.zeros((k, 6), dtype=np.int64)
        for i, entry in enumerate(self.pending):
            for p, (address, line, *_) in enumerate(entry.planes):
                table[i, p], table[i, 3 + p] = address, line
        view = self.out.reserve(k)
        target = view if view.device.type == "cpu" else torch.empty_like(view, device="cpu")
        pixels.planes_to_frames_table(
            table.ctypes.data,
            k,
            self.height,
            self.width,
            layout=layout,
            channels=channels,
            full_range=full,
            chroma_shift=shifts,
            out=target,
            resize=self.opts.resize,
            threads=self.opts.threads,
        )
        if target is not view:
            view.copy_(target)
        self.out.commit(k)
        self.pending.clear()

    def finish(self) -> torch.Tensor:
        self._flush()
        return self.out.result()


class _NativeCUDAConverter(_Converter):
    """Planes are packed into pinned host buffers (two, alternating), copied to the GPU
    asynchronously and converted there by the CUDA kernels, all on the current stream."""

    def __init__(self, *args):
        super().__init__(*args)
        h, w = self.height, self.width
        self.max_bytes = max(h * w * 3, h * w + 2 * h * w)
        self.pinned = [
            torch.empty((self.chunk, self.max_bytes), dtype=torch.uint8, pin_memory=True)
            for _ in range(2)
        ]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.current = 0
        self.staging = torch.empty(
            (self.chunk, self.max_bytes), dtype=torch.uint8, device=self.opts.device
        )
        self.key: tuple | None = None
        self.count = 0

    def add(self, index: int, frame) -> None:
        entry = _classify(self.path, index, frame, self.opts.grayscale)
        if self.count and entry.key != self.key:
            self._flush()
        if self.count == 0:
            event = self.events[self.current]
            if event is not None:
                event.synchronize()
        self.key = entry.key
        row = self.pinned[self.current][self.count].numpy()
        offset = 0
        for _address, line, row_bytes, rows, buffer in entry.planes:
            src = np.frombuffer(buffer, dtype=np.uint8, count=line * (rows - 1) + row_bytes)
            src = np.lib.stride_tricks.as_strided(src, (rows, row_bytes), (line, 1))
            row[offset : offset + rows * row_bytes].reshape(rows, row_bytes)[...] = src
            offset += rows * row_bytes
        self.count += 1
        if self.count == self.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self.count:
            return
        k = self.count
        layout, channels, full, (sx, sy) = self.key
        staging = self.staging[:k]
        staging.copy_(self.pinned[self.current][:k], non_blocking=True)
        stream = torch.cuda.current_stream(self.opts.device)
        event = torch.cuda.Event()
        event.record(stream)
        self.events[self.current] = event
        view = self.out.reserve(k)
        h, w = self.height, self.width
        if layout == pixels.LAYOUT_YUV:
            ch, cw = -(-h // (1 << sy)), -(-w // (1 << sx))
            y = staging[:, : h * w].unflatten(1, (h, w))
            u = staging[:, h * w : h * w + ch * cw].unflatten(1, (ch, cw))
            v = staging[:, h * w + ch * cw : h * w + 2 * ch * cw].unflatten(1, (ch, cw))
            pixels.yuv_to_frames(
                y, u, v, view, full_range=full, chroma_shift=(sx, sy), resize=self.opts.resize
            )
        else:
            shape = (h, w) if channels == 1 else (h, w, 3)
            packed = staging[:, : h * w * channels].unflatten(1, shape)
            pixels.packed_to_frames(packed, view, resize=self.opts.resize)
        self.out.commit(k)
        self.current ^= 1
        self.count = 0

    def finish(self) -> torch.Tensor:
        self._flush()
        return self.out.result()


def _container_format(path: Path) -> str:
    fmt = CONTAINERS.get(path.suffix.lower())
    if fmt is None:
        raise VideoDecodeError(
            f"{path}: unsupported container suffix {path.suffix!r}; supported: "
            f"{', '.join(sorted(CONTAINERS))}"
        )
    return fmt


def _decode_errors() -> tuple[type[BaseException], ...]:
    import av

    return (
        av.FFmpegError,
        OSError,
        EOFError,
        ValueError,
        IndexError,
        OverflowError,
        ZeroDivisionError,
        MemoryError,
    )


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    try:
        fps = float(rate) if rate else 0.0
    except (ZeroDivisionError, OverflowError, TypeError):
        return 0.0
    return fps if math.isfinite(fps) and fps > 0 else 0.0


def _decoded_frames(container, stream, path: Path, deadline: float | None, limit_s) -> Iterator:
    """Frames of ``stream``; FFmpeg failures and the time limit become VideoDecodeError."""
    errors = _decode_errors()
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets, None)
            if packet is None:
                return
            frames = packet.decode()
        except VideoDecodeError:
            raise
        except errors as err:
            raise VideoDecodeError(f"{path}: cannot decode ({type(err).__name__}: {err})") from err
        if deadline is not None and time.monotonic() > deadline:
            raise VideoDecodeError(f"{path}: decoding took longer than the {limit_s} s limit")
        yield from frames


def _check_size(path: Path, index: int, width: int, height: int) -> None:
    if (
        not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE)
        or width * height > MAX_FRAME_PIXELS
    ):
        raise VideoDecodeError(
            f"{path}: frame {index} is {width}x{height}, outside the limits (sides 1..{MAX_SIDE}, "
            f"at most {MAX_FRAME_PIXELS} pixels)"
        )


def read_video(
    path: str | os.PathLike,
    *,
    size: int | tuple[int, int] | None = None,
    grayscale: bool = True,
    dtype: torch.dtype = torch.uint8,
    device: torch.device | str = "cpu",
    max_frames: int | None = None,
    resize: str = "area",
    backend: str = "auto",
    threads: int | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT_S,
) -> tuple[torch.Tensor, float]:
    """Decode a video into a tensor and return it with the stream's frame rate (0.0 if unknown).

    Args:
        path: a file with a suffix in ``CONTAINERS``, video codec in ``READ_CODECS``.
        size: output (height, width) or one int for both; None keeps the decoded size.
        grayscale: (T, H, W) gray (the luma plane) if True, else (T, H, W, 3) RGB (BT.601).
        dtype: uint8 pixel values, or float32 / float16 / bfloat16 ``x / 128 − 1`` (the
            reference's normalisation, computed in fp32 from the 8-bit values).
        device: where the tensor is made; on CUDA the conversion runs on the GPU (current
            stream) when the extension has CUDA.
        max_frames: decode at most this many frames (default: all, up to ``MAX_FRAMES``).
        resize: ``"area"`` (adaptive average pooling, as ``interpolate(mode="area")``) or
            ``"bilinear"`` (``align_corners=False``, no antialiasing); used when ``size`` differs.
        backend: ``"auto"`` (native when the extension is available), ``"native"`` (raise
            :class:`~echofast.errors.BackendUnavailable` without it) or ``"pyav"``.
        threads: CPU threads for decoding and conversion (default: FFmpeg's and
            ``torch.get_num_threads()``).
        time_limit: seconds before giving up with :class:`VideoDecodeError` (None: no limit).

    Raises:
        VideoDecodeError: the file is missing, not a video, corrupted or truncated so that
            nothing decodes, in another codec or container, has frames of changing or
            out-of-limit size, too many frames, or takes longer than ``time_limit``.
    """
    import av

    opts = _read_options(size, grayscale, dtype, device, max_frames, resize, threads, time_limit)
    native = _use_native(backend)
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"{path}: no such file")
    fmt = _container_format(path)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    errors = _decode_errors()
    try:
        container = av.open(str(path), format=fmt, metadata_errors="ignore")
    except errors as err:
        raise VideoDecodeError(
            f"{path}: not a readable {fmt} file ({type(err).__name__}: {err})"
        ) from err
    with container:
        try:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            context = stream.codec_context
            if context is None:
                raise VideoDecodeError(f"{path}: the video stream names no known codec")
            if context.name not in READ_CODECS:
                raise VideoDecodeError(f"{path}: codec {context.name!r} is not in {READ_CODECS}")
            width, height = context.width, context.height
            if width or height:
                _check_size(path, 0, width, height)
            if threads is not None:
                context.thread_count = threads
            fps = _stream_fps(stream)
            hint = stream.frames if 0 < stream.frames <= MAX_FRAMES else 0
        except VideoDecodeError:
            raise
        except errors as err:
            raise VideoDecodeError(
                f"{path}: cannot read the stream ({type(err).__name__}: {err})"
            ) from err
        if opts.max_frames is not None:
            hint = min(hint or opts.max_frames, opts.max_frames)
        frames = _decoded_frames(container, stream, path, deadline, time_limit)
        return _convert(frames, path, opts, native, hint), fps


def _convert(
    frames: Iterable, path: Path, opts: _ReadOptions, native: bool, hint: int
) -> torch.Tensor:
    """Feed decoded frames to the chosen converter; check sizes and ``max_frames``."""
    converter: _Converter | None = None
    index = 0
    for frame in frames:
        if converter is None:
            _check_size(path, 0, frame.width, frame.height)
            cls: type[_Converter] = _PyAVConverter
            if native:
                cls = _NativeCUDAConverter if _native_cuda(opts.device) else _NativeCPUConverter
            converter = cls(path, opts, frame.height, frame.width, hint)
        elif (frame.width, frame.height) != (converter.width, converter.height):
            raise VideoDecodeError(
                f"{path}: frame {index} is {frame.width}x{frame.height}, the first frame "
                f"{converter.width}x{converter.height}"
            )
        converter.add(index, frame)
        index += 1
        if opts.max_frames is not None and index >= opts.max_frames:
            break
    if converter is None:
        raise VideoDecodeError(f"{path}: no decodable frames")
    return converter.finish()


def convert_frames(
    frames: Sequence[Any],
    *,
    size: int | tuple[int, int] | None = None,
    grayscale: bool = True,
    dtype: torch.dtype = torch.uint8,
    device: torch.device | str = "cpu",
    resize: str = "area",
    backend: str = "auto",
    threads: int | None = None,
) -> torch.Tensor:
    """Convert already decoded PyAV ``VideoFrame`` objects (all one size) into a tensor exactly
    as :func:`read_video` does; arguments as there. Errors name the frames as ``<frames>``."""
    opts = _read_options(size, grayscale, dtype, device, None, resize, threads, None)
    return _convert(frames, Path("<frames>"), opts, _use_native(backend), len(frames))


# ---- writing -----------------------------------------------------------------------------


def _frames_tensor(frames: torch.Tensor | np.ndarray, path: Path) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        if frames.dtype not in (np.uint8, np.float32, np.float16):
            raise VideoEncodeError(
                f"{path}: frames must be uint8 or float32 / float16, got {frames.dtype}"
            )
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise VideoEncodeError(
            f"{path}: frames must be a torch.Tensor or numpy array, got {type(frames).__name__}"
        )
    if frames.dtype not in pixels.DTYPES:
        raise VideoEncodeError(
            f"{path}: frames must be uint8 or float32 / float16 / bfloat16, got {frames.dtype}"
        )
    shape = tuple(frames.shape)
    rgb = frames.dim() == 4 and shape[3] == 3
    if not (frames.dim() == 3 or rgb) or shape[0] == 0 or min(shape[1:3]) < 2:
        raise VideoEncodeError(
            f"{path}: frames must be (T, H, W) gray or (T, H, W, 3) RGB with T >= 1 and "
            f"H, W >= 2, got {shape}"
        )
    if shape[1] % 2 or shape[2] % 2:
        raise VideoEncodeError(f"{path}: H and W must be even for 4:2:0 video, got {shape[1:3]}")
    return frames.detach()


def _yuv420_frame(planes: np.ndarray, height: int) -> Any:
    """A yuvj420p ``VideoFrame`` of ``height`` rows from a (3H/2, W) buffer of
    :func:`~echofast.io.pixels.yuv420_buffer`'s layout. The buffer is used in place when 4
    divides H; otherwise it is copied, because PyAV's ``from_numpy_buffer`` takes such a buffer
    for a frame of ``3H/2 // 6 * 4`` rows (H − 2: the chroma planes then start at the wrong row,
    and H = 2 gives an empty frame FFmpeg refuses)."""
    import av

    if height % 4:
        return av.VideoFrame.from_ndarray(planes, format="yuvj420p")
    return av.VideoFrame.from_numpy_buffer(planes, format="yuvj420p")


def reference_uint8(frames: torch.Tensor) -> torch.Tensor:
    """The reference's ``uint8(clamp((x + 1) * 128, 0, 255))`` in fp32 (truncating; NaN → 0);
    uint8 frames are returned as they are. PyTorch twin of the extension's conversion."""
    if frames.dtype == torch.uint8:
        return frames
    x = frames.float().nan_to_num(nan=-1.0)
    return ((x + 1) * 128).clamp_(0, 255).to(torch.uint8)


def _fps_text(fps: object) -> str:
    """``fps`` for a message: at most 40 characters (a huge int or Fraction has no repr)."""
    try:
        text = str(fps)
    except ValueError:
        return f"a {type(fps).__name__} too large to print"
    return text if len(text) <= 40 else f"{text[:37]}..."


def _avi_rate(fps: Any, path: Path) -> Fraction:
    """The rate an AVI stores for ``fps``: the nearest ratio with denominator <= 1001, which
    must be within 0.1 % of ``fps`` and at most ``AVI_MAX_FPS``; else VideoEncodeError naming
    ``path`` and ``fps``."""
    if isinstance(fps, bool | np.bool_ | str | bytes):
        raise VideoEncodeError(
            f"{path}: fps must be a number, got {type(fps).__name__} {_fps_text(repr(fps))}"
        )
    try:
        rate = fps if isinstance(fps, Fraction) else Fraction(float(fps))
    except (TypeError, ValueError, OverflowError):
        raise VideoEncodeError(
            f"{path}: fps must be a finite positive number, got {_fps_text(fps)}"
        ) from None
    if not rate > 0:
        raise VideoEncodeError(f"{path}: fps must be positive, got {_fps_text(fps)}")
    stored = rate.limit_denominator(1001)
    if not stored > 0 or abs(stored - rate) > rate * Fraction(1, 1000):
        raise VideoEncodeError(
            f"{path}: fps {_fps_text(fps)} cannot be stored in an AVI (a ratio with "
            "denominator <= 1001)"
        )
    if stored > AVI_MAX_FPS:
        raise VideoEncodeError(
            f"{path}: fps {_fps_text(fps)} cannot be stored in an AVI (FFmpeg would store "
            f"600): an AVI holds at most {AVI_MAX_FPS} fps"
        )
    return stored


def stored_fps(fps: float | Fraction) -> Fraction:
    """The frame rate an AVI that :func:`write_video` writes at ``fps`` stores (the nearest ratio
    with denominator <= 1001, e.g. 30000/1001 for 29.97002997); VideoEncodeError if none can."""
    return _avi_rate(fps, Path("fps"))


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray,
    fps: float | Fraction,
    *,
    codec: str = "mjpeg",
    backend: str = "auto",
    threads: int | None = None,
) -> Path:
    """Write frames as an AVI (MJPEG, yuvj420p, best quality) and return its path.

    ``frames``: gray (T, H, W) or RGB (T, H, W, 3), uint8 pixel values or float (float32 /
    float16 / bfloat16) in [−1, 1] made uint8 with the reference's truncation; on CPU or CUDA;
    H and W even. ``fps``: a number (not a bool or str) that an AVI stores: within 0.1 % of a
    ratio with denominator <= 1001 and at most ``AVI_MAX_FPS``; other rates raise
    VideoEncodeError naming the file and the rate. The file appears atomically: it is written
    to a temporary file in the same folder, synced, then renamed over ``path``. On any error
    nothing is left behind. ``backend`` as in :func:`read_video`.
    """
    import av

    path = Path(path)
    tensor = _frames_tensor(frames, path)
    stored = _avi_rate(fps, path)
    if path.suffix.lower() != ".avi":
        raise VideoEncodeError(f"{path}: write_video writes AVI files; the name must end in .avi")
    if codec != "mjpeg":
        raise VideoEncodeError(f"{path}: only codec 'mjpeg' is written, got {codec!r}")
    count, height, width = tensor.shape[:3]
    make: Callable[[int], Any]
    if _use_native(backend):
        if tensor.device.type != "cpu" and not _native_cuda(tensor.device):
            tensor = tensor.cpu()
        planes = pixels.frames_to_yuv(tensor, threads=threads).cpu().numpy()

        def make(t: int):
            return _yuv420_frame(planes[t], height)

    else:
        array = reference_uint8(tensor).cpu().numpy()
        pix_fmt = "gray" if array.ndim == 3 else "rgb24"

        def make(t: int):
            return av.VideoFrame.from_ndarray(array[t], format=pix_fmt)

    def encode(tmp: str) -> None:
        with av.open(tmp, "w", format="avi") as container:
            # every frame at quantiser MJPEG_QSCALE (FFmpeg's default qmin 2 would clamp 1 away)
            q = str(MJPEG_QSCALE)
            stream = container.add_stream("mjpeg", rate=stored, options={"qmin": q, "qmax": q})
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuvj420p"
            stream.codec_context.qscale = True
            if threads is not None:
                stream.codec_context.thread_count = threads
            for t in range(count):
                container.mux(stream.encode(make(t)))
            container.mux(stream.encode())
            if stream.time_base != 1 / stored:
                raise VideoEncodeError(
                    f"{path}: fps {_fps_text(fps)} cannot be stored in an AVI (FFmpeg would store "
                    f"{float(1 / stream.time_base):g})"
                )

    try:
        atomic_write(path, encode)
    except av.FFmpegError as err:
        raise VideoEncodeError(f"{path}: encoding failed ({type(err).__name__}: {err})") from err
    return path
