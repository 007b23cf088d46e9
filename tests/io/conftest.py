"""Fixtures of the video tests: the shared real echo clips and clips written in several codecs.

The real clips live in ``../shared/testdata/echo`` next to the repository (override with
``ECHOFAST_TESTDATA_ECHO``); tests that need them skip with the path they looked at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from echofast import _ext

ECHO_ENV = "ECHOFAST_TESTDATA_ECHO"
REPO = Path(__file__).resolve().parents[2]


def echo_dir() -> Path:
    return Path(os.environ.get(ECHO_ENV) or REPO.parent / "shared" / "testdata" / "echo")


@pytest.fixture(scope="session")
def echo_clips() -> list[Path]:
    folder = echo_dir()
    clips = sorted(p for p in folder.glob("*") if p.suffix in {".avi", ".mp4"})
    if not clips:
        pytest.skip(f"no real echo clips (*.avi, *.mp4) in {folder}; set {ECHO_ENV} to a folder")
    return clips


@pytest.fixture(scope="session")
def native():
    """The extension module; skips when it is unavailable (pure-Python install or
    ECHOFAST_SKIP_EXT=1)."""
    if not _ext.available():
        pytest.skip(f"echofast._C unavailable: {_ext.build_info()['reason']}")
    return _ext.load()


def smooth_rgb(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Colourful smooth frames with some noise: uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for t in range(frames):
        r = 128 + 100 * np.sin(xx / 7 + t / 3)
        g = 128 + 90 * np.cos(yy / 5 - t / 4)
        b = 128 + 60 * np.sin((xx + yy) / 9 + t)
        image = np.stack([r, g, b], -1) + rng.normal(0, 8, (height, width, 3))
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(out)


@dataclass(frozen=True)
class ClipSpec:
    name: str
    suffix: str
    container: str
    codec: str
    pix_fmt: str
    height: int = 48
    width: int = 64
    options: tuple[tuple[str, str], ...] = ()


CLIP_SPECS = [
    ClipSpec("mjpeg420", ".avi", "avi", "mjpeg", "yuvj420p"),
    ClipSpec("mjpeg422", ".avi", "avi", "mjpeg", "yuvj422p"),
    ClipSpec("h264", ".mp4", "mp4", "libx264", "yuv420p", options=(("crf", "10"),)),
    ClipSpec("ffv1_420", ".mkv", "matroska", "ffv1", "yuv420p"),
    ClipSpec("ffv1_444", ".mkv", "matroska", "ffv1", "yuv444p"),
    ClipSpec("ffv1_odd", ".mkv", "matroska", "ffv1", "yuv420p", height=23, width=37),
    ClipSpec("rawvideo", ".avi", "avi", "rawvideo", "yuv420p"),
    ClipSpec("rawvideo_odd", ".nut", "nut", "rawvideo", "yuv420p", height=25, width=31),
    ClipSpec("png_rgb", ".avi", "avi", "png", "rgb24"),
    ClipSpec("png_gray", ".avi", "avi", "png", "gray"),
    ClipSpec("gif", ".gif", "gif", "gif", "rgb8"),
]
CLIP_FPS = 25
CLIP_FRAMES = 6


def write_clip(path: Path, spec: ClipSpec, frames: np.ndarray) -> Path:
    """Encode RGB uint8 frames with PyAV (FFmpeg converts them to ``spec.pix_fmt``)."""
    import av

    with av.open(str(path), "w", format=spec.container) as container:
        stream = container.add_stream(spec.codec, rate=CLIP_FPS, options=dict(spec.options))
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, spec.pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def codec_clips(tmp_path_factory) -> dict[str, Path]:
    """One small clip per ``CLIP_SPECS`` entry, name → path."""
    import av

    folder = tmp_path_factory.mktemp("codec_clips")
    clips = {}
    for i, spec in enumerate(CLIP_SPECS):
        if spec.codec not in av.codecs_available:
            continue
        frames = smooth_rgb(CLIP_FRAMES, spec.height, spec.width, seed=i)
        clips[spec.name] = write_clip(folder / f"{spec.name}{spec.suffix}", spec, frames)
    return clips


def ffmpeg_frames(path: Path, fmt: str, max_frames: int | None = None) -> np.ndarray:
    """FFmpeg's own conversion of every frame (PyAV ``to_ndarray``): the oracle."""
    import av

    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format=fmt))
            if max_frames is not None and len(out) >= max_frames:
                break
    return np.stack(out)


@pytest.fixture(scope="session")
def ffmpeg():
    """:func:`ffmpeg_frames`: FFmpeg's conversion of a file's frames."""
    return ffmpeg_frames


@pytest.fixture(scope="session")
def make_rgb():
    """:func:`smooth_rgb`: colourful smooth uint8 frames."""
    return smooth_rgb
