"""write_video at tiny and odd frame sizes: the native path writes what the PyAV path writes.

Heights that 4 does not divide (2, 6, 10, ...) once broke the native path: PyAV's
``from_numpy_buffer`` reads a yuvj420p buffer of 3H/2 rows as a frame of H − 2 rows, so H = 2
failed with an opaque FFmpeg error and H = 6, 10, ... gave files with misplaced chroma. Sizes
4:2:0 cannot hold (a side of 1, odd sides) are refused by both paths with the same typed error.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from echofast.io import VideoEncodeError, frames_to_yuv, read_video, write_video

EVEN_SIZES = [(2, 2), (2, 6), (6, 4), (10, 2), (4, 2), (14, 10)]
REFUSED_SIZES = [(1, 1), (1, 2), (2, 1), (3, 4), (4, 3), (2, 5), (5, 5)]


def _random_frames(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return (torch.rand(shape, generator=g) * 2.2 - 1.1).to(dtype)


@pytest.mark.parametrize("size", EVEN_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16])
def test_native_gray_write_is_byte_identical_to_pyav(native, tmp_path, size, dtype):
    frames = _random_frames((3, *size), dtype, seed=size[0] * 31 + size[1])
    ours = write_video(tmp_path / "native.avi", frames, 25, backend="native")
    theirs = write_video(tmp_path / "pyav.avi", frames, 25, backend="pyav")
    assert ours.read_bytes() == theirs.read_bytes()
    decoded, _ = read_video(ours)
    assert decoded.shape == frames.shape


@pytest.mark.parametrize("size", [(2, 8), (6, 4), (10, 6), (8, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_native_rgb_write_stores_the_converted_planes(native, tmp_path, make_rgb, size):
    """The encoder gets frames_to_yuv's planes, chroma included (JPEG at qscale 1 moves smooth
    content by a few levels at most; misplaced chroma rows move it by tens)."""
    rgb = torch.from_numpy(make_rgb(3, *size, seed=size[0]))
    path = write_video(tmp_path / "rgb.avi", rgb, 25, backend="native")
    expected = frames_to_yuv(rgb).numpy().astype(np.int16)
    with av.open(str(path)) as container:
        stored = np.stack([f.to_ndarray(format="yuvj420p") for f in container.decode(video=0)])
    assert stored.shape == expected.shape
    assert np.abs(stored.astype(np.int16) - expected).max() <= 6


@pytest.mark.parametrize("backend", ["native", "pyav"])
@pytest.mark.parametrize("size", REFUSED_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_sizes_420_cannot_hold_are_refused_by_both_paths(native, tmp_path, backend, size, rgb):
    shape = (2, *size, 3) if rgb else (2, *size)
    with pytest.raises(VideoEncodeError, match=r"clip\.avi.*" + str(size)[1:-1]) as caught:
        write_video(
            tmp_path / "clip.avi", torch.zeros(shape, dtype=torch.uint8), 25, backend=backend
        )
    assert "even" in str(caught.value) or ">= 2" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
