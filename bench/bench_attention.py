"""Attention on a CUDA GPU at the LVDM's and LIDM's real shapes: echofast's Triton kernel vs every
SDPA backend (flash, efficient, cuDNN, math), xformers (when loadable) and the torch reference.

    python bench/bench_attention.py [--dtype float16] [--windows 5,40,64] [--lidm-batch 1,32]
                                    [--sweep] [--csv bench/results/attention.csv]

Shapes (forward, no mask), from the full configs (16×16 latents, head dim 16; LIDM head dim 8):
LVDM temporal attention over T = 64 frames (and T = 16) for every latent position of every window,
spatial attention over 256/64/16/4 tokens of every frame, at ``--windows`` windows per UNet call
(5 = one 192-frame video, 40 = a batch of 8 videos, 64: 131,072 temporal sequences); LIDM
self-attention over 256/64/16/4 tokens at ``--lidm-batch`` images. Q, K and V are strided views
of one (N, L, 3·heads·D) tensor, the layout of the model's fused QKV projection. Every backend
is first checked against the fp32 reference on a sample of sequences, then timed with
``triton.testing.do_bench`` (median, p20, p80; it flushes L2 before every run, so inputs never
sit in cache; inputs are random, never zeros).
Units: TFLOP/s (4·N·heads·Lq·Lk·D) and GB/s (Q, K, V read once, O written once), against a large
fp16 GEMM and a device-to-device copy measured in the same run. The summary gives, per shape and
per LVDM step, triton's speed-up over the fastest SDPA backend (issue 7's goal: ≥ 1.5×).
``--sweep`` also times the kernel's other tile sizes (32, 128) and persistent-grid sizes (2, 4, 16
programs per SM, or one program per group) to tune ``TILE`` and ``PROGRAMS_PER_SM`` in
``kernels/attention.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from benchutil import append_csv, copy_bandwidth, git_sha, graph_timed
from benchutil import timed as _bench

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GRAPH_TIMED = ("triton", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
"""Providers also timed from a CUDA graph (GPU time only, as in the pipelines' graph sampling):
eager timings of the small LIDM shapes measure the host's launch overhead. ``--sweep``'s Triton
variants are graph-timed too."""

# full LVDM (tests/support/configs.py): channels / heads per level, head dim 16
LVDM_LEVELS = [(16, 128, 8, 5), (8, 256, 16, 5), (4, 256, 16, 5), (2, 512, 32, 1)]
"""(latent side, channels, heads, transformers per UNet call) for levels 0-2 and the mid block;
each transformer runs one spatial and one temporal self-attention (its cross-attentions take the
exact single-key path, no attention op)."""
LIDM_LEVELS = [(16, 128, 16, 5), (8, 256, 32, 5), (4, 256, 32, 5), (2, 512, 64, 1)]
"""(side, channels, heads = channels / 8, attention calls per UNet call) of the LIDM."""


@dataclass(frozen=True)
class Case:
    origin: str
    n: int
    heads: int
    length: int
    head_dim: int
    calls_per_step: int

    @property
    def flops(self) -> float:
        return 4.0 * self.n * self.heads * self.length * self.length * self.head_dim

    def nbytes(self, elem: int) -> int:
        return 4 * self.n * self.heads * self.length * self.head_dim * elem

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.heads}x{self.length}x{self.head_dim}"


def cases(windows: list[int], lidm_batches: list[int]) -> list[Case]:
    out = []
    for w in windows:
        for frames in (64, 16):
            for side, _c, heads, calls in LVDM_LEVELS:
                tag = f"lvdm w={w} T={frames} {side}x{side}"
                out.append(Case(f"{tag} temporal", w * side * side, heads, frames, 16, calls))
                if frames == 64:
                    out.append(Case(f"{tag} spatial", w * frames, heads, side * side, 16, calls))
    for b in lidm_batches:
        for side, _c, heads, calls in LIDM_LEVELS:
            out.append(Case(f"lidm b={b} {side}x{side}", b, heads, side * side, 8, calls))
    return out


def inputs(case: Case, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    inner = case.heads * case.head_dim
    qkv = torch.randn(case.n, case.length, 3 * inner, device="cuda", generator=g).to(dtype)
    return tuple(
        t.view(case.n, case.length, case.heads, case.head_dim).transpose(1, 2)
        for t in qkv.split(inner, dim=-1)
    )


def providers(sweep: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from echofast.ops import attention, attention_reference

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    out = {
        "triton": lambda q, k, v: attention(q, k, v, backend="triton"),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_math": sdpa(SDPBackend.MATH),
        "torch_reference": attention_reference,
    }
    try:
        import xformers.ops as xops

        out["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"xformers not loadable ({type(e).__name__}: {e}); skipped", flush=True)
    if sweep:
        from echofast.kernels.attention import _sm_count, attention_fwd

        def variant(tile=None, per_sm=None):
            def run(q, k, v):
                programs = None if per_sm is None else _sm_count(q.device.index) * per_sm
                if per_sm == 0:
                    programs = q.shape[0] * q.shape[1]  # one group per program: not persistent
                scale = 1 / math.sqrt(q.shape[-1])
                return attention_fwd(q, k, v, scale, tile=tile, max_programs=programs)

            return run

        for tile in (32, 128):
            out[f"triton_tile{tile}"] = variant(tile=tile)
        for per_sm in (2, 4, 16, 0):
            name = f"triton_{per_sm}_per_sm" if per_sm else "triton_group_per_program"
            out[name] = variant(per_sm=per_sm)
    return out


def floors() -> tuple[float, float]:
    """(device copy GB/s, fp16 GEMM TFLOP/s) measured now, on this card."""
    copy_gbps = copy_bandwidth()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    med, _, _ = _bench(lambda: a @ b)
    return copy_gbps, 2 * 8192**3 / (med * 1e-3) / 1e12


def check(fn, q, k, v) -> float:
    """Max error vs the fp32 reference on up to 256 sequences, relative to max |reference|."""
    from echofast.ops import attention_reference

    idx = torch.randperm(q.shape[0], device="cuda")[:256]
    out = fn(q, k, v)[idx].float()
    ref = attention_reference(q[idx].float(), k[idx].float(), v[idx].float())
    return ((out - ref).abs().max() / ref.abs().max()).item()


def run(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    copy_gbps, gemm_tflops = floors()
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {copy_gbps:.0f} GB/s, fp16 GEMM {gemm_tflops:.0f} TFLOP/s", flush=True)
    windows = [int(w) for w in args.windows.split(",") if w]
    batches = [int(b) for b in args.lidm_batch.split(",") if b]
    import triton

    common = {
        "card": card,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "dtype": args.dtype,
        "copy_gbps": copy_gbps,
        "gemm_tflops": gemm_tflops,
    }
    rows = []
    for i, case in enumerate(cases(windows, batches)):
        q, k, v = inputs(case, dtype, seed=i)
        for name, fn in providers(args.sweep).items():
            if name == "torch_reference" and case.n * case.heads * case.length**2 > 2**31:
                continue  # its (N, heads, L, L) fp32 scores would not fit
            call = lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)  # noqa: E731
            try:
                err = check(fn, q, k, v)
                med, p20, p80 = _bench(call)
            except (RuntimeError, torch.OutOfMemoryError) as e:
                print(f"{case.origin:<34} {name:<16} unavailable: {str(e).splitlines()[0][:90]}")
                continue
            graph = graph_timed(call) if name in GRAPH_TIMED or name.startswith("triton") else None
            tflops = case.flops / (med * 1e-3) / 1e12
            gbps = case.nbytes(q.element_size()) / (med * 1e-3) / 1e9
            rows.append(
                {
                    **common,
                    "origin": case.origin,
                    "calls_per_step": case.calls_per_step,
                    "shape": case.shape,
                    "backend": name,
                    "median_ms": med,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "tflops": tflops,
                    "gbps": gbps,
                    "frac_copy": gbps / copy_gbps,
                    "max_rel_err": err,
                    "graph_median_ms": graph[0] if graph else "",
                    "graph_p20_ms": graph[1] if graph else "",
                    "graph_p80_ms": graph[2] if graph else "",
                }
            )
            print(
                f"{case.origin:<34} {case.shape:<18} {name:<16} {med * 1e3:9.1f} us "
                f"{tflops:6.1f} TFLOP/s {gbps:6.0f} GB/s ({gbps / copy_gbps:4.0%} of copy) "
                f"err {err:.1e}" + (f", graph {graph[0] * 1e3:.1f} us" if graph else ""),
                flush=True,
            )
        del q, k, v
    summarize(rows)
    return rows


def summarize(rows: list[dict]) -> None:
    """Triton vs the fastest SDPA backend, per shape and per LVDM/LIDM step: by the eager timings
    and by the CUDA-graph ones (GPU time, what the pipelines' graph sampling sees)."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(r["origin"], {})[r["backend"]] = r
    for key, what in (("median_ms", "eager timings"), ("graph_median_ms", "CUDA-graph timings")):
        step: dict[str, list[float]] = {}
        print(f"\nspeed-up of triton over the fastest SDPA backend, {what} (goal >= 1.5x):")
        for origin, res in by_case.items():
            sdpa = {k: r[key] for k, r in res.items() if k.startswith("sdpa_") and r[key] != ""}
            if "triton" not in res or res["triton"][key] == "" or not sdpa:
                continue
            best = min(sdpa, key=sdpa.get)
            ratio = sdpa[best] / res["triton"][key]
            print(f"  {origin:<34} {ratio:5.2f}x  (vs {best})")
            group = origin.split(" ")[0] + " " + origin.split(" ")[1]
            if "T=16" not in origin:
                calls = res["triton"]["calls_per_step"]
                acc = step.setdefault(group, [0.0, 0.0])
                acc[0] += calls * res["triton"][key]
                acc[1] += calls * sdpa[best]
        for group, (tri, best) in step.items():
            print(
                f"  per UNet step, {group:<14} triton {tri:.3f} ms, best SDPA {best:.3f} ms: "
                f"{best / tri:.2f}x"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--windows", default="5,40,64", help="LVDM windows per UNet call")
    parser.add_argument("--lidm-batch", default="1,32", help="LIDM images per UNet call")
    parser.add_argument(
        "--sweep", action="store_true", help="also time other tile sizes and grid sizes"
    )
    parser.add_argument("--csv", type=Path, default=None, help="append rows to this CSV")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_attention.py needs a CUDA GPU (on CPU attention runs sdpa or the reference)",
            file=sys.stderr,
        )
        return 2
    rows = run(args)
    if args.csv and rows:
        append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
