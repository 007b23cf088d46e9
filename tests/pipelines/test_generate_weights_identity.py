"""``generate``'s record of the weights (``weights_sha256`` in generation.json): the digests of
exactly the files the models load from (a sharded folder's index and shards; a pickled folder's
.bin behind ``allow_pickle``), so that changed weights are refused on resume; and the loaders'
typed errors, before anything is written, for folders it cannot load."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from echofast.errors import MissingFileError, WeightsError
from echofast.fsutil import sha256_file
from echofast.pipelines.dataset import GenerateConfig, GenerationConflict, generate_dataset

INDEX = "diffusion_pytorch_model.safetensors.index.json"
SINGLE = "diffusion_pytorch_model.safetensors"


def _cfg(root, out, **kw) -> GenerateConfig:
    args = dict(weights=str(root), out=str(out), num_videos=1, frames=8, fps=30.0, steps=2)
    return GenerateConfig(**(args | dict(seed=1, batch_size=1, progress=False) | kw))


def _copy_root(weights_root, tmp_path):
    return shutil.copytree(weights_root, tmp_path / "weights")


def _shard_vae(root):
    """Rewrites root/vae as diffusers' sharded layout (several shards and their index)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(root / "vae")
    shutil.rmtree(root / "vae")
    vae.save_pretrained(root / "vae", max_shard_size="20KB")
    index = json.loads((root / "vae" / INDEX).read_text())
    return sorted(set(index["weight_map"].values()))


def test_a_sharded_folder_is_recorded_by_its_index_and_shards(weights_root, tmp_path):
    root = _copy_root(weights_root, tmp_path)
    shards = _shard_vae(root)
    assert len(shards) > 2
    (root / "vae" / SINGLE).write_text("not the weights")  # the index wins, as in diffusers
    out = tmp_path / "ds"
    generate_dataset(_cfg(root, out))
    vae = json.loads((out / "generation.json").read_text())["arguments"]["weights_sha256"]["vae"]
    assert vae["weights"] == sha256_file(root / "vae" / INDEX)
    assert vae["shards"] == {s: sha256_file(root / "vae" / s) for s in shards}
    assert vae["config"] == sha256_file(root / "vae" / "config.json")
    generate_dataset(_cfg(root, out))  # unchanged: resumes (nothing left to do)
    # one shard's values change: the job is another one
    path = root / "vae" / shards[1]
    save_file({k: v * 0.5 for k, v in load_file(path).items()}, path)
    with pytest.raises(GenerationConflict) as err:
        generate_dataset(_cfg(root, out))
    # the one digest that changed, not every model's record
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"  weights_sha256.vae.shards.{shards[1]}: folder has '")


def test_single_file_folders_keep_their_record(weights_root, tmp_path):
    """Datasets generated before sharded folders were recorded resume unchanged: a single-file
    folder's entry is still its file's digest and its config's."""
    out = tmp_path / "ds"
    generate_dataset(_cfg(weights_root, out))
    record = json.loads((out / "generation.json").read_text())["arguments"]["weights_sha256"]
    for name, folder in (("vae", "vae"), ("lidm", "lidm_dynamic"), ("lvdm", "lvdm")):
        assert record[name] == {
            "weights": sha256_file(weights_root / folder / SINGLE),
            "config": sha256_file(weights_root / folder / "config.json"),
        }


def _pickle_lvdm(root):
    import torch

    folder = root / "lvdm"
    torch.save(load_file(folder / SINGLE), folder / "diffusion_pytorch_model.bin")
    (folder / SINGLE).unlink()
    return folder / "diffusion_pytorch_model.bin"


def test_a_pickled_folder_needs_allow_pickle_and_is_recorded_by_its_bin(weights_root, tmp_path):
    root = _copy_root(weights_root, tmp_path)
    pickled = _pickle_lvdm(root)
    out = tmp_path / "ds"
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.bin: pickled weights"):
        generate_dataset(_cfg(root, out))
    assert not out.exists()
    generate_dataset(_cfg(root, out, allow_pickle=True))
    record = json.loads((out / "generation.json").read_text())["arguments"]["weights_sha256"]
    assert record["lvdm"]["weights"] == sha256_file(pickled)
    reference = tmp_path / "reference"
    generate_dataset(_cfg(weights_root, reference))
    assert (out / "Videos" / "synthetic_000000.avi").read_bytes() == (
        reference / "Videos" / "synthetic_000000.avi"
    ).read_bytes()


@pytest.mark.parametrize(
    "remove, error, message",
    [
        ("lvdm/config.json", MissingFileError, r"lvdm/config\.json: config file is missing"),
        (f"lidm_dynamic/{SINGLE}", MissingFileError, r"lidm_dynamic/.*weights file is missing"),
        ("vae", MissingFileError, "weights root lacks model folder"),
    ],
)
def test_unloadable_folders_are_typed_errors_before_anything_is_written(
    weights_root, tmp_path, remove, error, message
):
    root = _copy_root(weights_root, tmp_path)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    out = tmp_path / "ds"
    with pytest.raises(error, match=message):
        generate_dataset(_cfg(root, out))
    assert not out.exists()
