"""Where the pipeline's GPU memory goes: per-phase peaks and the modules with the largest peaks.

    python bench/memory_profile.py [--batch-size 1 8] [--frames 192] [--steps 4]
        [--decode-chunk 64] [--top 12] [--smoke]

Real configs (random weights) unless ``--smoke``. For each batch size, each phase of one video
batch runs alone and reports the memory allocated before it, its peak and what it leaves
allocated (MiB): LIDM sampling, LVDM sampling with CUDA graphs and eagerly (``cuda_graphs=False``),
VAE decode in float32 and float16. A phase that runs out of memory is reported and the next one
runs. Then one eager LVDM UNet call and one decode chunk run with forward hooks on every module:
the ``--top`` modules whose call raised the peak most above what was allocated when it began.
Memory does not depend on the number of steps, so a few steps suffice. On CPU (no CUDA memory
statistics) the phases run and every number is empty: a check of the code path only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from echofast.benchmark import TINY_CONFIGS, _reference_configs
from echofast.benchmark_reference import build_models

MIB = 2**20


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _alloc(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if _cuda(device) else 0


def _fmt(n: int | None, device: torch.device) -> str:
    return f"{n / MIB:10.1f}" if _cuda(device) and n is not None else f"{'-':>10}"


def run_phase(name: str, fn: Callable[[], object], device: torch.device) -> object:
    """Run ``fn`` alone; print MiB allocated before, peak, after (out of memory is reported)."""
    if _cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = _alloc(device)
    out, error = None, ""
    try:
        out = fn()
    except torch.OutOfMemoryError as e:
        error = f"  OUT OF MEMORY: {str(e).splitlines()[0][:120]}"
    if _cuda(device):
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if _cuda(device) else None
    print(
        f"  {name:<28}{_fmt(before, device)}{_fmt(peak, device)}{_fmt(_alloc(device), device)}"
        f"{error}",
        flush=True,
    )
    return out


@contextmanager
def module_peaks(root: torch.nn.Module, device: torch.device, top: int) -> Iterator[None]:
    """Hooks on every module of ``root``: after the block, print the ``top`` module calls whose
    peak rose most above the memory allocated when the call began (nested calls count in their
    parents too)."""
    starts: dict[int, list[int]] = {}
    rises: list[tuple[int, str, str]] = []
    names = {id(m): n or type(root).__name__ for n, m in root.named_modules()}

    def pre(mod, args):
        if _cuda(device):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        starts.setdefault(id(mod), []).append(_alloc(device))

    def post(mod, args, out):
        begin = starts[id(mod)].pop()
        if _cuda(device):
            torch.cuda.synchronize(device)
            rise = torch.cuda.max_memory_allocated(device) - begin
        else:
            rise = 0
        shape = next((tuple(a.shape) for a in args if isinstance(a, torch.Tensor)), ())
        rises.append((rise, names[id(mod)], f"{type(mod).__name__} in {shape}"))

    handles = [m.register_forward_pre_hook(pre) for m in root.modules()]
    handles += [m.register_forward_hook(post) for m in root.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    # peaks are reset by every pre-hook, so a parent's rise covers only its calls after the
    # last child began: the children's rows are the informative ones
    for rise, name, what in sorted(rises, key=lambda r: -r[0])[:top]:
        print(f"    {_fmt(rise, device)} MiB  {name}  ({what})", flush=True)


def profile_batch(pipe, models, b: int, frames: int, dtype: str, args, device) -> None:
    """The phases and module peaks of one batch of ``b`` videos (see the module docstring)."""
    print(f"batch {b}: phase{'':<23}{'before':>10}{'peak':>10}{'after':>10} (MiB)")
    ef = torch.linspace(20, 80, b)
    lidm_kw = dict(seed=0, num_inference_steps=args.steps, batch_size=b, dtype=dtype)
    images = run_phase("lidm", lambda: pipe.lidm_pipe(b, progress=False, **lidm_kw).latents, device)
    if images is None:
        return
    lvdm_kw = dict(
        num_frames=frames,
        seed=0,
        num_inference_steps=args.steps,
        batch_size=b,
        output_type="latent",
        dtype=dtype,
        progress=False,
    )
    latents = None
    for graphs in (True, False) if _cuda(device) else (False,):
        out = run_phase(
            f"lvdm cuda_graphs={graphs}",
            lambda g=graphs: pipe.lvdm_pipe(images, ef, cuda_graphs=g, **lvdm_kw).latents,
            device,
        )
        latents = out if out is not None else latents
    if latents is None:
        return
    for dec in ("float32", "float16"):
        run_phase(
            f"decode {dec} chunk {args.decode_chunk}",
            lambda d=dec: pipe.lvdm_pipe.decode(latents, args.decode_chunk, dtype=d),
            device,
        )
    print(f"  top module calls, one eager LVDM sampling step (batch {b}):")
    with module_peaks(models.lvdm, device, args.top):
        run_phase(
            "lvdm eager, 1 step",
            lambda: pipe.lvdm_pipe(
                images, ef, cuda_graphs=False, **{**lvdm_kw, "num_inference_steps": 1}
            ),
            device,
        )
    print(f"  top module calls, one float32 decode chunk (batch {b}):")
    with module_peaks(models.vae, device, args.top):
        run_phase(
            "decode float32, 1 chunk",
            lambda: pipe.lvdm_pipe.decode(latents[:1, : args.decode_chunk], args.decode_chunk),
            device,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    p.add_argument("--frames", type=int)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--decode-chunk", type=int, default=64)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--smoke", action="store_true", help="tiny configs (the CPU check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    smoke = args.smoke or not _cuda(device)
    frames = args.frames or (12 if smoke else 192)
    configs = TINY_CONFIGS if smoke else _reference_configs()
    models = build_models(configs, device, with_diffusers=False)
    from echofast.pipelines import EchoSyntheticPipeline

    pipe = EchoSyntheticPipeline(models.lidm, models.lvdm, models.vae)
    dtype = "float16" if _cuda(device) else "float32"
    print(f"memory_profile: {device}, {'tiny' if smoke else 'real'} configs, {frames} frames")
    print(f"weights {_fmt(_alloc(device), device)} MiB allocated after building the models")
    for b in args.batch_size:
        profile_batch(pipe, models, b, frames, dtype, args, device)
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main())
