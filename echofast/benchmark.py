"""``echofast bench``: dataset-generation speed of echofast against the reference's way, one card.

Measured in one process, on one device, with the same weights and the same shapes:

* ``pipeline/echofast``: echofast's LIDM → LVDM → VAE pipelines (``EchoSyntheticPipeline``'s
  stages), then writing the AVIs (phase ``avi``, echofast only);
* ``pipeline/reference``: the reference's way, written here from the project spec with diffusers'
  modules only (``UNet2DModel``, ``UNetSpatioTemporalConditionModel``, ``AutoencoderKL``,
  ``DDPMScheduler``): fp16 autocast around the UNets with fp32 weights, replicate padding 14 → 16
  every step, all windows of a step in one UNet call (EF repeated with ``repeat_interleave``, as the
  reference does), fp32 VAE decode 8 frames per call with a CPU round trip per chunk;
* ``pipeline/reference+compile``: the same loop with ``torch.compile`` of the diffusers UNets;
* ``pipeline/echofast+compile``: echofast's pipelines with ``torch.compile`` of echofast's LIDM
  and LVDM (``--compile-echofast``; ``--compile-backend`` picks the backend, e.g. ``eager`` to
  test the tracing path quickly on a CPU);
* ``unet/*``: one LVDM UNet call at the pipeline's shape (all windows of a batch) for echofast,
  echofast replayed as a CUDA graph (``--graphs``; the pipelines then pass ``cuda_graphs=True``,
  else ``False``), echofast as its pipeline calls it at each step (``+step``: run-constant work
  precomputed, :class:`PipelineStepCall`), compiled echofast, diffusers and compiled diffusers:
  seconds per
  call, achieved TFLOP/s, its fraction of a large bf16 GEMM timed in the same run
  (``gemm/*`` row), and the kernels launched per call (profiler);
* ``pipeline/echofast+temporal-gemms`` and ``unet/echofast[+graphs]+step+temporal-gemms``
  (``--temporal-gemms``): echofast with the temporal resnets' convolutions as three GEMMs, as
  ``TEMPORAL_GEMMS_DEVICES`` holding the device would run them (for maps of up to
  ``TEMPORAL_GEMMS_MAX_DIM`` channels), so that a lease times that path end to end beside the
  default one before it is chosen;
* per pipeline: seconds per video, generated frames/s, videos/s, phase times, peak memory.

FLOPs are counted once per window by ``torch.utils.flop_counter.FlopCounterMode`` on the diffusers
LVDM (the nominal work; attention counted under ``sdpa_kernel(SDPBackend.MATH)``) and scaled by
the number of windows. Without CUDA the command runs a small configuration (``--smoke``, tiny
models, a few frames and steps) in seconds so that CI exercises every code path; CPU numbers are
then only a smoke test, kernel counts become counts of dispatched ATen ops, and the GEMM ceiling
is an fp32 CPU product.

Rows are appended to a CSV (``bench/results/echofast_bench_<card>.csv`` by default) with the card,
versions, git revision and a run id; while a run measures, each finished path's rows are already
on disk in ``<out>.partial.csv`` (a run stopped by a time limit keeps them; ``--report CSV`` prints
any such file's table with its ratios). ``--compare OLD.csv`` flags rows more than
``--threshold`` percent slower than the same measurement (card, config, shape, path, phase) in an
earlier CSV and then exits with status 1. Paths run cheapest-and-most-wanted first: echofast, the
reference, the compiled reference, compiled echofast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .benchmark_measure import (
    PhaseClock,
    Timing,
    card_slug,
    count_flops,
    count_kernels,
    environment,
    format_kernel_times,
    gemm_ceiling,
    time_call,
)
from .benchmark_reference import (
    REFERENCE_DECODE_CHUNK,
    Models,
    autocast_context,
    build_models,
    diffusers_scheduler,
    reference_decode,
    reference_lidm,
    reference_lvdm,
    reference_pad,
)
from .benchmark_rows import (
    CSV_FIELDS,
    RowJournal,
    add_ratios,
    compare,
    read_csv,
    report,
    summary_table,
)
from .models.tiny import TINY_CONFIGS

# ---- configurations ----------------------------------------------------------------------------

#: Tiny models for ``--smoke`` (CPU CI), see :mod:`echofast.models.tiny`.
SMOKE_CONFIGS: dict[str, dict[str, Any]] = TINY_CONFIGS


@dataclass(frozen=True)
class Plan:
    """What one ``echofast bench`` run measures (defaults per mode, overridden by flags)."""

    config: str  # "full" (the reference architectures) or "smoke" (SMOKE_CONFIGS)
    frames: int
    steps: int
    batch_sizes: tuple[int, ...]
    repeats: int
    warmup: int
    unet_repeats: int


FULL_PLAN = Plan(
    "full", frames=192, steps=64, batch_sizes=(1, 8), repeats=3, warmup=1, unet_repeats=10
)
SMOKE_PLAN = Plan(
    "smoke", frames=12, steps=2, batch_sizes=(1, 2), repeats=1, warmup=1, unet_repeats=1
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- one benchmark run -------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a measurement needs (resolved from the command line)."""

    device: torch.device
    plan: Plan
    dtype: torch.dtype
    env: dict[str, str]
    models: Models
    seed: int = 0
    decode_chunk: int = 64
    decode_dtypes: tuple[torch.dtype, ...] = ()
    reference: bool = True
    compile: bool = False
    compile_echofast: bool = False
    compile_backend: str = "inductor"
    graphs: bool = False
    temporal_gemms: bool = False
    pipelines: bool = True
    avi: bool = True
    profile: bool = True
    progress: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gemm_tflops: float | None = None
    gflop_per_window: float | None = None
    journal: RowJournal | None = None

    def record(self, rows: Sequence[dict]) -> None:
        """Keep finished rows (in memory and, at once, in the run's journal on disk)."""
        self.rows.extend(rows)
        if self.journal is not None:
            self.journal.add(rows)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _row(
    setup: Setup, batch: int | str, path: str, phase: str, timing: Timing | None, **extra
) -> dict:
    plan = setup.plan
    row: dict[str, Any] = {k: "" for k in CSV_FIELDS}
    row.update(setup.env)
    row.update(
        timestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        config=plan.config,
        dtype=extra.pop("dtype", _dtype_name(setup.dtype)),
        frames=plan.frames,
        steps=plan.steps,
        batch=batch,
        path=path,
        phase=phase,
    )
    if timing is not None:
        row.update(
            repeats=len(timing.samples),
            median_s=timing.median,
            p20_s=timing.p20,
            p80_s=timing.p80,
        )
    row.update(extra)
    return row


def _window_plan(num_frames: int, window: int) -> tuple[int, list[int]]:
    from .pipelines import window_plan

    return window_plan(num_frames, window)


def _efs(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 91, (batch,), generator=g).float()


def _graph_kwargs(setup: Setup) -> dict[str, Any]:
    """The pipelines' ``cuda_graphs``: forced with ``--graphs`` on CUDA, else eager calls (so the
    plain ``pipeline/echofast`` row always measures eager UNet calls)."""
    return {"cuda_graphs": setup.graphs and setup.device.type == "cuda"}


def _weights_bytes(*modules: Any) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes allocated now."""
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_mib(device: torch.device, base: int, weights: int) -> float | str:
    """Peak memory of a path: what it allocated beyond ``base`` (which holds every model of the
    run) plus its own models' ``weights``. Empty on CPU."""
    if device.type != "cuda":
        return ""
    return round((torch.cuda.max_memory_allocated(device) - base + weights) / 2**20, 1)


def _runs(
    setup: Setup, desc: str, run: Callable[[], dict[str, float]], weights: int
) -> tuple[dict[str, Timing], float | str, float]:
    """Warm-up + repeated runs of ``run`` (returns phase seconds): per-phase timings, peak memory
    (``weights``: bytes of the path's models) and the first warm-up's seconds (compilation,
    autotuning)."""
    from tqdm.auto import tqdm

    plan = setup.plan
    total = plan.warmup + plan.repeats
    first = 0.0
    samples: dict[str, list[float]] = {}
    base = _reset_peak(setup.device)
    with tqdm(total=total, desc=desc, unit="run", disable=not setup.progress, leave=False) as bar:
        for i in range(total):
            phases = run()
            if i == 0:
                first = sum(phases.values())
            if i >= plan.warmup:
                for name, sec in phases.items():
                    samples.setdefault(name, []).append(sec)
            bar.update(1)
    peak = _peak_mib(setup.device, base, weights)
    return {k: Timing(v) for k, v in samples.items()}, peak, first


def _pipeline_rows(
    setup: Setup,
    batch: int,
    path: str,
    timings: dict[str, Timing],
    peak: float | str,
    common: Sequence[str],
    lvdm_flop: float | None,
    note: str,
) -> list[dict]:
    """Rows of one pipeline path: its total over the ``common`` phases, each phase, and (echofast)
    the end-to-end total with the AVI phase."""
    frames = setup.plan.frames
    n = len(next(iter(timings.values())).samples)
    totals = Timing([sum(timings[p].samples[i] for p in common) for i in range(n)])
    rows = []

    def throughput(t: Timing) -> dict[str, float]:
        return {
            "s_per_video": t.median / batch,
            "frames_per_s": batch * frames / t.median,
            "videos_per_s": batch / t.median,
        }

    rows.append(
        _row(
            setup, batch, path, "total", totals, peak_mem_mib=peak, note=note, **throughput(totals)
        )
    )
    if "avi" in timings:
        e2e = Timing([totals.samples[i] + timings["avi"].samples[i] for i in range(n)])
        rows.append(
            _row(
                setup, batch, path, "end_to_end", e2e, note="total + AVI writing", **throughput(e2e)
            )
        )
    for phase, t in timings.items():
        extra: dict[str, Any] = {"s_per_video": t.median / batch}
        if phase == "lvdm" and lvdm_flop:
            extra.update(gflop=lvdm_flop / 1e9, tflops=lvdm_flop / t.median / 1e12)
            if setup.gemm_tflops:
                extra["gemm_fraction"] = extra["tflops"] / setup.gemm_tflops
        rows.append(_row(setup, batch, path, phase, t, **extra))
    return rows


def _lvdm_shapes(setup: Setup, batch: int) -> tuple[int, int, tuple[int, ...]]:
    """(windows per video, window length, UNet input shape) of the LVDM at ``batch`` videos."""
    cfg = setup.models.lvdm.config
    total, starts = _window_plan(setup.plan.frames, cfg.num_frames)
    window = min(cfg.num_frames, total)
    lat = setup.models.lidm.config.sample_size
    size = lat if isinstance(lat, int) else lat[0]
    pad = reference_pad(size, len(cfg.block_out_channels))
    shape = (batch * len(starts), window, cfg.in_channels, size + 2 * pad, size + 2 * pad)
    return len(starts), window, shape


def run_echofast(
    setup: Setup,
    batch: int,
    lvdm_flop: float | None,
    unets: tuple[Any, Any] | None = None,
    path: str = "pipeline/echofast",
    decode_dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """echofast's pipelines (LIDM → LVDM → decode) on ``batch`` videos, then the AVIs
    (``unets``: the LIDM and LVDM to use instead of the plain models, e.g. compiled ones;
    ``decode_dtype``: the VAE decode's precision)."""
    from .io import write_video
    from .pipelines import EchoSyntheticPipeline

    m = setup.models
    lidm, lvdm = unets if unets is not None else (m.lidm, m.lvdm)
    pipe = EchoSyntheticPipeline(lidm, lvdm, m.vae)
    ef = _efs(batch, setup.seed)
    dtype = _dtype_name(setup.dtype)
    plan = setup.plan
    lidm_kw = lvdm_kw = _graph_kwargs(setup)

    def run() -> dict[str, float]:
        clock = PhaseClock(setup.device)
        images = pipe.lidm_pipe(
            batch,
            seed=setup.seed,
            num_inference_steps=plan.steps,
            batch_size=batch,
            dtype=dtype,
            progress=False,
            **lidm_kw,
        ).latents
        clock.lap("lidm")
        latents = pipe.lvdm_pipe(
            images,
            ef,
            num_frames=plan.frames,
            seed=setup.seed,
            num_inference_steps=plan.steps,
            batch_size=batch,
            output_type="latent",
            dtype=dtype,
            progress=False,
            **lvdm_kw,
        ).latents
        clock.lap("lvdm")
        videos = pipe.lvdm_pipe.decode(latents, setup.decode_chunk, dtype=decode_dtype)
        clock.lap("decode")
        if setup.avi:
            with tempfile.TemporaryDirectory(prefix="echofast_bench_") as tmp:
                for i in range(batch):
                    write_video(Path(tmp) / f"video_{i}.avi", videos[i], 32.0)
                clock.lap("avi")
        return clock.phases

    timings, peak, first = _runs(
        setup, f"{path.split('/')[1]} b={batch}", run, _weights_bytes(m.lidm, m.lvdm, m.vae)
    )
    graphs = "cuda_graphs=True" if lvdm_kw["cuda_graphs"] else "eager UNet calls"
    if unets is not None:
        graphs += f"; torch.compile backend {setup.compile_backend}"
    note = (
        f"{setup.models.source}; {graphs}; decode {_dtype_name(decode_dtype)} chunk "
        f"{setup.decode_chunk}; first run {first:.2f} s"
    )
    return _pipeline_rows(
        setup,
        batch,
        path,
        timings,
        peak,
        ("lidm", "lvdm", "decode"),
        lvdm_flop,
        note,
    )


def run_reference(
    setup: Setup, batch: int, lvdm_flop: float | None, unets: tuple[Any, Any], path: str
) -> list[dict]:
    """The reference's way with diffusers' modules (``unets``: the LIDM and LVDM UNets to call,
    eager or compiled)."""
    m = setup.models
    device = setup.device
    autocast = torch.float16 if device.type == "cuda" else None
    scheduler = diffusers_scheduler()
    ef = _efs(batch, setup.seed)
    plan = setup.plan
    d_lidm, d_lvdm = unets

    def run() -> dict[str, float]:
        gen = torch.Generator(device=device).manual_seed(setup.seed)
        clock = PhaseClock(device)
        with torch.no_grad():
            images = reference_lidm(
                d_lidm, scheduler, batch, plan.steps, generator=gen, autocast_dtype=autocast
            )
            clock.lap("lidm")
            latents = reference_lvdm(
                d_lvdm,
                scheduler,
                images,
                ef,
                plan.frames,
                plan.steps,
                generator=gen,
                autocast_dtype=autocast,
            )
            clock.lap("lvdm")
            reference_decode(m.d_vae, latents)
            clock.lap("decode")
        return clock.phases

    weights = _weights_bytes(m.d_lidm, m.d_lvdm, m.d_vae)
    timings, peak, first = _runs(setup, f"{path.split('/')[1]} b={batch}", run, weights)
    precision = "fp16 autocast, fp32 weights" if autocast else "fp32 (CPU: no autocast)"
    note = (
        f"diffusers {setup.env['diffusers']}; {precision}; decode fp32, "
        f"{REFERENCE_DECODE_CHUNK} frames per call via CPU; first run {first:.2f} s"
    )
    rows = _pipeline_rows(
        setup, batch, path, timings, peak, ("lidm", "lvdm", "decode"), lvdm_flop, note
    )
    for row in rows:
        row["dtype"] = "float16" if autocast else "float32"
    return rows


def _unet_inputs(setup: Setup, batch: int, sets: int = 2) -> list[tuple]:
    """Random LVDM inputs at the pipeline's shape: ``sets`` steps of one run (rotated between
    calls), each with its own noisy latents and timestep, all with one conditioning latent
    (repeated on every frame of a window, as the pipelines pass it) and one set of EFs."""
    _, _, shape = _lvdm_shapes(setup, batch)
    g = torch.Generator(device=setup.device).manual_seed(setup.seed + 1)
    b, frames, channels, h, w = shape
    c = channels // 2
    cond = torch.randn((b, 1, channels - c, h, w), device=setup.device, generator=g)
    ehs = torch.rand(b, 1, 1, device=setup.device, generator=g)
    ids = torch.zeros(b, 1, device=setup.device)
    out = []
    for i in range(sets):
        noisy = torch.randn((b, frames, c, h, w), device=setup.device, generator=g)
        x = torch.cat([noisy, cond.expand(-1, frames, -1, -1, -1)], dim=2)
        t = torch.tensor(900 - 400 * i)  # a CPU int64 timestep, as the samplers pass them
        out.append((x, t, ehs, ids))
    return out


class PipelineStepCall:
    """echofast's LVDM called as its pipeline calls it at each step: the noisy half of the input
    only, with the conditioning half of ``conv_in`` and the run-constant features
    (``context_features``, ``frame_features``) computed once, from the first call, and each input
    set's noisy half and :meth:`~echofast.models.LVDM.time_features` once per set, outside the
    measured call. The sets are steps of one run: one that brings another conditioning latent
    (frame 0's conditioning half), other EFs or other ``added_time_ids`` than the first is a
    ``ValueError`` (the pipelines compute those once per run). The call writes the step's latents
    and time features into persistent inputs (two copies, as the pipeline's ``window_step`` and
    time-table row do; the latents in the pipeline's layout, channels-last frames of the call's
    dtype) and runs the UNet (its output left in that layout, as the pipeline reads it),
    replayed from a CUDA graph that reads those inputs in place when ``graphs``. Called like a
    UNet: ``(x, t, encoder_hidden_states=, added_time_ids=)``."""

    def __init__(self, model: Any, graphs: bool):
        from .pipelines.graphs import CUDAGraphUNet

        self.model = model
        self.unet = CUDAGraphUNet(model, enabled=True, borrow_inputs=True) if graphs else model
        self._sets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inputs: dict[str, torch.Tensor] | None = None
        self._first: tuple[torch.Tensor, ...] = ()

    @property
    def last_reasons(self) -> list[str]:
        return getattr(self.unet, "last_reasons", [])

    def _prepare(self, x, t, ehs, ids) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.model.config.in_channels // 2
        noisy = x[:, :, :c].contiguous()
        time = self.model.time_features(t, ids)
        if self._inputs is not None:
            first = self._first
            differ = [
                name
                for name, now, then in (
                    ("conditioning latent", x[:, 0, c:], first[0]),
                    ("encoder_hidden_states", ehs, first[1]),
                    ("added_time_ids", ids, first[2]),
                )
                if now.shape != then.shape or not torch.equal(now, then)
            ]
            if differ:
                raise ValueError(
                    "PipelineStepCall: input sets are steps of one run and share what the "
                    f"pipelines compute once per run; this set has another {', '.join(differ)}"
                )
        else:
            self._first = (x[:, 0, c:].clone(), ehs.clone(), ids.clone())
            with torch.autocast(x.device.type, enabled=False):
                cond = self.model.conditioning_features(x[:, 0, c:].to(self.model.dtype))
            # the pipeline's persistent input: channels-last frames in the call's dtype
            b, t_, ch, h, w = noisy.shape
            frames = torch.empty(
                (b * t_, ch, h, w), dtype=self.model._call_dtype(x.device), device=x.device
            )
            frames = frames.contiguous(memory_format=self.model.memory_format)
            self._inputs = {
                "x": frames.unflatten(0, (b, t_)).copy_(noisy),
                "conditioning": cond,
                "time_features": time.clone(),
                "context_features": self.model.context_features(ehs),
                "frame_features": self.model.frame_features(x.shape[1], x.device),
                "encoder_hidden_states": ehs,
                "added_time_ids": ids,
                "t": torch.as_tensor(t).to(x.device),
            }
        return noisy, time

    def __call__(self, x, t, *, encoder_hidden_states, added_time_ids):
        key = id(x)
        if key not in self._sets:
            self._sets[key] = self._prepare(x, t, encoder_hidden_states, added_time_ids)
        noisy, time = self._sets[key]
        inp = self._inputs
        inp["x"].copy_(noisy)
        inp["time_features"].copy_(time)
        kwargs = {k: v for k, v in inp.items() if k not in ("x", "t")}
        return self.unet(inp["x"], inp["t"], channels_last_output=True, **kwargs)


@contextlib.contextmanager
def temporal_gemms(device: torch.device) -> Iterator[None]:
    """The temporal resnets' convolutions as three GEMMs on ``device``'s type while inside (as
    :data:`~echofast.nn.spatiotemporal.TEMPORAL_GEMMS_DEVICES` holding it would run them; CUDA
    graphs captured inside keep that path)."""
    from .nn import spatiotemporal as st

    saved = st.TEMPORAL_GEMMS_DEVICES
    st.TEMPORAL_GEMMS_DEVICES = saved | {device.type}
    try:
        yield
    finally:
        st.TEMPORAL_GEMMS_DEVICES = saved


class WithTemporalGemms:
    """A UNet path (e.g. :class:`PipelineStepCall`) called inside :func:`temporal_gemms`."""

    def __init__(self, unet: Any, device: torch.device):
        self.unet, self.device = unet, device

    @property
    def last_reasons(self) -> list[str]:
        return getattr(self.unet, "last_reasons", [])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with temporal_gemms(self.device):
            return self.unet(*args, **kwargs)


def run_unet_calls(
    setup: Setup, batch: int, flop: float | None, unets: dict[str, Any]
) -> Iterator[dict]:
    """One LVDM UNet call per path at the pipeline's shape: time, TFLOP/s, kernels per call (a
    row per path as soon as it is measured)."""
    inputs = _unet_inputs(setup, batch)
    device = setup.device
    # the first call of a graph path captures; on a GPU one more settles autotuning and clocks
    warmup = max(1, setup.plan.warmup) + (device.type == "cuda")
    for path, unet in unets.items():

        def call(i: int, unet=unet) -> Any:
            x, t, ehs, ids = inputs[i % len(inputs)]
            with autocast_context(device, setup.dtype):
                return unet(x, t, encoder_hidden_states=ehs, added_time_ids=ids)

        try:
            with torch.no_grad():
                timing = time_call(call, device, warmup, setup.plan.unet_repeats)
                kernels, what, times = (
                    count_kernels(lambda: call(0), device) if setup.profile else ("", "", None)
                )
        except Exception as err:  # noqa: BLE001 - one failing path must not stop the others
            setup.failures.append(f"{path} b={batch}: {type(err).__name__}: {err}")
            continue
        if times is not None:
            _say(f"  {path} b={batch}: " + "\n    ".join(format_kernel_times(times)))
        extra: dict[str, Any] = {"kernels": kernels}
        reasons = getattr(unet, "last_reasons", None)
        if reasons:
            extra["note"] = "ran eagerly: " + "; ".join(reasons)
        elif what:
            extra["note"] = f"kernels = {what}"
        if flop:
            extra.update(gflop=flop / 1e9, tflops=flop / timing.median / 1e12)
            if setup.gemm_tflops:
                extra["gemm_fraction"] = extra["tflops"] / setup.gemm_tflops
        yield _row(setup, batch, path, "call", timing, **extra)


# ---- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="echofast bench",
        description="Generation speed of echofast vs the reference's way (diffusers eager, fp16 "
        "autocast, the reference's sampling and decode loops) and vs compiled diffusers UNets, "
        "same card, same run. Real configs and 192 frames x 64 steps at batch 1 and 8 on a GPU; "
        "without CUDA a small smoke configuration (seconds). Rows go to a CSV; see --compare.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models, few frames/steps (the default without CUDA)",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="the reference architectures even without CUDA (slow on CPU)",
    )
    p.add_argument(
        "--weights",
        metavar="ROOT",
        help="weights root (vae/, lidm_<dataset>/, lvdm/); default: random weights",
    )
    p.add_argument("--dataset", default="dynamic", help="LIDM folder lidm_<dataset> with --weights")
    p.add_argument("--frames", type=int, help="frames per video (full: 192, smoke: 12)")
    p.add_argument("--steps", type=int, help="denoising steps (full: 64, smoke: 2)")
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        metavar="B",
        help="videos per batch, one measurement each (full: 1 8, smoke: 1 2)",
    )
    p.add_argument("--repeats", type=int, help="timed pipeline runs per path (full: 3, smoke: 1)")
    p.add_argument("--warmup", type=int, help="untimed pipeline runs first (1)")
    p.add_argument("--unet-repeats", type=int, help="timed UNet calls per path (full: 10)")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="echofast's UNet precision (default float16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--decode-chunk", type=int, default=64, help="echofast VAE frames per call")
    p.add_argument(
        "--decode-dtype",
        nargs="+",
        choices=[d for d in DTYPES if d != "float32"],
        default=[],
        metavar="DTYPE",
        help="also time echofast with the VAE decode in these precisions (float16, bfloat16): "
        "one extra path pipeline/echofast+decode-<dtype> each (pipeline/echofast decodes in "
        "float32, the dataset default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true", help="skip the diffusers baselines")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time torch.compile'd diffusers UNets (default on CUDA, not in smoke)",
    )
    comp.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--compile-echofast",
        action="store_true",
        help="also time torch.compile'd echofast models (pipeline and unet rows)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend for --compile (inductor; 'eager' traces without codegen)",
    )
    p.add_argument(
        "--graphs",
        action="store_true",
        help="CUDA-graph UNet calls (echofast.pipelines.graphs): a unet row, and the "
        "pipelines' cuda_graphs=True (CUDA only)",
    )
    p.add_argument(
        "--temporal-gemms",
        action="store_true",
        help="also time echofast with the temporal convolutions (maps of up to "
        "TEMPORAL_GEMMS_MAX_DIM channels) as three GEMMs, as TEMPORAL_GEMMS_DEVICES holding the "
        "device would: paths pipeline/echofast+temporal-gemms and "
        "unet/echofast[+graphs]+step+temporal-gemms",
    )
    p.add_argument(
        "--no-pipeline",
        action="store_true",
        help="time single UNet calls only (no pipeline paths): e.g. the compiled baseline "
        "without compiling the reference's other shapes",
    )
    p.add_argument("--no-avi", action="store_true", help="do not time writing the AVIs")
    p.add_argument("--no-profile", action="store_true", help="skip the kernel counts")
    p.add_argument(
        "--out",
        type=Path,
        help="CSV to append to (default bench/results/echofast_bench_<card>.csv)",
    )
    p.add_argument("--no-csv", action="store_true", help="write no CSV")
    p.add_argument(
        "--compare",
        type=Path,
        metavar="OLD.csv",
        help="flag rows slower than in this earlier CSV (exit status 1 if any)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=10.0,
        help="percent slower that counts as a regression for --compare",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--report",
        type=Path,
        metavar="CSV",
        help="measure nothing: print the summary table (with ratios) of every run in this CSV, "
        "e.g. the <out>.partial.csv journal a stopped run left",
    )
    return p


def _say(msg: str) -> None:
    print(msg, flush=True)


def _resolve(a: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[torch.device, Plan, dict]:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available")
    smoke = a.smoke or (not a.full and device.type != "cuda")
    base = SMOKE_PLAN if smoke else FULL_PLAN
    plan = Plan(
        base.config,
        frames=base.frames if a.frames is None else a.frames,
        steps=base.steps if a.steps is None else a.steps,
        batch_sizes=tuple(base.batch_sizes if a.batch_size is None else a.batch_size),
        repeats=base.repeats if a.repeats is None else a.repeats,
        warmup=base.warmup if a.warmup is None else a.warmup,
        unet_repeats=base.unet_repeats if a.unet_repeats is None else a.unet_repeats,
    )
    if min(plan.frames, plan.steps, plan.repeats, plan.unet_repeats, *plan.batch_sizes) < 1:
        p.error("--frames, --steps, --repeats, --unet-repeats, --batch-size must be >= 1")
    if plan.warmup < 0 or a.decode_chunk < 1:
        p.error("--warmup must be >= 0 and --decode-chunk >= 1")
    if not (math.isfinite(a.threshold) and a.threshold >= 0):
        p.error(f"--threshold must be a finite percentage >= 0, got {a.threshold}")
    if a.weights:
        plan = dataclasses.replace(plan, config="weights")
    configs = SMOKE_CONFIGS if smoke else _reference_configs()
    return device, plan, configs


def _reference_configs() -> dict[str, dict[str, Any]]:
    from .train.config import REFERENCE_ARCHITECTURES

    return REFERENCE_ARCHITECTURES


def main_bench(argv: list[str]) -> int:
    """``echofast bench``: see the module docstring and ``--help``."""
    p = _parser()
    a = p.parse_args(argv)
    if a.report is not None:
        _say(report(a.report))
        return 0
    device, plan, configs = _resolve(a, p)
    dtype = (
        DTYPES[a.dtype] if a.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    if dtype != torch.float32 and device.type != "cuda":
        p.error(f"--dtype {a.dtype} needs CUDA (echofast samples in float32 on CPU)")
    old_rows = read_csv(a.compare) if a.compare else None
    env = environment(device)
    env["run"] = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    out = None
    if not a.no_csv:
        out = a.out or Path("bench/results") / f"echofast_bench_{card_slug(env['card'])}.csv"
    journal = RowJournal(out, env["run"])
    _say(
        f"echofast bench: {env['card']} | torch {env['torch']} (CUDA {env['cuda'] or '-'}) | "
        f"triton {env['triton'] or '-'} | diffusers {env['diffusers'] or '-'} | "
        f"git {env['git_sha']}"
    )
    if plan.config == "smoke":
        _say("smoke configuration (tiny models; CPU numbers are a code-path check, not a result)")
    _say(
        f"config {plan.config}: {plan.frames} frames, {plan.steps} steps, batch "
        f"{list(plan.batch_sizes)}, {plan.warmup} warm-up + {plan.repeats} timed runs per path, "
        f"echofast dtype {_dtype_name(dtype)}"
    )

    with torch.no_grad():
        models = build_models(
            configs if not a.weights else None,
            device,
            weights=a.weights,
            dataset=a.dataset,
            seed=a.seed,
            with_diffusers=not a.no_reference,
        )
    do_compile = (
        a.compile if a.compile is not None else (device.type == "cuda" and plan.config != "smoke")
    )
    setup = Setup(
        device=device,
        plan=plan,
        dtype=dtype,
        env=env,
        models=models,
        seed=a.seed,
        decode_chunk=a.decode_chunk,
        decode_dtypes=tuple(DTYPES[d] for d in a.decode_dtype),
        reference=not a.no_reference,
        compile=do_compile,
        compile_echofast=a.compile_echofast,
        compile_backend=a.compile_backend,
        graphs=a.graphs,
        temporal_gemms=a.temporal_gemms,
        pipelines=not a.no_pipeline,
        avi=not a.no_avi,
        profile=not a.no_profile,
        progress=not a.no_progress,
        journal=journal,
    )
    if models.diffusers_missing and not a.no_reference:
        setup.notes.append(f"baselines skipped: {models.diffusers_missing}")
        setup.reference = False
    if a.compile is None and not do_compile:
        setup.notes.append("torch.compile baseline skipped on CPU/smoke (--compile to force)")
    if a.graphs and device.type != "cuda":
        setup.notes.append(
            f"--graphs: CUDA graphs need CUDA; on {device.type} the pipelines and the "
            "unet/echofast+graphs row run eagerly"
        )
    for note in setup.notes:
        _say(f"note: {note}")

    _measure(setup)
    add_ratios(setup.rows)
    _say("")
    _say(summary_table(setup.rows))
    for note in setup.notes:
        _say(f"note: {note}")
    status = 0
    if setup.failures:
        status = 1
        for f in setup.failures:
            _say(f"FAILED: {f}")
    journal.finish(setup.rows)
    if out is not None and setup.rows:
        _say(f"{len(setup.rows)} rows appended to {out}")
    if old_rows is not None:
        lines, regressions = compare(setup.rows, old_rows, a.threshold)
        _say(
            f"\ncompared with {a.compare} (threshold {a.threshold:g}%): {len(lines)} matching rows"
        )
        if not lines:
            _say(
                f"  warning: no row of {a.compare} has this run's card ({env['card']}) and "
                f"configuration ({plan.config}, {plan.frames} frames, {plan.steps} steps, "
                "dtype, batch, path, phase): nothing was compared"
            )
        for line in lines:
            _say("  " + line)
        if regressions:
            _say(f"{len(regressions)} regression(s)")
            status = 1
    return status


def _measure(setup: Setup) -> None:
    """Every measurement of the plan, appending rows to ``setup.rows``."""
    device, m = setup.device, setup.models
    timing, flop, label = gemm_ceiling(device)
    setup.gemm_tflops = flop / timing.median / 1e12
    gemm_row = _row(
        setup,
        "",
        label,
        "call",
        timing,
        dtype=label.split("/")[1].split("-")[0],
        gflop=flop / 1e9,
        tflops=setup.gemm_tflops,
        note="ceiling: random inputs, CUDA events"
        if device.type == "cuda"
        else "CPU smoke ceiling (not a GPU number)",
    )
    setup.record([gemm_row])
    _say(f"GEMM ceiling {label}: {setup.gemm_tflops:.1f} TFLOP/s")
    setup.gflop_per_window = _flop_per_window(setup) / 1e9
    _say(
        f"LVDM UNet: {setup.gflop_per_window:.1f} GFLOP per window per step "
        f"({'diffusers' if m.d_lvdm is not None else 'echofast, torch backends'} count; "
        f"spec: ~572 for the reference config)"
    )

    def compile_(module: Any) -> Any:
        return torch.compile(module, dynamic=False, backend=setup.compile_backend)

    compiled: dict[str, Any] = {}
    if setup.compile_echofast:
        # fp32 weights: the pipelines' conditioning runs outside autocast, on the module passed
        compiled.update(echofast_lidm=compile_(m.lidm), echofast_lvdm=compile_(m.lvdm))
    if setup.reference and setup.compile:
        compiled.update(lidm=compile_(m.d_lidm), lvdm=compile_(m.d_lvdm))
    for batch in setup.plan.batch_sizes:
        n_win, _, shape = _lvdm_shapes(setup, batch)
        call_flop = setup.gflop_per_window * 1e9 * shape[0]
        run_flop = call_flop * setup.plan.steps
        _say(f"\nbatch {batch}: {n_win} windows per video, UNet input {tuple(shape)}")
        # cheapest and most wanted first: a run stopped part way keeps those rows (journal)
        paths: list[tuple[str, Any]] = [("pipeline/echofast", None)]
        decode = {f"pipeline/echofast+decode-{_dtype_name(d)}": d for d in setup.decode_dtypes}
        paths += [(name, None) for name in decode]
        variant = "pipeline/echofast+temporal-gemms"
        if setup.temporal_gemms:
            paths.append((variant, None))
        if setup.reference:
            paths.append(("pipeline/reference", (m.d_lidm, m.d_lvdm)))
        if "lvdm" in compiled:
            paths.append(("pipeline/reference+compile", (compiled["lidm"], compiled["lvdm"])))
        if "echofast_lvdm" in compiled:
            mine = (compiled["echofast_lidm"], compiled["echofast_lvdm"])
            paths.append(("pipeline/echofast+compile", mine))
        for name, unets in paths if setup.pipelines else ():
            try:
                if name.startswith("pipeline/echofast"):
                    switch = temporal_gemms(device) if name == variant else contextlib.nullcontext()
                    with switch:
                        rows = run_echofast(
                            setup, batch, run_flop, unets, name, decode.get(name, torch.float32)
                        )
                else:
                    rows = run_reference(setup, batch, run_flop, unets, name)
            except Exception as err:  # noqa: BLE001 - report the path, measure the others
                setup.failures.append(f"{name} b={batch}: {type(err).__name__}: {err}")
                _say(f"  {name}: FAILED ({type(err).__name__}: {err})")
                continue
            setup.record(rows)
            total = rows[0]
            _say(
                f"  {name:<34} {total['s_per_video']:.4g} s/video, "
                f"{total['frames_per_s']:.4g} frames/s, {total['videos_per_s']:.3g} videos/s"
            )
        # echofast's UNet as its pipelines call it: in reduced precision, its autocast_copy
        ours = m.lvdm if setup.dtype == torch.float32 else m.lvdm.autocast_copy(setup.dtype)
        unets: dict[str, Any] = {"unet/echofast": ours}
        if setup.graphs:
            from .pipelines.graphs import CUDAGraphUNet

            unets["unet/echofast+graphs"] = CUDAGraphUNet(ours)
        # as the pipeline calls it at each step (run-constant work precomputed): the kernels
        # per step that the ≤ 700 goal counts
        unets["unet/echofast+step"] = PipelineStepCall(ours, graphs=False)
        step_graphs = setup.graphs and device.type == "cuda"
        if step_graphs:
            unets["unet/echofast+graphs+step"] = PipelineStepCall(ours, graphs=True)
        if setup.temporal_gemms:  # beside the step call as the pipelines make it
            name = "unet/echofast+graphs+step" if step_graphs else "unet/echofast+step"
            unets[f"{name}+temporal-gemms"] = WithTemporalGemms(
                PipelineStepCall(ours, graphs=step_graphs), device
            )
        if setup.reference:
            unets["unet/diffusers"] = m.d_lvdm
        if "lvdm" in compiled:
            unets["unet/diffusers+compile"] = compiled["lvdm"]
        if "echofast_lvdm" in compiled:
            unets["unet/echofast+compile"] = compiled["echofast_lvdm"]
        for row in run_unet_calls(setup, batch, call_flop, unets):
            setup.record([row])
            _say(
                f"  {row['path']:<34} {1e3 * row['median_s']:.3f} ms/call, "
                f"{row.get('tflops', 0) or 0:.3g} TFLOP/s, kernels {row['kernels'] or '-'}"
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _flop_per_window(setup: Setup) -> float:
    """FLOPs of one LVDM UNet call on one window (nominal: diffusers' model when present, else
    echofast's with the plain-PyTorch backends)."""
    from .ops import use_backend

    x, t, ehs, ids = _unet_inputs(setup, 1, sets=1)[0]
    m = setup.models
    unet = m.d_lvdm if m.d_lvdm is not None else m.lvdm
    ctx = contextlib.nullcontext() if m.d_lvdm is not None else use_backend("torch")
    with torch.no_grad(), ctx:
        return count_flops(
            lambda: unet(x[:1], t, encoder_hidden_states=ehs[:1], added_time_ids=ids[:1])
        )


if __name__ == "__main__":
    sys.exit(main_bench(sys.argv[1:]))
