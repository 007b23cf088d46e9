"""LayerNorm on a CUDA GPU: echofast's Triton kernel vs autocast's fp32 round trip vs
torch.compile, for half-precision activations with fp32 affine (the LVDM under autocast).

    python bench/bench_layer_norm.py [--dtype float16] [--csv bench/results/layer_norm.csv]

Shapes: the input x (tokens, C) of every LayerNorm of one full-config LVDM step (16×16 latents,
T = 64) recorded by forward hooks, at 1 and 8 windows, plus one x of 128 MiB.
Providers, each returning x's dtype:
  ``echofast_triton``  ``echofast.ops.layer_norm(backend="triton")``: one pass, fp32 math;
  ``autocast``         what CUDA autocast runs for ``nn.LayerNorm`` followed by the next Linear's
                       cast: ``F.layer_norm(x.float(), w, b).to(x.dtype)`` (three kernels);
  ``half_affine``      ``F.layer_norm`` on x with the affine cast to x's dtype (one PyTorch kernel,
                       not autocast's values: the affine is rounded);
  ``torch_compile``    inductor's fusion of the ``autocast`` function;
and for the transformer blocks' residual form (``h = x + branch``, then LayerNorm(h)):
  ``echofast_triton+add``  the same kernel adding the branch in its pass (ops.add_layer_norm),
                           h into a separate buffer so that replays do not accumulate;
  ``autocast+add``         ``torch.add(x, branch, out=h)``, then the ``autocast`` path.
Bandwidth = the minimum bytes (read x, write y: 2·x.nbytes; +add: read x and the branch, write h
and y: 4·x.nbytes) / median time, against a
device-to-device copy measured in the same run. ``eager`` timings are back-to-back calls;
``graph`` replays 16 calls from a CUDA graph (GPU time only, as in the pipelines' graph sampling).
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

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LARGE = (65536, 1024)  # 64 Mi elements: 128 MiB in fp16


def _rows(x: torch.Tensor) -> tuple[int, int]:
    return (x.numel() // x.shape[-1], x.shape[-1])


def lvdm_call_sites(windows: int, **site_args) -> Counter:
    """Input shapes (tokens, C) of every LayerNorm of one LVDM step, with counts: module calls
    and the residual-fused ones (``LayerNorm.add_forward``, which calls no module).
    ``site_args``: see :func:`benchutil.lvdm_call_sites`."""
    from echofast.nn import LayerNorm

    fused: Counter = Counter()
    real = LayerNorm.add_forward

    def counted(self, x, *args, **kwargs):
        fused[_rows(x)] += 1
        return real(self, x, *args, **kwargs)

    LayerNorm.add_forward = counted
    try:
        sites = benchutil.lvdm_call_sites(
            LayerNorm, windows, lambda _m, a, _o: _rows(a[0]), **site_args
        )
    finally:
        LayerNorm.add_forward = real
    return sites + fused


def autocast_path(x, w, b):
    return F.layer_norm(x.float(), x.shape[-1:], w, b).to(x.dtype)


def providers() -> dict:
    """{name: fn(x, branch, h, w, b)}; the +add ones write x + branch into h."""
    from echofast.kernels.layer_norm import layer_norm_fwd
    from echofast.ops import layer_norm

    def fused(x, _r, _h, w, b):
        return layer_norm(x, w, b, backend="triton")

    def fused_add(x, r, h, w, b):
        return layer_norm_fwd(x, w, b, 1e-5, residual=r, h_out=h)

    def autocast_add(x, r, h, w, b):
        return autocast_path(torch.add(x, r, out=h), w, b)

    def half_affine(x, _r, _h, w, b):
        return F.layer_norm(x, x.shape[-1:], w.to(x.dtype), b.to(x.dtype))

    compiled = torch.compile(autocast_path)
    return {
        "echofast_triton": fused,
        "autocast": lambda x, _r, _h, w, b: autocast_path(x, w, b),
        "half_affine": half_affine,
        "torch_compile": lambda x, _r, _h, w, b: compiled(x, w, b),
        "echofast_triton+add": fused_add,
        "autocast+add": autocast_add,
    }


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
    fns = providers()
    for (shape, origin), count in sorted(cases.items(), key=str):
        x = torch.randn(shape, device="cuda").mul_(3).add_(1).to(dtype)
        w = torch.randn(shape[-1], device="cuda").mul_(0.3).add_(1)
        b = torch.randn(shape[-1], device="cuda").mul_(0.3)
        r, h = torch.randn_like(x), torch.empty_like(x)
        for timing in ("eager", "graph"):
            for name, fn in fns.items():
                moved = (4 if name.endswith("+add") else 2) * x.nbytes

                def call(fn=fn, x=x, r=r, h=h, w=w, b=b):
                    with torch.no_grad():
                        fn(x, r, h, w, b)

                times = graph_timed(call) if timing == "graph" else _bench(call)
                if times is None:
                    continue
                med, p20, p80 = times
                gbps = moved / (med * 1e-3) / 1e9
                rows.append(
                    {
                        "card": card,
                        "torch": torch.__version__,
                        "cuda": torch.version.cuda,
                        "git_sha": git_sha(),
                        "origin": origin,
                        "calls_per_step": count,
                        "shape": "x".join(map(str, shape)),
                        "dtype": args.dtype,
                        "timing": timing,
                        "backend": name,
                        "median_ms": med,
                        "p20_ms": p20,
                        "p80_ms": p80,
                        "min_bytes": moved,
                        "gbps": gbps,
                        "frac_copy": gbps / copy_gbps,
                    }
                )
                print(
                    f"{origin:<18} {rows[-1]['shape']:<12} x{count:<3} {timing:<5} {name:<15} "
                    f"{med * 1e3:8.1f} us {gbps:7.0f} GB/s ({gbps / copy_gbps:.0%} of copy)",
                    flush=True,
                )
        del x, r, h
    summarize(rows)
    return rows


def summarize(rows: list[dict]) -> None:
    """Per LVDM step (calls x median, graph timings): each provider's total and its ratio to
    the autocast path."""
    totals: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["origin"].startswith("lvdm") and r["timing"] == "graph":
            key = (r["origin"], r["backend"])
            totals[key] = totals.get(key, 0.0) + r["calls_per_step"] * r["median_ms"]
    for origin in sorted({o for o, _ in totals}):
        for (o, name), ms in sorted(totals.items()):
            if o == origin:
                base = totals.get((origin, "autocast+add" if name.endswith("+add") else "autocast"))
                ratio = f"{base / ms:5.2f}x vs autocast" if base else ""
                print(f"{origin}: LayerNorms of one step, {name:<15} {ms:8.3f} ms  {ratio}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--csv", type=Path, default=None, help="append rows to this CSV")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_layer_norm.py needs a CUDA GPU (the CPU path is PyTorch's own kernel)",
            file=sys.stderr,
        )
        return 2
    rows = run(args)
    if args.csv:
        append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
