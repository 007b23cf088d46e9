"""One GEMM for every resblock's time projection (TimeProjections): packed parameters survive
construction, loading and conversions; inference takes the fused path (no time_emb_proj module is
called, 2 ATen ops instead of 2 per resblock) with the per-block values; autograd and unpacked
parameters take the per-block path."""

from __future__ import annotations

import collections

import pytest
import torch
from support.configs import LIDM_SMALL_CONFIG, LVDM_SMALL_CONFIG
from support.models import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from echofast.models import LIDM, LVDM
from echofast.nn._packing import adjacent


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _lvdm():
    torch.manual_seed(0)
    model = LVDM.from_config(LVDM_SMALL_CONFIG).eval()
    cfg = LVDM_SMALL_CONFIG
    x = torch.randn(2, 4, cfg["in_channels"], 16, 16)
    ids = torch.rand(
        2, cfg["projection_class_embeddings_input_dim"] // cfg["addition_time_embed_dim"]
    )
    ehs = torch.rand(2, 1, cfg["cross_attention_dim"])

    def call(m):
        return m(x, 700, ehs, ids).sample

    return model, call


def _lidm():
    torch.manual_seed(0)
    model = LIDM.from_config(LIDM_SMALL_CONFIG).eval()
    x = torch.randn(2, LIDM_SMALL_CONFIG["in_channels"], 16, 16)
    return model, lambda m: m(x, 300).sample


def _packed(model) -> bool:
    tp = model._time_projections
    return adjacent(tp._params("weight")) and adjacent(tp._params("bias"))


def _unpacked_copy(model):
    """The same weights with every parameter in its own storage (the per-block path)."""
    other = type(model).from_config(dict(model.config)).eval()
    other.load_state_dict(model.state_dict())
    for lin in other._time_projections.linears:
        lin.weight.data = lin.weight.data.clone()
        lin.bias.data = lin.bias.data.clone()
    assert not _packed(other)
    return other


@pytest.mark.parametrize("build", [_lvdm, _lidm], ids=["lvdm", "lidm"])
def test_fused_time_projections_match_per_block(build):
    model, call = build()
    linears = model._time_projections.linears
    assert len(linears) >= 4 and _packed(model)
    calls = []
    hooks = [lin.register_forward_hook(lambda *a: calls.append(1)) for lin in linears]
    try:
        with torch.no_grad(), CountOps() as fused_ops:
            fused = call(model)
        assert calls == []  # every projection came from the one GEMM
        other = _unpacked_copy(model)
        with torch.no_grad(), CountOps() as block_ops:
            per_block = call(other)
    finally:
        for h in hooks:
            h.remove()
    assert rel_err(fused, per_block) <= 1e-6
    gemms = ("addmm", "mm", "linear")
    saved = sum(block_ops.counts[g] for g in gemms) - sum(fused_ops.counts[g] for g in gemms)
    assert saved == len(linears) - 1
    assert block_ops.counts["silu"] - fused_ops.counts["silu"] == len(linears) - 1


@pytest.mark.parametrize("build", [_lvdm, _lidm], ids=["lvdm", "lidm"])
def test_packing_survives_loading_and_conversions(build):
    model, call = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert _packed(model)  # the load hook repacked
    model.double()
    assert _packed(model) and model._time_projections.linears[0].weight.dtype == torch.float64
    model.float()
    model.load_state_dict(state)  # in place: storage kept
    assert _packed(model)
    assert [k for k in model.state_dict()] == list(state)  # keys unchanged


@pytest.mark.parametrize("build", [_lvdm, _lidm], ids=["lvdm", "lidm"])
def test_autograd_uses_the_per_block_path(build):
    model, call = build()
    calls = []
    hooks = [
        lin.register_forward_hook(lambda *a: calls.append(1))
        for lin in model._time_projections.linears
    ]
    try:
        call(model).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == len(model._time_projections.linears)
    assert all(lin.weight.grad is not None for lin in model._time_projections.linears)
