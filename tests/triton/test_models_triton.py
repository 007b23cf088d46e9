"""Model parity with diffusers when GroupNorm(+SiLU) runs on the Triton backend."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel
from support.configs import LIDM_SMALL_CONFIG, VAE_SMALL_CONFIG
from support.models import build_diffusers, rel_err
from support.triton_interp import interpreted_kernels
from support.weights import TINY_LVDM

import echofast.nn.resnet as rn
import echofast.nn.spatiotemporal as st
from echofast.models import LIDM, LVDM, VAE
from echofast.ops import registered_ops, use_backend

interpreted_kernels("group_norm", "_gn_fwd_stats_kernel")
interpreted_kernels("layer_norm", "_layer_norm_fwd_kernel")
interpreted_kernels("bias_residual", "_bias_residual_kernel")
interpreted_kernels("geglu_linear", "_geglu_linear_kernel")
interpreted_kernels("feed_forward", "_ff_fwd_kernel")

#: the fused paths the modules take on CUDA (the resblocks' epilogues, the GEGLU's GEMM)
AS_ON_CUDA = frozenset({"cpu", "cuda"})

TOL = 1e-5


@pytest.fixture(autouse=True)
def triton_group_norm():
    with use_backend(group_norm="triton"):
        yield


def _pair(diffusers_cls, ours_cls, config):
    ref = build_diffusers(diffusers_cls, config)
    ours = ours_cls.from_config(config).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@torch.no_grad()
def test_vae_decode(monkeypatch):
    """Triton GroupNorm and the GPU's resblock epilogue (convolutions without biases, biases and
    the residual added by the Triton bias_residual kernel)."""
    monkeypatch.setattr(rn, "FUSED_EPILOGUE_DEVICES", AS_ON_CUDA)
    ref, ours = _pair(AutoencoderKL, VAE, VAE_SMALL_CONFIG)
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert registered_ops()["group_norm"].select(z, 1).name == "triton"
    with use_backend(bias_residual="triton"):
        got = ours.decode(z).sample
    assert rel_err(got, ref.decode(z).sample) <= TOL


@torch.no_grad()
def test_lidm(monkeypatch):
    """With the GPU's resblock epilogue too (Triton bias_residual)."""
    monkeypatch.setattr(rn, "FUSED_EPILOGUE_DEVICES", AS_ON_CUDA)
    ref, ours = _pair(UNet2DModel, LIDM, LIDM_SMALL_CONFIG)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with use_backend(bias_residual="triton"):
        got = ours(x, 10).sample
    assert rel_err(got, ref(x, 10).sample) <= TOL


@pytest.mark.parametrize(
    "fused", [None, "norms", "feed_forward"], ids=["chunked_cpu", "fused_norms", "fused_ff"]
)
@torch.no_grad()
def test_lvdm(fused, monkeypatch):
    """8×8 latents: every group keeps ≥ 4 elements. (At 1×1 spatial with one channel per group
    PyTorch's own fp32 CPU group_norm is off by ~1e-3 of |x| — var of one element is not exactly
    0 — and rstd = 1/sqrt(eps) amplifies that, so such a comparison measures the reference.)
    ``feed_forward``: every feed-forward and its residual add as one Triton kernel too."""
    fused_norms = fused is not None
    if fused_norms:  # residual adds fused into LayerNorms, conv-bias epilogues, GEGLU GEMMs
        monkeypatch.setattr(st, "CPU_CHUNK_BYTES", 0)
        monkeypatch.setattr(st, "FUSED_GEGLU_DEVICES", AS_ON_CUDA)
    if fused == "feed_forward":
        monkeypatch.setattr(st, "FUSED_FF_DEVICES", AS_ON_CUDA)
    ref, ours = _pair(UNetSpatioTemporalConditionModel, LVDM, TINY_LVDM)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 8, 8, 8, generator=g)
    ehs, ids = torch.rand(1, 1, 1, generator=g), torch.zeros(1, 1)
    expected = ref(x, 500, encoder_hidden_states=ehs, added_time_ids=ids).sample
    forced = (
        {"add_layer_norm": "triton", "bias_residual": "triton", "geglu_linear": "triton"}
        if fused_norms
        else {}
    )
    if fused == "feed_forward":
        forced |= {"feed_forward": "triton"}
        calls = []
        real = registered_ops()["feed_forward"]
        monkeypatch.setattr(
            st.ops, "feed_forward", lambda *a, **k: calls.append(1) or real(*a, **k)
        )
    with use_backend(**forced):
        got = ours(x, 500, encoder_hidden_states=ehs, added_time_ids=ids).sample
    assert rel_err(got, expected) <= TOL
    if fused == "feed_forward":  # every feed-forward of the model took the one kernel
        assert len(calls) == sum(isinstance(m, st.FeedForward) for m in ours.modules())


@torch.no_grad()
def test_lvdm_fp16_autocast_copy_on_the_gpu_path(monkeypatch):
    """The CUDA inference path with everything it changes for half precision, here on CPU:
    fp16 autocast over the model's autocast_copy (fp16 GEMM weights and biases, fp32 norms),
    residual adds fused into Triton LayerNorms (half activations, fp32 affine), the resblocks'
    Triton epilogues (fp16 conv biases, the mix weight), the GEGLUs' Triton GEMMs and Triton
    GroupNorm: within fp16's error of diffusers' fp32 output, and every fused op on its Triton
    backend."""
    monkeypatch.setattr(st, "CPU_CHUNK_BYTES", 0)
    monkeypatch.setattr(st, "FUSED_GEGLU_DEVICES", AS_ON_CUDA)
    ref, ours = _pair(UNetSpatioTemporalConditionModel, LVDM, TINY_LVDM)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 8, 8, 8, generator=g)
    ehs, ids = torch.rand(1, 1, 1, generator=g), torch.zeros(1, 1)
    expected = ref(x, 500, encoder_hidden_states=ehs, added_time_ids=ids).sample
    copy = ours.autocast_copy(torch.float16)
    forced = {
        "add_layer_norm": "triton",
        "bias_residual": "triton",
        "layer_norm": "triton",
        "geglu_linear": "triton",
    }
    with use_backend(**forced), torch.autocast("cpu", dtype=torch.float16):
        got = copy(x, 500, encoder_hidden_states=ehs, added_time_ids=ids).sample
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert rel_err(got.float(), expected) <= 1e-2
