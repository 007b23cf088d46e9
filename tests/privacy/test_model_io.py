"""The re-identification model's config keys and their defaults, its refusals, its weight
initialisation, which weights file a folder load picks, what save_pretrained writes, and the
checks of user-supplied initial weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from echofast.errors import ConfigError, WeightsError
from echofast.privacy import ReIdentificationModel, normalize_clip
from echofast.privacy.model import RESNET50_LAYERS, TRANSFORMS, load_init_weights

SMALL = {"siamese_architecture": "ResNet", "resnet_layers": [1, 1, 1, 1], "resnet_width": 4}


def _small(**kw) -> ReIdentificationModel:
    torch.manual_seed(0)
    return ReIdentificationModel(layers=(1, 1, 1, 1), width=4, n_features=8, **kw)


def test_an_empty_config_is_the_reference_resnet50_on_clips():
    model = ReIdentificationModel.from_config({})
    assert (model.n_channels, model.n_features) == (4, 128)
    assert (model.layers, model.width, model.normalization) == (RESNET50_LAYERS, 64, "clip")
    assert model.config()["siamese_architecture"] == "ResNet-50"


@pytest.mark.parametrize("normalization", sorted(TRANSFORMS))
def test_the_transform_alone_names_the_normalisation(normalization):
    cfg = dict(SMALL, transform=TRANSFORMS[normalization])
    model = ReIdentificationModel.from_config(cfg)
    assert model.normalization == normalization
    written = model.config()
    assert (written["transform"], written["normalization"]) == (cfg["transform"], normalization)


@pytest.mark.parametrize(
    "config,message",
    [
        ([1, 2], "expected a JSON object"),
        (dict(SMALL, transform="zscore"), "'transform'"),
        ({"siamese_architecture": "ResNet-50", "resnet_width": 8}, "resnet_width"),
        ({"resnet_layers": [1, 1, 1, 1]}, "resnet_layers"),  # ResNet-50 by default
        (dict(SMALL, n_channels="four"), "malformed architecture keys"),
        (dict(SMALL, resnet_layers=[1, 1, 1]), "4 positive counts"),
        (dict(SMALL, resnet_layers=[1, 0, 1, 1]), "4 positive counts"),
        (dict(SMALL, resnet_width=0), "resnet_width positive"),
        (dict(SMALL, n_channels=0), "n_channels and n_features must be >= 1"),
        (dict(SMALL, n_features=0), "n_channels and n_features must be >= 1"),
        (dict(SMALL, normalization="global"), "'normalization'"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_source(config, message):
    with pytest.raises(ConfigError, match=message) as err:
        ReIdentificationModel.from_config(config, source="reid/config.json")
    assert "reid/config.json" in str(err.value)


def test_a_diffusers_model_folder_is_named_as_such(tmp_path):
    """A UNet or VAE folder given as the re-identification model (any JSON config would
    otherwise read as the ResNet-50 defaults, then fail on its weights)."""
    from echofast.models import LIDM
    from echofast.models.tiny import TINY_LIDM

    LIDM.from_config(TINY_LIDM).save_pretrained(tmp_path / "lidm")
    with pytest.raises(
        ConfigError, match="a diffusers UNet2DModel folder, not a re-identification"
    ):
        ReIdentificationModel.from_pretrained(tmp_path / "lidm")


def test_convolutions_are_he_normal_over_the_fan_out():
    """torchvision's ResNet init: std = sqrt(2 / fan_out). conv1 (64 × 4 × 7 × 7) has a fan-out
    of 64·49 and a fan-in of 4·49, so the two modes differ by a factor of 4."""
    torch.manual_seed(1)
    resnet = ReIdentificationModel(layers=(1, 1, 1, 1), width=64, n_features=8).model
    for conv in (resnet.conv1, resnet.layer1[0].conv3, resnet.layer4[0].conv1):
        w = conv.weight.detach()
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        assert float(w.std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    for bn in (resnet.bn1, resnet.layer2[0].bn3):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_frame_normalisation_of_an_image_uses_the_whole_image():
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(2)) * 3 + 1
    want = (x - x.min()) / (x.max() - x.min()) * 2 - 1
    torch.testing.assert_close(normalize_clip(x, "frame"), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["clip", "frame", "channel"])
def test_half_precision_latents_are_normalised_in_fp32(mode):
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3)).half()
    got = normalize_clip(x, mode)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, normalize_clip(x.float(), mode), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["clip", "frame", "channel"])
def test_a_constant_frame_normalises_to_zero(mode):
    x = torch.full((2, 4, 3, 3), 7.0)
    assert torch.equal(normalize_clip(x, mode), torch.zeros_like(x))


def test_embedding_no_frames_gives_an_empty_embedding_table():
    model = _small()
    assert model.embed_frames(torch.zeros(0, 4, 6, 6)).shape == (0, 8)


def test_embedding_frames_restores_training_mode():
    model = _small().train()
    model.embed_frames(torch.rand(2, 4, 6, 6))
    assert model.training


def test_non_finite_embeddings_are_refused():
    model = _small()
    with torch.no_grad():
        model.model.fc.bias[0] = float("nan")
    with pytest.raises(WeightsError, match="not finite"):
        model.embed_frames(torch.rand(2, 4, 6, 6))


def test_a_loaded_model_is_in_eval_mode(tmp_path):
    model = _small().train()
    model.save_pretrained(tmp_path / "reid")
    assert not ReIdentificationModel.from_pretrained(tmp_path / "reid").training


def test_the_folders_own_weights_file_is_preferred(tmp_path):
    folder = tmp_path / "reid"
    own = _small()
    own.save_pretrained(folder)
    other = ReIdentificationModel(layers=(1, 1, 1, 1), width=4, n_features=8)
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    save_file(state, folder / "aaa_best_network.safetensors")
    torch.save(state, folder / "aaa_best_network.pth")
    found = ReIdentificationModel.find_weights(folder)
    assert found.name == "reid_best_network.safetensors"
    (folder / found.name).unlink()
    assert ReIdentificationModel.find_weights(folder).name == "aaa_best_network.safetensors"
    (folder / "aaa_best_network.safetensors").unlink()
    torch.save(own.state_dict(), folder / "reid_best_network.pth")
    assert ReIdentificationModel.find_weights(folder, True).name == "reid_best_network.pth"


def test_extra_config_keys_never_override_the_architecture(tmp_path):
    model = _small(normalization="channel")
    extra = {"n_features": 999, "transform": "pmone", "learning_rate": 1e-4}
    model.save_pretrained(tmp_path / "reid", extra_config=extra)
    cfg = json.loads((tmp_path / "reid" / "config.json").read_text())
    assert cfg["learning_rate"] == 1e-4
    assert (cfg["n_features"], cfg["transform"]) == (8, "pmone-channel")
    again = ReIdentificationModel.from_pretrained(tmp_path / "reid")
    assert (again.n_features, again.normalization) == (8, "channel")


def test_a_saved_model_on_other_latent_channels_loads_as_saved(tmp_path):
    """A model for 8-channel latents (another VAE) keeps its conv1 through a save and load."""
    model = _small(n_channels=8).eval()
    model.save_pretrained(tmp_path / "reid")
    again = ReIdentificationModel.from_pretrained(tmp_path / "reid")
    assert again.n_channels == 8
    x = torch.rand(2, 8, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(again.embed(x), model.embed(x))


def _init_file(tmp_path, state: dict) -> str:
    path = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_initial_weights_load_head_keys_of_the_right_shape(tmp_path):
    src = _small()
    with torch.no_grad():
        src.fc_end.weight.normal_()
    state = {k.removeprefix("model."): v for k, v in src.state_dict().items()}
    model = ReIdentificationModel(layers=(1, 1, 1, 1), width=4, n_features=8)
    assert load_init_weights(model, _init_file(tmp_path, state)) == []
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize(
    "change,message",
    [
        ({"layer1.0.bn1.weight": torch.full((4,), float("inf"))}, "non-finite"),
        ({"layer9.weight": torch.zeros(1)}, "unexpected keys"),
        ({"layer1.0.conv1.weight": torch.zeros(4, 16, 1, 1)}, "shape"),
    ],
)
def test_bad_initial_weights_are_refused(tmp_path, change, message):
    src = _small()
    state = {k.removeprefix("model."): v for k, v in src.state_dict().items()}
    path = _init_file(tmp_path, {**state, **change})
    with pytest.raises(WeightsError, match=message):
        load_init_weights(_small(), path)


def test_initial_weights_must_be_safetensors(tmp_path):
    path = tmp_path / "init.pth"
    torch.save(_small().state_dict(), path)
    with pytest.raises(WeightsError, match="must be a .safetensors file"):
        load_init_weights(_small(), path)
