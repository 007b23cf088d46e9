"""A UNet trained on latents of one VAE and decoded by another makes noise: the trainers keep
the VAE of their latent datasets (``echofast encode``'s manifest) in checkpoints and exports
(``echofast_export.json``), and the pipelines refuse a weights root whose ``vae/`` differs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from support.models import save_diffusers
from support.weights import TINY_VAE
from train.test_training import make_config

from echofast import cli
from echofast.data import write_filelist
from echofast.data.encode import _vae_digest, main_encode
from echofast.io import write_video
from echofast.models.provenance import EXPORT_INFO_NAME, VAEMismatchError, read_export_info
from echofast.pipelines import EchoSyntheticPipeline
from echofast.train import load_checkpoint, train
from echofast.train.loop import export_checkpoint, list_checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """VAEs ``a`` and ``b`` (other random weights); an LVDM trained one step on latents that
    ``a`` encoded, and a LIDM trained on random data (no VAE recorded); both exported."""
    tmp = tmp_path_factory.mktemp("provenance")
    vaes = {name: tmp / f"vae_{name}" for name in "ab"}
    for seed, folder in enumerate(vaes.values()):
        save_diffusers(AutoencoderKL, TINY_VAE, folder, seed=5 * seed)
    videos = tmp / "videos"
    frames = torch.arange(8 * 12 * 12, dtype=torch.uint8).reshape(8, 12, 12).numpy()
    for i in range(2):
        write_video(videos / "Videos" / f"v{i}.avi", frames, 8.0)
    rows = [{"FileName": f"v{i}", "EF": 50 + i, "FPS": 8, "Split": "TRAIN"} for i in range(2)]
    write_filelist(videos, rows)
    latents = tmp / "latents"
    argv = ["--vae", str(vaes["a"]), "--input", str(videos), "--out", str(latents)]
    assert main_encode([*argv, "--no-progress", "--device", "cpu"]) == 0
    data = {"source": "files", "root": str(latents), "frames": 4, "target_fps": 8.0}
    train(make_config(tmp / "lvdm_run", "lvdm", steps=1, data=data))
    train(make_config(tmp / "lidm_run", "lidm", steps=1))
    return tmp, vaes, latents


def _root(tmp, vaes, vae: str):
    root = tmp / f"root_{vae}"
    if not root.exists():
        shutil.copytree(vaes[vae], root / "vae")
        shutil.copytree(tmp / "lidm_run" / "export", root / "lidm_dynamic")
        shutil.copytree(tmp / "lvdm_run" / "export", root / "lvdm")
    return root


def test_checkpoints_and_exports_record_the_latents_vae(trained):
    tmp, vaes, latents = trained
    manifest = json.loads((latents / "encode.json").read_text())
    scaling = json.loads((vaes["a"] / "config.json").read_text())["scaling_factor"]
    expected = {"vae_sha256": _vae_digest(vaes["a"]), "scaling_factor": scaling}
    assert manifest["vae_sha256"] == expected["vae_sha256"]
    _, ckpt = list_checkpoints(tmp / "lvdm_run")[-1]
    assert load_checkpoint(ckpt)["latents_vae"] == expected
    assert read_export_info(tmp / "lvdm_run" / "export")["latents_vae"] == expected
    assert read_export_info(tmp / "lidm_run" / "export")["latents_vae"] is None
    # an export made later from the checkpoint records it too
    assert read_export_info(export_checkpoint(ckpt, tmp / "again"))["latents_vae"] == expected


def test_the_pipeline_refuses_another_vae(trained):
    tmp, vaes, _ = trained
    EchoSyntheticPipeline.from_pretrained(_root(tmp, vaes, "a"))
    other = _root(tmp, vaes, "b")
    with pytest.raises(VAEMismatchError) as err:
        EchoSyntheticPipeline.from_pretrained(other)
    text = str(err.value)
    assert (
        f"{other / 'lvdm'} (lvdm) was trained on latents of another VAE than {other / 'vae'}"
        in text
    )
    assert _vae_digest(vaes["a"]) in text and _vae_digest(other / "vae") in text
    assert "check_vae=False; generate --no-vae-check" in text
    EchoSyntheticPipeline.from_pretrained(other, check_vae=False)


def test_the_scaling_factor_counts_too(trained, tmp_path):
    tmp, vaes, _ = trained
    root = tmp_path / "root"
    shutil.copytree(_root(tmp, vaes, "a"), root)
    config = json.loads((root / "vae" / "config.json").read_text())
    (root / "vae" / "config.json").write_text(
        json.dumps({**config, "scaling_factor": config["scaling_factor"] / 2})
    )
    info = read_export_info(root / "lvdm")
    digest = _vae_digest(root / "vae")  # the config is part of the digest: record the new one
    info["latents_vae"]["vae_sha256"] = digest
    (root / "lvdm" / EXPORT_INFO_NAME).write_text(json.dumps(info))
    half = config["scaling_factor"] / 2
    pattern = f"scaling_factor {config['scaling_factor']}; .* has [0-9a-f+]+, {half}"
    with pytest.raises(VAEMismatchError, match=pattern):
        EchoSyntheticPipeline.from_pretrained(root)


def test_generate_refuses_before_writing_anything(trained, tmp_path, capsys):
    tmp, vaes, _ = trained
    out = tmp_path / "out"
    argv = ["generate", "--weights", str(_root(tmp, vaes, "b")), "--out", str(out)]
    argv += ["--num-videos", "1", "--frames", "4", "--steps", "1", "--device", "cpu"]
    assert cli.main([*argv, "--no-progress"]) != 0
    assert "was trained on latents of another VAE" in capsys.readouterr().err
    assert not out.exists()
