"""LIDM parity with diffusers' UNet2DModel, both directions, plus the full config."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DModel
from support.configs import LIDM_FULL_CONFIG, LIDM_SMALL_CONFIG
from support.models import build_diffusers, rel_err, save_diffusers
from support.triton_interp import without_interpreter

import echofast.nn.attention as attention_nn
from echofast.models import LIDM
from echofast.models.tiny import TINY_LIDM
from echofast.nn import Attention
from echofast.nn._packing import adjacent
from echofast.ops import registered_ops, use_backend
from echofast.pipelines import LIDMPipeline

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lidm")
    ref = save_diffusers(UNet2DModel, LIDM_SMALL_CONFIG, folder)
    return ref, LIDM.from_pretrained(folder)


@pytest.mark.parametrize(
    "timestep", [0, 945, 15.7, torch.tensor(15), torch.tensor([3]), torch.tensor([3, 999, 500])]
)
@pytest.mark.parametrize("size", [16, 8])
def test_forward_matches_diffusers(pair, timestep, size):
    ref, ours = pair
    x = torch.randn(3, 4, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        a = ref(x, timestep).sample
        b = ours(x, timestep).sample
    assert b.shape == a.shape == x.shape
    assert rel_err(b, a) <= TOL


def test_autograd_path_matches_diffusers(pair):
    """With autograd on (training) the blocks take their out-of-place paths."""
    ref, ours = pair
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(x, torch.tensor([5, 600])).sample
    x.requires_grad_(True)
    out = ours(x, torch.tensor([5, 600])).sample
    assert rel_err(out.detach(), expected) <= TOL
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_default_layout_is_channels_last_and_nchw_matches_too(pair):
    ref, ours = pair
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(x, 99).sample
        fast = ours(x, 99).sample
        ours.use_channels_last(False)
        try:
            nchw = ours(x, 99).sample
        finally:
            ours.use_channels_last(True)
    assert fast.is_contiguous() and rel_err(fast, expected) <= TOL
    assert rel_err(nchw, expected) <= TOL


def test_return_dict_false(pair):
    _, ours = pair
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        out = ours(x, 10, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == x.shape


@pytest.mark.parametrize(
    "variant",
    [
        {"downsample_type": "conv", "upsample_type": "conv"},
        {"resnet_time_scale_shift": "scale_shift", "attention_head_dim": None},
        {
            "mid_block_type": None,
            "freq_shift": 1,
            "flip_sin_to_cos": False,
            "center_input_sample": True,
        },
        {"attn_norm_num_groups": 4, "time_embedding_dim": 48, "mid_block_scale_factor": 1.4142},
        {  # a plain DownBlock2D/UpBlock2D inside the UNet resamples with convs whatever the
            # types say; the conv downsampler pads per downsample_padding; every norm's eps
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
            "downsample_padding": 0,
            "norm_eps": 0.05,
        },
    ],
)
def test_config_variants(variant, tmp_path):
    ref = save_diffusers(UNet2DModel, {**LIDM_SMALL_CONFIG, **variant}, tmp_path)
    ours = LIDM.from_pretrained(tmp_path)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(ours(x, 321).sample, ref(x, 321).sample) <= TOL


def test_save_pretrained_loads_in_diffusers(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    back = UNet2DModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert rel_err(back(x, 77).sample, ours(x, 77).sample) <= TOL


def test_full_config_parameter_count_and_parity():
    ref = build_diffusers(UNet2DModel, LIDM_FULL_CONFIG)
    ours = LIDM.from_config(LIDM_FULL_CONFIG)
    assert ours.num_parameters() == 73_548_804
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(ours(x, 945).sample, ref(x, 945).sample) <= TOL


# ---- attention backends, fused QKV (with biases), sampling cache -------------------------------


def _runnable_attention_backends() -> list[str]:
    op = registered_ops()["attention"]
    q = torch.empty(2, 2, 8, 8)
    with without_interpreter():  # as in the tests' run (tests/conftest.py)
        return [name for name, b in op.backends.items() if not b.not_supported_reasons(q, q, q)]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("backend", _runnable_attention_backends())
def test_parity_with_every_runnable_attention_backend(pair, backend, fused, monkeypatch):
    """(triton runs in tests/triton under the interpreter; xformers needs CUDA.) ``fused``: the
    one-GEMM QKV projection (the CUDA default) forced on CPU."""
    if fused:
        monkeypatch.setattr(attention_nn, "FUSED_QKV_DEVICES", frozenset({"cpu", "cuda"}))
    ref, ours = pair
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref(x, 321).sample
        with use_backend(attention=backend):
            got = ours(x, 321).sample
    assert rel_err(got, expected) <= TOL
    attns = [m for m in ours.modules() if isinstance(m, Attention)]
    assert attns and {a.last_qkv for a in attns} == {"fused" if fused else "separate"}
    with torch.no_grad():
        for a in attns:
            w, b = a.fused_qkv()
            assert torch.equal(b, torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]))
            assert w.data_ptr() == a.to_q.weight.data_ptr()


def test_pipeline_precomputes_the_time_embedding(pair, monkeypatch):
    """The pipeline embeds every step's timestep once per batch (LIDM.time_features) and passes
    the step's row as a persistent input, with the UNet input in the model's layout and the
    output left in it: the latents of plain per-call sampling (the table's GEMM sees all steps'
    rows at once: last-bit rounding may differ)."""
    import echofast.pipelines.lidm as lidm_pipe

    _, ours = pair
    calls = []
    forward = ours.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    kw = dict(num_images=3, seed=1, num_inference_steps=3, batch_size=2, progress=False)
    monkeypatch.setattr(ours, "forward", spy)
    pipe = LIDMPipeline(ours)
    pre = pipe(**kw).latents
    assert len(calls) == 6 and all(c["channels_last_output"] for c in calls)
    tables = {id(c["time_features"]) for c in calls}
    assert len(tables) == 1  # one persistent input, refilled per step
    xs = [t for key, t in pipe._inputs._tensors.items() if key[0] == "x"]
    assert xs and all(t.is_contiguous(memory_format=torch.channels_last) for t in xs)
    calls.clear()
    monkeypatch.setattr(lidm_pipe, "echofast_model", lambda model, cls: None)
    plain = LIDMPipeline(ours)(**kw).latents
    assert all("time_features" not in c for c in calls)
    assert rel_err(pre, plain) <= TOL


def test_time_features_give_the_calls_values_and_are_checked(pair):
    _, ours = pair
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        plain = ours(x, 321).sample
        for t in (321, torch.tensor(321), torch.tensor([321])):
            table = ours.time_features(t)
            assert table.shape == (1, sum(ours._time_projections.sizes))
            assert torch.equal(ours(x, 321, time_features=table).sample, plain)
        per_sample = ours.time_features(torch.tensor([321, 654]))
        both = ours(x, torch.tensor([321, 654])).sample
        assert rel_err(ours(x, 0, time_features=per_sample).sample, both) <= TOL
        out = ours(x, 321, channels_last_output=True).sample
        assert torch.equal(out, plain) and out.is_contiguous(memory_format=torch.channels_last)
        with pytest.raises(ValueError, match=r"time_features must be \(1, \d+\) or \(2, \d+\)"):
            ours(x, 321, time_features=table[:, 1:])
        with pytest.raises(ValueError, match="float64"):
            ours(x, 321, time_features=table.double())
        # two rows for four samples: neither one shared row nor one per sample
        with pytest.raises(ValueError, match=r"time_features must be \(1, \d+\) or \(4, \d+\)"):
            ours(torch.cat([x, x]), 0, time_features=per_sample)


def test_time_features_under_autocast_are_in_autocasts_dtype(pair):
    """An fp32 model called under bf16 autocast takes bf16 time features (the call's dtype)."""
    _, ours = pair
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(13))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        table = ours.time_features(321)
        assert table.dtype == torch.bfloat16
        assert torch.equal(ours(x, 321, time_features=table).sample, ours(x, 321).sample)
        with pytest.raises(ValueError, match="torch.bfloat16"):
            ours(x, 321, time_features=table.float())


def test_sampling_cache_sees_weight_changes():
    ref = build_diffusers(UNet2DModel, LIDM_SMALL_CONFIG, seed=4)
    ours = LIDM.from_config(LIDM_SMALL_CONFIG).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), ours.sampling_cache() as memo:
        ours(x, 500)
        for model in (ours, ref):
            model.time_embedding.linear_1.bias.add_(0.5)
            model.up_blocks[1].resnets[0].time_emb_proj.weight.mul_(0.5)
        got = ours(x, 500).sample
        assert memo.misses > 0
        assert rel_err(got, ref(x, 500).sample) <= TOL


def test_sampling_cache_keeps_autocast_and_plain_calls_apart(pair):
    """A timestep embedded under autocast (bf16) is not reused by a plain fp32 call."""
    _, ours = pair
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        plain = ours(x, 250).sample
        with ours.sampling_cache():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours(x, 250)
            cached = ours(x, 250).sample
    assert torch.equal(cached, plain)


def test_class_labels_and_wrong_channels_are_value_errors(pair):
    """Like diffusers' UNet2DModel without a class embedding, class labels are refused; a
    sample with the wrong channel count is named before any layer runs."""
    ref, ours = pair
    x = torch.randn(1, 4, 8, 8)
    labels = torch.tensor([1])
    with pytest.raises(ValueError, match="class_embedding needs to be initialized"):
        ref(x, 3, class_labels=labels)
    with pytest.raises(ValueError, match="class_labels given, but this LIDM has no class"):
        ours(x, 3, class_labels=labels)
    for bad in (x[:, :3], x[0]):
        named = re.escape(f"must be (N, 4, H, W), got {tuple(bad.shape)}")
        with pytest.raises(ValueError, match=named):
            ours(bad, 3)


def test_conversions_keep_the_time_projections_packed():
    """After ``.double()``/``.half()`` (new storage for every parameter) the resblocks' time
    projections are one adjacent block again, with the values of the separate projections."""
    model = LIDM.from_config(TINY_LIDM)
    emb = torch.randn(2, model.time_embedding.linear_2.out_features, dtype=torch.float64)
    for convert, dtype in ((torch.nn.Module.double, torch.float64), (torch.nn.Module.half, None)):
        convert(model)
        tp = model._time_projections
        assert adjacent(tp._params("weight")) and adjacent(tp._params("bias"))
        assert adjacent(tp._fold_biases())
        if dtype is not None:
            with torch.no_grad():
                silu = torch.nn.functional.silu(emb)
                separate = torch.cat([lin(silu) + fold.bias for lin, fold in tp.folds.items()], -1)
                torch.testing.assert_close(tp.all(emb), separate, rtol=1e-12, atol=1e-12)
