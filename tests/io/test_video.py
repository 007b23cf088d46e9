"""read_video / write_video / read_videos against FFmpeg's own conversion, round trips, errors.

Gray frames must equal FFmpeg's ``to_ndarray(format="gray")`` exactly (bound 0: both are the
luma plane, range-expanded by the same tie-free rounding). RGB frames: <= 2 levels in full
range, <= 3 in limited range where the native path converts (FFmpeg's tables truncate, ours
round), exact where FFmpeg's conversion is used (packed RGB, palettes, odd sizes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echofast.errors import BackendUnavailable
from echofast.io import (
    VideoDecodeError,
    VideoEncodeError,
    read_video,
    read_videos,
    reference_uint8,
    video_backend,
    write_video,
)
from echofast.io import video as video_module

RGB_BOUND = {  # native RGB vs FFmpeg, by clip (0: FFmpeg's conversion is used)
    "mjpeg420": 2,
    "mjpeg422": 2,
    "h264": 3,
    "ffv1_420": 3,
    "ffv1_444": 1,
    "ffv1_odd": 0,
    "rawvideo": 3,
    "rawvideo_odd": 0,
    "png_rgb": 0,
    "png_gray": 0,
    "gif": 0,
}


def gray_clip(frames: int = 12, size: int = 112) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    t = torch.arange(frames)[:, None, None]
    img = 128 + 90 * torch.sin(xx / 9 + t / 3) * torch.cos(yy / 11 - t / 5)
    return img.round().clamp(0, 255).to(torch.uint8)


# ---- real clips ----------------------------------------------------------------------------


def test_real_clips_gray_exact(echo_clips, ffmpeg):
    import av

    for path in echo_clips:
        frames, fps = read_video(path)
        ref = ffmpeg(path, "gray")
        assert frames.dtype == torch.uint8 and frames.shape == ref.shape
        np.testing.assert_array_equal(frames.numpy(), ref)
        with av.open(str(path)) as container:
            assert fps == float(container.streams.video[0].average_rate)


def test_real_clips_rgb_and_normalised(echo_clips, ffmpeg):
    for path in echo_clips:
        rgb, _ = read_video(path, grayscale=False, max_frames=24)
        ref = ffmpeg(path, "rgb24", max_frames=24)
        assert rgb.shape == ref.shape
        assert np.abs(rgb.numpy().astype(int) - ref).max() <= 2
        gray = torch.from_numpy(ffmpeg(path, "gray", max_frames=24))
        expected = F.interpolate(gray.float()[:, None], size=(112, 112), mode="area")[:, 0]
        ours, _ = read_video(path, size=112, dtype=torch.float16, max_frames=24)
        torch.testing.assert_close(ours, (expected / 128 - 1).half(), rtol=0, atol=0)
        ours, _ = read_video(path, size=(64, 96), dtype=torch.float32, resize="bilinear")
        expected = F.interpolate(
            torch.from_numpy(ffmpeg(path, "gray")).float()[:, None],
            size=(64, 96),
            mode="bilinear",
            align_corners=False,
        )[:, 0]
        torch.testing.assert_close(ours, expected / 128 - 1, rtol=0, atol=1e-5)


# ---- clips in several codecs ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(RGB_BOUND))
def test_codec_clips_vs_ffmpeg(codec_clips, ffmpeg, name):
    if name not in codec_clips:
        pytest.skip(f"this FFmpeg build cannot encode the {name} clip")
    path = codec_clips[name]
    ref = ffmpeg(path, "gray")
    for backend in ("auto", "pyav"):
        frames, fps = read_video(path, backend=backend)
        np.testing.assert_array_equal(frames.numpy(), ref)
        assert fps == 25.0
    rgb, _ = read_video(path, grayscale=False)
    diff = np.abs(rgb.numpy().astype(int) - ffmpeg(path, "rgb24"))
    assert diff.max() <= RGB_BOUND[name], diff.max()
    fallback, _ = read_video(path, grayscale=False, backend="pyav")
    np.testing.assert_array_equal(fallback.numpy(), ffmpeg(path, "rgb24"))


def test_native_and_fallback_resize_agree(codec_clips):
    path = codec_clips["h264"]
    for resize in ("area", "bilinear"):
        for dtype in (torch.uint8, torch.float32, torch.bfloat16):
            kw = {"size": (37, 50), "resize": resize, "dtype": dtype}
            ours, _ = read_video(path, **kw)
            theirs, _ = read_video(path, backend="pyav", **kw)
            tol = 1 if dtype == torch.uint8 else (1e-5 if dtype == torch.float32 else 2**-7)
            assert (ours.double() - theirs.double()).abs().max() <= tol


# ---- writing and round trips ---------------------------------------------------------------


@pytest.mark.parametrize("fps", [32, 50.0, 29.97, Fraction(30000, 1001)])
def test_round_trip_gray(tmp_path, fps):
    frames = gray_clip()
    path = write_video(tmp_path / "clip.avi", frames, fps)
    decoded, read_fps = read_video(path)
    assert decoded.shape == frames.shape
    assert read_fps == pytest.approx(float(fps), rel=1e-6)
    diff = (decoded.int() - frames.int()).abs()
    assert diff.max() <= 4 and diff.float().mean() < 0.5  # JPEG at qscale 1 on smooth content


def test_round_trip_float_and_rgb_within_ffmpeg_only_error(tmp_path, make_rgb):
    g = torch.Generator().manual_seed(0)
    floats = (gray_clip(8).float() / 128 - 1 + torch.randn(8, 112, 112, generator=g) * 0.01).half()
    write_video(tmp_path / "f.avi", floats, 16)
    decoded, _ = read_video(tmp_path / "f.avi")
    diff = (decoded.int() - reference_uint8(floats).int()).abs()
    assert diff.max() <= 6 and diff.float().mean() < 1  # noisier content than gray_clip
    rgb = torch.from_numpy(make_rgb(8, 112, 112))
    errors = {}
    for backend in ("auto", "pyav"):
        path = write_video(tmp_path / f"rgb_{backend}.avi", rgb, 16, backend=backend)
        back, _ = read_video(path, grayscale=False, backend=backend)
        errors[backend] = (back.double() - rgb.double()).abs().mean().item()
    assert errors["auto"] <= errors["pyav"] + 0.05, errors


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_rgb_write_keeps_the_channel_order(tmp_path, backend):
    """Red, green and blue stripes come back red, green and blue from FFmpeg's own decoder (a
    BGR/RGB swap on either writing path would trade the red and blue stripes)."""
    import av

    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    frames = np.repeat(colours, 16, axis=0)[None, None].repeat(32, axis=1).repeat(2, axis=0)
    path = write_video(tmp_path / "stripes.avi", frames, 25, backend=backend)
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == frames.shape
    centres = decoded[:, 8:24, [4, 12, 20, 28, 36, 44]].astype(np.int16)
    expected = np.repeat(colours, 2, axis=0).astype(np.int16)
    assert np.abs(centres - expected).max() <= 8


def test_native_write_is_byte_identical_to_ffmpeg_conversion(tmp_path):
    frames = gray_clip(6)
    floats = frames.float() / 128 - 1
    for name, data in (("u8", frames), ("f32", floats), ("np", frames.numpy())):
        a = write_video(tmp_path / f"{name}_native.avi", data, 30)
        b = write_video(tmp_path / f"{name}_pyav.avi", data, 30, backend="pyav")
        assert a.read_bytes() == b.read_bytes()


def test_float_read_without_resize_is_x_over_128_minus_1(tmp_path):
    """dtype float: ``x / 128 − 1`` of the 8-bit values (read_video's docstring, the spec's VAE
    input), exact in fp32, on both pixel paths, when no resize happens (also a ``size`` equal
    to the decoded one)."""
    frames = gray_clip(4, 32)
    frames[:, :8, :8], frames[:, 8:16, :8] = 0, 255  # both ends of the range
    path = write_video(tmp_path / "clip.avi", frames, 25)
    for backend in ("pyav", "auto"):
        u8, _ = read_video(path, backend=backend)
        assert u8.min() <= 2 and u8.max() >= 253 and len(u8.unique()) > 100
        want = u8.double() / 128 - 1  # exact: 8-bit values over a power of two
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for size in (None, (32, 32)):
                got, _ = read_video(path, backend=backend, dtype=dtype, size=size)
                assert got.dtype == dtype and got.shape == u8.shape
                torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)
        got, _ = read_video(path, backend=backend, dtype=torch.float32)
        assert torch.equal(got.double(), want)


def test_read_options(codec_clips):
    path = codec_clips["mjpeg420"]
    frames, _ = read_video(path, max_frames=4, size=32, dtype=torch.float32)
    assert frames.shape == (4, 32, 32) and frames.dtype == torch.float32
    assert -1 <= frames.min() and frames.max() < 1
    frames, _ = read_video(path, grayscale=False, size=(20, 30), threads=1)
    assert frames.shape == (6, 20, 30, 3) and frames.is_contiguous()


def test_frames_beyond_a_chunk(tmp_path):
    frames = gray_clip(video_module.CHUNK_FRAMES * 2 + 5, 16)
    path = write_video(tmp_path / "long.avi", frames, 30)
    decoded, _ = read_video(path)
    assert decoded.shape == frames.shape
    assert (decoded.int() - frames.int()).abs().max() <= 4


# ---- bad input -----------------------------------------------------------------------------


def write_mpeg4(path: Path) -> Path:
    import av

    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in gray_clip(3, 32).numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())
    return path


def write_size_change(path: Path) -> Path:
    """An MJPEG AVI whose third JPEG header claims width 16 instead of 32 (a header edit)."""
    write_video(path, gray_clip(4, 32), 10)
    data = bytearray(path.read_bytes())
    sof = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xC0]
    assert len(sof) == 4
    data[sof[2] + 7 : sof[2] + 9] = (16).to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


def test_bad_files(tmp_path, codec_clips):
    good = codec_clips["mjpeg420"].read_bytes()
    text = tmp_path / "notes.avi"
    text.write_text("this is not a video\n" * 50)
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(good[:300])
    suffix = tmp_path / "clip.txt"
    suffix.write_bytes(good)
    cases = [
        (tmp_path / "missing.avi", "no such file"),
        (text, "not a readable avi file"),
        (empty, "not a readable avi file"),
        (truncated, "not a readable avi file"),
        (suffix, "unsupported container suffix '.txt'"),
        (write_mpeg4(tmp_path / "mpeg4.avi"), "codec 'mpeg4' is not in"),
        (write_size_change(tmp_path / "sizes.avi"), "frame 2 is 16x32, the first frame 32x32"),
    ]
    for path, reason in cases:
        for backend in ("auto", "pyav"):
            with pytest.raises(VideoDecodeError, match=reason) as excinfo:
                read_video(path, backend=backend)
            assert str(path) in str(excinfo.value)
    half = tmp_path / "half.avi"
    half.write_bytes(good[: len(good) * 2 // 3])
    frames, _ = read_video(half)  # whole frames before the cut still decode
    assert 1 <= len(frames) < 6


def test_limits(codec_clips, monkeypatch):
    path = codec_clips["mjpeg420"]
    with pytest.raises(VideoDecodeError, match="took longer than"):
        read_video(path, time_limit=1e-9)
    monkeypatch.setattr(video_module, "MAX_FRAMES", 4)
    with pytest.raises(VideoDecodeError, match="more than 4 frames"):
        read_video(path)
    assert len(read_video(path, max_frames=4)[0]) == 4
    monkeypatch.setattr(video_module, "MAX_SIDE", 40)
    with pytest.raises(VideoDecodeError, match="64x48, outside the limits"):
        read_video(path)
    monkeypatch.setattr(video_module, "MAX_SIDE", 4096)
    monkeypatch.setattr(video_module, "MAX_OUTPUT_BYTES", 48 * 64 * 4 * 3)
    with pytest.raises(VideoDecodeError, match="GiB, more than MAX_OUTPUT_BYTES"):
        read_video(path, max_frames=5, dtype=torch.float32)


def test_bad_arguments(codec_clips):
    path = codec_clips["mjpeg420"]
    bad = [
        ({"size": 0}, "got 0"),
        ({"size": (10, 20, 30)}, r"got \(10, 20, 30\)"),
        ({"dtype": torch.int16}, "got torch.int16"),
        ({"max_frames": 0}, "got 0"),
        ({"resize": "nearest"}, "got 'nearest'"),
        ({"backend": "opencv"}, "got 'opencv'"),
        ({"threads": 0}, "got 0"),
        ({"time_limit": 0}, "got 0"),
        ({"device": "meta"}, "got meta"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            read_video(path, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA"):
            read_video(path, device="cuda")


def test_write_errors_leave_nothing(tmp_path):
    target = tmp_path / "out.avi"
    target.write_bytes(b"previous result")
    frames = gray_clip(3, 16)
    bad = [
        ((frames[:, :15], 30), "even"),
        ((frames.short(), 30), "torch.int16"),
        ((frames[:0], 30), "T >= 1"),
        ((frames[..., None].expand(-1, -1, -1, 2), 30), r"\(3, 16, 16, 2\)"),
        ((frames, 0), "positive"),
        ((frames, -5), "positive"),
        ((frames, "fast"), "'fast'"),
        ((frames, float("nan")), "positive"),
        ((np.zeros((2, 8, 8), np.int32), 30), "int32"),
    ]
    for args, message in bad:
        with pytest.raises(VideoEncodeError, match=message):
            write_video(target, *args)
    with pytest.raises(VideoEncodeError, match="only codec 'mjpeg'"):
        write_video(target, frames, 30, codec="h264")
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.avi"]


# ---- fallback without the extension, batch reader, info -------------------------------------


def test_fallback_without_extension(tmp_path, codec_clips):
    path = codec_clips["h264"]
    native, _ = read_video(path, size=(30, 40), dtype=torch.float32)
    np.save(tmp_path / "native.npy", native.numpy())
    code = f"""
        import json, numpy as np, torch
        from echofast.errors import BackendUnavailable
        from echofast.io import read_video, video_backend, write_video
        out = {{"backend": video_backend()}}
        frames, fps = read_video({str(path)!r}, size=(30, 40), dtype=torch.float32)
        native = np.load({str(tmp_path / "native.npy")!r})
        out["max_diff"] = float(np.abs(frames.numpy() - native).max())
        out["fps"] = fps
        write_video({str(tmp_path / "w.avi")!r}, frames, fps)
        out["written"] = read_video({str(tmp_path / "w.avi")!r})[0].shape[0]
        try:
            read_video({str(path)!r}, backend="native")
        except BackendUnavailable as err:
            out["forced"] = str(err)
        print(json.dumps(out))
    """
    env = {**__import__("os").environ, "ECHOFAST_SKIP_EXT": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["backend"]["backend"] == "pyav"
    assert "ECHOFAST_SKIP_EXT" in out["backend"]["reason"]
    assert out["max_diff"] <= 1e-5 and out["fps"] == 25.0 and out["written"] == 6
    assert "ECHOFAST_SKIP_EXT" in out["forced"]


def test_read_videos_in_order(tmp_path, codec_clips):
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"RIFF" + b"\0" * 100)
    paths = [codec_clips["mjpeg420"], codec_clips["h264"], broken, codec_clips["ffv1_420"]]
    results = list(read_videos(paths, workers=2, errors="return", progress=False, size=24))
    assert [r.path for r in results] == paths
    assert results[2].frames is None and isinstance(results[2].error, VideoDecodeError)
    for result in (results[0], results[1], results[3]):
        frames, fps = read_video(result.path, size=24)
        assert result.error is None and result.fps == fps
        assert torch.equal(result.frames, frames)
    with pytest.raises(VideoDecodeError, match="broken.avi"):
        list(read_videos(paths, workers=2, progress=False))
    with pytest.raises(ValueError, match="'ignore'"):
        list(read_videos(paths, errors="ignore"))


def test_backend_reported_by_info():
    from echofast.info import collect, format_info

    info = collect()
    assert info["video"] == video_backend()
    assert "video pixel path:" in format_info(info)
    forced = video_module._use_native("native") if info["video"]["backend"] == "native" else None
    assert forced in (True, None)
    if info["video"]["backend"] == "pyav":
        with pytest.raises(BackendUnavailable):
            video_module._use_native("native")
