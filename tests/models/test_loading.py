"""from_pretrained / save_pretrained: formats, dtypes, and every error names its problem."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from support.configs import LIDM_SMALL_CONFIG, VAE_SMALL_CONFIG
from support.models import save_diffusers

from echofast.errors import ConfigError, MissingFileError, WeightsError
from echofast.models import LIDM, VAE

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture()
def vae_dir(tmp_path):
    save_diffusers(AutoencoderKL, VAE_SMALL_CONFIG, tmp_path / "vae")
    return tmp_path / "vae"


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    path = folder / WEIGHTS
    state = load_file(path)
    fn(state)
    save_file(state, path)


def test_subfolder_device_dtype(vae_dir):
    model = VAE.from_pretrained(vae_dir.parent, subfolder="vae", dtype=torch.float64)
    assert model.dtype == torch.float64 and model.device.type == "cpu"
    assert not model.training
    assert not any(p.is_meta for p in model.parameters())


def test_missing_folder_and_files(tmp_path, vae_dir):
    with pytest.raises(MissingFileError, match="model folder does not exist"):
        VAE.from_pretrained(tmp_path / "nope")
    (vae_dir / WEIGHTS).unlink()
    with pytest.raises(MissingFileError, match=f"{WEIGHTS}: weights file is missing"):
        VAE.from_pretrained(vae_dir)
    (vae_dir / "config.json").unlink()
    with pytest.raises(MissingFileError, match="config.json: config file is missing"):
        VAE.from_pretrained(vae_dir)


def test_malformed_config(vae_dir):
    (vae_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        VAE.from_pretrained(vae_dir)


def test_unknown_key_is_named(vae_dir):
    _edit_config(vae_dir, frobnicate=3)
    with pytest.raises(ConfigError, match="frobnicate"):
        VAE.from_pretrained(vae_dir)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("act_fn", "gelu"),
        (
            "down_block_types",
            ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"],
        ),
    ],
)
def test_unsupported_value_is_named(vae_dir, key, value):
    _edit_config(vae_dir, **{key: value})
    with pytest.raises(ConfigError, match=rf"{key}.*not supported"):
        VAE.from_pretrained(vae_dir)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("time_embedding_type", "fourier"),
        ("class_embed_type", "timestep"),
        ("up_block_types", ["UpBlock2D", "SkipUpBlock2D", "AttnUpBlock2D"]),
    ],
)
def test_lidm_unsupported_values(key, value):
    with pytest.raises(ConfigError, match=f"{key}.*{value if isinstance(value, str) else 'Skip'}"):
        LIDM.from_config({**LIDM_SMALL_CONFIG, key: value})


def test_wrong_class(vae_dir):
    _edit_config(vae_dir, _class_name="UNet2DModel")
    with pytest.raises(ConfigError, match="describes a 'UNet2DModel'"):
        VAE.from_pretrained(vae_dir)


def test_missing_and_unexpected_keys(vae_dir):
    _edit_weights(
        vae_dir,
        lambda s: (s.pop("decoder.conv_out.bias"), s.__setitem__("extra.weight", torch.zeros(1))),
    )
    with pytest.raises(WeightsError) as err:
        VAE.from_pretrained(vae_dir)
    msg = str(err.value)
    assert WEIGHTS in msg and "'decoder.conv_out.bias'" in msg and "'extra.weight'" in msg


def test_shape_mismatch(vae_dir):
    _edit_weights(
        vae_dir, lambda s: s.__setitem__("encoder.conv_in.weight", torch.zeros(1, 3, 3, 3))
    )
    with pytest.raises(WeightsError, match=r"'encoder.conv_in.weight' has shape \(1, 3, 3, 3\)"):
        VAE.from_pretrained(vae_dir)


def test_non_finite(vae_dir):
    def poison(state):
        state["decoder.conv_in.bias"][0] = float("nan")

    _edit_weights(vae_dir, poison)
    with pytest.raises(WeightsError, match="'decoder.conv_in.bias' holds non-finite"):
        VAE.from_pretrained(vae_dir)


def test_corrupt_safetensors(vae_dir):
    (vae_dir / WEIGHTS).write_bytes(b"\x00" * 20)
    with pytest.raises(WeightsError, match=f"{WEIGHTS}: cannot read safetensors"):
        VAE.from_pretrained(vae_dir)


def test_pickle_needs_opt_in(vae_dir):
    state = load_file(vae_dir / WEIGHTS)
    (vae_dir / WEIGHTS).unlink()
    torch.save(state, vae_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(
        WeightsError, match="pickled weights are not loaded by default.*allow_pickle"
    ):
        VAE.from_pretrained(vae_dir)
    model = VAE.from_pretrained(vae_dir, allow_pickle=True)
    assert torch.equal(model.state_dict()["decoder.conv_in.bias"], state["decoder.conv_in.bias"])


def test_pickle_with_code_is_refused(vae_dir):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (vae_dir / WEIGHTS).unlink()
    torch.save({"x": Evil()}, vae_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="cannot read pickled weights"):
        VAE.from_pretrained(vae_dir, allow_pickle=True)


def test_save_is_atomic_and_roundtrips(tmp_path):
    model = VAE.from_config(VAE_SMALL_CONFIG)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["block_out_channels"] == [32, 32, 64]
    again = VAE.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert dict(again.config) == json.loads(json.dumps(dict(model.config)))
