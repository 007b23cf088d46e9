"""Video input/output."""

from .video import (
    MJPEG_QSCALE,
    READ_CODECS,
    VideoDecodeError,
    VideoEncodeError,
    read_video,
    write_video,
)

__all__ = [
    "MJPEG_QSCALE",
    "READ_CODECS",
    "VideoDecodeError",
    "VideoEncodeError",
    "read_video",
    "write_video",
]
