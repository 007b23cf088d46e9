"""The CUDA pixel path equals the CPU one bit for bit (GPU only; skipped elsewhere).

The CPU path is checked against FFmpeg and PyTorch in test_pixels.py / test_video.py; here every
CUDA kernel configuration (dtype x gray / RGB x copy / area / bilinear x chroma layout x odd
sizes) must give exactly the CPU result, reads on ``device="cuda"`` equal CPU reads, and
writes from CUDA tensors equal writes from CPU tensors byte for byte.
"""

from __future__ import annotations

import pytest
import torch

from echofast.io import pixels, read_video, write_video

pytestmark = pytest.mark.gpu

DTYPES = [torch.uint8, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _cuda(native):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to PyTorch")
    if not native.build_info()["cuda"]:
        pytest.skip("echofast._C was built without CUDA")


def planes(g, frames, height, width, shift, device):
    ch, cw = -(-height // (1 << shift[1])), -(-width // (1 << shift[0]))
    return [
        torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)
        for shape in ((frames, height, width), (frames, ch, cw), (frames, ch, cw))
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("shift", [(1, 1), (1, 0), (0, 0)])
@pytest.mark.parametrize(
    "sizes", [((48, 64), None), ((23, 37), None), ((112, 224), (112, 112)), ((37, 23), (50, 61))]
)
def test_yuv_to_frames_cuda_equals_cpu(dtype, rgb, shift, sizes):
    (h, w), size = sizes
    g = torch.Generator().manual_seed(h * w + 7 * int(rgb))
    cpu = planes(g, 5, h, w, shift, "cpu")
    gpu = [p.cuda() for p in cpu]
    oh, ow = size or (h, w)
    shape = (5, oh, ow, 3) if rgb else (5, oh, ow)
    for full in (True, False):
        for resize in ("area", "bilinear"):
            want = torch.empty(shape, dtype=dtype)
            got = torch.empty(shape, dtype=dtype, device="cuda")
            kw = {"full_range": full, "chroma_shift": shift, "resize": resize}
            pixels.yuv_to_frames(*cpu, want, **kw)
            pixels.yuv_to_frames(*gpu, got, **kw)
            torch.cuda.synchronize()
            assert torch.equal(got.cpu(), want), (full, resize)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_to_frames_cuda_equals_cpu(dtype):
    g = torch.Generator().manual_seed(3)
    for shape, out_channels in (((4, 30, 41), 1), ((4, 30, 41), 3), ((4, 30, 41, 3), 3)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        for size in ((30, 41), (17, 64)):
            out_shape = (4, *size) + ((3,) if out_channels == 3 else ())
            want = pixels.packed_to_frames(x, torch.empty(out_shape, dtype=dtype))
            got = pixels.packed_to_frames(
                x.cuda(), torch.empty(out_shape, dtype=dtype, device="cuda")
            )
            assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rgb", [False, True])
def test_frames_to_yuv_cuda_equals_cpu(dtype, rgb):
    g = torch.Generator().manual_seed(5)
    shape = (6, 34, 50, 3) if rgb else (6, 34, 50)
    if dtype == torch.uint8:
        frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    else:
        frames = (torch.rand(shape, generator=g) * 2.4 - 1.2).to(dtype)
        frames.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    want = pixels.frames_to_yuv(frames)
    got = pixels.frames_to_yuv(frames.cuda())
    assert torch.equal(got.cpu(), want)
    strided = frames.cuda().transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(pixels.frames_to_yuv(strided).cpu(), want)


def test_more_frames_than_the_grid_z_limit():
    g = torch.Generator().manual_seed(9)
    cpu = planes(g, 70_000, 2, 4, (1, 1), "cpu")
    want = pixels.yuv_to_frames(*cpu, torch.empty(70_000, 2, 4, 3), full_range=False)
    got = torch.empty(70_000, 2, 4, 3, device="cuda")
    pixels.yuv_to_frames(*[p.cuda() for p in cpu], got, full_range=False)
    assert torch.equal(got.cpu(), want)
    frames = torch.randint(0, 256, (70_000, 2, 4), dtype=torch.uint8, generator=g)
    assert torch.equal(pixels.frames_to_yuv(frames.cuda()).cpu(), pixels.frames_to_yuv(frames))


def test_runs_on_the_current_stream():
    g = torch.Generator().manual_seed(11)
    cpu = planes(g, 64, 112, 112, (1, 1), "cpu")
    want = pixels.yuv_to_frames(
        *cpu, torch.empty(64, 112, 112, dtype=torch.float16), full_range=True
    )
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        gpu = [p.cuda(non_blocking=False) for p in cpu]
        got = torch.empty(64, 112, 112, dtype=torch.float16, device="cuda")
        pixels.yuv_to_frames(*gpu, got, full_range=True)
        result = got.to("cpu", non_blocking=False)
    side.synchronize()
    assert torch.equal(result, want)


def test_read_video_on_cuda_equals_cpu(codec_clips):
    for name, path in codec_clips.items():
        for kw in (
            {},
            {"grayscale": False},
            {"size": 32, "dtype": torch.float16},
            {"size": (40, 50), "dtype": torch.bfloat16, "resize": "bilinear", "grayscale": False},
        ):
            want, fps = read_video(path, **kw)
            got, gpu_fps = read_video(path, device="cuda", **kw)
            assert got.device.type == "cuda" and gpu_fps == fps
            assert torch.equal(got.cpu(), want), (name, kw)


def test_read_real_clips_on_cuda(echo_clips):
    for path in echo_clips:
        want, _ = read_video(path, size=112, dtype=torch.float16)
        got, _ = read_video(path, size=112, dtype=torch.float16, device="cuda")
        assert torch.equal(got.cpu(), want)


def test_write_from_cuda_is_byte_identical(tmp_path):
    g = torch.Generator().manual_seed(13)
    for name, frames in (
        ("gray", torch.rand(9, 64, 48, generator=g) * 2 - 1),
        ("rgb", torch.rand(9, 64, 48, 3, generator=g) * 2 - 1),
        ("u8", torch.randint(0, 256, (9, 64, 48), dtype=torch.uint8, generator=g)),
    ):
        a = write_video(tmp_path / f"{name}_cpu.avi", frames, 30)
        b = write_video(tmp_path / f"{name}_cuda.avi", frames.cuda(), 30)
        assert a.read_bytes() == b.read_bytes()


def test_device_mismatch_is_an_error():
    y = torch.zeros(1, 4, 4, dtype=torch.uint8)
    u = torch.zeros(1, 2, 2, dtype=torch.uint8)
    with pytest.raises(pixels.PixelFormatError, match="one device"):
        pixels.yuv_to_frames(y, u, u, torch.empty(1, 4, 4, device="cuda"), full_range=True)
    with pytest.raises(pixels.PixelFormatError, match="one device"):
        pixels.frames_to_yuv(
            torch.zeros(1, 4, 4), out=torch.empty(1, 6, 4, dtype=torch.uint8, device="cuda")
        )


def test_second_gpu_if_present():
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device")
    g = torch.Generator().manual_seed(17)
    cpu = planes(g, 3, 16, 16, (1, 1), "cpu")
    want = pixels.yuv_to_frames(*cpu, torch.empty(3, 16, 16), full_range=True)
    got = torch.empty(3, 16, 16, device="cuda:1")
    pixels.yuv_to_frames(*[p.to("cuda:1") for p in cpu], got, full_range=True)
    assert torch.equal(got.cpu(), want)
