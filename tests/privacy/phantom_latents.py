"""Latent datasets for the privacy tests: phantom echo clips (echofast.data.phantom), resized to
the tiny VAE's 12×12 frames and encoded with that VAE, written in the layout of ``echofast
encode`` (FileList.csv, Latents/<name>.safetensors, encode.json); single latent files; and an
untrained tiny re-identification model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from echofast.data import write_filelist
from echofast.data.encode import _vae_digest, encode_frames
from echofast.data.phantom import make_phantom
from echofast.models import VAE
from echofast.privacy import ReIdentificationModel
from echofast.privacy.metrics import AUCResult
from echofast.rng import sample_seed


def phantom_frames(index: int, frames: int, seed: int = 0, size: int = 12) -> torch.Tensor:
    """uint8 (frames, size, size): the first ``frames`` frames of phantom clip ``index`` (one
    second of at least 8 frames, so that it holds a whole cycle) drawn at 16×16, resized."""
    drawn = max(frames, 8)
    clip = make_phantom(
        seed=sample_seed(seed, index, "privacy-test"),
        frames=drawn,
        fps=float(drawn),
        size=16,
        hr_range=(60.0, 200.0),
    )
    x = torch.from_numpy(clip.frames[:frames]).float()[:, None]
    if size != 16:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    x = x[:, 0]
    return x.round().clamp(0, 255).to(torch.uint8)


def write_latents(path: Path, latents: torch.Tensor) -> Path:
    """One clip's latents at ``path`` (key ``latents``, as ``echofast encode`` writes them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(path))
    return path


def save_untrained_reid(folder: Path) -> Path:
    """An untrained tiny re-identification model (seed 0) in ``folder``, with a saved evaluation
    that passes the AUC threshold, so the CLIs accept it."""
    torch.manual_seed(0)
    model = ReIdentificationModel(
        layers=(1, 1, 1, 1), width=8, n_features=32, normalization="frame"
    )
    model.save_pretrained(folder)
    auc = AUCResult(0.95, 0.9, 0.99, 0.95, 0.95, 10, 10, 16, 8, 8, 0)
    (folder / "evaluation.json").write_text(json.dumps({"test_auc": auc.to_dict()}))
    return folder


def write_phantom_latents(
    root: Path,
    vae_dir: Path,
    splits: tuple[int, int, int],
    frames: int = 8,
    seed: int = 0,
    prefix: str = "real",
    size: int = 12,
) -> Path:
    """Encode ``sum(splits)`` phantom clips with the VAE in ``vae_dir`` into ``root``."""
    vae = VAE.from_pretrained(vae_dir)
    (root / "Latents").mkdir(parents=True, exist_ok=True)
    rows = []
    names = ["TRAIN"] * splits[0] + ["VAL"] * splits[1] + ["TEST"] * splits[2]
    for i, split in enumerate(names):
        name = f"{prefix}_{i:04d}"
        lat = encode_frames(vae, phantom_frames(i, frames, seed, size))
        save_file(
            {"latents": lat},
            str(root / "Latents" / f"{name}.safetensors"),
            metadata={"fps": repr(float(frames))},
        )
        rows.append(
            {"FileName": name, "EF": 50, "FPS": frames, "NumberOfFrames": frames, "Split": split}
        )
    write_filelist(root, rows)
    manifest = {
        "vae_sha256": _vae_digest(vae_dir),
        "scaling_factor": vae.config.scaling_factor,
        "dtype": "float32",
    }
    (root / "encode.json").write_text(json.dumps(manifest))
    return root


TINY_REID = {"architecture": "ResNet", "layers": [1, 1, 1, 1], "width": 8, "n_features": 32}


def reid_config(root, out, **train) -> dict:
    return {
        "seed": 42,
        "output_dir": str(out),
        "name": "reidentification_phantom",
        "model": dict(TINY_REID),
        "data": {"root": str(root), "pairs_per_video": 4, "eval_pairs_per_video": 4},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 32, "max_epochs": 25, "patience": 0, "progress": False, **train},
        "eval": {"bootstrap": 1000},
    }


def write_random_latents(
    root: Path, splits: dict[str, int], frames: int, shape=(4, 6, 6), seed: int = 0
) -> Path:
    """A latent dataset of standard-normal clips (``frames`` frames of ``shape``): ``splits``
    maps each split to its clip count; clips are named ``<split>_<k>``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for split, n in splits.items():
        for k in range(n):
            name = f"{split.lower()}_{k}"
            write_latents(
                root / "Latents" / f"{name}.safetensors", torch.randn(frames, *shape, generator=g)
            )
            rows.append(
                {"FileName": name, "EF": 50, "FPS": 2, "NumberOfFrames": frames, "Split": split}
            )
    write_filelist(root, rows)
    return root
