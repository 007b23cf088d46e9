"""Tiny random diffusers models for the ``echofast.patch`` tests, and call counters."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from support.configs import LIDM_SMALL_CONFIG, VAE_SMALL_CONFIG
from support.models import build_diffusers, randomize_norms
from support.weights import TINY_LVDM

from echofast.ops import Backend, registered_ops

#: An SVD-shaped UNet scaled down: 4 levels, head dim 64 everywhere, 3 added time ids (as SVD's
#: fps / motion bucket / noise augmentation), conditioning tokens of width 32 (SVD: 1024).
SVD_LIKE = {
    "sample_size": 16,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
    "block_out_channels": [64, 64, 128, 128],
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [1, 1, 2, 2],
    "num_frames": 4,
}

CONFIGS = {
    "vae": VAE_SMALL_CONFIG,
    "lidm": LIDM_SMALL_CONFIG,
    # time embedding applied as GroupNorm modulation (fused into the norm op)
    "lidm_scale_shift": {**LIDM_SMALL_CONFIG, "resnet_time_scale_shift": "scale_shift"},
    "lvdm": TINY_LVDM,  # EchoNet-Synthetic's layout: one conditioning token (the EF)
    "svd_like": SVD_LIKE,  # three conditioning tokens
}


def diffusers_class(kind: str) -> type:
    from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel

    return {
        "vae": AutoencoderKL,
        "lidm": UNet2DModel,
        "lidm_scale_shift": UNet2DModel,
        "lvdm": UNetSpatioTemporalConditionModel,
        "svd_like": UNetSpatioTemporalConditionModel,
    }[kind]


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    """A diffusers model of ``kind`` with random weights and random norm affines."""
    return build_diffusers(diffusers_class(kind), CONFIGS[kind], seed)


def inputs(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "vae":
        return {
            "x": torch.rand(2, 3, 24, 24, generator=g) * 2 - 1,
            "z": torch.randn(2, 4, 6, 6, generator=g),
        }
    if kind.startswith("lidm"):
        return {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor(417)}
    if kind == "lvdm":
        return {
            "sample": torch.randn(2, 3, 8, 8, 8, generator=g),
            "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.rand(2, 1, 1, generator=g),
            "added_time_ids": torch.zeros(2, 1),
        }
    return {
        "sample": torch.randn(2, 3, 8, 16, 16, generator=g),
        "timestep": torch.tensor(0.37),
        "encoder_hidden_states": torch.randn(2, 3, 32, generator=g),
        "added_time_ids": torch.rand(2, 3, generator=g) * 10,
    }


def run(kind: str, model: torch.nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's outputs on ``x`` (for the VAE: posterior mean/logvar and the decoded image)."""
    if kind == "vae":
        dist = model.encode(x["x"]).latent_dist
        return {"mean": dist.mean, "logvar": dist.logvar, "decoded": model.decode(x["z"]).sample}
    return {"sample": model(**x).sample}


def resnet(**kwargs) -> torch.nn.Module:
    """A small diffusers ``ResnetBlock2D`` (8 channels, time embedding of 6, 4 groups) with
    random weights and norm affines, in eval mode; ``kwargs`` override its options."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    options = {"in_channels": 8, "out_channels": 8, "temb_channels": 6, "groups": 4, **kwargs}
    return randomize_norms(ResnetBlock2D(**options)).eval()


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for the test modules (conftest is not importable by name)."""
    return SimpleNamespace(
        configs=CONFIGS,
        build=build,
        inputs=inputs,
        run=run,
        diffusers_class=diffusers_class,
        resnet=resnet,
    )


@pytest.fixture
def op_calls(monkeypatch) -> Counter:
    """Counts calls per (op, backend) of echofast's op dispatch during the test."""
    calls: Counter = Counter()
    for op_name, op in registered_ops().items():
        for name, b in list(op.backends.items()):

            def fn(*args, _fn=b.fn, _key=(op_name, name), **kwargs):
                calls[_key] += 1
                return _fn(*args, **kwargs)

            monkeypatch.setitem(op.backends, name, Backend(b.name, fn, b.reasons, b.description))
    return calls


@pytest.fixture
def diffusers_calls(monkeypatch) -> Counter:
    """Counts calls of diffusers' default attention processor and of ``nn.GroupNorm.forward``."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    calls: Counter = Counter()
    processor_call = AttnProcessor2_0.__call__
    norm_forward = torch.nn.GroupNorm.forward

    def counted_processor(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        calls["AttnProcessor2_0"] += 1
        return processor_call(
            self, attn, hidden_states, encoder_hidden_states, attention_mask, temb
        )

    def counted_norm(self, x):
        calls["GroupNorm"] += 1
        return norm_forward(self, x)

    monkeypatch.setattr(AttnProcessor2_0, "__call__", counted_processor)
    monkeypatch.setattr(torch.nn.GroupNorm, "forward", counted_norm)
    return calls
