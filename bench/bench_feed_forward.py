"""The one-kernel GEGLU feed-forward (``echofast.ops.feed_forward``) against the models' two-GEMM
path on a CUDA GPU, at the LVDM's feed-forward call sites: decides ``FUSED_FF_DEVICES`` and
``FUSED_FF_MAX_DIM`` (echofast/nn/spatiotemporal.py).

    python bench/bench_feed_forward.py [--dtype float16] [--windows 5 40] [--csv FILE]

Sites: the (M, C, I) of every feed-forward of one LVDM call at each ``--windows`` count (5: the
pipelines' batch-1 call, 40: batch 8), from forward hooks on the GEGLU projections of the real
config, counted; the mid block's (C = 512) is left out (the kernel holds rows up to 256 wide).
Each site is timed in the ``add_to`` form the transformer blocks use for two of their three
feed-forwards, ``h += ff(x)`` with h already holding the output bias:

* ``two_gemms``: the models' path today: the GEGLU GEMM (``ops.geglu_linear``, Triton, tiles from
  the tuned table) writes g (M, I), then cuBLAS's ``addmm_`` reads it and accumulates into h;
* ``fused``: ``ops.feed_forward(x, ..., residual=h, out=h)``, one kernel (g stays on chip), with
  its default tiles; ``fused_m64w4`` and ``fused_s2``: the same kernel with 64-row tiles over 4
  warps, or 2 pipeline stages instead of the default's 3 (sites with N = 128 only: at 256 they
  spill or overflow shared memory).

Every provider is checked against ``two_gemms`` on fresh inputs first (relative max error <=
2e-2 at fp16), then timed as in the pipelines' CUDA graphs (:func:`benchutil.graph_timed`).
TFLOP/s count both products, 2·M·C·2I + 2·M·I·N. The summary prints, per windows count and
provider, the total per UNet call over the sites that provider was measured at and its ratio to
``two_gemms`` over the same sites.
"""

from __future__ import annotations

import math
import sys
from collections import Counter

import torch
from benchutil import graph_timed, per_call_summary, print_rate, site_bench_main

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
ALTERNATIVES = {
    "fused_m64w4": {"BLOCK_M": 64, "BLOCK_I": 64, "num_warps": 4, "num_stages": 2},
    "fused_s2": {"BLOCK_M": 128, "BLOCK_I": 64, "num_warps": 8, "num_stages": 2},
}


def lvdm_sites(windows: int, **site_args) -> Counter:
    """(M, C, I) of every feed-forward of one LVDM call, counted (from the GEGLU projections:
    every FeedForward starts with one). ``site_args``: see :func:`benchutil.lvdm_call_sites`."""
    import benchutil

    from echofast.nn.spatiotemporal import GEGLU

    def key(module, args, out):
        return (math.prod(args[0].shape[:-1]), args[0].shape[-1], out.shape[-1])

    return benchutil.lvdm_call_sites(GEGLU, windows, key, **site_args)


def operands(m: int, c: int, inner: int, dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator("cuda").manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    return {
        "x": draw(m, c),
        "w1": draw(2 * inner, c, scale=1 / math.sqrt(c)),
        "b1": draw(2 * inner, scale=0.1),
        "w2": draw(c, inner, scale=1 / math.sqrt(inner)),
        "h": draw(m, c),
    }


def providers(n: int) -> dict:
    """name -> fn(x, w1, b1, w2, h): ``h += ff(x)`` in place."""
    from echofast.kernels.feed_forward import feed_forward_fwd
    from echofast.ops import feed_forward, geglu_linear

    def two_gemms(x, w1, b1, w2, h):
        g = geglu_linear(x, w1, b1, backend="triton")
        h.addmm_(g, w2.t())

    def fused(x, w1, b1, w2, h):
        feed_forward(x, w1, b1, w2, None, residual=h, out=h, backend="triton")

    def variant(config):
        return lambda x, w1, b1, w2, h: feed_forward_fwd(x, w1, b1, w2, None, h, h, config=config)

    found = {"two_gemms": two_gemms, "fused": fused}
    if n <= 128:
        found |= {name: variant(config) for name, config in ALTERNATIVES.items()}
    return found


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def measure(fn, ops: dict, ref: torch.Tensor) -> dict:
    """Check ``fn`` (``h += ff(x)``) against ``ref`` on a fresh h, then time it in CUDA graphs."""
    args = [ops[k] for k in ("x", "w1", "b1", "w2")]
    h = ops["h"].clone()
    with torch.no_grad():
        fn(*args, h)
    diff = rel_diff(h, ref)
    if diff > 2e-2:
        return {"status": "wrong", "rel_diff": diff}

    def call():
        with torch.no_grad():
            fn(*args, h)

    times = graph_timed(call, calls=4)
    if times is None:
        return {"status": "not-capturable", "rel_diff": diff}
    med, p20, p80 = times
    return {"status": "ok", "rel_diff": diff, "median_ms": med, "p20_ms": p20, "p80_ms": p80}


def run(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    card = torch.cuda.get_device_name()
    unit = lvdm_sites(1)
    rows = []
    for windows in args.windows:
        for (m1, c, inner), count in sorted(unit.items()):
            if c > 256:
                print(f"  C = {c} ({count} per call): not the kernel's (rows up to 256 wide)")
                continue
            m = m1 * windows
            ops = operands(m, c, inner, dtype, seed=m + c)
            found = providers(c)
            ref = ops["h"].clone()
            with torch.no_grad():
                found["two_gemms"](ops["x"], ops["w1"], ops["b1"], ops["w2"], ref)
            for name, fn in found.items():
                row = {"card": card, "dtype": args.dtype, "windows": windows, "m": m, "c": c}
                row |= {"i": inner, "count": count, "provider": name, **measure(fn, ops, ref)}
                rows.append(row)
                if row["status"] != "ok":
                    print(f"  {name} at {m}x{c}->{inner}: {row['status']}", flush=True)
                    continue
                flops = 2 * m * c * 2 * inner + 2 * m * inner * c
                site = f"{m:>7}x{c}->{inner:<5}"
                print_rate(row, flops, f"w={windows:<3} {site} x{count:<3} {name:<12} ")
            del ops
            torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Per windows count and provider: the total per UNet call and its ratio to ``two_gemms``'
    (see :func:`benchutil.per_call_summary`)."""
    return per_call_summary(rows, ("m", "c"), "two_gemms")


def main(argv: list[str] | None = None) -> int:
    return site_bench_main(__doc__, "bench_feed_forward.py", run, summary, DTYPES, argv)


if __name__ == "__main__":
    sys.exit(main())
