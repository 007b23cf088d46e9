"""The native pixel path (echofast.io.pixels) against FFmpeg, PyTorch and BT.601 in float64.

Bounds (and why):
- gray from YUV: exact (0 levels) vs FFmpeg's ``to_ndarray(format="gray")``: both are the luma
  plane, limited range expanded with round((Y - 16) * 255 / 219), which has no .5 ties.
- RGB from YUV: <= 1 level vs BT.601 in float64, rounded (20-bit fixed point, off only within
  ~1e-4 of a .5 boundary); vs FFmpeg <= 2 levels (full range) / 3 (limited range): FFmpeg's
  unscaled yuv -> rgb tables truncate (mean error about -0.5).
- resize: "area" equals ``F.interpolate(mode="area")`` bit for bit (same integer windows,
  sum / kh / kw); "bilinear" within 1e-5 of ``mode="bilinear"`` on the normalised scale (fp32
  rounding order); uint8 after a resize within 1 level (a .5 that rounds the other way).
- fp16 / bf16 outputs: error vs float64 <= 2x the error of PyTorch's own fp32 -> fp16 / bf16.
- frames -> yuvj420p: gray frames exact (Y = reference uint8, Cb = Cr = 128, FFmpeg's own gray
  -> yuvj420p); RGB luma <= 1 level vs float64, chroma <= 1 level vs float64 2x2 block means.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echofast.io import pixels
from echofast.io.video import reference_uint8

SHIFTS = {"420": (1, 1), "422": (1, 0), "440": (0, 1), "444": (0, 0)}


def chroma_shape(height: int, width: int, shift: tuple[int, int]) -> tuple[int, int]:
    sx, sy = shift
    return -(-height // (1 << sy)), -(-width // (1 << sx))


def random_planes(rng, frames, height, width, shift):
    ch, cw = chroma_shape(height, width, shift)
    y = rng.integers(0, 256, (frames, height, width), dtype=np.uint8)
    u = rng.integers(0, 256, (frames, ch, cw), dtype=np.uint8)
    v = rng.integers(0, 256, (frames, ch, cw), dtype=np.uint8)
    return y, u, v


def av_frame(fmt: str, planes: list[np.ndarray]):
    """A PyAV frame of ``fmt`` holding exactly ``planes`` (written row by row)."""
    import av

    height, width = planes[0].shape
    frame = av.VideoFrame(width, height, fmt)
    for plane, data in zip(frame.planes, planes):
        view = memoryview(plane).cast("B")
        full = np.frombuffer(view, dtype=np.uint8).reshape(-1, plane.line_size).copy()
        full[: data.shape[0], : data.shape[1]] = data
        view[:] = full.tobytes()
    return frame


def convert(y, u, v, *, full, shift=(1, 1), rgb=False, size=None, dtype=torch.uint8, **kw):
    t, h, w = y.shape
    oh, ow = size or (h, w)
    out = torch.empty((t, oh, ow, 3) if rgb else (t, oh, ow), dtype=dtype)
    args = [torch.from_numpy(np.ascontiguousarray(p)) for p in (y, u, v)]
    return pixels.yuv_to_frames(*args, out, full_range=full, chroma_shift=shift, **kw)


def bt601_rgb(y, u, v, full, shift):
    """Exact BT.601 YCbCr -> RGB in float64 (nearest chroma), rounded and clipped."""
    sx, sy = shift
    u = np.repeat(np.repeat(u, 1 << sy, axis=-2), 1 << sx, axis=-1)[
        ..., : y.shape[-2], : y.shape[-1]
    ]
    v = np.repeat(np.repeat(v, 1 << sy, axis=-2), 1 << sx, axis=-1)[
        ..., : y.shape[-2], : y.shape[-1]
    ]
    y, u, v = (a.astype(np.float64) for a in (y, u, v))
    kr, kb = 0.299, 0.114
    kg = 1 - kr - kb
    if full:
        luma, c = y, 1.0
    else:
        luma, c = (y - 16) * 255 / 219, 255 / 224
    u, v = (u - 128) * c, (v - 128) * c
    r = luma + 2 * (1 - kr) * v
    g = luma - 2 * kb * (1 - kb) / kg * u - 2 * kr * (1 - kr) / kg * v
    b = luma + 2 * (1 - kb) * u
    return np.clip(np.round(np.stack([r, g, b], -1)), 0, 255)


@pytest.fixture(autouse=True)
def _needs_native(native):
    return native


SIZES = [(48, 64), (24, 37), (23, 38), (23, 37), (3, 5), (1, 1)]


def legal_planes(rng, frames, height, width, shift, full):
    """Random planes; limited-range ones keep to legal codes (Y 16..235, C 16..240): FFmpeg
    wraps around on some out-of-gamut limited-range inputs, which no encoder produces."""
    y, u, v = random_planes(rng, frames, height, width, shift)
    if not full:
        y = (16 + y.astype(np.int32) * 219 // 255).astype(np.uint8)
        u, v = ((16 + c.astype(np.int32) * 224 // 255).astype(np.uint8) for c in (u, v))
    return y, u, v


def native_rgb_like_ffmpeg(layout: str, height: int, width: int) -> bool:
    """Where FFmpeg's unscaled path also takes the nearest chroma sample (read_video uses the
    native RGB conversion exactly there, FFmpeg's own elsewhere)."""
    return layout == "444" or (layout in ("420", "422") and height % 2 == 0 and width % 2 == 0)


@pytest.mark.parametrize("layout", ["420", "422", "440", "444"])
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("hw", SIZES)
def test_yuv_vs_ffmpeg_and_bt601(layout, full, hw):
    shift = SHIFTS[layout]
    fmt = ("yuvj" if full else "yuv") + layout + "p"
    rng = np.random.default_rng([SIZES.index(hw), int(full), int(layout)])
    y, u, v = legal_planes(rng, 3, *hw, shift, full)
    gray = convert(y, u, v, full=full, shift=shift).numpy()
    rgb = convert(y, u, v, full=full, shift=shift, rgb=True).numpy().astype(int)
    for t in range(3):
        frame = av_frame(fmt, [y[t], u[t], v[t]])
        np.testing.assert_array_equal(gray[t], frame.to_ndarray(format="gray"))
        if native_rgb_like_ffmpeg(layout, *hw):
            diff = np.abs(rgb[t] - frame.to_ndarray(format="rgb24").astype(int))
            assert diff.max() <= (2 if full else 3), diff.max()
    diff = np.abs(rgb - bt601_rgb(y, u, v, full, shift))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3


def test_gray_covers_every_luma_value():
    y = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    u = np.full((1, 8, 8), 128, np.uint8)
    for full in (True, False):
        gray = convert(y, u, u, full=full).numpy().astype(np.float64)
        expected = y if full else np.clip(np.round((y - 16.0) * 255 / 219), 0, 255)
        np.testing.assert_array_equal(gray, expected)


def torch_resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    """PyTorch's resize of gray (T, H, W) or RGB (T, H, W, 3) values, in fp32."""
    rgb = x.dim() == 4
    x = x.float().permute(0, 3, 1, 2) if rgb else x.float()[:, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    x = F.interpolate(x, size=size, mode=mode, **kwargs)
    return x.permute(0, 2, 3, 1) if rgb else x[:, 0]


RESIZES = [
    ((48, 64), (112, 112)),
    ((112, 224), (112, 112)),
    ((97, 131), (40, 60)),
    ((37, 23), (13, 7)),
]


@pytest.mark.parametrize("mode", ["area", "bilinear"])
@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("sizes", RESIZES)
def test_resize_vs_torch(mode, rgb, sizes):
    (h, w), size = sizes
    rng = np.random.default_rng(h * w)
    y, u, v = random_planes(rng, 2, h, w, (1, 1))
    base = convert(y, u, v, full=False, rgb=rgb)
    ref = torch_resize(base, size, mode)
    ours = convert(y, u, v, full=False, rgb=rgb, size=size, dtype=torch.float32, resize=mode)
    if mode == "area":
        torch.testing.assert_close(ours, ref / 128 - 1, rtol=0, atol=0)
    else:
        torch.testing.assert_close(ours, ref / 128 - 1, rtol=0, atol=1e-5)
    ours_u8 = convert(y, u, v, full=False, rgb=rgb, size=size, resize=mode)
    diff = (ours_u8.int() - ref.round().int()).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["area", "bilinear"])
def test_half_outputs_within_twice_torch_error(dtype, mode):
    # Mostly 128 with sparse 129s, upsampled 19x: normalised values down to ~1e-5 reach fp16's
    # subnormal range, where rounding is easiest to get wrong.
    rng = np.random.default_rng(7)
    y = np.full((2, 6, 5), 128, np.uint8)
    y[rng.random(y.shape) < 0.3] = 129
    y[0, 0, 0], y[1, 5, 4] = 0, 255
    u = np.full((2, 3, 3), 128, np.uint8)
    size = (113, 97)
    base = convert(y, u, u, full=True)
    ref32 = torch_resize(base, size, mode) / 128 - 1
    ref64 = ref32.double()
    torch_err = (ref32.to(dtype).double() - ref64).abs().max()
    ours = convert(y, u, u, full=True, size=size, dtype=dtype, resize=mode)
    ours_err = (ours.double() - ref64).abs().max()
    assert ours_err <= 2 * torch_err, (ours_err, torch_err)
    if dtype == torch.float16 and mode == "bilinear":
        tiny = ref32.abs()
        assert ((tiny > 0) & (tiny < 2**-14)).any(), "no fp16 subnormals exercised"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalised_without_resize_is_exact(dtype):
    rng = np.random.default_rng(3)
    y, u, v = random_planes(rng, 2, 10, 12, (1, 1))
    base = convert(y, u, v, full=False, rgb=True)
    ours = convert(y, u, v, full=False, rgb=True, dtype=dtype)
    torch.testing.assert_close(ours, (base.float() / 128 - 1).to(dtype), rtol=0, atol=0)


def test_packed_inputs():
    rng = np.random.default_rng(5)
    gray = torch.from_numpy(rng.integers(0, 256, (3, 20, 30), dtype=np.uint8))
    out = torch.empty(3, 20, 30, 3, dtype=torch.uint8)
    pixels.packed_to_frames(gray, out)
    torch.testing.assert_close(out, gray[..., None].expand(-1, -1, -1, 3), rtol=0, atol=0)
    rgb = torch.from_numpy(rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8))
    out = torch.empty(3, 9, 11, 3)
    pixels.packed_to_frames(rgb, out, resize="area")
    torch.testing.assert_close(out, torch_resize(rgb, (9, 11), "area") / 128 - 1, rtol=0, atol=0)
    padded = torch.from_numpy(rng.integers(0, 256, (3, 20, 40), dtype=np.uint8))[:, :, :30]
    out = torch.empty(3, 20, 30, dtype=torch.uint8)
    torch.testing.assert_close(pixels.packed_to_frames(padded, out), padded, rtol=0, atol=0)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(11)
    y, u, v = random_planes(rng, 9, 70, 90, (1, 1))
    for kw in ({}, {"size": (33, 47)}, {"size": (33, 47), "resize": "bilinear"}):
        one = convert(y, u, v, full=False, rgb=True, dtype=torch.float32, threads=1, **kw)
        two = convert(y, u, v, full=False, rgb=True, dtype=torch.float32, threads=3, **kw)
        assert torch.equal(one, two)


def test_strided_planes_views():
    rng = np.random.default_rng(13)
    y, u, v = random_planes(rng, 4, 16, 24, (1, 1))
    buf = torch.zeros(4, 16 * 32 + 2 * 8 * 16, dtype=torch.uint8)
    yv = buf[:, : 16 * 32].unflatten(1, (16, 32))[:, :, :24]
    uv = buf[:, 16 * 32 : 16 * 32 + 128].unflatten(1, (8, 16))[:, :, :12]
    vv = buf[:, 16 * 32 + 128 :].unflatten(1, (8, 16))[:, :, :12]
    yv.copy_(torch.from_numpy(y))
    uv.copy_(torch.from_numpy(u))
    vv.copy_(torch.from_numpy(v))
    out = torch.empty(4, 16, 24, 3, dtype=torch.uint8)
    pixels.yuv_to_frames(yv, uv, vv, out, full_range=True)
    torch.testing.assert_close(out, convert(y, u, v, full=True, rgb=True), rtol=0, atol=0)


def planes_of(buffer: torch.Tensor, height: int, width: int):
    flat = buffer.reshape(len(buffer), -1).numpy()
    ch, cw = height // 2, width // 2
    y = flat[:, : height * width].reshape(-1, height, width)
    u = flat[:, height * width : height * width + ch * cw].reshape(-1, ch, cw)
    v = flat[:, height * width + ch * cw :].reshape(-1, ch, cw)
    return y, u, v


SPECIAL = [
    float("nan"),
    float("inf"),
    -float("inf"),
    -1.0,
    1.0,
    0.99609375,
    0.9921875,
    -0.9921875,
    -0.99999,
    1e-8,
    -1e-3,
    2.0,
    -3.0,
]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16])
def test_gray_frames_to_yuv(dtype):
    import av

    g = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        frames = torch.randint(0, 256, (3, 16, 22), dtype=torch.uint8, generator=g)
    else:
        frames = (torch.rand(3, 16, 22, generator=g) * 2.4 - 1.2).to(dtype)
        frames.view(-1)[: len(SPECIAL)] = torch.tensor(SPECIAL).to(dtype)
    y, u, v = planes_of(pixels.frames_to_yuv(frames), 16, 22)
    expected = reference_uint8(frames).numpy()
    np.testing.assert_array_equal(y, expected)
    assert (u == 128).all() and (v == 128).all()
    ffmpeg = av.VideoFrame.from_ndarray(expected[0], format="gray").reformat(format="yuvj420p")
    for plane, ours in zip(ffmpeg.planes, (y[0], u[0], v[0])):
        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        np.testing.assert_array_equal(rows[: ours.shape[0], : ours.shape[1]], ours)


def test_reference_uint8_special_values():
    x = torch.tensor(SPECIAL)
    expected = [0, 255, 0, 0, 255, 255, 255, 1, 0, 128, 127, 255, 0]
    assert reference_uint8(x).tolist() == expected
    y, _, _ = planes_of(pixels.frames_to_yuv(x[:12].reshape(1, 2, 6)), 2, 6)
    assert y.reshape(-1).tolist() == expected[:12]


def test_rgb_frames_to_yuv():
    rng = np.random.default_rng(17)
    rgb = rng.integers(0, 256, (2, 20, 26, 3), dtype=np.uint8)
    y, u, v = planes_of(pixels.frames_to_yuv(torch.from_numpy(rgb)), 20, 26)
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    kr, kb = 0.299, 0.114
    kg = 1 - kr - kb
    luma = np.round(kr * r + kg * g + kb * b)
    assert np.abs(y - luma).max() <= 1 and (y != luma).mean() < 1e-3

    def block(a):
        return a.reshape(2, 10, 2, 13, 2).mean(axis=(2, 4))

    rb, gb, bb = block(r), block(g), block(b)
    cb = np.clip(
        np.round(128 - kr / (2 * (1 - kb)) * rb - kg / (2 * (1 - kb)) * gb + 0.5 * bb), 0, 255
    )
    cr = np.clip(
        np.round(128 + 0.5 * rb - kg / (2 * (1 - kr)) * gb - kb / (2 * (1 - kr)) * bb), 0, 255
    )
    assert np.abs(u - cb).max() <= 1 and (u != cb).mean() < 1e-2
    assert np.abs(v - cr).max() <= 1 and (v != cr).mean() < 1e-2
    floats = torch.from_numpy(rgb).float() / 128 - 1
    same = pixels.frames_to_yuv(floats.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1))
    torch.testing.assert_close(same, pixels.frames_to_yuv(torch.from_numpy(rgb)), rtol=0, atol=0)


def test_validation_names_the_values():
    y = torch.zeros(2, 8, 10, dtype=torch.uint8)
    u = torch.zeros(2, 4, 5, dtype=torch.uint8)
    out = torch.empty(2, 8, 10)
    cases = [
        (
            lambda: pixels.yuv_to_frames(y.short(), u, u, out, full_range=True),
            "uint8, got torch.int16",
        ),
        (
            lambda: pixels.yuv_to_frames(y, u[:, :3], u, out, full_range=True),
            r"\(2, 4, 5\), got \(2, 3, 5\)",
        ),
        (
            lambda: pixels.yuv_to_frames(y, u, u, out[:1], full_range=True),
            "out has 1 frames, the input 2",
        ),
        (lambda: pixels.yuv_to_frames(y, u, u, out.double(), full_range=True), "got torch.float64"),
        (lambda: pixels.yuv_to_frames(y, u, u, out.transpose(1, 2), full_range=True), "contiguous"),
        (
            lambda: pixels.yuv_to_frames(y[:, :, ::2], u, u, out, full_range=True),
            r"strides \(80, 10, 2\)",
        ),
        (
            lambda: pixels.yuv_to_frames(y, u, u, out, full_range=True, resize="nearest"),
            "'nearest'",
        ),
        (lambda: pixels.yuv_to_frames(y, u, u, out, full_range=True, threads=0), "got 0"),
        (
            lambda: pixels.yuv_to_frames(y, u, u, out, full_range=True, chroma_shift=(2, 1)),
            r"\(2, 1\)",
        ),
        (
            lambda: pixels.packed_to_frames(torch.zeros(2, 8, 10, 3, dtype=torch.uint8), out),
            "channel",
        ),
        (lambda: pixels.frames_to_yuv(torch.zeros(1, 7, 10)), "7x10"),
        (lambda: pixels.frames_to_yuv(torch.zeros(1, 8, 9)), "8x9"),
        (
            lambda: pixels.yuv_to_frames(
                y.as_strided((2, 8, 10), (80, 5, 1)), u, u, out, full_range=True
            ),
            r"strides \(80, 5, 1\)",
        ),
        (lambda: pixels.frames_to_yuv(torch.zeros(1, 8, 10, 2)), r"\(1, 8, 10, 2\)"),
        (lambda: pixels.frames_to_yuv(torch.zeros(1, 8, 10, dtype=torch.int32)), "torch.int32"),
        (lambda: pixels.yuv_to_frames(y, u, u, out.to("meta"), full_range=True), "one device"),
    ]
    for call, message in cases:
        with pytest.raises(pixels.PixelFormatError, match=message):
            call()


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("shift", [(0, 0), (1, 1)])
def test_vector_and_scalar_rgb_agree(full, shift):
    # Width 16 runs SSE2 blocks only (x86-64); width 15 converts columns 8..14 in the scalar
    # tail: the same samples must give the same bits (the CUDA kernels use the scalar formula).
    rng = np.random.default_rng([int(full), shift[0]])
    y, u, v = random_planes(rng, 1, 1 << 13, 16, shift)
    wide = convert(y, u, v, full=full, shift=shift, rgb=True)
    cw = 15 if shift == (0, 0) else 8
    narrow = convert(y[..., :15], u[..., :cw], v[..., :cw], full=full, shift=shift, rgb=True)
    assert torch.equal(wide[:, :, :15], narrow)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_are_rounded_float32_outputs(dtype):
    # fp16 / bf16 outputs are the fp32 outputs rounded to nearest even, bit for bit (what
    # torch's .to() and CUDA's __float2half_rn / __float2bfloat16_rn do), subnormals included.
    rng = np.random.default_rng(19)
    y = np.full((3, 9, 7), 128, np.uint8)
    y[rng.random(y.shape) < 0.5] = 129
    y[0] = rng.integers(0, 256, (9, 7))
    u = np.full((3, 5, 4), 128, np.uint8)
    for mode in ("area", "bilinear"):
        f32 = convert(y, u, u, full=True, size=(211, 173), dtype=torch.float32, resize=mode)
        half = convert(y, u, u, full=True, size=(211, 173), dtype=dtype, resize=mode)
        assert torch.equal(half.view(torch.int16), f32.to(dtype).view(torch.int16))


def test_more_validation_names_the_values():
    y = torch.zeros(2, 8, 10, dtype=torch.uint8)
    u = torch.zeros(2, 4, 5, dtype=torch.uint8)
    rgb = torch.zeros(2, 8, 10, 3, dtype=torch.uint8)
    cases = [
        (
            lambda: pixels.yuv_to_frames(y, u, u, torch.empty(3, 8, 10), full_range=True),
            "out has 3 frames, the input 2",
        ),
        (
            lambda: pixels.yuv_to_frames(
                y, u, u, torch.empty(2, 8, 10), chroma_shift=(1, 2), full_range=True
            ),
            r"\(1, 2\)",
        ),
        (lambda: pixels.frames_to_yuv(torch.zeros(1, 0, 4)), r"H, W >= 1, got shape \(1, 0, 4\)"),
        (
            lambda: pixels.packed_to_frames(
                rgb.as_strided((2, 8, 10, 3), (240, 30, 3, 0)), torch.empty(2, 8, 10, 3)
            ),
            r"packed rows .* got \(240, 30, 3, 0\)",
        ),
        (
            lambda: pixels.frames_to_yuv(torch.zeros(1, 8, 10), out=torch.empty(1, 12, 10)),
            "out must be uint8",
        ),
        (
            lambda: pixels.frames_to_yuv(
                torch.zeros(1, 8, 10), out=torch.empty(1, 10, 12, dtype=torch.uint8).transpose(1, 2)
            ),
            "out must be contiguous",
        ),
        (
            lambda: pixels.yuv_to_frames(
                y.to("meta"),
                u.to("meta"),
                u.to("meta"),
                torch.empty(2, 8, 10, device="meta"),
                full_range=True,
            ),
            "CPU or CUDA, got meta",
        ),
    ]
    for call, message in cases:
        with pytest.raises(pixels.PixelFormatError, match=message):
            call()


@pytest.mark.parametrize(("torch_threads", "cpus", "expected"), [(8, 3, 3), (2, 16, 2), (4, 1, 1)])
def test_default_threads_is_capped_by_the_usable_cpus(monkeypatch, torch_threads, cpus, expected):
    monkeypatch.setattr(pixels.torch, "get_num_threads", lambda: torch_threads)
    monkeypatch.setattr(pixels.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert pixels.default_threads() == expected
