"""Triton GEGLU feed-forward projection: ``out = (x Wxᵀ + bx) * gelu(x Wgᵀ + bg)`` in one GEMM.

Design
------
* Why. A feed-forward's GEGLU projects x (M, K) to h (M, 2N) with one GEMM, writes h, and the
  GEGLU pass reads h back and writes out (M, N): 2N + 2N + N element transfers per row besides
  the GEMM's own reads. Here each program computes the same output tile of both halves, x·Wxᵀ
  and x·Wgᵀ (two fp32 accumulators over the same A tiles), and applies the bias and x·gelu(g) in
  registers: only out is written. The trade-off: a Triton GEMM instead of cuBLAS's. It pays only
  if the GEMM stays near cuBLAS at these shapes (K = C = 128–512, N = 4·C, M = tokens); the
  models use it only where :data:`echofast.nn.spatiotemporal.FUSED_GEGLU_DEVICES` says, which a
  GPU benchmark (``bench/bench_geglu.py``, provider ``echofast_fused_gemm``) decides.
* Tiles. Program (pid_m, pid_n) owns out[BLOCK_M rows, BLOCK_N columns]: it loads each
  [BLOCK_M, BLOCK_K] tile of x once and the matching [BLOCK_N, BLOCK_K] tiles of Wx (rows n of
  the weight) and Wg (rows N + n), so x is read cdiv(N, BLOCK_N) times in all, as in a plain
  GEMM over 2N columns with 2·BLOCK_N-wide tiles. Programs are ordered in groups of GROUP_M
  row tiles so that consecutive programs share weight tiles in L2. Row offsets are int64.
  With K = 128-512 a tile has only a few K steps to hide its loads and its GELU epilogue
  behind; a persistent grid (``PROGRAMS_PER_SM`` in a configuration) walks several tiles per
  program in one flattened loop (``tl.range(..., flatten=True)``), so the software pipeline
  can issue the next tile's loads during one tile's epilogue. Whether that pays is measured.
* Precision. Products accumulate in fp32 (``tl.dot``; fp32 inputs use IEEE products, no TF32),
  the bias is added in fp32, GELU (exact erf or tanh, as :mod:`echofast.kernels.geglu`) and the
  product are fp32, and out is rounded once to x's dtype. The unfused path rounds h to x's dtype
  first: the fused result is the more exact one, by about one rounding of h.

Kernel arguments (all tensors on one device):
  a_ptr      (M, K) input x, fp32/fp16/bf16, row stride ``stride_am``, unit stride along K
  w_ptr      (2N, K) weight [Wx; Wg], x's dtype, row stride ``stride_wn``, unit stride along K
  b_ptr      (2N,) bias [bx; bg] (any float dtype, read as fp32); unused unless HAS_BIAS
  out_ptr    (M, N) output, x's dtype, row stride ``stride_om``, unit stride along N
  M, N, K    rows, output width (the weight has 2N rows), reduction width
  BLOCK_M, BLOCK_N, BLOCK_K   tile sizes (powers of two, BLOCK_K >= 16)
  GROUP_M    row tiles per program group (L2 reuse of weight tiles)
  HAS_BIAS, APPROX_TANH, IEEE constexpr: add the bias; tanh GELU; IEEE fp32 products
  PERSISTENT constexpr: the grid has fewer programs than tiles (``PROGRAMS_PER_SM`` per
             multiprocessor); each walks tiles pid, pid + P, ... in one flattened loop

Tile configurations. :data:`GPU_CONFIG` is the default on every GPU. A GPU run of
``bench/tune_geglu_linear.py`` times candidate configurations at the LVDM's call sites and
writes the winners to ``geglu_linear_tuned.json`` next to this file (architecture, dtype, K, N
and the M it was timed at); a launch on that architecture with that dtype, K and N takes the
entry whose M is nearest in log scale. The table is read once and checked; nothing is tuned
at launch, so a given build and GPU always run the same tiles and give the same bits.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import triton
import triton.language as tl

from .geglu import _gelu

#: default tile configuration on a GPU: 2 × 128 × 64 fp32 accumulators over 8 warps. Compiled
#: for sm_90 with Triton 3.6 as the JIT specialises it (bench/triton_aot.py): 108 registers, 48
#: KiB of shared memory, no spills in fp16/bf16. An H100 ran it at 160–240 TFLOP/s on the LVDM's
#: largest call sites (2026-11-26); bench/tune_geglu_linear.py times alternatives.
GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
#: the interpreter pays per program: one large tile
INTERPRETED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
GROUP_M = 8
#: the tuned tile configurations (see the module docstring); shipped with the package
TUNED_TABLE = Path(__file__).with_name("geglu_linear_tuned.json")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
#: GROUP_M (default :data:`GROUP_M`); PROGRAMS_PER_SM: a persistent grid of that many programs
#: per multiprocessor (default: one program per output tile)
OPTIONAL_KEYS = ("GROUP_M", "PROGRAMS_PER_SM")


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear tile index ``tile``, in groups of GROUP_M row tiles."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _geglu_linear_tile(
    a_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_om,
    pid_m,
    pid_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    IEEE: tl.constexpr,
):
    """out[pid_m tile, pid_n tile] = (a Wxᵀ + bx) * gelu(a Wgᵀ + bg)."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    a_tile = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    wx_tile = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    wg_tile = wx_tile + N * stride_wn
    acc_x = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + rk) < K
        a = tl.load(a_tile, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wx = tl.load(wx_tile, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(wg_tile, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if IEEE:
            acc_x += tl.dot(a, tl.trans(wx), input_precision="ieee")
            acc_g += tl.dot(a, tl.trans(wg), input_precision="ieee")
        else:
            acc_x += tl.dot(a, tl.trans(wx))
            acc_g += tl.dot(a, tl.trans(wg))
        a_tile += BLOCK_K
        wx_tile += BLOCK_K
        wg_tile += BLOCK_K
    if HAS_BIAS:
        acc_x += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = acc_x * _gelu(acc_g, APPROX_TANH)
    o = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _geglu_linear_kernel(
    a_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    IEEE: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """One output tile per program, or (PERSISTENT) tiles pid, pid + P, ... of P programs in one
    flattened loop, which lets the compiler's pipeline run into the next tile's loads while one
    tile's GELU epilogue and stores execute."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            _geglu_linear_tile(
                a_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_om,
                pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, APPROX_TANH, IEEE,
            )  # fmt: skip
    else:
        pid_m, pid_n = _tile_coords(tl.program_id(0), num_m, num_n, GROUP_M)
        _geglu_linear_tile(
            a_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_om,
            pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, APPROX_TANH, IEEE,
        )  # fmt: skip


# ------------------------------------------------------------------------- tile configurations


def check_config(config: dict, where: str) -> dict:
    """``config`` with its five integer keys checked (:data:`CONFIG_KEYS`, and the
    :data:`OPTIONAL_KEYS`): power-of-two tiles, warps and GROUP_M, BLOCK_K >= 16, 1-8 stages,
    positive PROGRAMS_PER_SM. ValueError naming ``where`` otherwise."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: a tile configuration must be an object, got {config!r}")
    unknown = sorted(set(config) - {*CONFIG_KEYS, *OPTIONAL_KEYS})
    missing = [key for key in CONFIG_KEYS if key not in config]
    if unknown or missing:
        raise ValueError(
            f"{where}: tile configuration {config}: unknown keys {unknown}, missing {missing}"
        )
    for key, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {key} = {value!r} is not a positive integer")
        if key not in ("num_stages", "PROGRAMS_PER_SM") and value & (value - 1):
            raise ValueError(f"{where}: {key} = {value} is not a power of two")
    if config["BLOCK_K"] < 16:
        raise ValueError(f"{where}: BLOCK_K = {config['BLOCK_K']} is below 16 (tl.dot's minimum)")
    if config["num_stages"] > 8:
        raise ValueError(f"{where}: num_stages = {config['num_stages']} is above 8")
    return dict(config)


def read_tuned_table(path: Path) -> list[dict]:
    """The entries of a tuned table: ``{"format": 1, "entries": [{"arch": "sm_90", "dtype":
    "float16", "k": 128, "n": 512, "m": 81920, "config": {...}, ...}, ...]}`` (other keys of an
    entry are notes: card, Triton version, times). ValueError naming the file and the entry."""
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON tile table: {e}") from None
    if (
        not isinstance(table, dict)
        or table.get("format") != 1
        or not isinstance(table.get("entries"), list)
    ):
        raise ValueError(f'{path}: expected {{"format": 1, "entries": [...]}} at the top level')
    entries = []
    for i, entry in enumerate(table["entries"]):
        where = f"{path}: entries[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: not an object")
        for key, kind in (("arch", str), ("dtype", str), ("k", int), ("n", int), ("m", int)):
            value = entry.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or kind is int and value < 1:
                what = "a positive integer" if kind is int else "a string"
                raise ValueError(f"{where}: {key} = {value!r} is not {what}")
        entries.append({**entry, "config": check_config(entry.get("config"), where)})
    return entries


@functools.cache
def _tuned_entries() -> tuple[dict, ...]:
    return tuple(read_tuned_table(TUNED_TABLE)) if TUNED_TABLE.is_file() else ()


def tuned_config(entries, arch: str, dtype: torch.dtype, m: int, k: int, n: int) -> dict | None:
    """The configuration of the entry for (arch, dtype, k, n) whose m is nearest to ``m`` in log
    scale (the first of equals), or None when the table has no entry for them."""
    name = str(dtype).removeprefix("torch.")
    same = [e for e in entries if (e["arch"], e["dtype"], e["k"], e["n"]) == (arch, name, k, n)]
    if not same:
        return None
    best = min(same, key=lambda e: abs(math.log(e["m"]) - math.log(max(m, 1))))
    return best["config"]


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA ``device``; 4 elsewhere (the interpreter: a few programs)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def gpu_config(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int) -> dict:
    """The tile configuration a launch on CUDA ``device`` uses: the tuned table's entry for this
    GPU's architecture, else :data:`GPU_CONFIG` (also for CPU tensors: what bench/triton_aot.py
    compiles for a GPU on a machine without one)."""
    if device.type != "cuda":
        return GPU_CONFIG
    arch = _arch(device.index if device.index is not None else torch.cuda.current_device())
    return tuned_config(_tuned_entries(), arch, dtype, m, k, n) or GPU_CONFIG


# ----------------------------------------------------------------------------------- launchers


def geglu_linear_fwd(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    approximate: str = "none",
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """out (M, N) in a's dtype, contiguous, for ``a`` (M, K) with unit stride along K, ``weight``
    (2N, K) in a's dtype with unit stride along K, ``bias`` (2N,) contiguous or None.
    ``config``: tile sizes, warps and stages, optionally ``GROUP_M`` (default: the tuned table's
    or :data:`GPU_CONFIG` on a GPU, :data:`INTERPRETED_CONFIG` under the interpreter)."""
    m, k = a.shape
    n = weight.shape[0] // 2
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if config is None:
        if type(_geglu_linear_kernel).__name__ == "InterpretedFunction":
            config = INTERPRETED_CONFIG
        else:
            config = gpu_config(a.device, a.dtype, m, k, n)
    c = dict(config)
    tiles = triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"])
    persistent = "PROGRAMS_PER_SM" in c
    if persistent:
        tiles = min(tiles, _sm_count(a.device) * c["PROGRAMS_PER_SM"])
    grid = (tiles,)
    _geglu_linear_kernel[grid](
        a,
        weight,
        weight if bias is None else bias,
        out,
        m,
        n,
        k,
        a.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=c["BLOCK_M"],
        BLOCK_N=c["BLOCK_N"],
        BLOCK_K=c["BLOCK_K"],
        GROUP_M=c.get("GROUP_M", GROUP_M),
        HAS_BIAS=bias is not None,
        APPROX_TANH=approximate == "tanh",
        IEEE=a.dtype == torch.float32,
        PERSISTENT=persistent,
        num_warps=c["num_warps"],
        num_stages=c["num_stages"],
    )
    return out
