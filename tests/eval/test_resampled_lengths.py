"""The reference set takes the videos that resample to enough frames by the reference loader's
own formula, floating point included: a video lasting exactly the set's duration can resample
to one frame fewer, and is then passed over at selection instead of failing the build."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from echofast.data.echonet import write_filelist
from echofast.eval.fidelity import load_frames, select_reference_videos
from echofast.io import write_video


@pytest.mark.parametrize("frames, n, fps", [(16, 49, 98), (128, 196, 49)])
def test_a_video_one_frame_short_after_resampling_is_passed_over(tmp_path, frames, n, fps):
    """``n`` frames at ``fps`` last exactly ``frames/32`` s, but the reference's
    ``np.floor(32 / fps * n)`` gives ``frames - 1``; one frame more resamples to ``frames``."""
    assert Fraction(n, fps) == Fraction(frames, 32)
    assert int(np.floor(32 / fps * n)) == frames - 1
    rows = []
    for name, count in (("exact", n), ("longer", n + 1)):
        video = (
            np.zeros((count, 16, 16), np.uint8) + np.arange(count, dtype=np.uint8)[:, None, None]
        )
        write_video(tmp_path / "Videos" / f"{name}.avi", video, fps)
        rows.append({"FileName": name, "EF": 50, "FPS": fps, "NumberOfFrames": count})
    write_filelist(tmp_path, [{**r, "Split": "TRAIN"} for r in rows])
    assert [r.name for r in select_reference_videos(tmp_path, frames)] == ["longer"]
    assert len(load_frames(tmp_path / "Videos" / "exact.avi", fps, size=None)) == frames - 1
    assert len(load_frames(tmp_path / "Videos" / "longer.avi", fps, size=None)) >= frames
