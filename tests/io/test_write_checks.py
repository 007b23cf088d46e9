"""write_video refuses frame rates an AVI cannot hold and names that are not .avi."""

from __future__ import annotations

import re
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from echofast.io import VideoEncodeError, read_video, stored_fps, write_video

#: (fps, what the message says after the file name): every rate an AVI cannot hold
UNSTORABLE = [
    (1e-9, r"fps 1e-09 cannot be stored in an AVI \(a ratio with denominator <= 1001\)"),
    (5e-324, r"fps 5e-324 cannot be stored"),
    (1e-300, r"fps 1e-300 cannot be stored"),
    (0.0009, r"fps 0\.0009 cannot be stored"),
    (Fraction(1, 10**400), r"fps 1/10000000000000000000000000000000000\.\.\. cannot be stored"),
    (Fraction(1, 10**5000), r"fps a Fraction too large to print cannot be stored"),
    (1000.4, r"fps 1000\.4 cannot be stored in an AVI \(FFmpeg would store 600\)"),
    (5000.0, r"fps 5000\.0 cannot be stored .* at most 1000 fps"),
    (2**31 - 1, r"fps 2147483647 cannot be stored .* at most 1000 fps"),
    (2**31, r"fps 2147483648 cannot be stored .* at most 1000 fps"),
    (1e20, r"fps 1e\+20 cannot be stored .* at most 1000 fps"),
    (1e300, r"fps 1e\+300 cannot be stored .* at most 1000 fps"),
    (np.float64(1e300), r"fps 1e\+300 cannot be stored .* at most 1000 fps"),
    (Fraction(2**40), r"fps 1099511627776 cannot be stored .* at most 1000 fps"),
    (
        10**400,
        r"fps must be a finite positive number, got 1000000000000000000000000000000000000\.\.\.",
    ),
    (10**5000, r"fps must be a finite positive number, got a int too large to print"),
    (float("nan"), r"fps must be a finite positive number, got nan"),
    (float("inf"), r"fps must be a finite positive number, got inf"),
    (float("-inf"), r"fps must be a finite positive number, got -inf"),
    (-30.0, r"fps must be positive, got -30\.0"),
    (-0.0, r"fps must be positive, got -0\.0"),
    (0, r"fps must be positive, got 0"),
    (True, r"fps must be a number, got bool True"),
    (False, r"fps must be a number, got bool False"),
    (np.bool_(True), r"fps must be a number, got bool_? (np\.True_|True)"),  # numpy 2 / 1
    ("30", r"fps must be a number, got str '30'"),
    (None, r"fps must be a finite positive number, got None"),
]


def _id(fps: object) -> str:
    try:
        return repr(fps)[:24]
    except ValueError:  # an int too long for str()
        return f"huge {type(fps).__name__}"


@pytest.mark.parametrize(("fps", "message"), UNSTORABLE, ids=[_id(f) for f, _ in UNSTORABLE])
def test_fps_that_avi_cannot_store_is_refused(tmp_path, fps, message):
    path = tmp_path / "v.avi"
    with pytest.raises(VideoEncodeError, match=rf"^{re.escape(str(path))}: {message}"):
        write_video(path, torch.zeros(2, 16, 16, dtype=torch.uint8), fps)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("fps", "stored"),
    [(0.002, 0.002), (1 / 1001, 1 / 1001), (Fraction(30000, 1001), 30000 / 1001), (1000, 1000.0)],
)
def test_storable_fps_reads_back(tmp_path, fps, stored):
    path = write_video(tmp_path / "v.avi", torch.zeros(2, 16, 16, dtype=torch.uint8), fps)
    assert read_video(path)[1] == pytest.approx(stored)
    with av.open(str(path)) as container:
        assert stored_fps(fps) == container.streams.video[0].average_rate


@pytest.mark.parametrize(("fps", "message"), UNSTORABLE, ids=[_id(f) for f, _ in UNSTORABLE])
def test_stored_fps_refuses_what_write_video_refuses(fps, message):
    with pytest.raises(VideoEncodeError, match=rf"^fps: {message}"):
        stored_fps(fps)


def test_non_avi_name_is_refused(tmp_path):
    with pytest.raises(VideoEncodeError, match=r"v\.mp4.*\.avi"):
        write_video(tmp_path / "v.mp4", torch.zeros(2, 16, 16, dtype=torch.uint8), 10)
    assert list(tmp_path.iterdir()) == []
