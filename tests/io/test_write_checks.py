"""write_video refuses frame rates an AVI cannot hold and names that are not .avi."""

from __future__ import annotations

import pytest
import torch

from echofast.io import VideoEncodeError, read_video, write_video


@pytest.mark.parametrize("fps", [1e-9, 5000.0])
def test_fps_that_avi_cannot_store_is_refused(tmp_path, fps):
    with pytest.raises(VideoEncodeError, match="cannot be stored"):
        write_video(tmp_path / "v.avi", torch.zeros(2, 16, 16, dtype=torch.uint8), fps)
    assert list(tmp_path.iterdir()) == []


def test_storable_fps_reads_back(tmp_path):
    path = write_video(tmp_path / "v.avi", torch.zeros(2, 16, 16, dtype=torch.uint8), 0.002)
    assert read_video(path)[1] == pytest.approx(0.002)


def test_non_avi_name_is_refused(tmp_path):
    with pytest.raises(VideoEncodeError, match=r"v\.mp4.*\.avi"):
        write_video(tmp_path / "v.mp4", torch.zeros(2, 16, 16, dtype=torch.uint8), 10)
    assert list(tmp_path.iterdir()) == []
