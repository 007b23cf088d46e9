"""GEGLU on a CUDA GPU: echofast's fused Triton kernel vs eager PyTorch vs torch.compile.

    python bench/bench_geglu.py [--dtype float16] [--providers ...] [--backward] [--csv FILE]

Shapes: the projection output h (tokens, 2·D) of every GEGLU of one full-config LVDM step
(16×16 latents, T = 64) recorded by forward hooks, at 1 and 8 windows, plus one h >= 64 MiB.
Providers: ``echofast_triton`` (one fused pass), ``eager`` (``x * F.gelu(gate)``, diffusers'
GEGLU after its projection: two kernels), ``torch_compile`` (inductor's fusion of that same
function); ``--providers`` picks a subset. Modes: forward (without autograd), with ``--backward``
also forward+backward (``autograd.grad(out, h, dy)``).
Bandwidth = the minimum bytes (forward: read x and gate, write out = 3·N·D elements; backward adds
read h and dy, write dh = 5·N·D) / median time, reported against a device-to-device copy measured
in the same run. Times are ``triton.testing.do_bench`` medians with p20/p80; inputs are random.
Forward is timed twice: ``eager`` (back-to-back calls: host-bound for small tensors) and ``graph``
(16 calls replayed from a CUDA graph: GPU time only, as in the pipelines' graph sampling).
Rows are appended to ``--csv`` after every case, so a run stopped by a time limit keeps them.

Mode ``projection+geglu`` (forward, both timings) decides ``FUSED_GEGLU_DEVICES``: the whole
feed-forward projection x (M, K) -> (M, N) at the same call sites (K = N / 4, random weights)
by ``cublas+echofast_triton`` (cuBLAS's GEMM writes h (M, 2N), the fused GEGLU pass reads it:
the models' path today) against ``echofast_fused_gemm`` (one Triton GEMM with the GEGLU in its
epilogue, :func:`echofast.ops.geglu_linear`); ``tflops`` is the GEMM's 2·M·K·2N / time.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import benchutil
import torch
import torch.nn.functional as F
from benchutil import append_csv, copy_bandwidth, git_sha, graph_timed
from benchutil import timed as _bench

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PROVIDERS = ("echofast_triton", "eager", "torch_compile")
LARGE = (32768, 2048)  # h of 64 Mi elements: 128 MiB in fp16


def lvdm_call_sites(windows: int, **site_args) -> Counter:
    """Shapes of h (the projection's output) of every GEGLU call of one LVDM step, with counts.
    ``site_args``: see :func:`benchutil.lvdm_call_sites`."""
    from echofast.nn.spatiotemporal import GEGLU

    return benchutil.lvdm_call_sites(
        GEGLU, windows, lambda _m, _args, out: (*out.shape[:-1], 2 * out.shape[-1]), **site_args
    )


def eager(h: torch.Tensor) -> torch.Tensor:
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate)


def providers() -> dict:
    from echofast.ops import geglu

    def fused(h):
        return geglu(h, backend="triton")

    return {"echofast_triton": fused, "eager": eager, "torch_compile": lambda: torch.compile(eager)}


def _forward(fn, h):
    def call():
        with torch.no_grad():
            fn(h)

    return call


def _backward(fn, h, dy):
    hg = h.detach().requires_grad_()
    return lambda: torch.autograd.grad(fn(hg), hg, dy)  # no .grad accumulation kernel


def run(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    copy_gbps = copy_bandwidth()
    card = torch.cuda.get_device_name()
    print(f"{card}: device copy {copy_gbps:.0f} GB/s", flush=True)
    cases: Counter = Counter()
    for windows in (1, 8):
        for shape, n in lvdm_call_sites(windows).items():
            cases[(shape, f"lvdm x{windows}")] += n
    cases[(LARGE, "large (>= 64 MiB)")] = 1
    rows = []
    for (shape, origin), count in sorted(cases.items(), key=str):
        h = torch.randn(shape, device="cuda", dtype=dtype)
        dy = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda", dtype=dtype)
        modes = [("forward", "eager"), ("forward", "graph")]
        if args.backward:
            modes.append(("forward+backward", "eager"))
        case_rows = []
        for mode, timing in modes:
            for name, fn in providers().items():
                if name not in args.providers:
                    continue
                if name == "torch_compile":
                    fn = fn()
                call = _forward(fn, h) if mode == "forward" else _backward(fn, h, dy)
                moved = (3 if mode == "forward" else 8) * dy.nbytes
                times = graph_timed(call) if timing == "graph" else _bench(call)
                if times is None:
                    continue
                med = times[0]
                gbps = moved / (med * 1e-3) / 1e9
                case_rows.append(
                    _row(
                        card,
                        origin,
                        count,
                        "x".join(map(str, shape)),
                        args.dtype,
                        mode,
                        name,
                        times,
                        moved,
                        copy_gbps,
                        timing,
                    )
                )
                print(
                    f"{origin:<18} {case_rows[-1]['shape']:<16} x{count:<3} {mode:<16} {timing:<5} "
                    f"{name:<15} "
                    f"{med * 1e3:8.1f} us {gbps:7.0f} GB/s ({gbps / copy_gbps:.0%} of copy)",
                    flush=True,
                )
        del h, dy
        _keep(args, rows, case_rows)
    if args.projection:
        for (shape, origin), count in sorted(cases.items(), key=str):
            if origin.startswith("lvdm"):
                _keep(args, rows, projection_rows(args, shape, origin, count, card, copy_gbps))
    return rows


def _keep(args, rows: list[dict], new: list[dict]) -> None:
    """Add one case's rows, appending them to ``--csv`` at once (a run stopped by a time limit
    keeps them)."""
    rows += new
    if args.csv and new:
        append_csv(args.csv, new)


def projection_rows(args, shape, origin, count, card, copy_gbps) -> list[dict]:
    """The projection + GEGLU of one call site, unfused (cuBLAS + the GEGLU kernel) and fused."""
    from echofast.ops import geglu, geglu_linear

    dtype = DTYPES[args.dtype]
    m, n = math.prod(shape[:-1]), shape[-1] // 2
    k = n // 4
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = (torch.randn(2 * n, k, device="cuda") / math.sqrt(k)).to(dtype)
    b = torch.randn(2 * n, device="cuda").to(dtype)
    fns = {
        "cublas+echofast_triton": lambda a: geglu(F.linear(a, w, b), backend="triton"),
        "echofast_fused_gemm": lambda a: geglu_linear(a, w, b, backend="triton"),
    }
    moved = (m * k + 2 * n * k + m * n) * x.element_size()
    rows = []
    for timing in ("eager", "graph"):
        for name, fn in fns.items():
            call = _forward(fn, x)
            times = graph_timed(call) if timing == "graph" else _bench(call)
            if times is None:
                continue
            row = _row(
                card,
                origin,
                count,
                f"{m}x{k}->{n}",
                args.dtype,
                "projection+geglu",
                name,
                times,
                moved,
                copy_gbps,
                timing,
            )
            row["tflops"] = 2 * m * k * 2 * n / (times[0] * 1e-3) / 1e12
            rows.append(row)
            print(
                f"{origin:<18} {rows[-1]['shape']:<16} x{count:<3} projection+geglu {timing:<5} "
                f"{name:<24} {times[0] * 1e3:8.1f} us {row['tflops']:6.1f} TFLOP/s",
                flush=True,
            )
    return rows


def _row(card, origin, count, shape, dtype, mode, backend, times, moved, copy_gbps, timing):
    """One CSV row: a provider's median/p20/p80 on one call site, and its bandwidth."""
    med, p20, p80 = times
    gbps = moved / (med * 1e-3) / 1e9
    return {
        "card": card,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "origin": origin,
        "calls_per_step": count,
        "shape": shape,
        "dtype": dtype,
        "mode": mode,
        "backend": backend,
        "median_ms": med,
        "p20_ms": p20,
        "p80_ms": p80,
        "min_bytes": moved,
        "gbps": gbps,
        "frac_copy": gbps / copy_gbps,
        "timing": timing,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--csv", type=Path, default=None, help="append rows to this CSV")
    parser.add_argument(
        "--no-projection",
        dest="projection",
        action="store_false",
        help="skip the projection+geglu comparison (cuBLAS + GEGLU kernel vs the fused GEMM)",
    )
    parser.add_argument(
        "--providers",
        type=benchutil.choice_list(PROVIDERS),
        default=list(PROVIDERS),
        help=f"comma-separated subset of {','.join(PROVIDERS)} for the GEGLU alone (default: all)",
    )
    parser.add_argument(
        "--backward", action="store_true", help="also time forward+backward (training)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_geglu.py needs a CUDA GPU (the CPU path is the torch reference)",
            file=sys.stderr,
        )
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
