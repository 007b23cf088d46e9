"""Video input/output: PyAV (FFmpeg) for containers and codecs, the extension for pixels."""

from .batch import VideoResult, read_videos
from .pixels import PixelFormatError, frames_to_yuv, packed_to_frames, yuv_to_frames
from .video import (
    AVI_MAX_FPS,
    MJPEG_QSCALE,
    READ_CODECS,
    VideoDecodeError,
    VideoEncodeError,
    convert_frames,
    read_video,
    reference_uint8,
    stored_fps,
    video_backend,
    write_video,
)
from .writer import VideoWriter

__all__ = [
    "AVI_MAX_FPS",
    "MJPEG_QSCALE",
    "READ_CODECS",
    "PixelFormatError",
    "VideoDecodeError",
    "VideoEncodeError",
    "VideoResult",
    "VideoWriter",
    "convert_frames",
    "frames_to_yuv",
    "packed_to_frames",
    "read_video",
    "read_videos",
    "reference_uint8",
    "stored_fps",
    "video_backend",
    "write_video",
    "yuv_to_frames",
]
