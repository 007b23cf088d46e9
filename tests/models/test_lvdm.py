"""LVDM parity with diffusers' UNetSpatioTemporalConditionModel, both directions, plus the full
EchoNet-Synthetic config, the exact fast paths and config errors."""

from __future__ import annotations

import collections
import dataclasses
import sys

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from support.configs import LVDM_FULL_CONFIG, LVDM_SMALL_CONFIG
from support.models import build_diffusers, randomize_norms, rel_err
from support.threads import one_torch_thread
from support.triton_interp import without_interpreter
from support.weights import TINY_LVDM
from torch.utils._python_dispatch import TorchDispatchMode

import echofast.nn.attention as attention_nn
import echofast.nn.spatiotemporal as st
from echofast.errors import ConfigError
from echofast.models import LVDM
from echofast.nn import Attention
from echofast.ops import registered_ops, use_backend
from echofast.pipelines import LVDMPipeline
from echofast.pipelines.common import echofast_model

TOL = 1e-5
FEATURES = ("time_features", "context_features", "frame_features")

# every supported stage type, per-block lists, several transformer layers, a wide context
GENERAL_CONFIG = {
    **LVDM_SMALL_CONFIG,
    "block_out_channels": [32, 64, 64],
    "down_block_types": [
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
    ],
    "up_block_types": [
        "CrossAttnUpBlockSpatioTemporal",
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    ],
    "num_attention_heads": [2, 4, 2],
    "layers_per_block": [1, 2, 1],
    "transformer_layers_per_block": [2, 1, 2],
    "cross_attention_dim": 8,
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 8,
}


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _randomized(config: dict, seed: int = 0) -> torch.nn.Module:
    """diffusers model with random norms and random AlphaBlender mix factors."""
    model = build_diffusers(UNetSpatioTemporalConditionModel, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _inputs(
    b: int, t: int, hw: int, ctx_len: int = 1, ctx_dim: int = 1, ids: int = 1, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, t, 8, hw, hw, generator=g),
        torch.rand(b, ctx_len, ctx_dim, generator=g),
        torch.randn(b, ids, generator=g),
    )


def _cross_attention_paths(model: LVDM) -> set[str]:
    return {
        m.attn2.last_path
        for m in model.modules()
        if isinstance(m, (st.SpatialTransformerBlock, st.TemporalTransformerBlock))
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lvdm")
    ref = _randomized(LVDM_SMALL_CONFIG)
    ref.save_pretrained(folder)
    return ref, LVDM.from_pretrained(folder)


@pytest.fixture(scope="module")
def general_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lvdm_general")
    ref = _randomized(GENERAL_CONFIG, seed=3)
    ref.save_pretrained(folder)
    return ref, LVDM.from_pretrained(folder)


@pytest.mark.parametrize("hw", [14, 16])
@pytest.mark.parametrize("frames", [5, 8, 12])
def test_forward_matches_diffusers_single_token(pair, frames, hw):
    ref, ours = pair
    x, ef, ids = _inputs(2, frames, hw, seed=frames + hw)
    with torch.no_grad():
        a = ref(x, 945, ef, ids).sample
        b = ours(x, 945, ef, ids).sample
    assert b.shape == a.shape == (2, frames, 4, hw, hw)
    assert b.is_contiguous()
    assert rel_err(b, a) <= TOL
    assert _cross_attention_paths(ours) == {"single_key"}


@pytest.mark.parametrize("hw", [14, 16, 9])
def test_forward_matches_diffusers_general_context(general_pair, hw):
    ref, ours = general_pair
    x, ctx, ids = _inputs(2, 6, hw, ctx_len=3, ctx_dim=8, ids=2, seed=hw)
    with torch.no_grad():
        a = ref(x, 321, ctx, ids).sample
        b = ours(x, 321, ctx, ids).sample
    assert rel_err(b, a) <= TOL
    assert _cross_attention_paths(ours) == {"general"}


@pytest.mark.parametrize("hw", [(9, 16), (16, 12)])
def test_forward_matches_diffusers_non_square(pair, hw):
    """Only one side off the 2^levels grid: the up path still resizes to the skips' sizes."""
    ref, ours = pair
    g = torch.Generator().manual_seed(sum(hw))
    x = torch.randn(1, 3, 8, *hw, generator=g)
    ef, ids = torch.rand(1, 1, 1, generator=g), torch.randn(1, 1, generator=g)
    with torch.no_grad():
        a = ref(x, 500, ef, ids).sample
        b = ours(x, 500, ef, ids).sample
    assert b.shape == a.shape == (1, 3, 4, *hw)
    assert rel_err(b, a) <= TOL


@pytest.mark.parametrize(
    "timestep", [0, 15.7, torch.tensor(500), torch.tensor([7]), torch.tensor([3.5, 999.0])]
)
def test_timestep_forms(pair, timestep):
    ref, ours = pair
    x, ef, ids = _inputs(2, 4, 16, seed=1)
    with torch.no_grad():
        assert rel_err(ours(x, timestep, ef, ids).sample, ref(x, timestep, ef, ids).sample) <= TOL


def test_chunked_cpu_path_and_autograd_path(pair, monkeypatch):
    """Tiny chunks (many row chunks) and the autograd path give the same outputs."""
    ref, ours = pair
    x, ef, ids = _inputs(1, 8, 16, seed=2)
    with torch.no_grad():
        a = ref(x, 30, ef, ids).sample
        monkeypatch.setattr(st, "CPU_CHUNK_BYTES", 64 << 10)
        chunked = ours(x, 30, ef, ids).sample
    assert rel_err(chunked, a) <= TOL
    x.requires_grad_(True)
    out = ours(x, 30, ef, ids).sample
    assert rel_err(out.detach(), a) <= TOL
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("context", ["single_key", "general"])
def test_fused_residual_norms_match_diffusers(pair, general_pair, context, monkeypatch):
    """Without CPU chunking, each transformer residual add is fused into the LayerNorm after it
    (ops.add_layer_norm: x + branch + one cross-attention row per video, then the norm)."""
    ref, ours = pair if context == "single_key" else general_pair
    if context == "single_key":
        x, ctx, ids = _inputs(2, 6, 9, seed=5)
    else:
        x, ctx, ids = _inputs(2, 6, 9, ctx_len=3, ctx_dim=8, ids=2, seed=5)
    monkeypatch.setattr(st, "CPU_CHUNK_BYTES", 0)
    calls = []
    ops_ln = sys.modules["echofast.ops.layer_norm"]
    real = ops_ln._add_op.backends["torch"].fn
    spy = dataclasses.replace(
        ops_ln._add_op.backends["torch"], fn=lambda *a, **k: calls.append(a[2]) or real(*a, **k)
    )
    monkeypatch.setitem(ops_ln._add_op.backends, "torch", spy)
    with torch.no_grad():
        a = ref(x, 321, ctx, ids).sample
        b = ours(x, 321, ctx, ids).sample
    assert rel_err(b, a) <= TOL
    blocks = sum(isinstance(m, st.TemporalTransformerBlock) for m in ours.modules())
    # spatial: 1 (single key) or 2 fused norms; temporal: two more each (norm_in adds the
    # frame positions to the frame-major tokens, norm1 the ff_in residual)
    per_block = 1 if context == "single_key" else 2
    assert len(calls) == 2 * blocks * per_block + 2 * blocks
    # the cross-attention's rows are added by the norm after it, one per block; the frame
    # positions by each temporal norm_in
    rows = 2 * blocks if context == "single_key" else 0
    assert sum(c is not None for c in calls) == rows + blocks


class _ConvBiases(TorchDispatchMode):
    """Records, per aten.convolution call, whether it ran with a bias."""

    def __init__(self):
        super().__init__()
        self.with_bias = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.with_bias.append(args[2] is not None)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_conv1_biases_are_folded_into_the_time_projections(pair, grad):
    """Every resnet's conv1 runs without its bias, which comes with the time projection that
    norm2 adds (one add of all folded biases to the packed projections in inference)."""
    ref, ours = pair
    folds = [m.time_fold() for m in ours.modules() if callable(getattr(m, "time_fold", None))]
    assert folds and all(f is not None for f in folds)
    x, ef, ids = _inputs(2, 3, 16, seed=6)
    with torch.set_grad_enabled(grad), _ConvBiases() as convs:
        out = ours(x, 40, ef, ids).sample
    with torch.no_grad():
        want = ref(x, 40, ef, ids).sample
    assert convs.with_bias.count(False) == len(folds)
    assert rel_err(out.detach(), want) <= TOL
    projections = ours._time_projections
    assert [projections.folds[lin] for lin in projections.linears] == folds
    if not grad:
        emb = torch.randn(2, projections.linears[0].in_features)
        with torch.no_grad():
            packed = projections.compute(emb)
            for lin, fold in projections.folds.items():
                alone = lin(torch.nn.functional.silu(emb)) + fold.bias
                torch.testing.assert_close(packed[lin], alone, rtol=1e-5, atol=1e-6)


def test_context_is_cast_once_under_autocast(pair):
    """Autocast would cast the fp32 encoder_hidden_states in every cross-attention's key/value
    projection; the model casts it once."""
    _, ours = pair
    x, ef, ids = _inputs(1, 3, 16, seed=8)

    class Casts(TorchDispatchMode):
        shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Casts() as casts:
        ours(x, 10, ef, ids)
    assert casts.shapes.count(tuple(ef.shape)) == 1


def test_return_dict_false(pair):
    _, ours = pair
    x, ef, ids = _inputs(1, 3, 16)
    with torch.no_grad():
        out = ours(x, 10, ef, ids, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (1, 3, 4, 16, 16)


def test_save_pretrained_loads_in_diffusers(general_pair, tmp_path):
    _, ours = general_pair
    ours.save_pretrained(tmp_path)
    back = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path).eval()
    x, ctx, ids = _inputs(2, 5, 14, ctx_len=2, ctx_dim=8, ids=2, seed=9)
    with torch.no_grad():
        assert rel_err(ours(x, 77, ctx, ids).sample, back(x, 77, ctx, ids).sample) <= TOL


# per-block lists that differ from their reverse: the up path reads level n-1-i's entries
ASYMMETRIC_CONFIG = {
    **LVDM_SMALL_CONFIG,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 2,
    "up_block_types": ["CrossAttnUpBlockSpatioTemporal"] * 2,
    "num_attention_heads": [2, 8],
    "layers_per_block": [2, 1],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 4,
    "addition_time_embed_dim": 2,
    "projection_class_embeddings_input_dim": 4,
}


def test_asymmetric_per_block_lists_match_diffusers(tmp_path):
    ref = _randomized(ASYMMETRIC_CONFIG, seed=5)
    ref.save_pretrained(tmp_path)
    ours = LVDM.from_pretrained(tmp_path)
    x, ctx, ids = _inputs(1, 3, 5, ctx_len=2, ctx_dim=4, ids=2, seed=6)
    with torch.no_grad():
        assert rel_err(ours(x, 40, ctx, ids).sample, ref(x, 40, ctx, ids).sample) <= TOL


def test_per_block_cross_attention_dims_follow_diffusers():
    """Each level's cross-attentions read its own context width, the up path's reversed."""
    cfg = {**ASYMMETRIC_CONFIG, "cross_attention_dim": [4, 8]}
    torch.manual_seed(0)
    ref = UNetSpatioTemporalConditionModel(**cfg)
    ours = LVDM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_full_config_parameter_count_and_parity():
    torch.manual_seed(0)
    ref = randomize_norms(UNetSpatioTemporalConditionModel(**LVDM_FULL_CONFIG)).eval()
    ours = LVDM.from_config(LVDM_FULL_CONFIG).eval()
    assert ours.num_parameters() == 143_830_186
    ours.load_state_dict(ref.state_dict())
    x, ef, ids = _inputs(1, 3, 16, seed=4)
    ids.zero_()
    with torch.no_grad():
        assert rel_err(ours(x, 945, ef, ids).sample, ref(x, 945, ef, ids).sample) <= TOL


@pytest.mark.parametrize(
    "change, named",
    [
        (
            {
                "down_block_types": ["CrossAttnDownBlock3D"]
                + LVDM_SMALL_CONFIG["down_block_types"][1:]
            },
            "CrossAttnDownBlock3D",
        ),
        ({"up_block_types": ["UpBlock2D"] + LVDM_SMALL_CONFIG["up_block_types"][1:]}, "UpBlock2D"),
        ({"num_attention_heads": [3, 4, 4, 4]}, "num_attention_heads"),
        ({"layers_per_block": [2, 2]}, "layers_per_block"),
        ({"block_out_channels": [32, 64, 64, 48]}, "block_out_channels"),
        ({"transformer_layers_per_block": [[1, 1]] * 4}, "transformer_layers_per_block"),
        ({"resnet_eps": 1e-6}, "resnet_eps"),
    ],
)
def test_config_errors_name_the_key_and_value(change, named):
    with pytest.raises(ConfigError, match=named):
        LVDM.from_config({**LVDM_SMALL_CONFIG, **change})


def test_bad_inputs_raise_value_errors(pair):
    _, ours = pair
    x, ef, ids = _inputs(2, 3, 16)
    with pytest.raises(ValueError, match="sample"):
        ours(x[:, :, :4], 1, ef, ids)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(x, 1, ef[:1], ids)
    with pytest.raises(ValueError, match="added_time_ids"):
        ours(x, 1, ef, torch.zeros(2, 2))


# ---- attention backends, fused QKV, sampling cache --------------------------------------------


def _runnable_attention_backends() -> list[str]:
    op = registered_ops()["attention"]
    q = torch.empty(2, 2, 8, 16)
    with without_interpreter():  # as in the tests' run (tests/conftest.py)
        return [name for name, b in op.backends.items() if not b.not_supported_reasons(q, q, q)]


@pytest.mark.parametrize("backend", _runnable_attention_backends())
def test_parity_with_every_runnable_attention_backend(general_pair, backend):
    """(triton runs in tests/triton under the interpreter; xformers needs CUDA.)"""
    ref, ours = general_pair
    x, ctx, ids = _inputs(1, 5, 14, ctx_len=2, ctx_dim=8, ids=2, seed=21)
    with torch.no_grad():
        a = ref(x, 640, ctx, ids).sample
        with use_backend(attention=backend):
            b = ours(x, 640, ctx, ids).sample
    assert rel_err(b, a) <= TOL


def _self_attentions(model) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention) and m.is_self_attention]


@pytest.fixture
def fuse_on_cpu(monkeypatch):
    """Run the fused-QKV path (the CUDA default) on CPU."""
    monkeypatch.setattr(attention_nn, "FUSED_QKV_DEVICES", frozenset({"cpu", "cuda"}))


def test_cpu_default_projects_separately(pair):
    _, ours = pair
    x, ef, ids = _inputs(1, 3, 16, seed=10)
    with torch.no_grad():
        ours(x, 99, ef, ids)
    assert {a.last_qkv for a in _self_attentions(ours)} == {"separate"}
    assert attention_nn.FUSED_QKV_DEVICES == {"cuda"}


def test_fused_qkv_is_a_view_of_the_live_weights(pair, fuse_on_cpu):
    ref, ours = pair
    attns = _self_attentions(ours)
    assert len(attns) == 2 * 16  # spatial + temporal self-attention of 16 transformers
    with torch.no_grad():
        for a in attns:
            w, b = a.fused_qkv()
            assert b is None  # the LVDM's projections have no bias
            assert torch.equal(w, torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]))
            assert w.data_ptr() == a.to_q.weight.data_ptr()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x, ef, ids = _inputs(1, 4, 16, seed=11)
    with torch.no_grad():
        ours(x, 99, ef, ids)
    assert {a.last_qkv for a in attns} == {"fused"}
    # under autograd the three projections run (gradients reach each parameter)
    ours(x, 99, ef, ids).sample.sum().backward()
    assert {a.last_qkv for a in attns} == {"separate"}
    assert all(a.to_k.weight.grad is not None for a in attns)
    ours.zero_grad(set_to_none=True)


def test_fused_qkv_parity_follows_weight_changes_and_conversions(tmp_path, fuse_on_cpu):
    ref = _randomized(LVDM_SMALL_CONFIG, seed=5)
    ours = LVDM.from_config(LVDM_SMALL_CONFIG).eval()
    ours.load_state_dict(ref.state_dict())
    x, ef, ids = _inputs(1, 4, 16, seed=12)
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        fused = ours(x, 12, ef, ids).sample
        # unpacked weights (e.g. a deep copy) run the separate projections, same values
        for a in _self_attentions(ours):
            a.to_k.weight.data = a.to_k.weight.data.clone()
        separate = ours(x, 12, ef, ids).sample
        assert {a.last_qkv for a in _self_attentions(ours)} == {"separate"}
        assert rel_err(fused, separate) <= 1e-6
        ours.float()  # any conversion repacks
        assert ours(x, 12, ef, ids).sample is not None
        assert {a.last_qkv for a in _self_attentions(ours)} == {"fused"}
        # in-place updates (optimizer steps, load_state_dict) are seen by the fused view
        for name, p in ref.named_parameters():
            if ".attn1.to_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        ours.load_state_dict(ref.state_dict())
        assert rel_err(ours(x, 12, ef, ids).sample, ref(x, 12, ef, ids).sample) <= TOL
        ref64, ours64 = ref.double(), ours.double()
        out = ours64(x.double(), 12, ef.double(), ids.double()).sample
        assert {a.last_qkv for a in _self_attentions(ours64)} == {"fused"}
        assert rel_err(out, ref64(x.double(), 12, ef.double(), ids.double()).sample) <= 1e-12
    ours64.float().save_pretrained(tmp_path)
    back = LVDM.from_pretrained(tmp_path)
    assert all(
        torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours64.state_dict().values())
    )


def test_sampling_cache_is_exact_and_never_stale():
    ref = _randomized(LVDM_SMALL_CONFIG, seed=6)
    ours = LVDM.from_config(LVDM_SMALL_CONFIG).eval()
    ours.load_state_dict(ref.state_dict())
    x, ef, ids = _inputs(2, 4, 16, seed=14)
    with torch.no_grad():
        plain = {t: ours(x, t, ef, ids).sample for t in (700, 300)}
        with ours.sampling_cache() as memo:
            first = ours(x, torch.tensor(700), ef, ids).sample
            misses = memo.misses
            again = ours(x, torch.tensor(700), ef, ids).sample
            assert memo.misses == misses and memo.hits >= misses  # all reused
            other = ours(x, 300, ef, ids).sample
            transformers = sum(
                isinstance(m, st.TransformerSpatioTemporalModel) for m in ours.modules()
            )
            assert memo.misses == 2 * misses - transformers  # frame embeddings do not depend on t
            # a weight changed in place inside the run is seen at once
            proj = ours.down_blocks[0].resnets[0].temporal_res_block.time_emb_proj
            proj.weight.mul_(1.5)
            ref.down_blocks[0].resnets[0].temporal_res_block.time_emb_proj.weight.mul_(1.5)
            changed = ours(x, torch.tensor(700), ef, ids).sample
            # other conditioning values are other keys
            ids2 = ids + 1
            shifted = ours(x, torch.tensor(700), ef, ids2).sample
        assert ours._run_memo is None
        assert torch.equal(first, plain[700]) and torch.equal(again, plain[700])
        assert torch.equal(other, plain[300])
        assert rel_err(changed, ref(x, 700, ef, ids).sample) <= TOL
        assert rel_err(shifted, ref(x, 700, ef, ids2).sample) <= TOL
    with ours.sampling_cache() as memo:  # under autograd nothing is reused
        ours(x, 700, ef, ids)
        ours(x, 700, ef, ids)
    assert memo.hits == memo.misses == 0


def _features(model: LVDM, t, ctx, ids, frames: int) -> dict[str, torch.Tensor]:
    return {
        "time_features": model.time_features(t, ids),
        "context_features": model.context_features(ctx),
        "frame_features": model.frame_features(frames),
    }


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("config", ["small", "general"])
def test_precomputed_features_give_the_same_outputs_and_skip_their_work(
    pair, general_pair, config, fused, monkeypatch
):
    """time_features / context_features / frame_features computed beforehand give what the call
    computes itself (bit for bit), match diffusers, and the call then launches none of it."""
    ref, ours = pair if config == "small" else general_pair
    if fused:  # the GPU's path: residual adds and cross-attention rows fused into the norms
        monkeypatch.setattr(st, "CPU_CHUNK_BYTES", 0)
    ctx_dim = ours.config.cross_attention_dim
    x, ctx, ids = _inputs(2, 6, 9, ctx_dim=ctx_dim, ids=ids_per_sample(ours), seed=21)
    t = torch.tensor([321, 654])
    with torch.no_grad():
        feats = _features(ours, t, ctx, ids, 6)
        plain_ops, pre_ops = _OpCount(), _OpCount()
        with plain_ops:
            plain = ours(x, t, ctx, ids).sample
        with pre_ops:
            pre = ours(x, t, ctx, ids, **feats).sample
        a = ref(x, t, ctx, ids).sample
    assert torch.equal(pre, plain)
    assert rel_err(pre, a) <= TOL
    transformers = sum(isinstance(m, st.TransformerSpatioTemporalModel) for m in ours.modules())
    attns = 2 * sum(isinstance(m, st.TemporalTransformerBlock) for m in ours.modules())
    widths = ours.feature_widths()
    assert feats["context_features"].shape == (2, widths["context_features"])
    assert feats["frame_features"].shape == (6, widths["frame_features"])
    # per transformer: two frame-embedding GEMMs; per cross-attention: to_v and to_out; the time
    # embedding's two MLPs and the resblocks' projection GEMM
    gemms = plain_ops.ops["addmm"] + plain_ops.ops["mm"] - pre_ops.ops["addmm"] - pre_ops.ops["mm"]
    assert gemms == 2 * transformers + 2 * attns + 4 + 1
    assert pre_ops.ops["sin"] == pre_ops.ops["cos"] == 0  # no sinusoidal features at all
    # the blenders' weights ride in the time table's last columns: no sigmoid in the call
    blenders = sum(isinstance(m, st.AlphaBlender) for m in ours.modules())
    projections = sum(ours._time_projections.sizes)
    assert widths["time_features"] == projections + blenders
    want = torch.cat([b.temporal_weight(torch.float32) for b in ours._mix_weights.blenders])
    # (one vectorised sigmoid for all of them may round the last bit unlike 1-element ones)
    torch.testing.assert_close(
        feats["time_features"][:, projections:], want.expand(2, -1), rtol=1e-6, atol=0
    )
    assert plain_ops.ops["sigmoid"] >= 1 and pre_ops.ops["sigmoid"] == 0


def ids_per_sample(model: LVDM) -> int:
    cfg = model.config
    return cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim


def test_precomputed_features_under_autocast_match_the_call():
    """Computed under the call's autocast state (bf16 on CPU, the autocast copy the pipelines
    use) they are the values the call computes, in its dtype."""
    ours = LVDM.from_config(LVDM_SMALL_CONFIG).eval()
    copy = ours.autocast_copy(torch.bfloat16)
    x, ctx, ids = _inputs(2, 4, 8, seed=22)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = _features(copy, 500, ctx, ids, 4)
        assert {f.dtype for f in feats.values()} == {torch.bfloat16}
        assert torch.equal(copy(x, 500, ctx, ids, **feats).sample, copy(x, 500, ctx, ids).sample)
        with pytest.raises(ValueError, match="frame_features must be"):
            copy(x, 500, ctx, ids, frame_features=feats["frame_features"].float())


def test_inputs_in_the_activation_layout_are_read_in_place_and_outputs_can_stay_there():
    """Under bf16 autocast (the autocast copy the pipelines call), a sample whose frames are
    already channels-last bf16 (as window_step writes the pipeline's input) costs no copy or cast;
    ``channels_last_output=True`` returns the same values as a view of the last conv's frames."""
    ours = LVDM.from_config(LVDM_SMALL_CONFIG).eval().autocast_copy(torch.bfloat16)
    x, ctx, ids = _inputs(2, 4, 8, seed=25)
    b, t, c, h, w = x.shape
    frames = x.bfloat16().flatten(0, 1).contiguous(memory_format=torch.channels_last)
    x_cl = frames.unflatten(0, (b, t))
    assert not x_cl.is_contiguous()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = ours(x, 500, ctx, ids).sample
        ops = _OpCount()
        with ops:
            out = ours(x_cl, 500, ctx, ids, channels_last_output=True).sample
        plain_ops = _OpCount()
        with plain_ops:
            ours(x, 500, ctx, ids)
    assert torch.equal(out, plain)  # the input rounding is the cast autocast makes
    assert out.shape == plain.shape and not out.is_contiguous()
    assert out.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    copies = ("clone", "_to_copy", "copy_")
    assert sum(plain_ops.ops[k] for k in copies) - sum(ops.ops[k] for k in copies) == 3


def test_precomputed_features_are_checked(pair, general_pair):
    _, ours = pair
    x, ctx, ids = _inputs(2, 4, 8, seed=23)
    with torch.no_grad():
        feats = _features(ours, 500, ctx, ids, 4)
        with pytest.raises(ValueError, match=r"time_features must be \(2, \d+\)"):
            ours(x, 500, ctx, ids, time_features=feats["time_features"][:1])
        with pytest.raises(ValueError, match=r"frame_features must be \(4, \d+\)"):
            ours(x, 500, ctx, ids, frame_features=ours.frame_features(5))
        with pytest.raises(ValueError, match="context_features must be"):
            ours(x, 500, ctx, ids, context_features=feats["context_features"][:, 1:])
        with pytest.raises(ValueError, match="added_time_ids must be"):
            ours.time_features(500, ids[:, None])
        with pytest.raises(ValueError, match=r"added_time_ids must be \(B, 1\), got \(2, 2\)"):
            ours.time_features(500, torch.cat([ids, ids], dim=1))  # one id more than configured
        with pytest.raises(ValueError, match="num_frames must be a positive int"):
            ours.frame_features(0)
        _, general = general_pair
        x, ctx, ids = _inputs(2, 4, 8, ctx_len=3, ctx_dim=8, ids=2, seed=24)
        with pytest.raises(ValueError, match="single-token contexts"):
            general.context_features(ctx)
        rows = general.context_features(ctx[:, :1])
        with pytest.raises(ValueError, match="single-token contexts"):
            general(x, 500, ctx, ids, context_features=rows)


def test_pipeline_precomputes_run_constant_work_and_matches_per_call_work(monkeypatch):
    ours = LVDM.from_config(TINY_LVDM).eval()
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(15))
    calls = []
    forward = ours.forward

    def spy(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in FEATURES})
        return forward(*args, **kwargs)

    kw = dict(
        num_frames=8,
        seed=3,
        num_inference_steps=3,
        batch_size=1,
        output_type="latent",
        progress=False,
    )
    monkeypatch.setattr(ours, "forward", spy)
    precomputed = LVDMPipeline(ours)(cond, [40.0, 70.0], **kw).latents
    assert len(calls) == 6 and all(v is not None for c in calls for v in c.values())
    # the time features change per step, the context features per batch (video)
    assert calls[0]["time_features"] is calls[1]["time_features"]  # one persistent input
    monkeypatch.setattr(LVDMPipeline, "_precompute", lambda *args: None)
    calls.clear()
    per_call = LVDMPipeline(ours)(cond, [40.0, 70.0], **kw).latents
    assert all(v is None for c in calls for v in c.values())
    # the table's GEMMs run on all steps' rows at once: rounding differs from per-call GEMMs
    assert rel_err(precomputed, per_call) <= TOL


def test_pipeline_input_is_in_the_models_layout_and_dtype():
    """The persistent UNet input: for echofast's LVDM in its conv_in's layout (channels-last
    frames) and the call's dtype (autocast's), so a step neither copies nor casts it; fp32 and
    contiguous for another UNet (the reference's way)."""
    ours = LVDM.from_config(TINY_LVDM).eval()
    pipe = LVDMPipeline(ours)
    shape, cpu = (3, 8, 4, 10, 10), torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        x = pipe._unet_input(ours, shape, cpu, dtype)
        assert x.shape == shape and x.dtype == dtype
        assert x.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    x = pipe._unet_input(None, shape, cpu, torch.bfloat16)
    assert x.dtype == torch.float32 and x.is_contiguous()


def test_pipeline_gives_a_compiled_lvdm_the_precomputed_inputs(monkeypatch):
    """A ``torch.compile``'d LVDM (the benchmark's echofast+compile) is called with the same
    precomputed features and layouts as the plain one, and samples the same latents."""
    import torch._dynamo

    ours = LVDM.from_config(TINY_LVDM).eval()
    cond = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(16))
    kw = dict(num_frames=8, seed=4, num_inference_steps=2, output_type="latent", progress=False)
    plain = LVDMPipeline(ours)(cond, [55.0], **kw).latents
    calls = []
    forward = ours.forward

    @torch._dynamo.disable
    def record(kwargs):  # outside the trace: appending there made dynamo guard on len(calls)
        calls.append(kwargs)  # and compile the whole model again at every step

    def spy(*args, **kwargs):
        record(kwargs)
        return forward(*args, **kwargs)

    graphs = []

    def eager(gm, example_inputs):  # backend="eager", counting the graphs it is given
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(ours, "forward", spy)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=eager, dynamic=False)
    assert echofast_model(compiled, LVDM) is ours and echofast_model(ours, LVDM) is ours
    latents = LVDMPipeline(compiled)(cond, [55.0], **kw).latents
    torch._dynamo.reset()
    assert graphs and max(graphs) > 100  # the UNet itself was traced, not only the spy
    assert calls and all(c["time_features"] is not None for c in calls)
    assert all(c["channels_last_output"] for c in calls)
    torch.testing.assert_close(latents, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"num_attention_heads": [2, 0, 2]}, r"\[2, 0, 2\] .*entry 1 = 0 is not a positive int"),
        ({"layers_per_block": True}, r"'layers_per_block'.*True \(bool\).*int or list of int"),
        # the mid block attends at the last level even when its stages do not
        ({"num_attention_heads": [2, 2, 3]}, "entry 2 = 3 does not divide block_out_channels"),
        (
            {"block_out_channels": [], "down_block_types": [], "up_block_types": []},
            r"'block_out_channels': value \[\] is not supported",
        ),
        (
            {"up_block_types": TINY_LVDM["up_block_types"][:2]},
            r"'len\(up_block_types\)': value 2 is not supported",
        ),
    ],
)
def test_config_errors_name_the_entry_at_fault(change, named):
    with pytest.raises(ConfigError, match=named):
        LVDM.from_config({**TINY_LVDM, **change})


def test_added_time_ids_must_fill_the_projection_input():
    """projection_class_embeddings_input_dim not a multiple of addition_time_embed_dim: no
    count of ids fits, and the call says so instead of failing inside a layer."""
    dims = {"addition_time_embed_dim": 2, "projection_class_embeddings_input_dim": 3}
    model = LVDM.from_config({**TINY_LVDM, **dims})
    x = torch.randn(1, 2, 8, 6, 6)
    with pytest.raises(ValueError, match=r"added_time_ids must be \(1, 1\)"):
        model(x, 10, torch.rand(1, 1, 1), torch.zeros(1, 1))
