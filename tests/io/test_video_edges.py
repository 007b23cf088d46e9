"""Edge cases of read_video / write_video / stored_fps / reference_uint8 that the main tests
leave open: each is checked against an independent reference (numpy, FFmpeg through PyAV)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echofast.io import VideoDecodeError, VideoEncodeError, read_video, reference_uint8, write_video
from echofast.io import video as video_module
from echofast.io.video import convert_frames, stored_fps


def _ffmpeg_gray(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])


def test_reference_uint8_matches_numpy_truncation():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.2, 1.2, (4, 8, 8)).astype(np.float32)
    x.flat[:6] = [np.nan, np.inf, -np.inf, 1.0, 0.99609375, -1.0]  # 0.996 → 255
    finite = np.nan_to_num(x, nan=-1.0, posinf=np.inf, neginf=-np.inf)
    expected = np.clip((finite + 1) * 128, 0, 255).astype(np.uint8)
    got = reference_uint8(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got.flat[0] == 0 and got.flat[1] == 255 and got.flat[4] == 255


def test_stored_fps_edges():
    assert stored_fps(30000 / 1001) == Fraction(30000, 1001)  # NTSC needs denominator 1001
    assert stored_fps(Fraction(24000, 1001)) == Fraction(24000, 1001)
    assert stored_fps(video_module.AVI_MAX_FPS) == video_module.AVI_MAX_FPS  # the limit is allowed
    with pytest.raises(VideoEncodeError, match="at most 1000 fps"):
        stored_fps(1000.5)
    # 0.000995 is 0.4 % from 1/1001, its nearest storable rate: beyond the 0.1 % tolerance
    with pytest.raises(VideoEncodeError, match="denominator <= 1001"):
        stored_fps(0.000995)
    assert stored_fps(1 / 1001 * (1 + 2e-4)) == Fraction(1, 1001)  # within 0.1 %


def test_the_avi_rate_limit_is_public_in_echofast_io():
    """README, Video I/O: ``fps`` at most 1000 (``AVI_MAX_FPS``), a name of ``echofast.io``
    (``from echofast.io import AVI_MAX_FPS`` raised ImportError)."""
    import echofast.io

    assert "AVI_MAX_FPS" in echofast.io.__all__
    assert echofast.io.AVI_MAX_FPS == video_module.AVI_MAX_FPS == 1000


def test_write_refuses_odd_width_and_takes_upper_case_suffix(tmp_path):
    frames = torch.zeros((2, 16, 16), dtype=torch.uint8)
    with pytest.raises(VideoEncodeError, match="even") as excinfo:
        write_video(tmp_path / "odd.avi", frames[:, :, :15], 30)
    assert "odd.avi" in str(excinfo.value) and not (tmp_path / "odd.avi").exists()
    path = write_video(tmp_path / "UPPER.AVI", frames + 100, 30)
    assert path.is_file() and read_video(path)[0].shape == (2, 16, 16)


def test_pyav_resize_rounds_like_torch(codec_clips):
    path = codec_clips["mjpeg420"]
    gray = torch.from_numpy(_ffmpeg_gray(path)).float()[:, None]
    for mode in ("area", "bilinear"):
        kw = {} if mode == "area" else {"align_corners": False}
        expected = F.interpolate(gray, size=(20, 30), mode=mode, **kw)[:, 0]
        expected = expected.round().clamp(0, 255).to(torch.uint8)
        got, _ = read_video(path, size=(20, 30), resize=mode, backend="pyav")
        assert torch.equal(got, expected), mode


def test_limits_are_inclusive(codec_clips, monkeypatch):
    path = codec_clips["mjpeg420"]  # 6 frames of 64x48
    monkeypatch.setattr(video_module, "MAX_FRAMES", 6)
    assert len(read_video(path)[0]) == 6
    monkeypatch.setattr(video_module, "MAX_FRAMES", 5)
    with pytest.raises(VideoDecodeError, match="more than 5 frames"):
        read_video(path)
    monkeypatch.setattr(video_module, "MAX_FRAMES", 1_000_000)
    monkeypatch.setattr(video_module, "MAX_FRAME_PIXELS", 64 * 48)
    assert read_video(path)[0].shape == (6, 48, 64)
    monkeypatch.setattr(video_module, "MAX_FRAME_PIXELS", 64 * 48 - 1)
    with pytest.raises(VideoDecodeError, match="64x48, outside the limits"):
        read_video(path)


def test_output_grows_without_a_frame_count(tmp_path):
    """Matroska gives no frame count: the output buffer grows past its first capacity and
    must keep the frames decoded before."""
    import av

    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (video_module.CHUNK_FRAMES * 2 + 7, 16, 16), dtype=np.uint8)
    path = tmp_path / "long.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "gray"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    for backend in ("auto", "pyav"):
        got, _ = read_video(path, backend=backend)
        np.testing.assert_array_equal(got.numpy(), frames)


def test_yuv440_rgb_is_ffmpegs(tmp_path):
    """4:4:0 chroma is interpolated by FFmpeg: RGB must be FFmpeg's conversion exactly."""
    import av

    rng = np.random.default_rng(2)
    path = tmp_path / "c440.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv440p"
        for _ in range(3):
            rgb = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
        assert decoded[0].format.name == "yuv440p"
        expected = np.stack([f.to_ndarray(format="rgb24") for f in decoded])
    got, _ = read_video(path, grayscale=False)
    np.testing.assert_array_equal(got.numpy(), expected)


def _bt601_full(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Full-range BT.601 YUV 4:2:0 (chroma nearest) → RGB, in float64."""
    u = u.repeat(2, 0).repeat(2, 1).astype(np.float64) - 128
    v = v.repeat(2, 0).repeat(2, 1).astype(np.float64) - 128
    y = y.astype(np.float64)
    rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], -1)
    return np.clip(np.rint(rgb), 0, 255)


def _random_yuv420(seed: int, height: int = 16, width: int = 24):
    """A random (3H/2, W) yuv420 buffer and its Y, U, V planes."""
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, (3 * height // 2, width), dtype=np.uint8)
    quarter = height // 4
    u = planes[height : height + quarter].reshape(height // 2, width // 2)
    v = planes[height + quarter :].reshape(height // 2, width // 2)
    return planes, planes[:height], u, v


def test_yuv420_tagged_full_range_is_converted_as_full_range():
    """yuv420p frames tagged with the JPEG (full) colour range convert like yuvj420p."""
    import av

    planes, y, u, v = _random_yuv420(3)
    expected = _bt601_full(y, u, v)
    tagged = av.VideoFrame.from_ndarray(planes, format="yuv420p")
    tagged.color_range = 2  # AVCOL_RANGE_JPEG
    jpeg = av.VideoFrame.from_ndarray(planes, format="yuvj420p")
    for frame in (tagged, jpeg):
        got = convert_frames([frame], grayscale=False).numpy()[0].astype(np.float64)
        assert np.abs(got - expected).max() <= 2, frame.format.name


def test_colour_matrix_tag_picks_the_conversion(native):
    """Untagged (BT.601) frames are converted natively, rounding (no FFmpeg truncation); frames
    tagged BT.709 get FFmpeg's own conversion, which honours the tag; ``backend="pyav"`` is
    FFmpeg's conversion whatever the tag."""
    import av

    planes, y, u, v = _random_yuv420(4)
    frame = av.VideoFrame.from_ndarray(planes, format="yuvj420p")
    assert frame.colorspace == 2  # AVCOL_SPC_UNSPECIFIED
    ffmpeg_601 = frame.to_ndarray(format="rgb24")
    got = convert_frames([frame], grayscale=False).numpy()[0]
    np.testing.assert_array_equal(got, _bt601_full(y, u, v))
    assert not np.array_equal(got, ffmpeg_601)  # FFmpeg truncates: this case tells them apart
    pyav = convert_frames([frame], grayscale=False, backend="pyav").numpy()[0]
    np.testing.assert_array_equal(pyav, ffmpeg_601)
    frame.colorspace = 1  # AVCOL_SPC_BT709
    got = convert_frames([frame], grayscale=False).numpy()[0]
    np.testing.assert_array_equal(got, frame.to_ndarray(format="rgb24"))


def test_frames_of_mixed_formats_in_one_call_are_each_converted_as_their_own(native):
    """A stream may switch pixel format or colour range between frames: each frame must be
    converted by its own layout (gray exactly as FFmpeg's; RGB of a packed frame exactly)."""
    import av

    planes = _random_yuv420(10)[0]
    yuv = [av.VideoFrame.from_ndarray(planes, format=f) for f in ("yuvj420p", "yuv420p")]
    gray = [yuv[0], yuv[1], yuv[0], yuv[1]]
    expected = np.stack([f.to_ndarray(format="gray") for f in gray])
    np.testing.assert_array_equal(convert_frames(gray).numpy(), expected)
    rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(planes[:16, :, None].repeat(3, 2)))
    mixed = convert_frames([yuv[0], rgb, yuv[0]], grayscale=False).numpy()
    np.testing.assert_array_equal(mixed[1], rgb.to_ndarray(format="rgb24"))
    np.testing.assert_array_equal(mixed[0], mixed[2])
    assert np.abs(mixed[0].astype(int) - yuv[0].to_ndarray(format="rgb24")).max() <= 2
