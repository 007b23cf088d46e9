"""The re-identification model: the reference's architecture and state-dict layout, loading the
published folder layout, strict weight checks, initial weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from echofast.errors import ConfigError, WeightsError
from echofast.privacy import ReIdentificationModel, normalize_clip
from echofast.privacy.model import load_init_weights

# The reference's training config (echosyn/privacy/configs/config_dynamic.json), as published
# beside the weights in reidentification_dynamic/.
REFERENCE_CONFIG = {
    "experiment_description": "reidentification_dynamic",
    "resumption": False,
    "resumption_count": None,
    "previous_experiment": None,
    "image_path": "data/latents/dynamic/FileList.csv",
    "siamese_architecture": "ResNet-50",
    "data_handling": "balanced",
    "num_workers": 16,
    "pin_memory": True,
    "n_channels": 4,
    "n_features": 128,
    "image_size": 14,
    "loss": "BCEWithLogitsLoss",
    "optimizer": "Adam",
    "learning_rate": 0.0001,
    "batch_size": 128,
    "max_epochs": 1000,
    "early_stopping": 50,
    "transform": "pmone",
    "n_samples_train": 7465,
    "n_samples_val": 1288,
    "n_samples_test": 1277,
}


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = ReIdentificationModel.from_config(REFERENCE_CONFIG).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics and affines
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model


def test_reference_architecture_keys_and_size(resnet50):
    """torchvision's resnet50 has 25,557,032 parameters and 320 state-dict entries; the
    reference swaps conv1 for 4 input channels (+3,136), fc for 2048→128 (−2,049,000 +
    262,272) and adds fc_end (129): 23,773,569 parameters, 322 entries."""
    state = resnet50.state_dict()
    assert sum(p.numel() for p in resnet50.parameters()) == 23_773_569
    assert len(state) == 322
    for key, shape in {
        "model.conv1.weight": (64, 4, 7, 7),
        "model.bn1.num_batches_tracked": (),
        "model.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "model.layer1.0.downsample.1.running_var": (256,),
        "model.layer2.0.conv2.weight": (128, 128, 3, 3),
        "model.layer3.5.bn3.weight": (1024,),
        "model.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "model.fc.weight": (128, 2048),
        "fc_end.weight": (1, 128),
        "fc_end.bias": (1,),
    }.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("model.layer4.3") or k.startswith("model.layer3.6") for k in state)


def _functional_resnet(state: dict, x: torch.Tensor) -> torch.Tensor:
    """ResNet-50 v1.5 (stride on the 3×3 conv) in eval mode, written with torch.nn.functional
    from the state dict alone: an oracle for the module wiring."""

    def bn(h, p):
        return F.batch_norm(
            h,
            state[p + ".running_mean"],
            state[p + ".running_var"],
            state[p + ".weight"],
            state[p + ".bias"],
            training=False,
            eps=1e-5,
        )

    h = F.relu(bn(F.conv2d(x, state["model.conv1.weight"], stride=2, padding=3), "model.bn1"))
    h = F.max_pool2d(h, 3, stride=2, padding=1)
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p = f"model.layer{stage}.{b}"
            stride = 2 if (b == 0 and stage > 1) else 1
            y = F.relu(bn(F.conv2d(h, state[p + ".conv1.weight"]), p + ".bn1"))
            y = F.relu(
                bn(F.conv2d(y, state[p + ".conv2.weight"], stride=stride, padding=1), p + ".bn2")
            )
            y = bn(F.conv2d(y, state[p + ".conv3.weight"]), p + ".bn3")
            skip = h
            if p + ".downsample.0.weight" in state:
                skip = bn(
                    F.conv2d(h, state[p + ".downsample.0.weight"], stride=stride),
                    p + ".downsample.1",
                )
            h = F.relu(y + skip)
    h = h.mean(dim=(2, 3))
    return torch.sigmoid(F.linear(h, state["model.fc.weight"], state["model.fc.bias"]))


def test_embedding_matches_functional_oracle(resnet50):
    x = torch.randn(3, 4, 14, 14, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = resnet50.embed(x)
        want = _functional_resnet(resnet50.state_dict(), x)
        logit = resnet50(x[:2], x[1:])
    assert got.shape == (3, 128)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    head = resnet50.state_dict()
    want_logit = (want[:2] - want[1:]).abs() @ head["fc_end.weight"].T + head["fc_end.bias"]
    assert torch.allclose(logit, want_logit, atol=1e-6)


def test_published_layout_loads_with_identical_embeddings(resnet50, tmp_path):
    """A random model saved as the reference saves it (config.json + torch.save(state_dict) as
    <folder>_best_network.pth) loads (pickle opt-in) and embeds identically."""
    folder = tmp_path / "reidentification_dynamic"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(REFERENCE_CONFIG, indent="\t"))
    torch.save(resnet50.state_dict(), folder / "reidentification_dynamic_best_network.pth")
    with pytest.raises(WeightsError, match="pickled weights are not loaded by default"):
        ReIdentificationModel.from_pretrained(folder)
    loaded = ReIdentificationModel.from_pretrained(folder, allow_pickle=True)
    assert loaded.normalization == "clip"  # the reference's "pmone" transform
    x = torch.randn(5, 4, 14, 14, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), resnet50.embed(x))
    # echofast's own layout (safetensors) round-trips too
    out = tmp_path / "echofast_copy"
    loaded.save_pretrained(out)
    assert (out / "echofast_copy_best_network.safetensors").is_file()
    again = ReIdentificationModel.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again.embed(x), resnet50.embed(x))


def test_strict_loading_names_file_and_key(tmp_path):
    model = ReIdentificationModel(layers=(1, 1, 1, 1), width=8, n_features=16)
    folder = tmp_path / "reid"
    model.save_pretrained(folder)
    weights = folder / "reid_best_network.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    bad = dict(state)
    bad["model.fc.weight"] = torch.full_like(bad["model.fc.weight"], float("nan"))
    save_file(bad, weights)
    with pytest.raises(
        WeightsError, match=r"reid_best_network.safetensors.*'model.fc.weight'.*non-finite"
    ):
        ReIdentificationModel.from_pretrained(folder)
    bad = {k: v for k, v in state.items() if k != "fc_end.bias"}
    save_file(bad, weights)
    with pytest.raises(WeightsError, match=r"missing keys \['fc_end.bias'\]"):
        ReIdentificationModel.from_pretrained(folder)
    bad = dict(state, **{"model.conv1.weight": torch.zeros(8, 3, 7, 7)})
    save_file(bad, weights)
    with pytest.raises(WeightsError, match=r"'model.conv1.weight' has shape \(8, 3, 7, 7\)"):
        ReIdentificationModel.from_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, siamese_architecture="VGG")))
    with pytest.raises(ConfigError, match="siamese_architecture"):
        ReIdentificationModel.from_pretrained(folder)


def test_initial_weights_from_torchvision_style_keys(tmp_path):
    """ImageNet-style weights (torchvision keys, 3-channel conv1, 1000-way fc) initialise the
    trunk; conv1, fc and the head keep their random initialisation, as in the reference."""
    from safetensors.torch import save_file

    src = ReIdentificationModel(layers=(1, 1, 1, 1), width=8)
    state = {
        k[len("model.") :]: v.clone() for k, v in src.state_dict().items() if k.startswith("model.")
    }
    state["conv1.weight"] = torch.randn(8, 3, 7, 7)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 256), torch.randn(1000)
    path = tmp_path / "imagenet.safetensors"
    save_file(state, path)
    torch.manual_seed(5)
    model = ReIdentificationModel(layers=(1, 1, 1, 1), width=8)
    skipped = load_init_weights(model, path)
    assert sorted(skipped) == [
        "fc_end.bias",
        "fc_end.weight",
        "model.conv1.weight",
        "model.fc.bias",
        "model.fc.weight",
    ]
    assert torch.equal(model.model.layer2[0].conv2.weight, src.model.layer2[0].conv2.weight)
    state.pop("layer1.0.conv1.weight")
    save_file(state, path)
    with pytest.raises(WeightsError, match="'model.layer1.0.conv1.weight' missing"):
        load_init_weights(model, path)


def test_normalization_modes():
    x = torch.randn(3, 4, 6, 6) * torch.tensor([1.0, 2.0, 3.0])[:, None, None, None] + 5
    clip = normalize_clip(x, "clip")
    assert clip.min() == -1 and clip.max() == 1
    assert torch.allclose(clip, (x - x.min()) / (x.max() - x.min()) * 2 - 1)
    frame = normalize_clip(x, "frame")
    for f, raw in zip(frame, x):
        assert torch.allclose(f, (raw - raw.min()) / (raw.max() - raw.min()) * 2 - 1)
    # a positive affine change (brightness) is removed exactly per frame
    assert torch.allclose(normalize_clip(1.3 * x + 0.7, "frame"), frame, atol=1e-6)
    assert torch.equal(normalize_clip(torch.ones(2, 4, 3, 3), "clip"), torch.zeros(2, 4, 3, 3))
