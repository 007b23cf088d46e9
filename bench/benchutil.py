"""Helpers shared by the benchmark scripts: the code's git version, CSV rows, GPU timing and
the real LVDM's call sites of a module."""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from echofast import benchmark_measure


def git_sha() -> str:
    """The code's version: ``$ECHOFAST_GIT_SHA``, else ``git describe --always --dirty`` (see
    :func:`echofast.benchmark_measure.git_sha`), else "unknown"."""
    return benchmark_measure.git_sha()


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``path``, writing the header when the file is new. When the rows have
    columns the file lacks, the file is rewritten (atomically) with the union of the columns,
    earlier rows keeping their values (empty in the new columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            old_fields, old_rows = list(reader.fieldnames or []), list(reader)
        union = old_fields + [f for f in fields if f not in old_fields]
        if union != old_fields:
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=union)
                writer.writeheader()
                writer.writerows(old_rows)
            tmp.replace(path)
        fields = union
        new = False
    else:
        new = True
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def choice_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated subset of ``choices`` (unknown names: an error
    listing the choices)."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                f"choose from {','.join(choices)}"
            )
        return names

    return parse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def no_cuda(script: str) -> bool:
    """Whether there is no CUDA GPU for ``script`` (which times GPU kernels); says so on stderr."""
    if torch.cuda.is_available():
        return False
    print(f"{script} times GPU kernels: it needs a CUDA GPU", file=sys.stderr)
    return True


def versions() -> dict[str, str]:
    """torch, Triton and git versions for a CSV row."""
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "git": git_sha()}


def timed(fn: Callable[[], object], rep: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``: CUDA
    events, L2 flushed before every run; runs for about ``rep`` ms after a quarter of that of
    warm-up)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=max(rep // 4, 1), rep=rep)
    return med, p20, p80


def graph_timed(
    fn: Callable[[], object], calls: int = 16, rep: int = 100
) -> tuple[float, float, float] | None:
    """(median, p20, p80) milliseconds per ``fn()`` on the GPU alone: ``calls`` calls captured in
    one CUDA graph, its replays timed as in :func:`timed` and divided by ``calls``. No host time
    (launch overhead, Python dispatch) is in it, as in the pipelines' CUDA-graph sampling; eager
    :func:`timed` of a small kernel measures the host instead. The calls after the first read
    inputs that are in L2, as consecutive layers do. ``rep``: see :func:`timed`. None when ``fn``
    cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(3):  # compilation, autotuning, allocator warm-up
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as e:
        print(f"  (not capturable in a CUDA graph: {str(e).splitlines()[0][:100]})", flush=True)
        torch.cuda.synchronize()
        return None
    med, p20, p80 = timed(graph.replay, rep)
    return med / calls, p20 / calls, p80 / calls


def per_call_summary(
    rows: list[dict], site_keys: tuple[str, ...], base: str, width: int = 12
) -> list[str]:
    """Per windows count and provider (``rows`` with windows, provider, status, count,
    median_ms and the ``site_keys`` columns): the total per UNet call over the sites that
    provider was timed at (each site's median times its count), and ``base``'s total over the
    same sites divided by it (a provider timed at some sites only is compared at those)."""
    times: dict[tuple[int, str], dict[tuple, float]] = {}
    for r in rows:
        if r["status"] == "ok":
            site = tuple(r[k] for k in site_keys)
            times.setdefault((r["windows"], r["provider"]), {})[site] = r["count"] * r["median_ms"]
    lines = []
    for (windows, name), sites in sorted(times.items()):
        total = sum(sites.values())
        line = f"windows {windows:<3} {name:<{width}} {total:8.3f} ms per UNet call"
        base_sites = times.get((windows, base), {})
        if name != base and all(site in base_sites for site in sites):
            line += f"  {sum(base_sites[site] for site in sites) / total:.2f}x {base}"
            if len(sites) < len(base_sites):
                line += f" (at {len(sites)} of {len(base_sites)} sites)"
        lines.append(line)
    return lines


def print_rate(row: dict, flops: float, label: str) -> None:
    """Sets ``row["tflops"]`` from its ``median_ms`` and prints ``label``, the median in µs and
    the rate."""
    row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
    print(f"  {label}{row['median_ms'] * 1e3:9.1f} us {row['tflops']:6.0f} TFLOP/s", flush=True)


def site_bench_main(
    doc: str,
    script: str,
    run: Callable[[argparse.Namespace], list[dict]],
    summary: Callable[[list[dict]], list[str]],
    dtypes: dict,
    argv: list[str] | None = None,
) -> int:
    """The command line of a benchmark over the LVDM's call sites: ``--dtype``, ``--windows``
    (default 5 and 40) and ``--csv``; ``run(args)`` gives the rows, ``summary(rows)`` the lines
    printed last, and ``--csv`` gets the rows with :func:`versions`. 2 without CUDA."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--dtype", default="float16", choices=list(dtypes))
    p.add_argument("--windows", type=positive_int, nargs="+", default=[5, 40])
    p.add_argument("--csv", type=Path, help="append one row per site and provider")
    args = p.parse_args(argv)
    if no_cuda(script):
        return 2
    rows = run(args)
    print("\n".join(summary(rows)))
    if args.csv:
        meta = versions()
        append_csv(args.csv, [{**r, **meta} for r in rows])
    return 0


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s measured now (bytes read + written), the memory ceiling."""
    src = torch.randn(64 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    med, _, _ = timed(lambda: dst.copy_(src))
    return 2 * src.nbytes / (med * 1e-3) / 1e9


def lvdm_call_sites(
    module_type: type,
    windows: int,
    key: Callable[[torch.nn.Module, tuple, object], object],
    *,
    device: str = "cuda",
    config: dict | None = None,
    frames: int = 64,
    size: int = 16,
) -> Counter:
    """``key(module, args, output)`` of every call of a ``module_type`` module in one call of the
    LVDM (random weights, ``windows`` windows of ``frames`` frames of ``size``×``size`` latents;
    by default the real config, 64-frame windows of 16×16 latents, on CUDA), with counts. The
    keyword arguments exist for the scripts' CPU tests (a small config on the CPU)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.configs import LVDM_FULL_CONFIG

    from echofast.models import LVDM

    model = LVDM.from_config(config or LVDM_FULL_CONFIG).to(device).eval()
    sites: Counter = Counter()

    def hook(module, args, out):
        sites[key(module, args, out)] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, module_type)]
    x = torch.randn(windows, frames, 8, size, size, device=device)
    with torch.no_grad():
        model(
            x,
            500,
            encoder_hidden_states=torch.rand(windows, 1, 1, device=device),
            added_time_ids=torch.zeros(windows, 1, device=device),
        )
    for h in handles:
        h.remove()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return sites
