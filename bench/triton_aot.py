"""Compile every echofast Triton kernel for a GPU target ahead of time, on a machine with no GPU.

A kernel that the device's Triton cannot compile would waste a scarce GPU lease; this finds it
here. Each launcher of ``echofast.kernels`` is driven on CPU tensors with the real models' shapes,
dtypes and flags while ``JITFunction.run`` is replaced by a recorder: every launch becomes a
variant (kernel, argument types, constexpr values, num_warps). Each distinct variant is compiled
with ``triton.compile`` for the target (default ``cuda:90``: H100/H200; also e.g. ``cuda:80``),
then ``cuobjdump`` (bundled with Triton) reads registers, local memory (spills) and shared memory
of each compiled variant.

Launch plans on CPU differ from a GPU's only where they read the device: the persistent grids'
program counts (runtime values, not compiled in) and group_norm's chunk count, whose power of two
``BLOCK_K`` is a constexpr — the cases pass the chunk count an H100 (132 SMs) would get.
Arguments are specialised as Triton's JIT specialises them at a launch: a pointer to 16-byte
aligned memory and an integer divisible by 16 carry the ``tt.divisibility = 16`` hint (what lets
the compiler prove contiguous, aligned accesses and issue 16-byte loads), an integer equal to 1
is compiled in as a constant; other integers are i32 (i64 when large).

Usage::

    python bench/triton_aot.py [--target cuda:90 cuda:80] [--quick] [--csv FILE] [--jobs N]
    PYTHONPATH=/path/to/triton-3.6 python bench/triton_aot.py   # the device's Triton version

Exit status 1 when a variant fails to compile (every failure is printed with its error).
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
    sys.exit("triton_aot.py compiles kernels: unset TRITON_INTERPRET")

from echofast.ops._triton import triton_too_old  # noqa: E402

if triton_too_old():  # its compiler API differs too (ASTSource, attributes)
    sys.exit(f"triton_aot.py: {triton_too_old()}")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

#: multiprocessors of the card the group_norm chunk counts are planned for (H100/H200 SXM)
SM_COUNT = 132

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_TENSOR_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


FLOAT_NAMES = ("fp32", "fp16", "bf16", "fp64")


@dataclass
class Variant:
    """One compilation unit: a kernel with argument types, constexprs and launch options."""

    kernel: JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, int]
    case: str
    attrs: dict[tuple[int, ...], list] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def key(self) -> tuple:
        return (
            self.kernel.__module__,
            self.name,
            tuple(sorted(self.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
            tuple(sorted(self.options.items())),
            tuple(sorted(self.attrs)),
        )

    def describe(self) -> str:
        dtypes = sorted({t[1:] for t in self.signature.values() if t[1:] in FLOAT_NAMES})
        consts = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        return f"{'/'.join(dtypes) or '-'} {consts} warps={self.options.get('num_warps', 4)}"


@dataclass
class Recorder:
    """``JITFunction.run`` stand-in: records each launch as a :class:`Variant`, launches nothing."""

    case: str = ""
    variants: dict[tuple, Variant] = field(default_factory=dict)
    launches: int = 0

    def __call__(self, fn: JITFunction, *args, grid, warmup, **kwargs) -> None:
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        bound = fn.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(fn.params):
            value = bound.arguments[param.name]
            if param.is_constexpr or _is_int(value) and value == 1:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
                continue
            signature[param.name] = _arg_type(value, f"{fn.__name__}({param.name})")
            if _divisible_by_16(value):
                attrs[(i,)] = [["tt.divisibility", 16]]
        variant = Variant(fn, signature, constexprs, options, self.case, attrs)
        self.variants.setdefault(variant.key(), variant)
        self.launches += 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _divisible_by_16(value: object) -> bool:
    """The JIT's alignment specialisation: a tensor's address or an integer divisible by 16."""
    if torch.is_tensor(value):
        return value.data_ptr() % 16 == 0
    return _is_int(value) and value % 16 == 0


def _arg_type(value: object, where: str) -> str:
    if torch.is_tensor(value):
        return "*" + _TENSOR_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"{where}: cannot type a {type(value).__name__} argument")


# ---- the cases: the launchers on the real models' shapes ------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _gn_chunks(n: int, groups: int) -> int:
    """group_norm's chunk count on a GPU (kernels.group_norm.Plan with SM_COUNT multiprocessors)."""
    from echofast.kernels import group_norm as k

    return triton.cdiv(SM_COUNT * k.PROGRAMS_PER_SM, n * groups)


def _group_norm_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    from echofast.kernels import group_norm as k

    cl, cl3, cf = torch.channels_last, torch.channels_last_3d, torch.contiguous_format
    shapes = [
        ("lvdm-spatial", (5 * 64, 320, 16, 16), 32, cl),  # (B·T, C, H, W) spatial resnet
        ("lvdm-temporal", (5, 640, 64, 8, 8), 32, cf),  # (B, C, T, H, W): a group spans T·H·W
        # the LVDM's temporal resnets read channels-last frames: the split rows kernels
        ("lvdm-temporal-cl", (5, 128, 64, 16, 16), 32, cl3),
        # 16 channels per group: the DENSE form (16-byte loads, per-element Welford)
        ("lvdm-temporal-512-cl", (5, 512, 64, 8, 8), 32, cl3),
        ("vae-decoder", (8, 128, 112, 112), 32, cl),  # the VAE's largest maps
        ("odd", (2, 63, 5, 7), 21, cl),
    ]
    flag_sets = [  # (name, affine, activation, scale/shift modulation, input add)
        ("affine+silu", True, "silu", False, False),
        ("affine", True, None, False, False),
        ("modulated+silu", True, "silu", True, False),
        ("plain", False, None, False, False),
        ("temb-add+silu", True, "silu", False, True),
    ]
    for dtype in DTYPES[:1] if quick else DTYPES:
        # quick: one shape whose groups are split (stats + apply) and two that are not (fused)
        for shape_name, shape, groups, fmt in (
            [x for x in shapes if x[0] != "vae-decoder"] if quick else shapes
        ):
            for flags_name, affine, act, modulated, add in flag_sets:
                name = f"group_norm {shape_name} {flags_name} {str(dtype)[6:]}"

                def run(
                    shape=shape,
                    groups=groups,
                    fmt=fmt,
                    affine=affine,
                    act=act,
                    mod=modulated,
                    add=add,
                    dt=dtype,
                ):
                    n, c = shape[:2]
                    x = torch.empty(shape, dtype=dt).contiguous(memory_format=fmt)
                    w = torch.empty(c, dtype=dt) if affine else None
                    b = torch.empty(c, dtype=dt) if affine else None
                    sc = torch.empty(n, c, dtype=dt) if mod else None
                    sh = torch.empty(n, c, dtype=dt) if mod else None
                    chunks = _gn_chunks(n, groups)
                    rows = torch.empty(n, c, dtype=dt) if add else None
                    if fmt != torch.contiguous_format:  # the rows kernels (forward only)
                        for split in (1, triton.cdiv(SM_COUNT * k.PROGRAMS_PER_SM, n)):
                            k.group_norm_fwd(
                                x,
                                groups,
                                w,
                                b,
                                1e-5,
                                act,
                                sc,
                                sh,
                                fmt,
                                add=rows,
                                use_rows=True,
                                num_chunks=split,
                            )
                    if add:  # forward only: under autograd the op adds first
                        k.group_norm_fwd(
                            x, groups, w, b, 1e-5, act, sc, sh, fmt, add=rows, num_chunks=chunks
                        )
                        return
                    _, mean, rstd = k.group_norm_fwd(
                        x, groups, w, b, 1e-5, act, sc, sh, fmt, num_chunks=chunks
                    )
                    dy = torch.empty_like(x)
                    k.group_norm_bwd(
                        dy, x, mean, rstd, groups, w, b, act, sc, sh, num_chunks=chunks
                    )

                yield name, run


def _attention_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    from echofast.kernels import attention as k

    lengths = [(64, 64), (256, 256), (16, 16), (1024, 1024), (37, 65)]
    for dtype in DTYPES[:2] if quick else DTYPES:
        for d in k.HEAD_DIMS[-2:] if quick else k.HEAD_DIMS:
            for lq, lk in lengths[:2] if quick else lengths:

                def run(d=d, lq=lq, lk=lk, dt=dtype):
                    q = torch.empty(2, 3, lq, d, dtype=dt)
                    kv = torch.empty(2, 3, lk, d, dtype=dt)
                    k.attention_fwd(q, kv, kv, d**-0.5, max_programs=SM_COUNT * k.PROGRAMS_PER_SM)

                yield f"attention d={d} L={lq}x{lk} {str(dtype)[6:]}", run
        for d in k.HEAD_DIMS[1:2] if quick else k.HEAD_DIMS:

            def frames(d=d, dt=dtype):
                # temporal attention of frame-major fused QKV: (B, S, heads, T, D) views
                qkv = torch.empty(5, 64, 196, 3, 4, d, dtype=dt)
                q, kk, v = (qkv[:, :, :, i].permute(0, 2, 3, 1, 4) for i in range(3))
                k.attention_fwd(q, kk, v, d**-0.5, max_programs=SM_COUNT * k.PROGRAMS_PER_SM)

            yield f"attention frame-major d={d} T=64 {str(dtype)[6:]}", frames


def _window_step_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    from echofast.kernels import window_step as k
    from echofast.ops.window_step import window_tables

    total, window, stride, c, h = 192, 64, 32, 4, 14
    starts = list(range(0, total - window + 1, stride))
    tables = [
        torch.tensor(v, dtype=torch.int32)
        for v in (*window_tables(total, starts, window, window - stride), starts)
    ]
    for dtype in DTYPES[:1] if quick else DTYPES:
        for pad in (1,) if quick else (0, 1):
            for noise in (True, False):

                def run(dt=dtype, pad=pad, noise=noise):
                    lat = torch.empty(2, total, c, h, h)
                    pred = torch.empty(2 * len(starts), window, c, h + 2 * pad, h + 2 * pad)
                    nxt = torch.empty(2 * len(starts), window, 2 * c, h + 2 * pad, h + 2 * pad)
                    z = torch.empty_like(lat) if noise else None
                    coeffs = torch.empty(2, 6)
                    k.window_step_fwd(pred.to(dt), lat, coeffs, z, *tables, pad, 4.0, nxt)

                yield f"window_step pad={pad} noise={noise} {str(dtype)[6:]}", run


def _geglu_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    from echofast.kernels import geglu as k

    shapes = [(81920, 2 * 512), (20480, 2 * 1024), (3, 2 * 37)]
    for dtype in DTYPES[:1] if quick else DTYPES:
        for rows, cols in shapes[::2] if quick else shapes:
            for approximate in ("none", "tanh"):

                def run(rows=rows, cols=cols, dt=dtype, approximate=approximate):
                    h = torch.empty(rows, cols, dtype=dt)
                    k.geglu_fwd(h, approximate)
                    k.geglu_bwd(h, torch.empty(rows, cols // 2, dtype=dt), approximate)

                yield f"geglu {rows}x{cols} {approximate} {str(dtype)[6:]}", run


def _geglu_linear_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    from echofast.kernels import geglu_linear as k

    shapes = [(81920, 128, 512), (20480, 256, 1024), (5120, 512, 2048), (37, 40, 20)]
    for dtype in DTYPES[:1] if quick else DTYPES:
        for m, kk, n in shapes[::3] if quick else shapes:
            for bias in (True, False) if not quick else (True,):

                def run(m=m, kk=kk, n=n, dt=dtype, bias=bias):
                    w = torch.empty(2 * n, kk, dtype=dt)
                    b = torch.empty(2 * n, dtype=dt) if bias else None
                    k.geglu_linear_fwd(torch.empty(m, kk, dtype=dt), w, b)

                yield f"geglu_linear {m}x{kk}->{n} bias={bias} {str(dtype)[6:]}", run


def _feed_forward_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    from echofast.kernels import feed_forward as k

    # the LVDM's feed-forwards at levels 0-2 (C = N, I = 4·C), at one 5-window call; an awkward one
    shapes = [(81920, 128, 512, 128), (20480, 256, 1024, 256), (37, 40, 160, 24)]
    # quick: fp16 (the models' GPU dtype; fp32 spills and takes ~25 s per variant to compile)
    for dtype in (torch.float16,) if quick else DTYPES:
        for m, c, inner, n in shapes[::2] if quick else shapes:
            for residual in (True, False):

                def run(m=m, c=c, inner=inner, n=n, dt=dtype, residual=residual):
                    w1, b1 = torch.empty(2 * inner, c, dtype=dt), torch.empty(2 * inner, dtype=dt)
                    w2, b2 = torch.empty(n, inner, dtype=dt), torch.empty(n, dtype=dt)
                    out = torch.empty(m, n, dtype=dt)
                    r = out if residual else None
                    k.feed_forward_fwd(torch.empty(m, c, dtype=dt), w1, b1, w2, b2, r, out)

                yield (
                    f"feed_forward {m}x{c}->{inner}->{n} residual={residual} {str(dtype)[6:]}",
                    run,
                )


def _geglu_linear_tuning_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """Every tile configuration that bench/tune_geglu_linear.py may try, fp16 with bias at the
    LVDM's K = 128 site: registers, spills and shared memory of each."""
    import tune_geglu_linear as tune

    from echofast.kernels import geglu_linear as k

    for config in tune.candidates(128)[: 4 if quick else None]:

        def run(config=config, dt=torch.float16):
            w, b = torch.empty(1024, 128, dtype=dt), torch.empty(1024, dtype=dt)
            k.geglu_linear_fwd(torch.empty(81920, 128, dtype=dt), w, b, config=config)

        yield f"geglu_linear tuning {tune.config_name(config)}", run


def _layer_norm_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    from echofast.kernels import layer_norm as k

    widths = [320, 640, 1280, 37]  # the LVDM's and LIDM's LayerNorm widths, an awkward one
    for dtype in DTYPES[:1] if quick else DTYPES:
        for c in widths[::2] if quick else widths:
            for affine in (True, False):

                def run(c=c, dt=dtype, affine=affine):
                    w = torch.empty(c) if affine else None
                    k.layer_norm_fwd(torch.empty(81920, c, dtype=dt), w, w, 1e-5)

                yield f"layer_norm C={c} affine={affine} {str(dtype)[6:]}", run
            for form in ("residual", "residual+rows+shift", "frame rows"):

                def fused(c=c, dt=dtype, form=form):
                    x = torch.empty(81920, c, dtype=dt)
                    w = torch.empty(c)
                    r = None if form == "frame rows" else torch.empty_like(x)
                    a = None if form == "residual" else torch.empty(64, c, dtype=dt)
                    shift = torch.empty(c, dtype=dt) if "shift" in form else None
                    group = 20 if form == "frame rows" else None
                    k.layer_norm_fwd(
                        x, w, w, 1e-5, residual=r, add=a, h_out=x, shift=shift, add_group=group
                    )

                yield f"add_layer_norm {form} C={c} {str(dtype)[6:]}", fused


def _bias_residual_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    from echofast.kernels import bias_residual as k

    forms = [  # the resblock epilogues: conv2 + b2 + x; + shortcut + b_sc; s += w·(g + b_t)
        ("residual+bias", {"residual": True, "bias": True}),
        ("residual+bias+bias2", {"residual": True, "bias": True, "bias2": True}),
        ("mix", {"residual": True, "bias": True, "weight": True}),
    ]
    for dtype in DTYPES[:1] if quick else DTYPES:
        for c in (320, 1280) if quick else (320, 640, 1280, 37):
            for name, form in forms:

                def run(c=c, dt=dtype, form=form):
                    y = torch.empty(81920, c, dtype=dt)
                    extra = {
                        "residual": torch.empty_like(y) if form.get("residual") else None,
                        "bias": torch.empty(c, dtype=dt) if form.get("bias") else None,
                        "bias2": torch.empty(c, dtype=dt) if form.get("bias2") else None,
                        "weight": torch.empty(1, dtype=dt) if form.get("weight") else None,
                    }
                    k.bias_residual_fwd(y, y, **extra)

                yield f"bias_residual C={c} {name} {str(dtype)[6:]}", run


CASES = {
    "group_norm": _group_norm_cases,
    "attention": _attention_cases,
    "window_step": _window_step_cases,
    "geglu": _geglu_cases,
    "geglu_linear": _geglu_linear_cases,
    "feed_forward": _feed_forward_cases,
    "layer_norm": _layer_norm_cases,
    "bias_residual": _bias_residual_cases,
}
#: cases run only when named (``--cases``)
EXTRA_CASES = {"geglu_linear_tuning": _geglu_linear_tuning_cases}


def kernel_functions() -> dict[str, list[str]]:
    """Every ``@triton.jit`` kernel (a function launched with a grid, named ``_*_kernel``) of
    each ``echofast.kernels`` module: what the cases must cover."""
    import importlib

    found = {}
    for module_name in CASES:
        module = importlib.import_module(f"echofast.kernels.{module_name}")
        found[module_name] = sorted(
            name
            for name, obj in vars(module).items()
            if isinstance(obj, JITFunction) and name.endswith("_kernel")
        )
    return found


def record(quick: bool, names: list[str] | None = None) -> tuple[Recorder, list[str]]:
    """Drive the cases (``names``, default: every one of :data:`CASES`) with the recorder in
    place of ``JITFunction.run``."""
    chosen = [{**CASES, **EXTRA_CASES}[name] for name in names or CASES]
    recorder = Recorder()
    errors = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return recorder(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = run
    try:
        with torch.no_grad():
            for cases in chosen:
                for name, case in cases(quick):
                    recorder.case = name
                    try:
                        case()
                    except Exception as e:  # noqa: BLE001 - report every case that cannot launch
                        errors.append(f"{name}: {type(e).__name__}: {e}")
    finally:
        JITFunction.run = original
    return recorder, errors


# ---- compile and read the resource usage ----------------------------------------------------

_LOAD = re.compile(r"\b(LDG(?:\.[A-Z0-9_]+)*)")
_USAGE = re.compile(
    r"REG:(?P<reg>\d+) STACK:(?P<stack>\d+) SHARED:(?P<shared>\d+) LOCAL:(?P<local>\d+)"
)


def _cuobjdump() -> str:
    """The cuobjdump that ships with Triton (this machine's CUDA toolkit may have none)."""
    import triton.backends.nvidia as nv

    bundled = Path(nv.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else "cuobjdump"


def resources(cubin: bytes) -> dict[str, int | str]:
    """Registers per thread, stack + local bytes per thread (register spills and local arrays),
    static shared memory of a compiled kernel (``cuobjdump --dump-resource-usage``), and its
    global loads by width (``--dump-sass``: e.g. ``LDG.E.128:4 LDG.E.U16:2``; 128-bit loads are
    16 bytes per thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage, sass = (
            subprocess.run(
                [_cuobjdump(), flag, str(path)], capture_output=True, text=True, check=True
            ).stdout
            for flag in ("--dump-resource-usage", "--dump-sass")
        )
    m = _USAGE.search(usage)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {usage[-300:]!r}")
    loads = Counter(_LOAD.findall(sass))
    return {
        "registers": int(m["reg"]),
        "local_bytes": int(m["stack"]) + int(m["local"]),
        "static_shared_bytes": int(m["shared"]),
        "global_loads": " ".join(f"{op}:{n}" for op, n in sorted(loads.items())),
    }


def compile_variant(v: Variant, target: GPUTarget) -> dict:
    """Compile one variant for ``target``; a row with its resource usage or its error."""
    row = {
        "kernel": f"{v.kernel.__module__.rsplit('.', 1)[-1]}.{v.name}",
        "variant": v.describe(),
        "case": v.case,
        "target": f"{target.backend}:{target.arch}",
        "triton": triton.__version__,
    }
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs, attrs=v.attrs)
        compiled = triton.compile(src, target=target, options=dict(v.options))
        row.update(resources(compiled.asm["cubin"]))
        row["shared_bytes"] = int(getattr(compiled.metadata, "shared", 0))
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is reported, the run carries on
        row["status"] = "FAIL"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != "^"]
        row["error"] = f"{type(e).__name__}: " + " | ".join(lines[-3:])[:400]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _compile_share(
    quick: bool, names: list[str] | None, keys: list[tuple], targets: list[str]
) -> list[dict]:
    """In a worker process: record the cases again and compile the variants of ``keys`` for
    each of ``targets`` (``cuda:<cc>``), in that order. Recording is deterministic; a key the
    worker does not record is an error, not a silently skipped variant."""
    recorder, _ = record(quick, names)
    missing = [k for k in keys if k not in recorder.variants]
    if missing:
        raise RuntimeError(f"a worker process did not record {len(missing)} variants: {missing[0]}")
    return _compile_keys(recorder, keys, targets)


def _compile_keys(recorder: Recorder, keys: list[tuple], targets: list[str]) -> list[dict]:
    return [compile_variant(recorder.variants[k], _target(t)) for t in targets for k in keys]


def compile_all(
    recorder: Recorder, targets: list[str], jobs: int, quick: bool, names: list[str] | None
) -> list[dict]:
    """One row per (target, variant), targets outer, in the recorder's order. ``jobs`` > 1:
    that many spawned processes (Triton compiles one kernel at a time per process), each taking
    every ``jobs``-th variant."""
    keys = list(recorder.variants)
    jobs = min(jobs, len(keys))
    if jobs <= 1:
        return _compile_keys(recorder, keys, targets)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [keys[i::jobs] for i in range(jobs)]
    work = functools.partial(_compile_share, quick, names, targets=targets)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(work, shares))
    by_key = {
        (t, k): row
        for share, rows in zip(shares, parts)
        for (t, k), row in zip([(t, k) for t in targets for k in share], rows)
    }
    return [by_key[t, k] for t in targets for k in keys]


def _target(text: str) -> GPUTarget:
    backend, _, arch = text.partition(":")
    if backend != "cuda" or not arch.isdigit():
        raise argparse.ArgumentTypeError(f"target must be cuda:<cc>, e.g. cuda:90, got {text!r}")
    return GPUTarget("cuda", int(arch), 32)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=_target, nargs="+", default=[_target("cuda:90")])
    p.add_argument("--quick", action="store_true", help="fewer dtypes/shapes (CI)")
    p.add_argument("--csv", type=Path, help="write one row per compiled variant")
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=len(os.sched_getaffinity(0)),
        help="compile in this many processes (default: one per usable CPU)",
    )
    p.add_argument(
        "--cases",
        nargs="+",
        choices=[*CASES, *EXTRA_CASES],
        help=f"only these cases (default: all but {', '.join(EXTRA_CASES)})",
    )
    a = p.parse_args(argv)

    recorder, errors = record(a.quick, a.cases)
    variants = list(recorder.variants.values())
    print(
        f"triton {triton.__version__}: {recorder.launches} launches recorded, "
        f"{len(variants)} distinct variants; targets "
        + ", ".join(f"{t.backend}:{t.arch}" for t in a.target)
    )
    covered = {v.name for v in variants}
    for module_name, names in kernel_functions().items() if a.cases is None else ():
        missing = [n for n in names if n not in covered]
        if missing:
            errors.append(f"{module_name}: kernels never launched by the cases: {missing}")

    targets = [f"{t.backend}:{t.arch}" for t in a.target]
    rows = compile_all(recorder, targets, a.jobs, a.quick, a.cases)
    width = max(len(r["kernel"]) for r in rows) if rows else 10
    print(f"{'kernel':<{width}} target   regs local  smem(B)  s     variant")
    for r in rows:
        if r["status"] == "ok":
            print(
                f"{r['kernel']:<{width}} {r['target']:<8} {r['registers']:>4} "
                f"{r['local_bytes']:>5} {r['shared_bytes']:>8} {r['seconds']:>5}  {r['variant']}"
            )
        else:
            print(f"{r['kernel']:<{width}} {r['target']:<8} FAIL  {r['variant']}: {r['error']}")
    failed = [r for r in rows if r["status"] != "ok"]
    if a.csv:
        fields = ["kernel", "target", "triton", "status", "registers", "local_bytes"]
        fields += ["shared_bytes", "static_shared_bytes", "global_loads", "seconds", "variant"]
        fields += ["case", "error"]
        a.csv.parent.mkdir(parents=True, exist_ok=True)
        with a.csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    for e in errors:
        print(f"ERROR {e}")
    spilling = sorted({r["kernel"] for r in rows if r.get("local_bytes", 0) > 0})
    print(
        f"{len(rows) - len(failed)}/{len(rows)} compiled"
        + (f"; local memory (spills?): {', '.join(spilling)}" if spilling else "; no local memory")
    )
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
