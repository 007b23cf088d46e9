"""``ModelBase.autocast_copy``: Linear/Conv weights stored in the autocast dtype once, so that a
reduced-precision call (and a CUDA-graph replay of it) launches no weight casts, with exactly the
outputs of the fp32-weight model under autocast. Checked on CPU autocast (bfloat16 and float16)
against the model itself, on every model, with fused QKV packing switched on as on CUDA."""

from __future__ import annotations

import pytest
import torch
from support.configs import LIDM_SMALL_CONFIG, LVDM_SMALL_CONFIG, VAE_SMALL_CONFIG
from support.dispatch import CountOps
from torch import nn

import echofast.nn.attention as attention_nn
from echofast.models import LIDM, LVDM, VAE
from echofast.nn._packing import adjacent


def _lvdm():
    model = LVDM.from_config(LVDM_SMALL_CONFIG).eval()
    cfg = LVDM_SMALL_CONFIG
    x = torch.randn(2, 3, cfg["in_channels"], 14, 14)
    ids = torch.rand(
        2, cfg["projection_class_embeddings_input_dim"] // cfg["addition_time_embed_dim"]
    )
    ehs = torch.rand(2, 1, cfg["cross_attention_dim"])
    return model, lambda m: m(x, 700, ehs, ids).sample


def _lidm():
    model = LIDM.from_config(LIDM_SMALL_CONFIG).eval()
    x = torch.randn(3, LIDM_SMALL_CONFIG["in_channels"], 16, 16)
    return model, lambda m: m(x, 300).sample


def _vae():
    model = VAE.from_config(VAE_SMALL_CONFIG).eval()
    z = torch.randn(2, VAE_SMALL_CONFIG["latent_channels"], 8, 8)
    return model, lambda m: m.decode(z).sample


@pytest.fixture
def fused_qkv(monkeypatch):
    """Fused QKV packing and GEMM on CPU too (as on CUDA), so the copy's repacking is exercised."""
    monkeypatch.setattr(attention_nn, "FUSED_QKV_DEVICES", frozenset({"cpu", "cuda"}))


def _randomise(model: nn.Module) -> None:
    """Random norm affines too (fresh models have ones and zeros there)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("build", [_lvdm, _lidm, _vae], ids=["lvdm", "lidm", "vae"])
def test_autocast_copy_is_exact_and_casts_no_weights(build, dtype, fused_qkv):
    torch.manual_seed(0)
    model, call = build()
    model = type(model).from_config(dict(model.config)).eval()  # packed under the fixture
    _randomise(model)
    copy = model.autocast_copy(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        with CountOps() as ref_ops:
            ref = call(model)
        with CountOps() as ops:
            out = call(copy)
    assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
    casts, ref_casts = ops.counts["_to_copy"], ref_ops.counts["_to_copy"]
    n_gemm = sum(isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)) for m in model.modules())
    assert ref_casts - casts >= n_gemm // 2, (ref_casts, casts, n_gemm)


def test_autocast_copy_shares_all_but_gemm_weights(fused_qkv):
    torch.manual_seed(0)
    model = LVDM.from_config(LVDM_SMALL_CONFIG).eval()
    copy = model.autocast_copy(torch.float16)
    ours = dict(model.named_parameters())
    for name, p in copy.named_parameters():
        owner = copy.get_submodule(name.rsplit(".", 1)[0]) if "." in name else copy
        if isinstance(owner, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            assert p.dtype == torch.float16 and not p.requires_grad, name
            assert p.untyped_storage().data_ptr() != ours[name].untyped_storage().data_ptr()
            torch.testing.assert_close(p.float(), ours[name].half().float(), rtol=0, atol=0)
        else:
            assert p is ours[name], f"{name} was copied, not shared"
    assert set(dict(copy.named_buffers())) == set(dict(model.named_buffers()))
    # the packed groups and fused QKV are packed again in the copy, in float16
    tp = copy._time_projections
    assert adjacent(tp._params("weight")) and tp._params("weight")[0].dtype == torch.float16
    assert adjacent(tp._fold_biases()) and tp._fold_biases()[0].dtype == torch.float16
    attns = [m for m in copy.modules() if getattr(m, "is_self_attention", False)]
    with torch.no_grad():
        assert attns and all(m.fused_qkv() is not None for m in attns)
    # the original is untouched
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.training is False and copy.training is False


def test_autocast_copy_rejects_integer_dtypes():
    model = LIDM.from_config(LIDM_SMALL_CONFIG)
    with pytest.raises(ValueError, match="floating-point"):
        model.autocast_copy(torch.int8)


def test_autocast_copy_of_a_training_model_is_for_inference():
    """The copy is in eval mode even when the model is training (which it stays in)."""
    model = VAE.from_config(VAE_SMALL_CONFIG).train()
    copy = model.autocast_copy(torch.bfloat16)
    assert model.training and not copy.training
    assert not any(m.training for m in copy.modules())
