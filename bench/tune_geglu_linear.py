"""Tune the tiles of the GEGLU projection GEMM (``kernels/geglu_linear.py``) on a CUDA GPU.

    python bench/tune_geglu_linear.py [--dtype float16] [--windows 5 40] [--budget-s 150]
        [--csv FILE] [--write-table kernels/geglu_linear_tuned.json] [--min-gain 0.03]

Why: the fused GEGLU GEMM is about a quarter of the LVDM's FLOPs (every feed-forward's first
projection, K = C = 128-512 and 2N = 8·C), and the H100 lease of 2026-11-26 timed it with the
default tiles at 160-240 TFLOP/s on the large call sites, a quarter of a large GEMM's rate.
Small K leaves each program few K steps to hide its loads and its GELU epilogue behind, so the
best tiles depend on K; they are measured here, not guessed.

Sites: the (M, K, N) of every GEGLU projection of one LVDM call at each ``--windows`` count
(the pipelines' batch-1 call has 5 windows of 64 frames, batch 8 has 40), from forward hooks on
the real config; the count of each per call weighs the totals.

Candidates (:func:`candidates`): the default :data:`GPU_CONFIG` first, then tiles of 64/128 rows,
32/64/128 columns (of each half), K steps of 32/64/128 (at most K), 4 or 8 warps and 2-4
stages, without those whose two fp32 accumulators would take more than 128 registers per
thread or whose pipelined tiles would take more than ``SMEM_LIMIT`` of shared memory (91 at
K >= 128); then every tile shape once more on a persistent grid of 1 or 2 programs per
multiprocessor (3 stages, 8 warps for 128-row tiles, else 4; the 12 whose 3 stages fit and
whose accumulators take at most 64 registers per thread: 24 more). All 115 compile for sm_90
without register spills (``bench/triton_aot.py --cases geglu_linear_tuning``, Triton 3.6:
48-255 registers; persistent variants with 128 accumulator registers per thread spilled).

Each candidate, at each site: checked (max error against an fp64 product of the same inputs,
relative to max|ref|, must be within 2x the default's + half an ulp: a wrong tile cannot win),
then timed as in the pipelines' CUDA graphs (:func:`benchutil.graph_timed`). Candidates are
timed in order until ``--budget-s`` is spent (every site per candidate, so a short budget still
compares the first candidates everywhere). Per site the fastest checked candidate is reported
with its gain over the default; ``--write-table`` records it for that site when the gain is at
least ``--min-gain`` (entries of the sites measured are replaced, others kept), and the kernel's
launcher uses it from then on (see ``kernels/geglu_linear.py``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import benchutil
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: shared memory the pipelined tiles may take (an H100/H200 block may have 227 KiB)
SMEM_LIMIT = 192 * 1024
CSV_FIELDS = (
    "card",
    "dtype",
    "windows",
    "m",
    "k",
    "n",
    "count",
    "config",
    "status",
    "err",
    "median_us",
    "p20_us",
    "p80_us",
    "tflops",
    "vs_default",
    "torch",
    "triton",
    "git",
)


def config_key(config: dict) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, PROGRAMS_PER_SM or 0)."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return (*(config[key] for key in keys), config.get("PROGRAMS_PER_SM", 0))


def config_name(config: dict) -> str:
    """e.g. ``m128n64k32w8s3``, with ``p2`` appended for a persistent grid of 2 programs/SM."""
    bm, bn, bk, warps, stages, programs = config_key(config)
    return f"m{bm}n{bn}k{bk}w{warps}s{stages}" + (f"p{programs}" if programs else "")


def candidates(k: int, elem_bytes: int = 2) -> list[dict]:
    """The configurations tried at reduction width ``k`` (see the module docstring), the default
    first. ``elem_bytes``: x's element size (shared memory per stage)."""
    from echofast.kernels.geglu_linear import GPU_CONFIG

    def fits(bm, bn, bk, warps, stages):
        return (
            bk <= max(32, k)
            and 2 * bm * bn // (32 * warps) <= 128  # fp32 accumulator registers per thread
            and stages * (bm + 2 * bn) * bk * elem_bytes <= SMEM_LIMIT
        )

    found = [dict(GPU_CONFIG)]
    tiles = list(itertools.product((64, 128), (32, 64, 128), (32, 64, 128)))
    for (bm, bn, bk), warps, stages in itertools.product(tiles, (4, 8), (2, 3, 4)):
        if fits(bm, bn, bk, warps, stages):
            found.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps})
            found[-1]["num_stages"] = stages
    for (bm, bn, bk), programs in itertools.product(tiles, (1, 2)):
        warps = 8 if bm == 128 else 4
        # the flattened loop keeps more values live: 128 accumulator registers per thread spill
        if fits(bm, bn, bk, warps, 3) and 2 * bm * bn // (32 * warps) <= 64:
            found.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps})
            found[-1] |= {"num_stages": 3, "PROGRAMS_PER_SM": programs}
    default = config_key(GPU_CONFIG)
    return [found[0], *(c for c in found[1:] if config_key(c) != default)]


def lvdm_sites(windows: int, device: str = "cuda", **site_args) -> Counter:
    """(M, K, N) of every GEGLU projection of one LVDM call with ``windows`` windows, counted.
    ``site_args``: see :func:`benchutil.lvdm_call_sites` (the CPU tests' small config)."""
    from echofast.nn.spatiotemporal import GEGLU

    def key(module, args, out):
        x = args[0]
        return (math.prod(x.shape[:-1]), x.shape[-1], out.shape[-1])

    return benchutil.lvdm_call_sites(GEGLU, windows, key, device=device, **site_args)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The product of the same (rounded) inputs in fp64, exact-erf GEGLU, stored in fp32: the
    check's reference."""
    n = w.shape[0] // 2
    h = torch.addmm(b.double(), x.double(), w.double().t())
    return (h[:, :n] * torch.nn.functional.gelu(h[:, n:])).float()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def accepted(err: float, default_err: float, dtype: torch.dtype) -> bool:
    """A candidate's error is within 2x the default configuration's, plus half an ulp."""
    return err <= 2 * default_err + 0.5 * torch.finfo(dtype).eps


def best_per_site(rows: list[dict]) -> dict[tuple, dict]:
    """Per (windows, m, k, n): the fastest row with status ``ok`` (the default included)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        site = (row["windows"], row["m"], row["k"], row["n"])
        if site not in best or row["median_us"] < best[site]["median_us"]:
            best[site] = row
    return best


def table_entries(rows: list[dict], arch: str, min_gain: float) -> tuple[list[dict], set]:
    """(entries for the sites whose fastest candidate beats the default by ``min_gain``, every
    measured site as (arch, dtype, k, n, m))."""
    default = {
        (r["windows"], r["m"], r["k"], r["n"]): r
        for r in rows
        if r.get("is_default") and r["status"] == "ok"
    }
    entries, measured = [], set()
    for site, row in sorted(best_per_site(rows).items()):
        measured.add((arch, row["dtype"], row["k"], row["n"], row["m"]))
        base = default.get(site)
        if base is None or row["median_us"] > base["median_us"] * (1 - min_gain):
            continue
        entries.append(
            {
                "arch": arch,
                "dtype": row["dtype"],
                "k": row["k"],
                "n": row["n"],
                "m": row["m"],
                "config": row["config_dict"],
                "median_us": round(row["median_us"], 2),
                "default_us": round(base["median_us"], 2),
                "card": row["card"],
                "triton": row["triton"],
                "git": row["git"],
            }
        )
    return entries, measured


def write_table(path: Path, entries: list[dict], measured: set) -> None:
    """Merge ``entries`` into the table at ``path``: the entries of ``measured`` sites are
    replaced, all others kept. Written to a temporary file first, then renamed."""
    from echofast.kernels.geglu_linear import read_tuned_table

    kept = []
    note = "tile configurations of kernels/geglu_linear.py timed by bench/tune_geglu_linear.py"
    if path.is_file():
        kept = [
            e
            for e in read_tuned_table(path)
            if (e["arch"], e["dtype"], e["k"], e["n"], e["m"]) not in measured
        ]
        note = json.loads(path.read_text()).get("note", note)
    merged = sorted(
        [*kept, *entries], key=lambda e: (e["arch"], e["dtype"], e["k"], e["n"], e["m"])
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "note": note, "entries": merged}, indent=1) + "\n")
    read_tuned_table(tmp)  # what is written must load
    os.replace(tmp, path)


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, seed: int, device: str = "cuda"):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    w = (torch.randn(2 * n, k, generator=g, device=device) / math.sqrt(k)).to(dtype)
    b = (torch.randn(2 * n, generator=g, device=device) * 0.1).to(dtype)
    return x, w, b


def _compile(
    configs: list[dict], dtype_name: str, shapes: list[tuple[int, int]], device: str = "cuda"
) -> list[str]:
    """In a worker process: launch each configuration once per (K, N) on small inputs (the same
    specialisation as the sites': every size a multiple of 16), which leaves the compiled kernel
    in Triton's on-disk cache for the tuner. Returns the launches that failed."""
    from echofast.kernels.geglu_linear import geglu_linear_fwd

    failed = []
    for k, n in shapes:
        x, w, b = _inputs(64, k, n, DTYPES[dtype_name], seed=0, device=device)
        for config in configs:
            try:
                geglu_linear_fwd(x, w, b, config=config)
            except Exception as e:  # noqa: BLE001 - the tuner reports it again when it launches
                failed.append(f"{config_name(config)} K={k}: {type(e).__name__}")
    if device == "cuda":
        torch.cuda.synchronize()
    return failed


def precompile(
    configs: list[dict], dtype_name: str, shapes: list, workers: int, device: str = "cuda"
) -> list[str]:
    """Compile ``configs`` in ``workers`` processes at once (Triton compiles one kernel at a time
    per process, a second or two each): the timing loop then loads them from the cache. Returns
    the launches that failed; a pool that breaks is reported, and the kernels then compile as
    the timing loop launches them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.monotonic()
    chunks = [configs[i::workers] for i in range(workers)]
    context = multiprocessing.get_context("spawn")
    work = functools.partial(_compile, dtype_name=dtype_name, shapes=shapes, device=device)
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            failed = [f for part in pool.map(work, chunks) for f in part]
    except Exception as e:  # noqa: BLE001 - compiling ahead is an optimisation only
        print(f"compiling ahead failed ({type(e).__name__}: {e}); compiling as launched")
        return []
    took = time.monotonic() - t0
    print(
        f"compiled {len(configs)} candidates in {workers} processes in {took:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return failed


def measure(
    fwd, config: dict, inputs: tuple, ref: torch.Tensor, bar: float | None, rep: int = 20
) -> dict:
    """Check, then time one candidate at one site: a row's status, err and times. ``fwd``: the
    launcher; ``bar``: the default's error (None: this is the default, nothing to check against);
    ``rep``: milliseconds of timed CUDA-graph replays (:func:`benchutil.graph_timed`).
    """
    x, w, b = inputs
    m, k = x.shape
    n = w.shape[0] // 2
    with torch.no_grad():
        try:
            out = fwd(x, w, b, config=config)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot compile or launch
            return {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"}
        err = rel_err(out, ref)
        del out
        if bar is not None and not accepted(err, bar, x.dtype):
            return {"status": "wrong", "err": err}
        calls = 8 if m * n * x.element_size() < 2**28 else 2
        times = benchutil.graph_timed(lambda: fwd(x, w, b, config=config), calls=calls, rep=rep)
    if times is None:
        return {"status": "not-capturable", "err": err}
    med, p20, p80 = (t * 1e3 for t in times)
    return {
        "status": "ok",
        "err": err,
        "median_us": med,
        "p20_us": p20,
        "p80_us": p80,
        "tflops": 2 * m * k * 2 * n / (med * 1e-6) / 1e12,
    }


def tune(args, sites: dict[int, Counter], card: str, versions: dict) -> list[dict]:
    """Every candidate at every site until the budget is spent: one row each."""
    from echofast.kernels.geglu_linear import geglu_linear_fwd

    dtype = DTYPES[args.dtype]
    shapes = sorted({(m, k, n) for counter in sites.values() for m, k, n in counter})
    data = {s: _inputs(*s, dtype, seed=i) for i, s in enumerate(shapes)}
    refs = {s: reference(*data[s]) for s in shapes}
    per_k = {k: candidates(k, dtype.itemsize) for _, k, _ in shapes}
    deadline = time.monotonic() + args.budget_s
    if args.compile_workers > 1:
        unique = {config_key(c): c for configs in per_k.values() for c in configs}
        shapes_kn = sorted({(k, n) for _, k, n in shapes})
        workers = min(args.compile_workers, len(unique))
        precompile(list(unique.values()), args.dtype, shapes_kn, workers)
    rows, bars = [], {}
    for index in range(max(len(c) for c in per_k.values())):
        if time.monotonic() > deadline:
            print(f"budget of {args.budget_s:.0f} s spent after {index} candidates", flush=True)
            break
        for windows, counter in sites.items():
            for (m, k, n), count in sorted(counter.items()):
                if index >= len(per_k[k]):
                    continue
                config = per_k[k][index]
                bar = None if index == 0 else bars.get((m, k, n), 0.0)
                result = measure(geglu_linear_fwd, config, data[m, k, n], refs[m, k, n], bar)
                if index == 0 and "err" in result:
                    bars[m, k, n] = result["err"]
                row = {"card": card, "dtype": args.dtype, "windows": windows, "m": m, "k": k}
                row |= {"n": n, "count": count, "config": config_name(config)}
                rows.append({**row, "config_dict": config, "is_default": index == 0, **versions})
                rows[-1].update(result)
        left = deadline - time.monotonic()
        print(f"candidate {index + 1} done at every site ({left:.0f} s of budget left)", flush=True)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``vs_default``: the default's median / this row's (above 1: faster than the default)."""
    default = {
        (r["windows"], r["m"], r["k"], r["n"]): r["median_us"]
        for r in rows
        if r["is_default"] and r["status"] == "ok"
    }
    for r in rows:
        base = default.get((r["windows"], r["m"], r["k"], r["n"]))
        if r["status"] == "ok" and base:
            r["vs_default"] = base / r["median_us"]


def report(rows: list[dict]) -> list[str]:
    """Per site: default and best time, the gain, the best tiles; per windows count: the GEGLU
    projections' total per LVDM call with the default and with the best tiles."""
    lines = [
        f"{'windows':>7} {'M':>8} {'K':>4} {'N':>5} {'x':>3} {'default us':>10} "
        f"{'best us':>9} {'gain':>6} {'TFLOP/s':>8}  best tiles"
    ]
    default = {
        (r["windows"], r["m"], r["k"], r["n"]): r
        for r in rows
        if r["is_default"] and r["status"] == "ok"
    }
    totals: dict[int, list[float]] = {}
    for site, best in sorted(best_per_site(rows).items()):
        base = default.get(site)
        if base is None:
            continue
        windows, m, k, n = site
        lines.append(
            f"{windows:>7} {m:>8} {k:>4} {n:>5} {best['count']:>3} {base['median_us']:>10.1f} "
            f"{best['median_us']:>9.1f} {base['median_us'] / best['median_us']:>5.2f}x "
            f"{best['tflops']:>8.0f}  {best['config']}"
        )
        total = totals.setdefault(windows, [0.0, 0.0])
        total[0] += best["count"] * base["median_us"]
        total[1] += best["count"] * best["median_us"]
    for windows, (base, best) in sorted(totals.items()):
        lines.append(
            f"per LVDM call at {windows} windows: {base / 1e3:.3f} ms with the default tiles, "
            f"{best / 1e3:.3f} ms with the best ({base / best:.2f}x)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--windows", type=benchutil.positive_int, nargs="+", default=[5, 40])
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting candidates after")
    p.add_argument("--min-gain", type=float, default=0.03, help="table entries beat the default by")
    p.add_argument(
        "--compile-workers",
        type=int,
        default=max(1, min(12, (os.cpu_count() or 2) - 2)),
        help="processes compiling the candidates before the timing (1: compile as launched)",
    )
    p.add_argument("--csv", type=Path, help="append one row per candidate and site")
    p.add_argument("--write-table", type=Path, help="merge the winners into this tuned table")
    args = p.parse_args(argv)
    if benchutil.no_cuda("tune_geglu_linear.py"):
        return 2
    card = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    unit = lvdm_sites(1)
    sites = {w: Counter({(m * w, k, n): c for (m, k, n), c in unit.items()}) for w in args.windows}
    print(
        f"{card}: {sum(len(c) for c in sites.values())} sites, "
        f"{len(candidates(max(k for _, k, _ in unit)))} candidates at most",
        flush=True,
    )
    rows = tune(args, sites, card, benchutil.versions())
    add_ratios(rows)
    print("\n".join(report(rows)), flush=True)
    if args.csv:
        benchutil.append_csv(args.csv, [{f: r.get(f, "") for f in CSV_FIELDS} for r in rows])
    if args.write_table:
        entries, measured = table_entries(rows, f"sm_{major}{minor}", args.min_gain)
        write_table(args.write_table, entries, measured)
        print(f"{args.write_table}: {len(entries)} entries written for {len(measured)} sites")
    return 0


if __name__ == "__main__":
    sys.exit(main())
