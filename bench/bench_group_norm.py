"""GroupNorm(+SiLU) on a CUDA GPU: echofast's Triton kernel vs eager PyTorch vs torch.compile.

    python bench/bench_group_norm.py [--dtype float16] [--providers ...] [--backward] [--csv FILE]

Shapes: every GroupNorm call site of one full-config LVDM step (16×16 latents, T=64) recorded by
forward hooks, at 1 and 8 windows, plus one >= 64 MiB tensor. Modes: forward, and with
``--backward`` forward+backward. Providers: ``echofast_triton`` (the op's choice: the channels-last
rows kernel where it applies), ``echofast_triton_groups`` (the per-group kernels forced, forward
only), ``eager`` (F.group_norm + F.silu), ``torch_compile``; ``--providers`` picks a subset.
Bandwidth = bytes read and written once (fwd: x + y; fwd+bwd: adds dy, x again and dx) / median
time, reported against a device-to-device copy measured in the same run. Times are
``triton.testing.do_bench`` medians with p20/p80; inputs are random (never zeros). Two timings per
forward: ``eager`` (back-to-back calls: for the model's small tensors this measures the host's
launch and dispatch time, not the GPU's) and ``graph`` (16 calls replayed from a CUDA graph: GPU
time only, as in the pipelines' CUDA-graph sampling); forward+backward is timed eagerly. Goals
(issue 6): >= 80 % of copy bandwidth on the large tensor, >= 3x eager on the model's shapes.
torch.compile compiles once with dynamic shapes (a compile per shape would take minutes). Rows
are appended to ``--csv`` after every shape, so a run stopped by a time limit keeps them.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import benchutil
import torch
import torch.nn.functional as F
from benchutil import append_csv, copy_bandwidth, git_sha, graph_timed
from benchutil import timed as _bench

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PROVIDERS = ("echofast_triton", "echofast_triton_groups", "eager", "torch_compile")
provider_list = benchutil.choice_list(PROVIDERS)


def lvdm_call_sites(windows: int, **site_args) -> Counter:
    """(shape, groups, eps, activation, channels_last) of every GroupNorm call, with counts.
    ``site_args``: see :func:`benchutil.lvdm_call_sites`."""
    from echofast.nn import GroupNorm

    def key(module, args, _out):
        x = args[0]
        cl = x.dim() > 3 and not x.is_contiguous()
        return (tuple(x.shape), module.num_groups, module.eps, module.activation, cl)

    return benchutil.lvdm_call_sites(GroupNorm, windows, key, **site_args)


def providers(groups: int, eps: float, activation: str | None):
    from echofast.ops import group_norm

    def eager(x, w, b):
        y = F.group_norm(x, groups, w, b, eps)
        return F.silu(y) if activation == "silu" else y

    def fused(x, w, b):
        return group_norm(x, groups, w, b, eps, activation=activation, backend="triton")

    def per_group(x, w, b):
        """The per-group kernels even where the channels-last rows kernel would run."""
        from echofast.kernels.group_norm import group_norm_fwd

        fmt = _memory_format(x)
        return group_norm_fwd(x, groups, w, b, eps, activation, None, None, fmt, use_rows=False)

    return {
        "echofast_triton": fused,
        "echofast_triton_groups": per_group,
        "eager": eager,
        "torch_compile": lambda: torch.compile(eager, dynamic=True),
    }


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _forward(fn, x, w, b):
    return lambda: fn(x, w, b)


def _backward(fn, x, w, b, dy):
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
    return lambda: fn(xg, wg, bg).backward(dy)


def run(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    copy_gbps = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy {copy_gbps:.0f} GB/s", flush=True)
    cases: Counter = Counter()
    for windows in (1, 8):
        for key, n in lvdm_call_sites(windows).items():
            cases[key + (f"lvdm x{windows}",)] += n
    cases[((2, 256, 64, 32, 32), 32, 1e-6, "silu", False, "large 64 MiB (fp16)")] = 1
    rows = []
    for (shape, groups, eps, act, cl, origin), count in sorted(cases.items(), key=str):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        if cl:
            x = x.contiguous(
                memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            )
        w = torch.randn(shape[1], device="cuda", dtype=dtype)
        b = torch.randn(shape[1], device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        case_rows = []
        modes = [("forward", "eager"), ("forward", "graph")]
        if args.backward:
            modes.append(("forward+backward", "eager"))
        for mode, timing in modes:
            for name, fn in providers(groups, eps, act).items():
                if name not in args.providers or (mode != "forward" and name.endswith("_groups")):
                    continue  # not asked for, or a kernel-level call (no autograd)
                if name == "torch_compile":
                    fn = fn()
                if mode == "forward":
                    call = _forward(fn, x, w, b)
                    times = _bench(call) if timing == "eager" else graph_timed(call)
                else:
                    times = _bench(_backward(fn, x, w, b, dy))
                if times is None:
                    continue
                med, p20, p80 = times
                moved = (2 if mode == "forward" else 5) * x.nbytes
                gbps = moved / (med * 1e-3) / 1e9
                case_rows.append(
                    {
                        "card": torch.cuda.get_device_name(),
                        "torch": torch.__version__,
                        "cuda": torch.version.cuda,
                        "git_sha": git_sha(),
                        "origin": origin,
                        "calls_per_step": count,
                        "shape": "x".join(map(str, shape)),
                        "groups": groups,
                        "activation": act or "",
                        "channels_last": cl,
                        "dtype": args.dtype,
                        "mode": mode,
                        "backend": name,
                        "median_ms": med,
                        "p20_ms": p20,
                        "p80_ms": p80,
                        "gbps": gbps,
                        "frac_copy": gbps / copy_gbps,
                        "timing": timing,
                    }
                )
                print(
                    f"{origin:<20} {case_rows[-1]['shape']:<18} G={groups:<3} {mode:<16} "
                    f"{timing:<5} {name:<15} {med * 1e3:8.1f} us {gbps:7.0f} GB/s "
                    f"({gbps / copy_gbps:.0%} of copy)",
                    flush=True,
                )
        if args.csv:
            append_csv(args.csv, case_rows)
        rows += case_rows
    summarize(rows)
    return rows


def summarize(rows: list[dict]) -> None:
    """GPU time per LVDM step (graph timings times the calls per step) of each provider, the
    fused op's speed-up over eager, and each provider's fraction of copy bandwidth on the large
    tensor (graph timing)."""
    total: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["timing"] == "graph":
            key = (r["origin"], r["backend"])
            total[key] = total.get(key, 0.0) + r["calls_per_step"] * r["median_ms"]
    print("\nGroupNorm GPU time per LVDM step (CUDA-graph timings x calls per step):")
    for origin in sorted({o for o, _ in total}):
        parts = [f"{b} {t:.3f} ms" for (o, b), t in sorted(total.items()) if o == origin]
        ours, eager = total.get((origin, "echofast_triton")), total.get((origin, "eager"))
        ratio = f"; eager / triton {eager / ours:.2f}x" if ours and eager else ""
        print(f"  {origin:<20} " + ", ".join(parts) + ratio)
    for r in rows:
        if r["timing"] == "graph" and r["origin"].startswith("large"):
            print(f"  large tensor, {r['backend']}: {r['frac_copy']:.0%} of copy bandwidth")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--csv", type=Path, default=None, help="append rows to this CSV")
    parser.add_argument(
        "--backward", action="store_true", help="also time forward+backward (training)"
    )
    parser.add_argument(
        "--providers",
        type=provider_list,
        default=list(PROVIDERS),
        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_group_norm.py needs a CUDA GPU (the CPU path is the torch reference)",
            file=sys.stderr,
        )
        return 2
    # guards differ per eps/activation/grad mode (torch 2.5 names the limit cache_size_limit)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, 64)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
