"""read_video / convert_frames / write_video at their limits and formats: sizes at the limit,
refused option values, frames write_video must refuse or take, which conversion a frame's
format and colour tags pick (against FFmpeg's own), the demuxer a suffix names, the frame rate
of a stream without an average rate, and the quantiser of written MJPEG frames."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from echofast.io import VideoDecodeError, VideoEncodeError, read_video, write_video
from echofast.io import video as video_module
from echofast.io.video import convert_frames


def _gray_frames(count: int, height: int, width: int, seed: int = 0) -> list:
    import av

    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, (count, height, width), dtype=np.uint8)
    return [av.VideoFrame.from_ndarray(p, format="gray") for p in planes]


def test_output_size_of_max_side_is_accepted_and_one_more_refused(monkeypatch):
    monkeypatch.setattr(video_module, "MAX_SIDE", 12)
    frames = _gray_frames(2, 8, 8)
    assert convert_frames(frames, size=12).shape == (2, 12, 12)
    assert convert_frames(frames, size=(12, 4)).shape == (2, 12, 4)
    with pytest.raises(ValueError, match=r"in 1\.\.12, got \(13, 4\)"):
        convert_frames(frames, size=(13, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 1.5}, "got 1.5"),
        ({"threads": "2"}, "got '2'"),
        ({"max_frames": 2.0}, "got 2.0"),
        ({"time_limit": float("nan")}, "got nan"),
        ({"time_limit": -1}, "got -1"),
    ],
)
def test_read_refuses_option_values_of_the_wrong_type_or_range(codec_clips, kwargs, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        read_video(codec_clips["mjpeg420"], **kwargs)
    assert not isinstance(excinfo.value, VideoDecodeError)


def test_chunks_of_big_frames_hold_at_most_64_mib():
    assert video_module._chunk_frames(16, 16) == video_module.CHUNK_FRAMES
    for height, width in [(1024, 1024), (2048, 2048), (4096, 2048), (8192, 8192)]:
        chunk = video_module._chunk_frames(height, width)
        assert chunk == max(1, (64 << 20) // (3 * height * width)), (height, width)


def test_output_bytes_limit_is_inclusive(codec_clips, monkeypatch):
    path = codec_clips["mjpeg420"]  # 6 frames of 64x48
    monkeypatch.setattr(video_module, "MAX_OUTPUT_BYTES", 6 * 48 * 64)
    assert read_video(path)[0].shape == (6, 48, 64)
    monkeypatch.setattr(video_module, "MAX_OUTPUT_BYTES", 6 * 48 * 64 - 1)
    with pytest.raises(VideoDecodeError, match="6 frames of"):
        read_video(path)


def test_frame_height_beyond_max_side_is_refused(monkeypatch):
    monkeypatch.setattr(video_module, "MAX_SIDE", 12)
    assert convert_frames(_gray_frames(1, 12, 8)).shape == (1, 12, 8)
    with pytest.raises(VideoDecodeError, match="<frames>: frame 0 is 8x14, outside the limits"):
        convert_frames(_gray_frames(1, 14, 8))


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((2, 8, 8), np.float64), "got float64"),
        (np.zeros((2, 0, 8), np.uint8), r"H, W >= 2, got \(2, 0, 8\)"),
        (np.zeros((2, 8, 8, 4), np.uint8), r"got \(2, 8, 8, 4\)"),
        (np.zeros((2, 8, 8, 1), np.uint8), r"got \(2, 8, 8, 1\)"),
        (np.zeros((2, 8, 8, 3, 1), np.uint8), r"got \(2, 8, 8, 3, 1\)"),
        ([[[0, 0], [0, 0]]], "got list"),
    ],
)
def test_write_refuses_frames_of_another_dtype_or_layout(tmp_path, frames, message):
    path = tmp_path / "v.avi"
    with pytest.raises(VideoEncodeError, match=message):
        write_video(path, frames, 30)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_write_takes_non_contiguous_numpy_frames(tmp_path, backend):
    frames = np.random.default_rng(5).integers(0, 256, (3, 16, 24), dtype=np.uint8)
    strided = frames[:, ::-1, ::2]  # negative and doubled strides
    path = write_video(tmp_path / "v.avi", strided, 10, backend=backend)
    copy = write_video(tmp_path / "c.avi", np.ascontiguousarray(strided), 10, backend=backend)
    assert path.read_bytes() == copy.read_bytes()
    got, fps = read_video(path)
    assert got.shape == (3, 16, 12) and fps == 10


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_frames_come_back_without_the_unused_capacity(codec_clips, backend):
    """Matroska gives no frame count, so the output buffer starts larger than the clip: the
    result must not keep that spare memory alive."""
    got, _ = read_video(codec_clips["ffv1_420"], backend=backend)
    assert got.shape == (6, 48, 64)
    assert got.untyped_storage().nbytes() == got.numel() * got.element_size()


def _plane(line_size: int, buffer_size: int) -> SimpleNamespace:
    return SimpleNamespace(line_size=line_size, buffer_size=buffer_size, buffer_ptr=1234)


def test_plane_just_big_enough_is_read_with_its_row_stride():
    # 3 rows of 10 bytes, 16 bytes apart: the last row needs no padding after it
    plane = _plane(16, 2 * 16 + 10)
    assert video_module._plane_entry(Path("v.avi"), 0, plane, 3, 10) == (1234, 16, 10, 3, plane)


@pytest.mark.parametrize(("line", "size"), [(16, 2 * 16 + 9), (8, 100)])
def test_plane_too_small_for_its_rows_is_refused(line, size):
    with pytest.raises(VideoDecodeError, match="v.avi: frame 4 has a plane of"):
        video_module._plane_entry(Path("v.avi"), 4, _plane(line, size), 3, 10)


@pytest.mark.parametrize(("height", "width"), [(16, 23), (15, 24)])
def test_yuv420_rgb_of_an_odd_side_is_ffmpegs(make_rgb, height, width):
    """FFmpeg interpolates 4:2:0 chroma when either side is odd: RGB is its conversion exactly."""
    import av

    rgb = make_rgb(2, height, width, seed=7)
    frames = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p") for f in rgb]
    expected = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    np.testing.assert_array_equal(convert_frames(frames, grayscale=False).numpy(), expected)


def test_frame_of_another_height_is_refused():
    frames = _gray_frames(2, 8, 10) + _gray_frames(1, 12, 10)
    with pytest.raises(VideoDecodeError, match="<frames>: frame 2 is 10x12, the first frame 10x8"):
        convert_frames(frames)


def test_no_frames_is_a_decode_error():
    with pytest.raises(VideoDecodeError, match="<frames>: no decodable frames"):
        convert_frames([])


@pytest.mark.parametrize("other", ["ffv1_420", "h264"])
def test_suffix_names_the_only_demuxer_tried(tmp_path, codec_clips, other):
    """A Matroska or MP4 file named .avi is not probed into opening: it is not a readable AVI."""
    disguised = tmp_path / "disguised.avi"
    disguised.write_bytes(codec_clips[other].read_bytes())
    with pytest.raises(VideoDecodeError, match="disguised.avi: not a readable avi file"):
        read_video(disguised)


def _quant_tables(path: Path) -> list[bytes]:
    """The first DQT segment (quantisation tables) of every MJPEG packet of ``path``."""
    import av

    tables = []
    with av.open(str(path)) as container:
        for packet in container.demux(video=0):
            data = bytes(packet)
            if data:
                start = data.index(b"\xff\xdb")
                length = int.from_bytes(data[start + 2 : start + 4], "big")
                tables.append(data[start : start + 4 + length])
    return tables


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("qscale", [1, 3])
def test_every_frame_is_written_at_the_quantiser_of_mjpeg_qscale(
    tmp_path, monkeypatch, backend, qscale
):
    """Busy frames at a high rate still get quantiser scale MJPEG_QSCALE (1 by default: the best
    quality): the tables of an FFmpeg encode with the quantiser pinned (qmin = qmax)."""
    import av

    import echofast.io.video as video

    monkeypatch.setattr(video, "MJPEG_QSCALE", qscale)
    frames = np.random.default_rng(8).integers(0, 256, (3, 64, 96), dtype=np.uint8)
    path = write_video(tmp_path / "v.avi", frames, 60, backend=backend)
    pinned = tmp_path / "pinned.avi"
    q = str(qscale)
    with av.open(str(pinned), "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=60, options={"qmin": q, "qmax": q})
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuvj420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())
    expected = _quant_tables(pinned)
    assert len(expected) == 3 and len(set(expected)) == 1
    assert _quant_tables(path) == expected


def test_fps_of_a_stream_without_an_average_rate_is_its_guessed_rate(tmp_path):
    """A one-frame NUT file has no average rate; FFmpeg still guesses the stream's 25 fps."""
    import av

    path = tmp_path / "one.nut"
    frame = np.random.default_rng(9).integers(0, 256, (8, 10), dtype=np.uint8)
    with av.open(str(path), "w", format="nut") as container:
        stream = container.add_stream("rawvideo", rate=25)
        stream.width, stream.height, stream.pix_fmt = 10, 8, "gray"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate is None
    got, fps = read_video(path)
    assert fps == 25.0
    np.testing.assert_array_equal(got.numpy(), frame[None])
