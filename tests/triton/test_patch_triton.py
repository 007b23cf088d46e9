"""``echofast.patch`` call sites with the Triton backends forced (interpreter, CPU): what they pass
to the ops is Triton-eligible, and the fused resnets match diffusers on the real kernels."""

from __future__ import annotations

import importlib

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from support.models import build_diffusers, randomize_norms, rel_err
from support.triton_interp import interpreted_kernels
from support.weights import TINY_LVDM

import echofast
from echofast.ops import Backend, group_norm_reference, registered_ops

interpreted_kernels("group_norm", "_gn_fwd_stats_kernel")

TOL = 1e-5

#: The smallest SVD-shaped UNet that has every patched call site: spatial and temporal resnets,
#: spatial and temporal attention with head dim 64 over three context tokens, GroupNorms.
SVD_TINY = {
    **TINY_LVDM,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "block_out_channels": [64, 64],
    "num_attention_heads": [1, 1],
    "cross_attention_dim": 32,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
}


def _attention_backend() -> str:
    """``triton`` when its kernels run here (interpreted), else ``sdpa``."""
    if "triton" not in registered_ops()["attention"].backends:
        return "sdpa"
    try:
        kernels = importlib.import_module("echofast.kernels.attention")
    except ImportError:
        return "sdpa"
    interpreted = type(getattr(kernels, "_attn_fwd_kernel", None)).__name__
    return "triton" if interpreted == "InterpretedFunction" else "sdpa"


@pytest.fixture
def group_norm_calls(monkeypatch) -> list[tuple]:
    """The ``triton`` group_norm backend with its real eligibility check but the reference as its
    computation (interpreting the kernels for a whole UNet takes minutes); records the shapes."""
    op = registered_ops()["group_norm"]
    triton = op.backends["triton"]
    calls: list[tuple] = []

    def reference(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return group_norm_reference(x, *args, **kwargs)

    monkeypatch.setitem(
        op.backends, "triton", Backend("triton", reference, triton.reasons, triton.description)
    )
    return calls


@torch.no_grad()
def test_patched_call_sites_take_the_triton_backends(group_norm_calls):
    """Every GroupNorm the call sites issue (4D maps, the temporal resnets' permuted 5D views,
    the transformers' norms) is one the Triton backend accepts — forced, it raises otherwise —
    and the attention processor runs on the Triton attention kernel when there is one."""
    g = torch.Generator().manual_seed(5)
    model = build_diffusers(UNetSpatioTemporalConditionModel, SVD_TINY)
    args = (torch.randn(1, 2, 8, 8, 8, generator=g), torch.tensor(0.3))
    kwargs = {
        "encoder_hidden_states": torch.randn(1, 3, 32, generator=g),
        "added_time_ids": torch.rand(1, 3, generator=g) * 10,
    }
    expected = model(*args, **kwargs).sample
    backend = {"group_norm": "triton", "attention": _attention_backend()}
    report = echofast.patch(model, backend=backend, replace_models=False)
    assert report.counts()["temporal_resnet"] > 0 and report.counts()["attention"] > 0
    got = model(*args, **kwargs).sample
    assert rel_err(got, expected) <= TOL
    assert any(len(shape) == 5 for shape in group_norm_calls)  # the temporal resnets' norms
    echofast.unpatch(model)
    assert torch.equal(model(*args, **kwargs).sample, expected)


@torch.no_grad()
def test_fused_resnets_on_the_triton_kernels():
    """The fused GroupNorm(+scale/shift)+SiLU calls of patched resnets on the real kernels."""
    from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    resnet = ResnetBlock2D(
        in_channels=32,
        out_channels=32,
        temb_channels=16,
        groups=8,
        time_embedding_norm="scale_shift",
    )
    temporal = TemporalResnetBlock(32, 32, temb_channels=16)
    cases = [
        (
            randomize_norms(resnet).eval(),
            torch.randn(2, 32, 4, 4, generator=g),
            torch.randn(2, 16, generator=g),
        ),
        # (B, C, T, H, W) as SpatioTemporalResBlock passes it: a permuted view
        (
            randomize_norms(temporal).eval(),
            torch.randn(1, 3, 32, 4, 4, generator=g).permute(0, 2, 1, 3, 4),
            torch.randn(1, 3, 16, generator=g),
        ),
    ]
    for module, x, temb in cases:
        expected = module(x, temb)
        echofast.patch(module, backend="group_norm=triton")
        got = module(x, temb)
        echofast.unpatch(module)
        assert rel_err(got, expected) <= TOL, type(module).__name__
