"""``echofast bench``'s measuring tools: the environment (card, versions, git revision), timed
calls with medians and quantiles, FLOP counts, the profiler's kernel counts and kernel-time
tables, and the large-GEMM ceiling every TFLOP/s figure is reported against."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__

# ---- environment -------------------------------------------------------------------------------


def git_sha() -> str:
    """``$ECHOFAST_GIT_SHA`` if set (a copy of the tree without its .git, as on a lent GPU machine),
    else ``git describe --always --dirty`` of the working directory's checkout, else of the
    package's source tree, else "unknown"."""
    if os.environ.get("ECHOFAST_GIT_SHA"):
        return os.environ["ECHOFAST_GIT_SHA"]
    for cwd in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                cwd=cwd,
                timeout=20,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where it exists)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def card_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu: <model>``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}"


def card_slug(card: str) -> str:
    """A file-name-safe card name: ``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """The columns every row carries: card, device, versions, git revision."""
    return {
        "card": card_name(device),
        "device": str(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "",
        "diffusers": _version("diffusers"),
        "echofast": __version__,
        "git_sha": git_sha(),
    }


# ---- timing ------------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation between order statistics)."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """Seconds of repeated runs: median, 20th and 80th percentiles."""

    samples: list[float]

    @property
    def median(self) -> float:
        return quantile(self.samples, 0.5)

    @property
    def p20(self) -> float:
        return quantile(self.samples, 0.2)

    @property
    def p80(self) -> float:
        return quantile(self.samples, 0.8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[int], Any], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Seconds per ``fn(i)`` call (``i`` counts calls, to rotate inputs): CUDA events on a GPU,
    ``perf_counter`` around a synchronised call on CPU; ``warmup`` untimed calls first."""
    for i in range(warmup):
        fn(i)
    synchronize(device)
    samples = []
    for i in range(warmup, warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(i)
            samples.append(time.perf_counter() - t0)
    return Timing(samples)


class PhaseClock:
    """Wall time of consecutive phases of one run, the device synchronised at each boundary."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, float] = {}
        synchronize(device)
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now


# ---- FLOPs, kernels, GEMM ceiling --------------------------------------------------------------


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` by ``FlopCounterMode``, attention decomposed by SDPA's MATH backend (the
    fused CPU/GPU attention kernels are not counted otherwise)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return int(counter.get_total_flops())


KERNEL_KINDS: tuple[tuple[str, str], ...] = (
    ("triton GroupNorm", r"_gn_"),
    ("triton attention", r"_attn_"),
    ("triton GEGLU", r"_geglu_"),
    ("triton feed-forward", r"_ff_fwd"),
    ("triton bias + residual", r"_bias_residual"),
    ("triton window step", r"_window_"),
    ("triton LayerNorm", r"_layer_norm_fwd"),
    ("convolution", r"conv|fprop|dgrad|wgrad"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|matmul"),
    ("attention (library)", r"fmha|flash|attention|softmax"),
    ("layer norm", r"layer_?norm"),
    ("group norm (library)", r"group_?norm"),
    ("concatenation", r"\bcat|catarray"),
    # "nocast" in an elementwise kernel's name is the TensorIterator path, not a cast
    ("copy / cast", r"direct_copy|copy_kernel|contiguous|nchwtonhwc|nhwctonchw|(?<!no)cast"),
    # PyTorch's non-vectorised path: broadcasts (a conv bias over channels-last, a (1,) weight)
    # and non-contiguous operands
    ("elementwise, strided", r"(?<![a-z_])elementwise_kernel<"),
    ("elementwise / reduction", r"elementwise|vectorized|unrolled|reduce"),
)
"""(kind, regular expression on the lower-cased kernel name), first match wins."""

_FUNCTOR = re.compile(r"\w*(?:functor|_kernel_cuda|lambda)\w*", re.IGNORECASE)


def short_kernel_name(name: str, width: int = 110) -> str:
    """A kernel name cut to about ``width`` characters, keeping what tells PyTorch's templated
    elementwise kernels apart: the functors named in the cut part."""
    if len(name) <= width:
        return name
    head = name[: width - 40]
    functors = list(dict.fromkeys(_FUNCTOR.findall(name[len(head) :])))
    tail = ", ".join(functors)[:38]
    return f"{head} .. {tail}" if tail else head


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel from its name (see :data:`KERNEL_KINDS`), else "other"."""
    low = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, low)), "other")


def kernel_time_table(kernels: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """From (kernel name, device microseconds) pairs of one call: the totals per kind
    ``{kind: (calls, us)}`` and the kernels ``[(name, calls, us)]``, longest first."""
    per_name: dict[str, list[float]] = {}
    for name, us in kernels:
        acc = per_name.setdefault(name, [0, 0.0])
        acc[0] += 1
        acc[1] += us
    kinds: dict[str, list[float]] = {}
    for name, (calls, us) in per_name.items():
        acc = kinds.setdefault(kernel_kind(name), [0, 0.0])
        acc[0] += calls
        acc[1] += us
    by_time = sorted(((n, int(c), t) for n, (c, t) in per_name.items()), key=lambda r: -r[2])
    return {
        "kinds": {k: (int(c), t) for k, (c, t) in sorted(kinds.items(), key=lambda kv: -kv[1][1])},
        "kernels": by_time,
    }


#: the ATen ops whose device time :func:`op_time_table` lists by input shape: convolutions and
#: matrix products (leaves of ``linear``; ``convolution`` is the entry of every conv backend)
HEAVY_OPS = ("aten::convolution", "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")


def op_time_table(
    averages: Sequence[Any], time_attr: str = "device_time_total", names: Sequence[str] = HEAVY_OPS
) -> list[tuple[str, str, int, float]]:
    """From a profile's ``key_averages(group_by_input_shape=True)``: ``[(op, input shapes,
    calls, microseconds)]`` of the ``names`` ops, longest first (``time_attr``: the averages'
    time field, e.g. ``cpu_time_total`` on a CPU). A CUDA-graph replay has no ops: empty."""
    rows = [
        (a.key, str(a.input_shapes), int(a.count), float(getattr(a, time_attr, 0.0) or 0.0))
        for a in averages
        if a.key in names
    ]
    return sorted(rows, key=lambda r: -r[3])


def format_kernel_times(table: dict[str, Any], top: int = 10) -> list[str]:
    """Lines: GPU time per kind of kernel, then the ``top`` longest kernels (name shortened),
    then (where the table has ``ops``: an eager call) the ``top`` convolutions and matrix
    products with the most GPU time, by input shape."""
    total = sum(t for _, t in table["kinds"].values()) or 1.0
    lines = [f"GPU time of one call by kind ({total / 1e3:.2f} ms in kernels):"]
    for kind, (calls, us) in table["kinds"].items():
        share = 100 * us / total
        lines.append(f"  {kind:<26} {us / 1e3:8.3f} ms {share:5.1f} %  {calls:5d} kernels")
    lines.append(f"longest {top} kernels:")
    for name, calls, us in table["kernels"][:top]:
        lines.append(f"  {us / 1e3:8.3f} ms {calls:5d}x  {short_kernel_name(name)}")
    ops = table.get("ops") or []
    if ops:
        lines.append("convolutions / matrix products with the most GPU time, by input shape:")
        for name, shapes, calls, us in ops[:top]:
            lines.append(f"  {us / 1e3:8.3f} ms {calls:5d}x  {name[6:]:<12} {shapes}")
    return lines


def count_kernels(
    fn: Callable[[], Any], device: torch.device
) -> tuple[int, str, dict[str, Any] | None]:
    """(count, what, times) for one ``fn()`` call: on a GPU the CUDA kernels it launches
    (profiler; memcpy/memset not counted) and their device time by kind
    (:func:`kernel_time_table`); on CPU the ATen ops it dispatches (each runs one CPU kernel),
    counted by a dispatch mode, which is much cheaper than parsing a CPU profile, and no times."""
    if device.type != "cuda":
        from torch.utils._python_dispatch import TorchDispatchMode

        class _OpCounter(TorchDispatchMode):
            count = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.count += 1
                return func(*args, **(kwargs or {}))

        with _OpCounter() as counter:
            fn()
        return counter.count, "ATen ops dispatched (CPU: no CUDA kernels)", None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
    ) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    kernels = [
        (e.name, e.time_range.end - e.time_range.start)
        for e in events
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    if kernels:
        table = kernel_time_table(kernels)
        table["ops"] = op_time_table(prof.key_averages(group_by_input_shape=True))
        return len(kernels), "CUDA kernels", table
    # no device activity recorded (CUPTI unavailable): count the launches on the host side
    launches = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    n = sum(1 for e in events if e.name in launches)
    return n, "CUDA kernel launches (runtime API; no device trace)", None


def gemm_ceiling(device: torch.device, repeats: int = 10) -> tuple[Timing, float, str]:
    """A large matrix product on random data: (timing, FLOPs per product, label). bf16
    8192×8192×8192 on a GPU (the spec's ceiling); fp32 512³ on CPU (smoke only)."""
    if device.type == "cuda":
        n, dtype, label = 8192, torch.bfloat16, "gemm/bf16-8192"
    else:
        n, dtype, label = 512, torch.float32, "gemm/fp32-512-cpu"
    g = torch.Generator(device=device).manual_seed(0)
    mats = [torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(4)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_call(
        lambda i: torch.mm(mats[i % 2], mats[2 + i % 2], out=out), device, 3, repeats
    )
    return timing, 2.0 * n**3, label
