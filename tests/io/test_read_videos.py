"""`echofast.io.read_videos`: results in input order past the first window of files, the
documented bound on files read ahead, argument checks, and which errors become results."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import echofast.io.batch as batch_mod
from echofast.io import VideoDecodeError, read_video, read_videos


def _fake_reader(calls: list, fail: str | None = None):
    """A read_video stand-in that records (name, kwargs) and returns tiny frames."""
    lock = threading.Lock()

    def read(path, **kwargs):
        with lock:
            calls.append((path.name, dict(kwargs)))
        if path.name == fail:
            raise RuntimeError(f"not a decode error: {path}")
        return torch.full((1, 2, 2), len(path.name), dtype=torch.uint8), 25.0

    return read


def test_more_files_than_the_read_ahead_window_come_back_in_order(codec_clips):
    paths = [codec_clips[k] for k in ("mjpeg420", "h264", "ffv1_420", "mjpeg420", "h264")]
    results = list(read_videos(paths, workers=1, progress=False, size=16))
    assert [r.path for r in results] == paths
    for result in results:
        frames, fps = read_video(result.path, size=16)
        assert result.error is None and result.fps == fps
        assert torch.equal(result.frames, frames)


def test_failed_file_has_no_frames_and_no_fps(tmp_path, codec_clips):
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"RIFF" + b"\0" * 64)
    (result,) = read_videos([broken], workers=1, errors="return", progress=False)
    assert isinstance(result.error, VideoDecodeError)
    assert result.frames is None and result.fps is None


@pytest.mark.parametrize("workers", [1, 2])
def test_at_most_twice_the_workers_files_are_read_ahead(tmp_path, monkeypatch, workers):
    calls: list = []
    monkeypatch.setattr(batch_mod, "read_video", _fake_reader(calls))
    paths = [tmp_path / f"{k}.avi" for k in range(4 * workers + 3)]
    results = read_videos(paths, workers=workers, progress=False)
    first = next(results)
    assert first.path == paths[0]
    limit = 2 * workers + 1  # the window, refilled once after the first result
    deadline = time.monotonic() + 30
    while len(calls) < limit:
        assert time.monotonic() < deadline, "the read-ahead files were not read"
        time.sleep(0.005)
    time.sleep(0.2)
    assert len(calls) == limit
    assert [r.path for r in results] == paths[1:]


def test_threads_default_to_one_per_file_and_pass_through(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(batch_mod, "read_video", _fake_reader(calls))
    list(read_videos([tmp_path / "a.avi"], workers=1, progress=False, size=8))
    list(read_videos([tmp_path / "b.avi"], workers=1, progress=False, threads=3))
    assert calls == [("a.avi", {"threads": 1, "size": 8}), ("b.avi", {"threads": 3})]


def test_errors_other_than_decode_errors_propagate(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(batch_mod, "read_video", _fake_reader(calls, fail="b.avi"))
    paths = [tmp_path / n for n in ("a.avi", "b.avi", "c.avi")]
    with pytest.raises(RuntimeError, match="not a decode error"):
        list(read_videos(paths, workers=1, errors="return", progress=False))


@pytest.mark.parametrize("workers", [0, -2])
def test_workers_below_one_are_refused(tmp_path, workers):
    with pytest.raises(ValueError, match=f"workers must be >= 1, got {workers}"):
        list(read_videos([tmp_path / "a.avi"], workers=workers, progress=False))
