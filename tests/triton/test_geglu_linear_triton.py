"""The ``triton`` geglu_linear backend (projection GEMM with the GEGLU in its epilogue), run by
the Triton interpreter on CPU.

Against an fp64 oracle (F.linear in fp64, the GELU written out): fp32 to 1e-5 of max|ref|; fp16
within 2x the error of plain PyTorch at fp16 (cuBLAS-order F.linear in fp16, then the GEGLU in
fp16; floor: half an ulp of max|ref|). Awkward shapes (K and N not multiples of the tiles, more
row tiles than a program group), no bias, tanh GELU, row-strided x, the model's GEGLU module on
the fused path. Shapes are small: the interpreter pays per program and per element.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.triton_interp import interpreted_kernels

import echofast.nn.spatiotemporal as st
from echofast.errors import BackendUnavailable
from echofast.ops import geglu_linear

kernels = interpreted_kernels("geglu_linear", "_geglu_linear_kernel")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def oracle(x, w, b, approximate="none"):
    h = F.linear(x.double(), w.double(), None if b is None else b.double())
    n = w.shape[0] // 2
    xs, g = h[..., :n], h[..., n:]
    if approximate == "tanh":
        gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    else:
        gelu = g * 0.5 * (1 + torch.erf(g / math.sqrt(2)))
    return xs * gelu


def inputs(m, k, n, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(2 * n, k, generator=g) / math.sqrt(k) * 2).to(dtype)
    b = torch.randn(2 * n, generator=g) if bias else None
    return x, w, b


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(("m", "k", "n"), [(37, 40, 20), (5, 16, 72), (130, 96, 33)], ids=str)
def test_fp32_matches_fp64(m, k, n, bias, approximate):
    x, w, b = inputs(m, k, n, seed=m + k, bias=bias)
    out = geglu_linear(x, w, b, approximate=approximate, backend="triton")
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, oracle(x, w, b, approximate)) <= 1e-5


def test_small_tiles_group_order_and_k_loop():
    """More row tiles than GROUP_M, several column tiles and K steps: every tile written once."""
    x, w, b = inputs(300, 70, 45, seed=3)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    out = kernels.geglu_linear_fwd(x, w, b, config=config)
    assert rel_err(out, oracle(x, w, b)) <= 1e-5


def test_every_tuning_candidate_computes_the_same_product():
    """Every tile shape bench/tune_geglu_linear.py may write into the tuned table (warps and
    stages do not change what the interpreter computes), on awkward M, K, N: partial row, column
    and K tiles."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import tune_geglu_linear as tune

    x, w, b = inputs(130, 200, 72, seed=7)
    ref = oracle(x, w, b)
    tiles = {}
    for config in tune.candidates(200):
        persistent = "PROGRAMS_PER_SM" in config
        tiles.setdefault((*tune.config_key(config)[:3], persistent), config)
    assert len(tiles) == 30  # 18 tile shapes, 12 of them also on a persistent grid
    for config in tiles.values():
        out = kernels.geglu_linear_fwd(x, w, b, config=config)
        assert rel_err(out, ref) <= 1e-5, config


def test_a_persistent_grid_walks_every_tile_once():
    """Fewer programs than tiles (the interpreter's launcher plans 4 multiprocessors): every
    program computes several tiles in its loop, including the partial last ones."""
    x, w, b = inputs(300, 70, 45, seed=8)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    config["PROGRAMS_PER_SM"] = 1  # 4 programs for 19 x 3 tiles
    out = kernels.geglu_linear_fwd(x, w, b, config=config)
    assert rel_err(out, oracle(x, w, b)) <= 1e-5


def test_fp16_within_twice_plain_pytorch():
    x, w, b = inputs(96, 64, 48, torch.float16, seed=4)
    b = b.half()
    ref = oracle(x, w, b)
    out = geglu_linear(x, w, b, backend="triton")
    h = F.linear(x.float(), w.float(), b.float()).half()  # PyTorch's fp16 projection, rounded
    plain = h[:, :48] * F.gelu(h[:, 48:].float()).half()
    err = (out.double() - ref).abs().max().item()
    base = (plain.double() - ref).abs().max().item()
    assert out.dtype == torch.float16
    assert err <= 2 * max(base, 2.0**-11 * ref.abs().max().item())


def test_row_strided_input_and_leading_dims():
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 7, 50, generator=g)
    x = wide[..., 3:43]  # rows strided, unit stride along K: read in place
    _, w, b = inputs(1, 40, 24, seed=6)
    out = geglu_linear(x, w, b, backend="triton")
    assert out.shape == (2, 7, 24)
    assert rel_err(out, oracle(x, w, b)) <= 1e-5


def test_forward_only_and_one_dtype():
    x, w, b = inputs(4, 16, 8)
    with pytest.raises(BackendUnavailable, match="forward only"):
        geglu_linear(x, w.requires_grad_(), b, backend="triton")
    with pytest.raises(BackendUnavailable, match="one GEMM dtype"):
        geglu_linear(x, w.detach().half(), b, backend="triton")


@torch.no_grad()
def test_module_on_the_fused_path(monkeypatch):
    """GEGLU on FUSED_GEGLU_DEVICES: one geglu_linear call, the projection + GEGLU values."""
    torch.manual_seed(0)
    module = st.GEGLU(24, 40)
    x = torch.randn(3, 5, 24)
    plain = module(x)
    calls = []
    real = kernels.geglu_linear_fwd
    monkeypatch.setattr(
        kernels, "geglu_linear_fwd", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    monkeypatch.setattr(st, "FUSED_GEGLU_DEVICES", frozenset({"cpu"}))
    fused = module(x)
    assert len(calls) == 1
    assert rel_err(fused, plain.double()) <= 1e-5


def test_config_check_limits():
    """The documented limits, inclusive: up to 8 stages, and PROGRAMS_PER_SM any positive
    integer (not only powers of two); one past them is refused, naming the key."""
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 8}
    config["PROGRAMS_PER_SM"] = 3
    assert kernels.check_config(config, "here") == config
    with pytest.raises(ValueError, match="here: num_stages = 9 is above 8"):
        kernels.check_config({**config, "num_stages": 9}, "here")
    with pytest.raises(ValueError, match="here: PROGRAMS_PER_SM = 0 is not a positive integer"):
        kernels.check_config({**config, "PROGRAMS_PER_SM": 0}, "here")
