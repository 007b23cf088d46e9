"""from_pretrained / save_pretrained: formats, dtypes, and every error names its problem."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel
from safetensors.torch import load_file, save_file
from support.configs import LIDM_SMALL_CONFIG, VAE_SMALL_CONFIG
from support.models import build_diffusers, save_diffusers

from echofast import fsutil
from echofast.errors import ConfigError, MissingFileError, WeightsError
from echofast.models import LIDM, VAE
from echofast.models.tiny import TINY_LIDM, TINY_VAE

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


@pytest.mark.parametrize(
    "data", [b"{not json", b'{"in_channels": "\xff"}'], ids=["not_json", "not_utf8"]
)
def test_malformed_config(vae_dir, data):
    (vae_dir / "config.json").write_bytes(data)
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        VAE.from_pretrained(vae_dir)


def test_unknown_key_is_named(vae_dir):
    _edit_config(vae_dir, frobnicate=3)
    with pytest.raises(ConfigError, match=r"\['frobnicate'\] not supported by VAE"):
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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(vae_dir, value):
    def poison(state):
        state["decoder.conv_in.bias"][0] = value

    _edit_weights(vae_dir, poison)
    with pytest.raises(WeightsError, match="'decoder.conv_in.bias' holds non-finite"):
        VAE.from_pretrained(vae_dir)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_a_weight_that_is_not_floating_point_is_named(vae_dir, dtype):
    """An integer (or bool, complex) tensor where the model holds floats is a WeightsError
    naming the file, the key and its dtype (it was torch's RuntimeError from load_state_dict
    with assign=True)."""
    key = "decoder.conv_in.bias"
    _edit_weights(vae_dir, lambda s: s.__setitem__(key, s[key].round().to(dtype)))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        WeightsError, match=rf"{WEIGHTS}: key '{key}' holds {name} values, VAE expects floating"
    ):
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


def test_pickled_state_dict_wrapper_is_unwrapped(vae_dir):
    """A training checkpoint's ``{"state_dict": ...}`` wrapper is read as its state dict."""
    state = load_file(vae_dir / WEIGHTS)
    (vae_dir / WEIGHTS).unlink()
    torch.save({"state_dict": state}, vae_dir / "diffusion_pytorch_model.bin")
    model = VAE.from_pretrained(vae_dir, allow_pickle=True)
    assert torch.equal(model.state_dict()["decoder.conv_in.bias"], state["decoder.conv_in.bias"])


@pytest.mark.parametrize(
    "obj", [{"encoder.conv_in.bias": torch.zeros(32), "epoch": 3}, [torch.zeros(1)]]
)
def test_pickle_that_is_not_a_dict_of_tensors_is_refused(vae_dir, obj):
    (vae_dir / WEIGHTS).unlink()
    torch.save(obj, vae_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"model\.bin: expected a dict of tensors"):
        VAE.from_pretrained(vae_dir, allow_pickle=True)


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


def test_save_pretrained_variant_loads_here_and_in_diffusers(tmp_path):
    model = VAE.from_config(VAE_SMALL_CONFIG)
    model.save_pretrained(tmp_path, variant="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    with pytest.raises(MissingFileError, match=f"{WEIGHTS}: weights file is missing"):
        VAE.from_pretrained(tmp_path)
    again = VAE.from_pretrained(tmp_path, variant="fp16")
    theirs = AutoencoderKL.from_pretrained(tmp_path, variant="fp16")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
        assert torch.equal(theirs.state_dict()[k], v), k


# ---- config value types ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    return build_diffusers(UNet2DModel, TINY_LIDM)


@pytest.fixture()
def unet_dir(tmp_path, unet):
    unet.save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("layers_per_block", "1", "'layers_per_block'.*'1' \\(str\\).*int"),
        ("block_out_channels", 32, "'block_out_channels'.*32 \\(int\\).*list of int"),
        ("norm_eps", True, "'norm_eps'.*True \\(bool\\).*float"),
        ("layers_per_block", True, "'layers_per_block'.*True \\(bool\\).*int"),
        ("down_block_types", ["DownBlock2D", 2, "DownBlock2D"], "'down_block_types'"),
        ("norm_num_groups", 5, r"must be divisible by num_groups"),  # torch's words
        ("in_channels", -1, "negative dimension -1"),
    ],
)
def test_bad_config_value_is_a_config_error(unet_dir, key, value, named):
    _edit_config(unet_dir, **{key: value})
    with pytest.raises(ConfigError, match=rf"config\.json: .*{named}"):
        LIDM.from_pretrained(unet_dir)


# ---- dtype ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float16", torch.float16), ("bfloat16", torch.bfloat16), (torch.float16, torch.float16)],
)
def test_dtype_by_name_or_dtype(unet_dir, dtype, expected):
    model = LIDM.from_pretrained(unet_dir, dtype=dtype)
    assert model.dtype == expected


def test_torch_dtype_is_diffusers_name_for_dtype(unet_dir):
    from diffusers import UNet2DModel

    model = LIDM.from_pretrained(unet_dir, torch_dtype=torch.float16)
    ref = UNet2DModel.from_pretrained(unet_dir, torch_dtype=torch.float16)
    assert model.dtype == ref.dtype == torch.float16
    with pytest.raises(ValueError, match="give dtype or torch_dtype .* not both"):
        LIDM.from_pretrained(unet_dir, dtype="float16", torch_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^torch_dtype must be one of float32, .* got 'fp16'"):
        LIDM.from_pretrained(unet_dir, torch_dtype="fp16")


@pytest.mark.parametrize("dtype", [torch.int64, "int64", "fp16", torch.float8_e4m3fn, 16])
def test_bad_dtype_is_refused(unet_dir, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float16, bfloat16"):
        LIDM.from_pretrained(unet_dir, dtype=dtype)


# ---- sharded folders ------------------------------------------------------------------------

SHARD = "100KB"  # the tiny UNet's weights are ~1.8 MB: a couple dozen shards
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture()
def sharded_dir(tmp_path, unet):
    unet.save_pretrained(tmp_path / "sharded", max_shard_size=SHARD)
    return tmp_path / "sharded"


def _assert_same(model, ref):
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


@pytest.mark.parametrize(
    ("variant", "safe"),
    [(None, True), ("fp16", True), (None, False), ("fp16", False)],
)
def test_sharded_loads_like_single_file(tmp_path, unet, unet_dir, variant, safe):
    folder = tmp_path / "sharded"
    unet.save_pretrained(folder, max_shard_size=SHARD, variant=variant, safe_serialization=safe)
    shards = [p for p in folder.iterdir() if p.name != "config.json" and "index" not in p.name]
    assert len(shards) > 2
    single = LIDM.from_pretrained(unet_dir)
    if not safe:
        with pytest.raises(WeightsError, match=r"index.*pickled weights are not loaded"):
            LIDM.from_pretrained(folder, variant=variant)
    sharded = LIDM.from_pretrained(folder, variant=variant, allow_pickle=not safe)
    _assert_same(sharded, single)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sharded(x, 10).sample, single(x, 10).sample)


def test_a_folder_with_an_index_and_a_single_file_loads_the_shards_like_diffusers(
    sharded_dir, tmp_path
):
    """diffusers looks for the safetensors index first: a folder that has one loads its shards
    even when a single weights file of other values sits beside them."""
    other = build_diffusers(UNet2DModel, TINY_LIDM, seed=1)
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "diffusion_pytorch_model.safetensors", sharded_dir)
    ref = UNet2DModel.from_pretrained(sharded_dir)
    _assert_same(LIDM.from_pretrained(sharded_dir), ref)
    assert not torch.equal(ref.conv_in.weight, other.conv_in.weight)


def test_sharded_variant_is_not_taken_for_plain(sharded_dir):
    with pytest.raises(
        MissingFileError, match=r"model\.fp16\.safetensors: weights file is missing"
    ):
        LIDM.from_pretrained(sharded_dir, variant="fp16")


def _edit_index(folder, fn):
    path = folder / INDEX
    index = json.loads(path.read_text())
    fn(index["weight_map"])
    path.write_text(json.dumps(index))
    return index["weight_map"]


def _shard(folder, i):
    """The name of shard ``i`` (from 1) of a sharded folder."""
    shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    return shards[i - 1]


def test_sharded_missing_shard(sharded_dir):
    (sharded_dir / _shard(sharded_dir, 2)).unlink()
    with pytest.raises(MissingFileError, match=rf"00002-of-.*: shard file listed in {INDEX}"):
        LIDM.from_pretrained(sharded_dir)


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"]
)
def test_sharded_shard_outside_folder(sharded_dir, shard):
    outside = sharded_dir.parent / "outside.safetensors"
    shutil.copy(sharded_dir / _shard(sharded_dir, 1), outside)
    _edit_index(sharded_dir, lambda m: m.__setitem__("conv_in.weight", shard))
    with pytest.raises(WeightsError, match="is not a file inside"):
        LIDM.from_pretrained(sharded_dir)


def test_sharded_index_cannot_name_a_pickle(sharded_dir):
    torch.save({"conv_in.weight": torch.zeros(1)}, sharded_dir / "evil.bin")
    _edit_index(sharded_dir, lambda m: m.__setitem__("conv_in.weight", "evil.bin"))
    with pytest.raises(WeightsError, match="'evil.bin' is not a .safetensors file"):
        LIDM.from_pretrained(sharded_dir)


def test_sharded_tensor_not_in_its_shard(sharded_dir):
    path = sharded_dir / _shard(sharded_dir, 1)
    state = load_file(path)
    del state["conv_in.weight"]
    save_file(state, path)
    with pytest.raises(WeightsError, match=r"does not hold \['conv_in.weight'\].*places there"):
        LIDM.from_pretrained(sharded_dir)


def test_sharded_tensor_missing_from_index(sharded_dir):
    _edit_index(sharded_dir, lambda m: m.pop("conv_in.weight"))
    with pytest.raises(WeightsError, match=r"holds \['conv_in.weight'\].*does not place there"):
        LIDM.from_pretrained(sharded_dir)


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"weight_map": {}}', '{"weight_map": {"a": 1}}']
)
def test_sharded_malformed_index(sharded_dir, text):
    (sharded_dir / INDEX).write_text(text)
    with pytest.raises(WeightsError, match=f"{INDEX}: "):
        LIDM.from_pretrained(sharded_dir)


# ---- file modes -----------------------------------------------------------------------------


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    fsutil._umask.cache_clear()
    yield
    os.umask(old)
    fsutil._umask.cache_clear()


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_saved_files_get_umask_mode(tmp_path, umask_022):
    VAE.from_config(VAE_SMALL_CONFIG).save_pretrained(tmp_path)
    assert _mode(tmp_path / WEIGHTS) == _mode(tmp_path / "config.json") == 0o644
    path = fsutil.atomic_write(
        tmp_path / "latents.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp)
    )
    assert _mode(path) == 0o644


# ---- what save_pretrained writes --------------------------------------------------------------


def test_save_pretrained_writes_what_diffusers_writes(tmp_path):
    """A new nested folder is created; the config carries diffusers' metadata keys (and
    echofast's version), the safetensors file diffusers' ``{"format": "pt"}`` header."""
    from safetensors import safe_open

    import echofast

    ref = build_diffusers(AutoencoderKL, TINY_VAE)
    ref.save_pretrained(tmp_path / "theirs")
    ours = VAE.from_config(TINY_VAE)
    ours.save_pretrained(tmp_path / "a" / "b" / "ours")
    folders = {name: tmp_path / name for name in ("theirs", "a/b/ours")}
    configs = {k: json.loads((f / "config.json").read_text()) for k, f in folders.items()}
    meta = {}
    for k, f in folders.items():
        with safe_open(f / WEIGHTS, "pt") as weights:
            meta[k] = weights.metadata()
    assert meta["a/b/ours"] == meta["theirs"] == {"format": "pt"}
    theirs_meta = {k for k in configs["theirs"] if k.startswith("_")}
    assert theirs_meta == {"_class_name", "_diffusers_version"}
    assert {k: configs["a/b/ours"][k] for k in theirs_meta} == {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.27.0",
    }
    assert configs["a/b/ours"]["_echofast_version"] == echofast.__version__
    assert {k: v for k, v in configs["a/b/ours"].items() if not k.startswith("_")} == {
        k: v for k, v in dict(ours.config).items()
    }


@pytest.mark.parametrize("name", ["LIDM", "UNet2DModel"])
def test_config_names_this_class_or_its_diffusers_class(tmp_path, name):
    LIDM.from_config(TINY_LIDM).save_pretrained(tmp_path)
    _edit_config(tmp_path, _class_name=name)
    assert dict(LIDM.from_pretrained(tmp_path).config) == {
        **LIDM.config_defaults(),
        **json.loads(json.dumps(TINY_LIDM)),
    }


def test_config_that_is_not_an_object_is_named(vae_dir):
    (vae_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object, got list"):
        VAE.from_pretrained(vae_dir)


# ---- config values: each error names the file, the key and what it takes ---------------------


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("time_embedding_dim", "x", "'time_embedding_dim': value 'x' \\(str\\) .* int or null"),
        ("sample_size", "x", "'sample_size': .* int or list of int or null"),
        ("center_input_sample", 1, "'center_input_sample': value 1 \\(int\\) .* valid bool"),
        ("act_fn", 3, "'act_fn': value 3 \\(int\\) is not a valid str"),
        ("act_fn", "gelu", "config key 'act_fn': value 'gelu' is not supported"),
        ("norm_num_groups", 0, "do not build a LIDM \\(ZeroDivisionError"),
        (
            "block_out_channels",
            [],
            "do not build a LIDM \\(IndexError",
        ),
    ],
)
def test_config_value_errors_name_the_file_key_and_type(tmp_path, key, value, named):
    LIDM.from_config(TINY_LIDM).save_pretrained(tmp_path)
    changes = {key: value}
    if key == "block_out_channels":  # lengths agree: the layers find nothing to build
        changes.update(down_block_types=[], up_block_types=[])
    _edit_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/config\.json: .*{named}"):
        LIDM.from_pretrained(tmp_path)


@pytest.mark.parametrize("build", ["from_config", "constructor"])
def test_config_built_without_a_folder_is_in_the_activations_layout(build):
    """``from_config`` and the constructor store conv kernels in ``memory_format``
    (channels_last) for every model, not only after a load."""
    for cls, cfg in ((VAE, TINY_VAE), (LIDM, TINY_LIDM)):
        model = cls.from_config(cfg) if build == "from_config" else cls(**cfg)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(
            c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs
        ), cls


# ---- weights errors name the file and the keys -----------------------------------------------


def test_many_missing_keys_are_listed_sorted_and_counted(tiny_vae_dir):
    vae_dir = tiny_vae_dir
    gone = sorted(load_file(vae_dir / WEIGHTS))[:10]

    extra = [f"z{i}" for i in range(8)]

    def drop_ten_add_eight(state):
        for key in gone:
            del state[key]
        state.update({key: torch.zeros(1) for key in reversed(extra)})

    _edit_weights(vae_dir, drop_ten_add_eight)
    with pytest.raises(WeightsError) as err:
        VAE.from_pretrained(vae_dir)
    missing = ", ".join(repr(k) for k in gone[:8])
    unexpected = ", ".join(repr(k) for k in extra)
    assert str(err.value) == (
        f"{vae_dir / WEIGHTS}: weights do not match VAE: missing keys [{missing}, ...] (10 in all)"
        f"; unexpected keys [{unexpected}] (8 in all)"
    )


@pytest.fixture()
def tiny_vae_dir(tmp_path):
    save_diffusers(AutoencoderKL, TINY_VAE, tmp_path / "tiny_vae")
    return tmp_path / "tiny_vae"


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_other_pickle_suffixes_need_the_opt_in_too(tiny_vae_dir, suffix):
    vae_dir = tiny_vae_dir
    state = load_file(vae_dir / WEIGHTS)
    (vae_dir / WEIGHTS).unlink()
    path = vae_dir / f"diffusion_pytorch_model{suffix}"
    torch.save(state, path)
    with pytest.raises(
        WeightsError,
        match=rf"^{re.escape(str(path))}: pickled weights .* convert them to {WEIGHTS} or",
    ):
        VAE.from_pretrained(vae_dir)
    model = VAE.from_pretrained(vae_dir, allow_pickle=True)
    assert torch.equal(model.decoder.conv_in.bias, state["decoder.conv_in.bias"])


def test_a_bin_is_preferred_to_other_pickles(tiny_vae_dir):
    """diffusers' own pickle name, ``.bin``, is read first when several pickles are there."""
    vae_dir = tiny_vae_dir
    state = load_file(vae_dir / WEIGHTS)
    (vae_dir / WEIGHTS).unlink()
    torch.save(state, vae_dir / "diffusion_pytorch_model.bin")
    torch.save({k: v + 1 for k, v in state.items()}, vae_dir / "diffusion_pytorch_model.pt")
    torch.save({k: v + 2 for k, v in state.items()}, vae_dir / "diffusion_pytorch_model.ckpt")
    with pytest.raises(WeightsError, match=r"^\S+model\.bin: pickled weights"):
        VAE.from_pretrained(vae_dir)
    model = VAE.from_pretrained(vae_dir, allow_pickle=True)
    assert torch.equal(model.decoder.conv_in.bias, state["decoder.conv_in.bias"])


def test_an_empty_shard_index_is_refused_as_such(sharded_dir):
    (sharded_dir / INDEX).write_text('{"weight_map": {}}')
    with pytest.raises(WeightsError, match=f'{INDEX}: shard index needs a non-empty "weight_map"'):
        LIDM.from_pretrained(sharded_dir)


def test_a_weight_of_the_right_size_but_wrong_shape_is_named(tiny_vae_dir):
    key = "decoder.conv_out.weight"  # (3, 32, 3, 3): its transpose has as many values
    _edit_weights(tiny_vae_dir, lambda s: s.__setitem__(key, s[key].transpose(0, 1).contiguous()))
    with pytest.raises(WeightsError, match=rf"'{key}' has shape \(32, 3, 3, 3\), VAE expects"):
        VAE.from_pretrained(tiny_vae_dir)
