"""LVDM parity with diffusers' UNetSpatioTemporalConditionModel, both directions, plus the full
EchoNet-Synthetic config, the exact fast paths and config errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from support.configs import LVDM_FULL_CONFIG, LVDM_SMALL_CONFIG
from support.models import build_diffusers, randomize_norms, rel_err

import echofast.nn.spatiotemporal as st
from echofast.errors import ConfigError
from echofast.models import LVDM

TOL = 1e-5

# every supported stage type, per-block lists, several transformer layers, a wide context
GENERAL_CONFIG = {
    **LVDM_SMALL_CONFIG,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal",
                         "CrossAttnDownBlockSpatioTemporal"],
    "up_block_types": ["CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal",
                       "CrossAttnUpBlockSpatioTemporal"],
    "num_attention_heads": [2, 4, 2],
    "layers_per_block": [1, 2, 1],
    "transformer_layers_per_block": [2, 1, 2],
    "cross_attention_dim": 8,
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 8,
}


def _randomized(config: dict, seed: int = 0) -> torch.nn.Module:
    """diffusers model with random norms and random AlphaBlender mix factors."""
    model = build_diffusers(UNetSpatioTemporalConditionModel, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _inputs(b: int, t: int, hw: int, ctx_len: int = 1, ctx_dim: int = 1, ids: int = 1,
            seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, 8, hw, hw, generator=g),
            torch.rand(b, ctx_len, ctx_dim, generator=g),
            torch.randn(b, ids, generator=g))


def _cross_attention_paths(model: LVDM) -> set[str]:
    return {m.attn2.last_path for m in model.modules()
            if isinstance(m, (st.SpatialTransformerBlock, st.TemporalTransformerBlock))}


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


@pytest.mark.parametrize("timestep", [0, 15.7, torch.tensor(500), torch.tensor([7]),
                                      torch.tensor([3.5, 999.0])])
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


@pytest.mark.parametrize("change, named", [
    ({"down_block_types": ["CrossAttnDownBlock3D"] + LVDM_SMALL_CONFIG["down_block_types"][1:]},
     "CrossAttnDownBlock3D"),
    ({"up_block_types": ["UpBlock2D"] + LVDM_SMALL_CONFIG["up_block_types"][1:]}, "UpBlock2D"),
    ({"num_attention_heads": [3, 4, 4, 4]}, "num_attention_heads"),
    ({"layers_per_block": [2, 2]}, "layers_per_block"),
    ({"block_out_channels": [32, 64, 64, 48]}, "block_out_channels"),
    ({"transformer_layers_per_block": [[1, 1]] * 4}, "transformer_layers_per_block"),
    ({"resnet_eps": 1e-6}, "resnet_eps"),
])
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
