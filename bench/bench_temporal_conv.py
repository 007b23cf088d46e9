"""The temporal resnets' (3, 1, 1) convolution in other forms than the models' (3, 1) Conv2d over
(T, H·W), on a CUDA GPU, at the LVDM's call sites: decides ``TEMPORAL_GEMMS_DEVICES`` and
``TEMPORAL_GEMMS_MAX_DIM`` (echofast/nn/spatiotemporal.py).

    python bench/bench_temporal_conv.py [--dtype float16] [--windows 5 40] [--csv FILE]

Why: in the third H100 lease (2026-11-27, git 3a36557) the 10 such convolutions at C = 128
(5 windows of 64 frames of 16×16) took 0.66 ms of a 15.7-ms UNet call on cuDNN's
``sm80_xmma_fprop_implicit_gemm_indexed_wo_smem`` kernel, about 120 TFLOP/s, where the call's
3×3 convolutions ran on sm90 kernels at several times that rate.

Sites: the (B, C, T, H, W) input of every temporal convolution of one LVDM call at each
``--windows`` count (the real config, two per temporal resnet), counted. Providers, each
``x`` (B, C, T, H, W) channels-last-3d (as the UNet holds it), ``weight`` (C, C, 3, 1, 1),
``bias`` (C,) → y (B, C, T, H, W):

* ``conv2d``: ``echofast.nn.spatiotemporal.temporal_conv2d``, the models' path elsewhere;
* ``conv3d``: ``F.conv3d`` on the channels-last-3d input (cuDNN's 3-D kernels);
* ``conv3d_ncdhw``: ``F.conv3d`` on a contiguous (B, C, T, H, W) copy (the copies the models
  would need, in and out, are not timed: a bound on what another layout could give);
* ``three_gemms``: ``echofast.nn.spatiotemporal.temporal_conv_gemms`` (the models' path on
  ``TEMPORAL_GEMMS_DEVICES``): the tokens (B, T·H·W, C) times each tap, ``addmm`` for the centre
  tap and the bias into y, then two ``baddbmm_`` that add the previous and next frames'
  products into y's rows shifted by H·W (3 cuBLAS GEMMs, no temporaries).

Every provider is checked against ``F.conv3d`` in fp32 on fresh inputs first (its error within
2× that of ``conv2d`` plus 1e-4, relative to the reference's largest value), then timed as in the
pipelines' CUDA graphs (:func:`benchutil.graph_timed`). TFLOP/s count 2·B·T·H·W·C·3C. The summary
prints, per windows count and provider, the total per UNet call and its ratio to ``conv2d``, then
per map width the GEMMs' ratio and the settings that follow (``TEMPORAL_GEMMS_MAX_DIM``).
"""

from __future__ import annotations

import math
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from benchutil import graph_timed, per_call_summary, print_rate, site_bench_main

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def lvdm_sites(windows: int, **site_args) -> Counter:
    """(B, C, T, H, W) of every temporal convolution of one LVDM call, counted (read by wrapping
    ``TemporalResnetBlock._conv`` while the call runs). ``site_args``: see
    :func:`benchutil.lvdm_call_sites`."""
    import benchutil

    from echofast.nn.spatiotemporal import TemporalResnetBlock

    sites: Counter = Counter()
    original = TemporalResnetBlock._conv

    def counted(conv, x, *, bias=True):
        sites[tuple(x.shape)] += 1
        return original(conv, x, bias=bias)

    TemporalResnetBlock._conv = staticmethod(counted)
    try:
        benchutil.lvdm_call_sites(TemporalResnetBlock, windows, lambda *_: None, **site_args)
    finally:
        TemporalResnetBlock._conv = staticmethod(original)
    return sites


def operands(shape: tuple, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Random x (channels-last-3d), weight and bias for one site, fp32 copies beside them."""
    b, c, t, h, w = shape
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(b, c, t, h, w, generator=g, device=device)
    weight = torch.randn(c, c, 3, 1, 1, generator=g, device=device) / math.sqrt(3 * c)
    bias = torch.randn(c, generator=g, device=device) * 0.1
    x = x.to(memory_format=torch.channels_last_3d)
    low = {"x": x.to(dtype), "weight": weight.to(dtype), "bias": bias.to(dtype)}
    return low | {"fp32": {"x": x, "weight": weight, "bias": bias}}


def providers() -> dict:
    """name -> fn(x, weight, bias) -> y, see the module docstring."""
    from echofast.nn.spatiotemporal import temporal_conv2d, temporal_conv_gemms

    def conv3d(x, weight, bias):
        return F.conv3d(x, weight, bias, padding=(1, 0, 0))

    return {
        "conv2d": temporal_conv2d,
        "conv3d": conv3d,
        "conv3d_ncdhw": conv3d,
        "three_gemms": temporal_conv_gemms,
    }


def inputs_for(name: str, ops: dict) -> tuple:
    x = ops["x"].contiguous() if name == "conv3d_ncdhw" else ops["x"]
    return x, ops["weight"], ops["bias"]


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def check(found: dict, ops: dict) -> dict[str, float]:
    """Each provider's error against ``F.conv3d`` in fp32 (relative to its largest value)."""
    fp32 = ops["fp32"]
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref = F.conv3d(fp32["x"], fp32["weight"], fp32["bias"], padding=(1, 0, 0))
        return {name: rel_error(fn(*inputs_for(name, ops)), ref) for name, fn in found.items()}


def accepted(errors: dict[str, float]) -> dict[str, bool]:
    """A provider passes with an error within 2× the Conv2d form's plus 1e-4 (the project's bound
    for half precision: within 2× plain PyTorch's error)."""
    bound = 2 * errors["conv2d"] + 1e-4
    return {name: err <= bound for name, err in errors.items()}


def run(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    card = torch.cuda.get_device_name()
    unit = lvdm_sites(1)
    found = providers()
    rows = []
    for windows in args.windows:
        for (b1, c, t, h, w), count in sorted(unit.items()):
            shape = (b1 * windows, c, t, h, w)
            ops = operands(shape, dtype, "cuda", seed=c + h)
            errors = check(found, ops)
            ok = accepted(errors)
            for name, fn in found.items():
                row = {"card": card, "dtype": args.dtype, "windows": windows, "count": count}
                row |= {"b": shape[0], "c": c, "t": t, "h": h, "w": w, "provider": name}
                row |= {"rel_error": errors[name], "status": "ok" if ok[name] else "wrong"}
                rows.append(row)
                if not ok[name]:
                    print(f"  {name} at {shape}: wrong (rel error {errors[name]:.2e})")
                    continue
                args_ = inputs_for(name, ops)

                def call(fn=fn, args_=args_):
                    with torch.no_grad():
                        fn(*args_)

                times = graph_timed(call, calls=4)
                if times is None:
                    row["status"] = "not-capturable"
                    continue
                row["median_ms"], row["p20_ms"], row["p80_ms"] = times
                flops = 2 * shape[0] * t * h * w * c * 3 * c
                site = f"{shape[0]}x{c}x{t}x{h}x{w}"
                print_rate(row, flops, f"w={windows:<3} {site} x{count:<3} {name:<13}")
            del ops
            torch.cuda.empty_cache()
    return rows


def by_width(rows: list[dict], provider: str = "three_gemms", base: str = "conv2d") -> dict:
    """{C: {windows: (base's time / provider's time, convolutions per call)}} over the sites of
    width C where both were timed (ratios above 1: the provider is faster)."""
    totals: dict[tuple[int, int, str], float] = {}
    counts: dict[tuple[int, int], int] = {}
    for r in rows:
        if r["status"] == "ok" and r["provider"] in (provider, base):
            key = (r["c"], r["windows"], r["provider"])
            totals[key] = totals.get(key, 0.0) + r["count"] * r["median_ms"]
            if r["provider"] == base:
                counts[r["c"], r["windows"]] = counts.get((r["c"], r["windows"]), 0) + r["count"]
    out: dict[int, dict[int, tuple[float, int]]] = {}
    for (c, windows, name), total in sorted(totals.items()):
        if name == provider and (c, windows, base) in totals:
            ratio = totals[c, windows, base] / total
            out.setdefault(c, {})[windows] = (ratio, counts[c, windows])
    return out


def width_decision(rows: list[dict]) -> list[str]:
    """The three GEMMs against the Conv2d form per map width, and the settings that follow: the
    widest C up to which the GEMMs were timed and won at every width and windows count
    (``TEMPORAL_GEMMS_MAX_DIM``), with the kernels it adds per UNet call (two per convolution)."""
    widths = by_width(rows)
    lines = []
    for c, per_windows in widths.items():
        ratios = ", ".join(f"{r:.2f}x at {w} windows" for w, (r, _) in per_windows.items())
        lines.append(f"C = {c:<4} three_gemms {ratios} (conv2d's time / its time)")
    timed = {r["windows"] for r in rows}
    limit, convs = None, 0
    for c, per_windows in widths.items():
        if set(per_windows) != timed or not all(r > 1 for r, _ in per_windows.values()):
            break
        limit, convs = c, convs + max(n for _, n in per_windows.values())
    if limit is not None:
        lines.append(
            f"-> TEMPORAL_GEMMS_DEVICES = {{'cuda'}}, TEMPORAL_GEMMS_MAX_DIM = {limit} "
            f"({convs} convolutions per UNet call, {2 * convs} kernels more)"
        )
    elif widths:
        lines.append("-> TEMPORAL_GEMMS_DEVICES stays empty (the GEMMs lost at the narrowest maps)")
    return lines


def summary(rows: list[dict]) -> list[str]:
    """Per windows count and provider: the total per UNet call and its ratio to ``conv2d``'s
    (see :func:`benchutil.per_call_summary`), then :func:`width_decision`."""
    lines = per_call_summary(rows, ("b", "c", "t", "h", "w"), "conv2d", width=13)
    return lines + width_decision(rows)


def main(argv: list[str] | None = None) -> int:
    return site_bench_main(__doc__, "bench_temporal_conv.py", run, summary, DTYPES, argv)


if __name__ == "__main__":
    sys.exit(main())
