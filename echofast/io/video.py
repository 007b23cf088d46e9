"""Video files through PyAV (FFmpeg): atomic writing and checked reading of grayscale clips.

Pixel conversion here is FFmpeg's own (``to_ndarray(format="gray")`` / ``from_ndarray``).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..errors import EchofastError
from ..fsutil import atomic_write

MJPEG_QSCALE = 1
"""JPEG quantiser scale of written MJPEG frames: 1 is the best quality FFmpeg offers
(the reference asks imageio for quality 10, i.e. ``-qscale:v 1``)."""

READ_CODECS = ("mjpeg", "h264", "ffv1", "rawvideo", "png", "gif")


class VideoDecodeError(EchofastError, ValueError):
    """A file is not a readable video of a supported codec; the message names file and reason."""


class VideoEncodeError(EchofastError, ValueError):
    """Frames cannot be written (bad shape, dtype or fps); nothing is left on disk."""


def _as_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    array = (
        frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    )
    if array.dtype != np.uint8:
        raise VideoEncodeError(f"frames must be uint8, got {array.dtype}")
    if array.ndim != 3 or array.shape[0] == 0 or min(array.shape[1:]) < 2:
        raise VideoEncodeError(f"frames must be (T, H, W) grayscale with T >= 1, got {array.shape}")
    if array.shape[1] % 2 or array.shape[2] % 2:
        raise VideoEncodeError(f"H and W must be even for 4:2:0 video, got {array.shape[1:]}")
    return np.ascontiguousarray(array)


def write_video(
    path: str | os.PathLike, frames: torch.Tensor | np.ndarray, fps: float, *, codec: str = "mjpeg"
) -> Path:
    """Write grayscale uint8 frames (T, H, W) as an AVI (MJPEG, yuvj420p, best quality).

    The file appears atomically: it is written to a temporary file in the same folder, synced,
    then renamed over ``path``. On any error nothing is left behind.
    """
    import av

    path = Path(path)
    array = _as_uint8_frames(frames)
    if not fps or fps <= 0:
        raise VideoEncodeError(f"{path}: fps must be positive, got {fps}")
    if codec != "mjpeg":
        raise VideoEncodeError(f"{path}: only codec 'mjpeg' is written, got {codec!r}")

    def encode(tmp: str) -> None:
        with av.open(tmp, "w", format="avi") as container:
            stream = container.add_stream(
                "mjpeg", rate=Fraction(fps).limit_denominator(1001), options={"qmin": "1"}
            )
            stream.width, stream.height = array.shape[2], array.shape[1]
            stream.pix_fmt = "yuvj420p"
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = MJPEG_QSCALE * 118
            for frame in array:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
            container.mux(stream.encode())

    atomic_write(path, encode)
    return path


def read_video(
    path: str | os.PathLike, *, max_frames: int | None = None
) -> tuple[torch.Tensor, float]:
    """Decode a video to grayscale uint8 frames (T, H, W) and its frame rate.

    Raises :class:`VideoDecodeError` naming the file for a missing, unreadable or non-video file
    or a codec outside ``READ_CODECS``.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"{path}: no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            if codec not in READ_CODECS:
                raise VideoDecodeError(f"{path}: codec {codec!r} is not in {READ_CODECS}")
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="gray"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoDecodeError:
        raise
    except (av.FFmpegError, ValueError, OSError) as err:
        raise VideoDecodeError(f"{path}: cannot decode ({type(err).__name__}: {err})") from None
    if not frames:
        raise VideoDecodeError(f"{path}: no decodable frames")
    return torch.from_numpy(np.stack(frames)), fps
