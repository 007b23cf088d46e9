"""``echofast.patch`` on a CUDA GPU: diffusers UNets patched vs unpatched, same run, same card.

    python bench/bench_patch.py [--models lvdm,svd] [--repeats 10] [--compile]
                                [--csv bench/results/patch.csv]

Models (real configs, random weights):

* ``lvdm``: EchoNet-Synthetic's LVDM (``UNetSpatioTemporalConditionModel``, 143.8M parameters),
  one step on 64-frame windows at 16x16 latents (``--lvdm-windows``, default 1 and 8), EF as the
  single context token; fp32 weights under fp16 autocast, as the reference samples.
* ``svd``: Stable Video Diffusion's UNet (diffusers' default config = SVD's: 320-1280 channels,
  head dim 64, cross-attention width 1024), ``--svd-frames`` frames at ``--svd-latent`` latents
  (default 14 at 72x128, i.e. 576x1024 video), batch 2 (classifier-free guidance), one image
  token; fp16 weights, as SVD pipelines load it.

Modes, each timed in the same process on the same model object: ``diffusers`` (eager),
``call_sites`` (``echofast.patch(unet, replace_models=False)``), ``echofast``
(``echofast.patch(unet)``: the whole model served by echofast's LVDM), and with ``--compile``
``torch.compile`` of the unpatched model. Every mode is first checked against eager diffusers on
the same input (``rel_err_vs_diffusers``: max |a - b| / max |b|). Times: CUDA events around single
calls after warm-up, modes in rounds (``--rounds``) so that drift hits all of them; median, p20,
p80. ``speedup`` = diffusers median / mode median; TFLOP/s from a FLOP count of the step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from benchutil import append_csv, git_sha

MODES = ("diffusers", "call_sites", "echofast")


def lvdm_case(windows: int) -> tuple[torch.nn.Module, tuple, dict, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from diffusers import UNetSpatioTemporalConditionModel
    from support.configs import LVDM_FULL_CONFIG

    unet = UNetSpatioTemporalConditionModel(**LVDM_FULL_CONFIG).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(windows, 64, 8, 16, 16, device="cuda", generator=g)
    kwargs = {
        "encoder_hidden_states": torch.rand(windows, 1, 1, device="cuda", generator=g),
        "added_time_ids": torch.zeros(windows, 1, device="cuda"),
    }
    return unet, (x, torch.tensor(500, device="cuda")), kwargs, f"{windows}x64x8x16x16"


def svd_case(frames: int, latent: tuple[int, int]) -> tuple[torch.nn.Module, tuple, dict, str]:
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(num_frames=frames).to("cuda", torch.float16).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    h, w = latent
    x = torch.randn(2, frames, 8, h, w, device="cuda", dtype=torch.float16, generator=g)
    kwargs = {
        "encoder_hidden_states": torch.randn(
            2, 1, 1024, device="cuda", dtype=torch.float16, generator=g
        ),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * 2, device="cuda", dtype=x.dtype),
    }
    return unet, (x, torch.tensor(0.7, device="cuda")), kwargs, f"2x{frames}x8x{h}x{w}"


def _step(unet, args, kwargs, autocast: bool) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=autocast):
            return unet(*args, **kwargs, return_dict=False)[0]

    return call


def _time(fn: Callable[[], torch.Tensor], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def _flops(fn: Callable[[], torch.Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run_case(name: str, unet, args, kwargs, shape: str, autocast: bool, opts) -> list[dict]:
    import echofast

    modes: dict[str, Callable[[], torch.Tensor]] = {}
    step = _step(unet, args, kwargs, autocast)
    for mode in MODES:
        modes[mode] = step
    if opts.compile:
        modes["diffusers+compile"] = _step(torch.compile(unet), args, kwargs, autocast)

    def activate(mode: str) -> dict:
        echofast.unpatch(unet)
        if mode == "call_sites":
            return _summary(echofast.patch(unet, replace_models=False))
        if mode == "echofast":
            return _summary(echofast.patch(unet))
        return {"replaced": "", "patched_sites": 0}

    activate("diffusers")
    reference = step().float()
    flops = _flops(step)
    info, errors, times = {}, {}, {m: [] for m in modes}
    for mode, fn in modes.items():
        info[mode] = activate(mode)
        errors[mode] = _rel_err(fn(), reference)
        _time(fn, opts.warmup)
        print(f"{name} {shape} {mode}: rel err vs diffusers {errors[mode]:.2e}", flush=True)
    for _ in range(opts.rounds):
        for mode, fn in modes.items():
            activate(mode)
            times[mode] += _time(fn, opts.repeats)
    echofast.unpatch(unet)
    base = statistics.median(times["diffusers"])
    rows = []
    for mode, samples in times.items():
        q = statistics.quantiles(samples, n=10) if len(samples) > 1 else [samples[0]] * 9
        med = statistics.median(samples)
        rows.append(
            {
                "card": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "triton": _version("triton"),
                "diffusers": _version("diffusers"),
                "git_sha": git_sha(),
                "model": name,
                "shape": shape,
                "weights_dtype": str(next(unet.parameters()).dtype).replace("torch.", ""),
                "autocast": "float16" if autocast else "",
                "mode": mode,
                "median_ms": med,
                "p20_ms": q[1],
                "p80_ms": q[7],
                "speedup": base / med,
                "tflops": flops / (med * 1e-3) / 1e12,
                "rel_err_vs_diffusers": errors[mode],
                **info[mode],
            }
        )
        print(
            f"{name:<5} {shape:<18} {mode:<18} {med:9.2f} ms (p20 {q[1]:.2f}, p80 {q[7]:.2f}) "
            f"{base / med:5.2f}x  {rows[-1]['tflops']:6.1f} TFLOP/s",
            flush=True,
        )
    return rows


def _summary(report) -> dict:
    return {
        "replaced": ";".join(r.echofast_class for r in report.replaced),
        "patched_sites": len(report.patched),
    }


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _latent(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="lvdm,svd", help="comma list of lvdm, svd")
    parser.add_argument("--lvdm-windows", default="1,8", help="64-frame windows per call")
    parser.add_argument("--svd-frames", type=int, default=14)
    parser.add_argument("--svd-latent", type=_latent, default=(72, 128), help="HxW latents")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per mode and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--csv", type=Path, default=None, help="append rows to this CSV")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_patch.py needs a CUDA GPU (it times GPU inference)", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"lvdm", "svd"})
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from lvdm, svd")
    rows = []
    if "lvdm" in models:
        for windows in (int(w) for w in args.lvdm_windows.split(",")):
            unet, a, kw, shape = lvdm_case(windows)
            rows += run_case("lvdm", unet, a, kw, shape, True, args)
            del unet
            torch.cuda.empty_cache()
    if "svd" in models:
        unet, a, kw, shape = svd_case(args.svd_frames, args.svd_latent)
        rows += run_case("svd", unet, a, kw, shape, False, args)
    if args.csv:
        append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
