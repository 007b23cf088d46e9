"""Packed parameter groups of the models: one GEMM for every resblock's time projection
(TimeProjections) and one computation of every AlphaBlender weight (MixWeights). Packed parameters
survive construction, loading and conversions; inference takes the fused path (no time_emb_proj
module is called, 2 ATen ops instead of 2 per resblock; one sigmoid for all blenders) with the
per-block values; autograd and unpacked parameters take the per-block path."""

from __future__ import annotations

import pytest
import torch
from support.configs import LIDM_SMALL_CONFIG, LVDM_SMALL_CONFIG
from support.dispatch import CountOps
from support.models import rel_err
from support.threads import one_torch_thread

from echofast.models import LIDM, LVDM
from echofast.nn._packing import adjacent, pack_rows

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


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


def _mix_params(model):
    return [b.mix_factor for b in model._mix_weights.blenders]


def test_mix_weights_are_one_computation_with_the_same_values():
    """The LVDM's AlphaBlender weights 1 - sigmoid(mix_factor) from one sigmoid over the packed
    mix factors: bit-identical to per-blender computation, in-place changes seen at once."""
    model, call = _lvdm()
    blenders = model._mix_weights.blenders
    assert len(blenders) >= 4 and adjacent(_mix_params(model))
    with torch.no_grad():
        for i, p in enumerate(_mix_params(model)):
            p.fill_(0.3 * i - 1.0)  # distinct weights: a mixed-up blender would show
    other = _unpacked_copy(model)
    for p in _mix_params(other):
        p.data = p.data.clone()
    assert not adjacent(_mix_params(other))
    with torch.no_grad(), CountOps() as fused_ops:
        fused = call(model)
    with torch.no_grad(), CountOps() as block_ops:
        per_block = call(other)
    assert rel_err(fused, per_block) <= 1e-6  # (the time projections: one GEMM vs many)
    assert fused_ops.counts["sigmoid"] == 1 and block_ops.counts["sigmoid"] == len(blenders)
    with torch.no_grad():
        _mix_params(model)[2].add_(0.5)
        _mix_params(other)[2].add_(0.5)
        assert rel_err(call(model), call(other)) <= 1e-6
    model.double()
    assert adjacent(_mix_params(model))


def test_frame_features_are_computed_once_per_width_and_call():
    """The transformers' frame-position features depend only on (T, C): one sinusoid per width
    and call in inference (each transformer's MLP still runs), one per transformer under grad."""
    import echofast.nn.spatiotemporal as st

    model, call = _lvdm()
    transformers = [m for m in model.modules() if isinstance(m, st.TransformerSpatioTemporalModel)]
    widths = {m.in_channels for m in transformers}
    assert len(transformers) > len(widths) > 1
    with torch.no_grad(), CountOps() as ops:
        shared = call(model)
    with CountOps() as grad_ops:
        own = call(model)
    time_features = 2  # the timestep's and the added time ids' sinusoids
    assert ops.counts["sin"] == time_features + len(widths)
    assert grad_ops.counts["sin"] == time_features + len(transformers)
    assert rel_err(shared, own.detach()) <= 1e-5  # grad mode: per-block GEMMs, no in-place


def test_pack_rows_packs_like_parameters_and_leaves_mixed_ones_alone():
    """Same trailing shape, dtype and device: one storage, values unchanged, and a packed list
    stays where it is. Otherwise (e.g. one layer converted on its own) every parameter keeps its
    dtype, shape and storage."""
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(rows, 5, generator=g)) for rows in (2, 3, 1)]
    values = [p.detach().clone() for p in ps]
    pack_rows(ps)
    assert adjacent(ps) and all(torch.equal(p, v) for p, v in zip(ps, values))
    packed = [p.data_ptr() for p in ps]
    pack_rows(ps)  # already packed: left in place, so views of the packed storage stay live
    assert [p.data_ptr() for p in ps] == packed
    for other in (
        torch.randn(2, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 4, generator=g),
    ):
        mixed = [torch.nn.Parameter(torch.randn(3, 5, generator=g)), torch.nn.Parameter(other)]
        before = [(p.dtype, p.shape, p.data_ptr()) for p in mixed]
        pack_rows(mixed)
        assert [(p.dtype, p.shape, p.data_ptr()) for p in mixed] == before
