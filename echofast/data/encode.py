"""``echofast encode``: encode every video of an EchoNet-layout dataset into VAE latents.

Output (read by :class:`echofast.data.LatentVideoDataset` / :class:`LatentFrameDataset`)::

    <out>/Latents/<FileName>.safetensors   key "latents": float32 (T, 4, h, w) = posterior mean
                                           × scaling_factor (112×112 frames → 4×14×14); metadata
                                           fps, frames, source, scaling_factor, vae_sha256,
                                           source_sha256 (of the video file)
    <out>/FileList.csv                     the input rows of the encoded videos (all columns),
                                           FPS and NumberOfFrames set to the decoded video's
    <out>/encode.json                      VAE digest, scaling_factor, dtype, conventions

Pixels follow the reference: grey uint8 → ``x/128 − 1`` → repeated on 3 channels. The reference
stores ``latent_dist.sample()`` (a random draw); echofast stores the posterior **mean**
(deterministic; the draw's noise is ``exp(logvar/2)`` ≈ tiny for a trained VAE), as the
project's brief asks.

Resumable: every file appears atomically (temp file + fsync + rename), so an existing readable
file is a finished video and is skipped, unless it records (``source_sha256``) another video than
the one the input holds now (a dataset regenerated or replaced under the same names: encoded
again); FileList.csv is rewritten at the end from every finished file. A folder encoded with
another VAE or dtype is refused, and so, before anything is written, is an input none of whose
listed videos exists (a latent dataset, say). A video that cannot be decoded
(``VideoDecodeError``) is recorded, the others are still encoded, and the run ends with the list
of failures (``main_encode`` exits 1).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import EchofastError
from ..fsutil import atomic_write, atomic_write_text, sha256_file
from .datasets import (
    LATENT_KEY,
    LATENT_SUFFIX,
    LATENTS_DIR,
    DatasetError,
    VideoRecord,
    read_records,
    to_model_pixels,
)
from .echonet import number_text

MANIFEST = "encode.json"
SOURCE_SHA_KEY = "source_sha256"
"""Latent file metadata: SHA-256 of the video it was encoded from."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EncodeConflict(EchofastError, RuntimeError):
    """The output folder holds something ``echofast encode`` must not write into."""


@dataclass
class EncodeConfig:
    vae: str
    """A diffusers AutoencoderKL folder, or a weights root holding ``vae/``."""
    input: str
    out: str
    batch_size: int = 32
    """Frames per VAE call."""
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True


@dataclass
class EncodeSummary:
    folder: str
    encoded: int = 0
    already_done: int = 0
    in_dataset: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(FileName, reason) of every video that could not be encoded."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def vae_folder(path: str | os.PathLike) -> Path:
    """``path`` if it holds config.json, else ``path/vae`` (a weights root)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return path / "vae"
    return path


def _vae_digest(folder: Path) -> str:
    """Digests of the weights files ``VAE.from_pretrained(folder)`` loads (a sharded folder's
    shards, in name order; not its index) and of its config: other variants and stray files
    beside them do not count."""
    from ..models.vae import VAE

    weights = sorted(p for p in VAE.weights_files(folder, allow_pickle=True) if p.suffix != ".json")
    parts = [sha256_file(p)[:16] for p in weights] + [sha256_file(folder / "config.json")[:16]]
    return "+".join(parts)


@torch.no_grad()
def encode_frames(
    vae: torch.nn.Module,
    frames: torch.Tensor,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 grey frames (T, H, W) → float32 CPU latents (T, C, h, w): posterior mean ×
    ``vae.config.scaling_factor``, ``batch_size`` frames per call."""
    scale = float(vae.config.scaling_factor)
    out = []
    for i in range(0, len(frames), batch_size):
        x = to_model_pixels(frames[i : i + batch_size]).to(device=device, dtype=dtype)
        mean = vae.encode(x).latent_dist.mean
        out.append((mean.float() * scale).cpu())
    return torch.cat(out, 0).contiguous()


def _finished(path: Path, source_sha256: str | None = None) -> tuple[float, int] | None:
    """(fps, frames) of a complete latent file, None if absent or unreadable, or if it records
    the digest of a source video other than ``source_sha256`` (the input's video changed)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            shape = fh.get_slice(LATENT_KEY).get_shape()
            meta = fh.metadata() or {}
            fps = float(meta.get("fps", "nan"))
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply redone
        return None
    recorded = meta.get(SOURCE_SHA_KEY)
    if recorded is not None and source_sha256 is not None and recorded != source_sha256:
        return None
    return (fps, int(shape[0])) if len(shape) == 4 else None


def _prepare(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EncodeConflict(f"{path}: unreadable manifest ({err})") from None
        keys = ("vae_sha256", "scaling_factor", "dtype")
        diff = [k for k in keys if old.get(k) != manifest[k]]
        if diff:
            raise EncodeConflict(
                f"{out} holds latents encoded with another VAE/dtype (differs in {diff}); "
                "refusing to mix them: use another --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise EncodeConflict(
            f"{out} exists, is not empty and is not an echofast latent dataset (no {MANIFEST}); "
            "refusing to write into it"
        )
    (out / LATENTS_DIR).mkdir(parents=True, exist_ok=True)
    for tmp in (out / LATENTS_DIR).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    if not path.is_file():
        atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _write_filelist(out: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "FileList.csv", buf.getvalue())


def _check_names(filelist: Path, records: Sequence[VideoRecord]) -> None:
    """Refuse FileNames that are not plain file names (they would read and write outside the
    dataset folders); :func:`read_records` refuses two naming the same video."""
    for rec in records:
        given = rec.row.get("FileName")
        if rec.name in (".", "..") or any(c in rec.name for c in "/\\\0"):
            raise DatasetError(f"{filelist}: FileName {given!r} is not a plain file name")


def encode_dataset(cfg: EncodeConfig, vae: torch.nn.Module | None = None) -> EncodeSummary:
    """Encode (or finish encoding) ``cfg.input`` into ``cfg.out``; see the module docstring."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..io import VideoDecodeError, read_video

    if cfg.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {cfg.batch_size}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    src, out = Path(cfg.input), Path(cfg.out)
    if src.resolve() == out.resolve():
        raise EncodeConflict(f"--out must differ from --input ({src})")
    records = read_records(src, None, require_files=False)
    if not records:
        raise DatasetError(f"{src}/FileList.csv lists no videos")
    _check_names(src / "FileList.csv", records)
    if not any(rec.path.is_file() for rec in records):
        what = (
            f"{src} is a latent dataset ({MANIFEST}), not a video dataset"
            if (src / MANIFEST).is_file()
            else f"none of the {len(records)} video(s) FileList.csv lists is there "
            f"(first: {records[0].path})"
        )
        raise DatasetError(
            f"{src}: {what}; --input takes a folder with FileList.csv and Videos/<FileName>.avi"
        )
    with (src / "FileList.csv").open(newline="", encoding="utf-8-sig") as fh:
        columns = list(csv.DictReader(fh).fieldnames or [])
    columns += [c for c in ("FPS", "NumberOfFrames") if c not in columns]

    folder = vae_folder(cfg.vae)
    if vae is None:
        from ..models.vae import VAE

        vae = VAE.from_pretrained(folder, device=cfg.device, dtype=DTYPES[cfg.dtype])
    vae.eval()
    scale = float(vae.config.scaling_factor)
    digest = _vae_digest(folder) if (folder / "config.json").is_file() else "in-memory"
    manifest = {
        "kind": "echofast latent dataset",
        "vae": str(folder.resolve()) if digest != "in-memory" else None,
        "vae_sha256": digest,
        "scaling_factor": scale,
        "dtype": cfg.dtype,
        "input": str(src.resolve()),
        "latents": "float32 (T, C, h, w) = vae.encode(x).latent_dist.mean * scaling_factor",
        "pixels": "x = uint8 grey / 128 - 1, repeated on 3 channels",
    }
    _prepare(out, manifest)

    summary = EncodeSummary(folder=str(out))
    rows = []
    start = time.perf_counter()
    bar = tqdm(records, unit="video", desc="encode", disable=not cfg.progress)
    for rec in bar:
        target = out / LATENTS_DIR / f"{rec.name}{LATENT_SUFFIX}"
        source_sha = sha256_file(rec.path) if rec.path.is_file() else None
        done = _finished(target, source_sha)
        if done is None:
            try:
                frames, fps = read_video(rec.path)
            except VideoDecodeError as err:
                summary.failed.append((rec.name, str(err)))
                bar.set_postfix(failed=len(summary.failed))
                continue
            fps = fps or rec.fps or 0.0
            latents = encode_frames(
                vae,
                frames,
                batch_size=cfg.batch_size,
                device=cfg.device,
                dtype=DTYPES[cfg.dtype],
            )
            if not torch.isfinite(latents).all():
                summary.failed.append((rec.name, f"{rec.path}: non-finite latents"))
                continue
            meta = {
                "fps": repr(float(fps)),
                "frames": str(len(latents)),
                "source": rec.name,
                "scaling_factor": repr(scale),
                "vae_sha256": digest,
                SOURCE_SHA_KEY: source_sha,
            }
            atomic_write(
                target, lambda tmp, t=latents, m=meta: save_file({LATENT_KEY: t}, tmp, metadata=m)
            )
            done = (float(fps), len(latents))
            summary.encoded += 1
        else:
            summary.already_done += 1
        row = dict(rec.row)
        row["FPS"] = number_text(done[0]) if done[0] == done[0] else row.get("FPS", "")
        row["NumberOfFrames"] = done[1]
        rows.append(row)
    bar.close()
    _write_filelist(out, columns, rows)
    summary.in_dataset = len(rows)
    summary.seconds = time.perf_counter() - start
    return summary


def main_encode(argv: Sequence[str] | None = None) -> int:
    """``echofast encode``: VAE latents of every video of a dataset (resumable)."""
    p = argparse.ArgumentParser(
        prog="echofast encode",
        description="Encode every video of an EchoNet-layout dataset into VAE latents "
        "(one safetensors file per video, FileList.csv beside them). Re-running the same "
        "command resumes; unreadable videos are reported at the end (exit status 1).",
    )
    p.add_argument("--vae", required=True, help="VAE folder (diffusers) or a weights root")
    p.add_argument("--input", required=True, help="dataset with FileList.csv and Videos/")
    p.add_argument("--out", required=True, help="output latent dataset folder")
    p.add_argument("--batch-size", type=int, default=32, help="frames per VAE call (32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.batch_size < 1:
        p.error("--batch-size must be >= 1")
    summary = encode_dataset(
        EncodeConfig(
            vae=a.vae,
            input=a.input,
            out=a.out,
            batch_size=a.batch_size,
            device=a.device,
            dtype=a.dtype,
            progress=not a.no_progress,
        )
    )
    print(
        f"{summary.folder}: encoded {summary.encoded} video(s) in {summary.seconds:.1f} s, "
        f"{summary.already_done} already done; FileList.csv lists {summary.in_dataset}"
    )
    if summary.failed:
        print(f"echofast encode: {len(summary.failed)} video(s) failed:", file=sys.stderr)
        for name, reason in summary.failed:
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    return 0
