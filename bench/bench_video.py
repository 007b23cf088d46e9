"""The video pixel path: echofast's extension vs FFmpeg's own conversion (PyAV), in frames/s.

    python bench/bench_video.py [--frames 64] [--repeats 7] [--csv bench/results/video_cpu.csv]
    python bench/bench_video.py --device cuda --csv bench/results/video_<card>.csv

CPU (default): clips written by this script (112x112 MJPEG, as EchoNet-Dynamic, and a 224x112
one to resize); each case times echofast and its baseline alternately in one process, ``repeats``
rounds, and reports frames / median time for both plus the median per-round ratio
baseline_time / echofast_time (> 1: echofast is faster). Baselines are the idiomatic PyAV code:
``to_ndarray(format="gray" | "rgb24")`` per frame, ``np.stack``, then PyTorch for
normalisation and resizing; writing converts with ``VideoFrame.from_ndarray``.

CUDA (``--device cuda``; exits with status 2 and a message when CUDA is unusable): first checks
that the CUDA kernels equal the CPU extension bit for bit (status 1 on a mismatch), then times
decode -> normalised fp16 on the GPU (vs PyAV + PyTorch on the GPU, vs torchvision / torchcodec
where installed), the conversion kernel alone on device-resident planes (vs the same in PyTorch,
with the bandwidth it reaches), and decoded model output on the GPU -> written AVI (vs PyAV
conversion). It ends with the pixel path's share of generating one 192-frame video, against the
VAE decode of those frames (full config, random weights, fp16; a lower bound of generation
time, so the share is an upper bound) or ``--generation-s`` when given.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from benchutil import append_csv, git_sha

from echofast.io import convert_frames, pixels, read_video, write_video


@dataclass
class Case:
    name: str
    shape: str
    frames: int
    baseline_name: str
    baseline: Callable[[], object]
    candidate: Callable[[], object]


def echo_like(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Gray uint8 frames with echo-like structure: a bright moving ring, speckle, dark corners."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij"
    )
    out = []
    for t in range(frames):
        radius = 0.5 + 0.1 * np.sin(2 * np.pi * t / 32)
        ring = torch.exp(-(((xx**2 + yy**2).sqrt() - radius) ** 2) / 0.01)
        speckle = torch.rand(height, width, generator=g) * 60
        out.append((ring * 180 + speckle + 20 * (1 - yy.abs())).clamp(0, 255))
    return torch.stack(out).to(torch.uint8)


def decoded(path: Path) -> list:
    import av

    with av.open(str(path)) as container:
        return list(container.decode(video=0))


def pyav_tensor(frames, *, fmt="gray", dtype=torch.uint8, size=None, device="cpu"):
    """The baseline: FFmpeg's conversion per frame, then PyTorch."""
    x = torch.from_numpy(np.stack([f.to_ndarray(format=fmt) for f in frames])).to(device)
    if size is not None:
        x = F.interpolate(x.float()[:, None], size=size, mode="area")[:, 0]
        return x.round().to(torch.uint8) if dtype == torch.uint8 else (x / 128 - 1).to(dtype)
    return x if dtype == torch.uint8 else (x.float() / 128 - 1).to(dtype)


def make_cpu_cases(folder: Path, frames: int) -> list[Case]:
    clip = write_video(folder / "echo112.avi", echo_like(frames, 112, 112), 50)
    wide = write_video(folder / "echo224x112.avi", echo_like(frames, 112, 224), 50)
    av_frames, wide_frames = decoded(clip), decoded(wide)
    model_out = echo_like(frames, 112, 112, seed=1).float() / 128 - 1
    n = len(av_frames)
    shape = "112x112 yuvj420p"
    return [
        Case(
            "convert_gray_u8",
            shape,
            n,
            "pyav to_ndarray(gray)",
            lambda: pyav_tensor(av_frames),
            lambda: convert_frames(av_frames, backend="native"),
        ),
        Case(
            "convert_f32",
            shape,
            n,
            "pyav to_ndarray(gray) + torch /128-1",
            lambda: pyav_tensor(av_frames, dtype=torch.float32),
            lambda: convert_frames(av_frames, dtype=torch.float32, backend="native"),
        ),
        Case(
            "convert_rgb_u8",
            shape,
            n,
            "pyav to_ndarray(rgb24)",
            lambda: pyav_tensor(av_frames, fmt="rgb24"),
            lambda: convert_frames(av_frames, grayscale=False, backend="native"),
        ),
        Case(
            "convert_resize_f16",
            "224x112 -> 112x112 area, fp16",
            n,
            "pyav to_ndarray(gray) + F.interpolate(area)",
            lambda: pyav_tensor(wide_frames, dtype=torch.float16, size=(112, 112)),
            lambda: convert_frames(wide_frames, size=112, dtype=torch.float16, backend="native"),
        ),
        Case(
            "read_video_u8",
            f"{shape} MJPEG AVI",
            n,
            "read_video(backend='pyav')",
            lambda: read_video(clip, backend="pyav"),
            lambda: read_video(clip, backend="native"),
        ),
        Case(
            "read_video_f32",
            f"{shape} MJPEG AVI",
            n,
            "read_video(backend='pyav')",
            lambda: read_video(clip, dtype=torch.float32, backend="pyav"),
            lambda: read_video(clip, dtype=torch.float32, backend="native"),
        ),
        Case(
            "write_video_f32",
            "112x112 float32 in [-1, 1] -> MJPEG AVI",
            n,
            "write_video(backend='pyav')",
            lambda: write_video(folder / "w_pyav.avi", model_out, 50, backend="pyav"),
            lambda: write_video(folder / "w_native.avi", model_out, 50, backend="native"),
        ),
    ]


def _timed(fn: Callable[[], object], sync: bool) -> float:
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(case: Case, repeats: int, sync: bool = False) -> dict:
    case.baseline()
    case.candidate()
    base_t, ours_t, ratios = [], [], []
    for i in range(repeats):
        if i % 2:
            o, b = _timed(case.candidate, sync), _timed(case.baseline, sync)
        else:
            b, o = _timed(case.baseline, sync), _timed(case.candidate, sync)
        base_t.append(b)
        ours_t.append(o)
        ratios.append(b / o)
    return {
        "case": case.name,
        "shape": case.shape,
        "frames": case.frames,
        "baseline": case.baseline_name,
        "repeats": repeats,
        "baseline_fps": case.frames / statistics.median(base_t),
        "echofast_fps": case.frames / statistics.median(ours_t),
        "median_ratio": statistics.median(ratios),
    }


# ---- CUDA --------------------------------------------------------------------------------


def gpu_checks(folder: Path) -> list[str]:
    """CUDA kernels vs the CPU extension, bit for bit; returns the mismatches."""
    failures = []
    g = torch.Generator().manual_seed(0)
    for h, w, size in ((48, 64, None), (23, 37, None), (112, 224, (112, 112)), (37, 23, (50, 61))):
        ch, cw = (h + 1) // 2, (w + 1) // 2
        cpu = [
            torch.randint(0, 256, s, dtype=torch.uint8, generator=g)
            for s in ((5, h, w), (5, ch, cw), (5, ch, cw))
        ]
        gpu = [p.cuda() for p in cpu]
        oh, ow = size or (h, w)
        for dtype in pixels.DTYPES:
            for rgb in (False, True):
                for full in (False, True):
                    for resize in ("area", "bilinear"):
                        shape = (5, oh, ow, 3) if rgb else (5, oh, ow)
                        want = torch.empty(shape, dtype=dtype)
                        got = torch.empty(shape, dtype=dtype, device="cuda")
                        kw = {"full_range": full, "resize": resize}
                        pixels.yuv_to_frames(*cpu, want, **kw)
                        pixels.yuv_to_frames(*gpu, got, **kw)
                        if not torch.equal(got.cpu(), want):
                            failures.append(
                                f"yuv_to_frames {h}x{w}->{size} {dtype} rgb={rgb} "
                                f"full={full} {resize}"
                            )
    for dtype in pixels.DTYPES:
        for shape in ((7, 34, 50), (7, 34, 50, 3)):
            x = torch.rand(shape, generator=g) * 2.4 - 1.2
            x = (x * 100 + 128).clamp(0, 255).to(dtype) if dtype == torch.uint8 else x.to(dtype)
            if not torch.equal(pixels.frames_to_yuv(x.cuda()).cpu(), pixels.frames_to_yuv(x)):
                failures.append(f"frames_to_yuv {shape} {dtype}")
    clip = write_video(folder / "check.avi", echo_like(40, 112, 112), 50)
    for kw in ({}, {"size": 64, "dtype": torch.float16}, {"grayscale": False}):
        if not torch.equal(
            read_video(clip, device="cuda", **kw)[0].cpu(), read_video(clip, **kw)[0]
        ):
            failures.append(f"read_video cuda {kw}")
    return failures


def _cuda_events_time(fn: Callable[[], object], repeats: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def gpu_kernel_rows(frames: int) -> list[dict]:
    """The conversion kernel alone on device-resident 4:2:0 planes -> normalised fp16."""
    rows = []
    y = torch.randint(0, 256, (frames, 112, 112), dtype=torch.uint8, device="cuda")
    u = torch.randint(0, 256, (frames, 56, 56), dtype=torch.uint8, device="cuda")
    out = torch.empty(frames, 112, 112, dtype=torch.float16, device="cuda")
    ours = _cuda_events_time(lambda: pixels.yuv_to_frames(y, u, u, out, full_range=True))
    theirs = _cuda_events_time(lambda: out.copy_(y.float() / 128 - 1))
    src = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = _cuda_events_time(lambda: dst.copy_(src), 20)
    moved = (y.numel() * 1.5) + out.numel() * 2
    rows.append(
        {
            "case": "kernel_yuv420_to_f16",
            "shape": f"({frames}, 112, 112) planes on the GPU",
            "frames": frames,
            "baseline": "torch: y.float() / 128 - 1 -> fp16",
            "repeats": 50,
            "baseline_fps": frames / theirs,
            "echofast_fps": frames / ours,
            "median_ratio": theirs / ours,
            "note": f"{moved / ours / 1e9:.0f} GB/s; device copy "
            f"{2 * src.nbytes / copy_s / 1e9:.0f} GB/s",
        }
    )
    return rows


def _torchvision_missing() -> str:
    """Why torchvision's ``io.read_video`` baseline can't run here, or "" (0.26 removed it)."""
    try:
        import torchvision.io
    except ImportError:
        return "torchvision not installed"
    if not hasattr(torchvision.io, "read_video"):
        return f"torchvision {torchvision.__version__} has no io.read_video"
    return ""


def make_gpu_cases(folder: Path, frames: int) -> list[Case]:
    clip = write_video(folder / "echo112.avi", echo_like(frames, 112, 112), 50)
    model_out = (echo_like(frames, 112, 112, seed=1).float() / 128 - 1).half().cuda()
    n = frames
    cases = [
        Case(
            "read_video_cuda_f16",
            "112x112 MJPEG AVI -> (T, 112, 112) fp16 on the GPU",
            n,
            "read_video(backend='pyav', device='cuda')",
            lambda: read_video(clip, dtype=torch.float16, device="cuda", backend="pyav"),
            lambda: read_video(clip, dtype=torch.float16, device="cuda", backend="native"),
        ),
        Case(
            "write_video_from_cuda_f16",
            "(T, 112, 112) fp16 on the GPU -> MJPEG AVI",
            n,
            "reference uint8 on GPU -> CPU -> PyAV conversion",
            lambda: write_video(folder / "w_pyav.avi", model_out, 50, backend="pyav"),
            lambda: write_video(folder / "w_native.avi", model_out, 50, backend="native"),
        ),
    ]
    tv_reason = _torchvision_missing()
    if tv_reason:
        print(f"{tv_reason}: no torchvision baseline", file=sys.stderr)
    else:
        import torchvision.io

        def torchvision_read():
            frames = torchvision.io.read_video(str(clip), pts_unit="sec", output_format="THWC")[0]
            return (frames.cuda().float().mean(-1) / 128 - 1).half()

        cases.append(
            Case(
                "read_video_cuda_f16_vs_torchvision",
                "112x112 MJPEG AVI -> fp16 on the GPU",
                n,
                "torchvision.io.read_video + torch",
                torchvision_read,
                lambda: read_video(clip, dtype=torch.float16, device="cuda"),
            )
        )
    try:
        from torchcodec.decoders import VideoDecoder

        cases.append(
            Case(
                "read_video_cuda_f16_vs_torchcodec",
                "112x112 MJPEG AVI -> fp16 on the GPU",
                n,
                "torchcodec VideoDecoder (CPU decode) + torch",
                lambda: (VideoDecoder(str(clip))[:].cuda().float().mean(1) / 128 - 1).half(),
                lambda: read_video(clip, dtype=torch.float16, device="cuda"),
            )
        )
    except ImportError:
        print("torchcodec not installed: no torchcodec baseline", file=sys.stderr)
    return cases


def generation_seconds_per_video(batch: int, steps: int) -> float:
    """Generate ``batch`` 192-frame videos with the LVDM pipeline (full configs, random weights,
    fp16 autocast, ``steps`` steps, VAE decode included) and return seconds per video."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.configs import LVDM_FULL_CONFIG, VAE_FULL_CONFIG

    from echofast.models import LVDM, VAE
    from echofast.pipelines import LVDMPipeline

    pipe = LVDMPipeline(
        LVDM.from_config(LVDM_FULL_CONFIG).cuda().eval(),
        VAE.from_config(VAE_FULL_CONFIG).cuda().eval(),
    )
    cond = torch.randn(batch, 4, 14, 14, device="cuda")

    def run():
        pipe(
            cond,
            [50.0] * batch,
            num_frames=192,
            num_inference_steps=steps,
            seed=0,
            batch_size=batch,
            dtype="float16",
            progress=False,
        )

    return _timed(run, True) / batch


def pixel_share(folder: Path, generation_s: float | None, steps: int) -> dict:
    """Writing one 192-frame video from GPU output vs generating it."""
    frames = (echo_like(192, 112, 112).float() / 128 - 1).half().cuda()
    path = folder / "share.avi"
    write_video(path, frames, 32)
    pixel_s = statistics.median(
        _timed(lambda: write_video(path, frames, 32), True) for _ in range(5)
    )
    source = "--generation-s"
    if generation_s is None:
        generation_s = generation_seconds_per_video(8, steps)
        source = f"LVDM pipeline, batch 8, {steps} steps, fp16, random weights"
    share = pixel_s / (pixel_s + generation_s)
    return {
        "case": "pixel_share_192_frames",
        "shape": "192x112x112 fp16 on GPU -> AVI",
        "frames": 192,
        "baseline": f"generation {generation_s:.3f} s/video ({source})",
        "repeats": 5,
        "baseline_fps": 192 / generation_s,
        "echofast_fps": 192 / pixel_s,
        "median_ratio": generation_s / pixel_s,
        "note": f"pixel path {pixel_s * 1e3:.1f} ms = {100 * share:.2f}% of generation + pixels "
        f"({'<' if share < 0.05 else '>='} 5%)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--frames", type=int, default=64, help="frames per clip")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--generation-s",
        type=float,
        default=None,
        help="seconds to generate one 192-frame video (CUDA share row; default: measured)",
    )
    parser.add_argument(
        "--generation-steps", type=int, default=64, help="sampler steps when measuring"
    )
    parser.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            print("bench_video: --device cuda needs a CUDA GPU visible to PyTorch", file=sys.stderr)
            return 2
        status = pixels.native_status()
        if not status["cuda"]:
            print(f"bench_video: the extension has no CUDA: {status['reason']}", file=sys.stderr)
            return 2
    device = (
        f"cuda: {torch.cuda.get_device_name(0)}"
        if cuda
        else f"cpu: {platform.processor() or platform.machine()}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if cuda:
            failures = gpu_checks(folder)
            if failures:
                print("CUDA path differs from the CPU path:\n  " + "\n  ".join(failures))
                return 1
            print("CUDA check: all configurations equal the CPU extension bit for bit", flush=True)
            cases = make_gpu_cases(folder, args.frames)
        else:
            cases = make_cpu_cases(folder, args.frames)
        for case in cases:
            rows.append({**run_case(case, args.repeats, sync=cuda), "note": ""})
        if cuda:
            rows += gpu_kernel_rows(1024)
            rows.append(pixel_share(folder, args.generation_s, args.generation_steps))
    import av

    for row in rows:
        row.update(
            device=device,
            threads=args.threads,
            torch=torch.__version__,
            av=av.__version__,
            git_sha=git_sha(),
        )
        print(
            f"{row['case']:<36} echofast {row['echofast_fps']:>10.0f} frames/s   "
            f"{row['baseline']}: {row['baseline_fps']:>10.0f} frames/s   "
            f"ratio {row['median_ratio']:.2f}  {row['note']}",
            flush=True,
        )
    if args.csv:
        append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
