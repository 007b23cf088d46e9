"""``echofast generate``: a resumable, shardable job that writes an EchoNet-Dynamic-layout dataset.

Layout written into the output folder::

    Videos/<FileName>.avi        MJPEG, yuvj420p, best quality, at the FPS of the CSV
    FileList.csv                 FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split
    VolumeTracings.csv           header only (synthetic videos have no tracings)
    generation.json              arguments, seed rule, weights' SHA-256, package versions
    .echofast/journal-<shard>.jsonl   one fsynced line per finished video

Crash safety: a video is written to a temporary file, synced and renamed; only then is its journal
line appended and synced. On restart, journaled videos whose file is intact are kept, temporary
files are removed, and the rest are generated again. Every sample's randomness depends only on
(seed, index), and work is done in fixed chunks of ``batch_size`` consecutive samples (an
interrupted chunk is recomputed whole), so a resumed run writes the same bytes as an
uninterrupted one with the same batch size. ``FileList.csv`` is rebuilt from the journals.
A folder made with different arguments is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.echonet import (
    read_filelist,
    split_counts,
    split_of,
    write_empty_tracings,
    write_filelist,
)
from ..errors import EchofastError
from ..fsutil import atomic_write_text, sha256_file
from ..io import write_video
from ..rng import sample_seed
from .echo_synthetic import EchoSyntheticPipeline

MANIFEST = "generation.json"
STATE_DIR = ".echofast"
SEED_RULE = (
    "sample i of a job with seed S draws from torch CPU generators seeded with "
    "echofast.rng.sample_seed(S, i, stream) = first 8 bytes (big-endian, 63 bits) of "
    "sha256('echofast:{stream}:{S}:{i}'); streams: 'lidm' (initial image latents, then one noise "
    "tensor per step with t > 0), 'lvdm' (same, for the video latents), 'ef' (requested EF)"
)


class GenerationConflict(EchofastError, RuntimeError):
    """The output folder holds a different job (or something that is not an echofast dataset)."""


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """``"i/N"``; or torchrun's ``RANK``/``WORLD_SIZE`` when ``text`` is None."""
        if text is None:
            rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
            if rank is None or world is None:
                return cls()
            text = f"{rank}/{world}"
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like 'i/N', got {text!r}") from None
        if not 0 <= i < n:
            raise ValueError(f"shard index must satisfy 0 <= i < N, got {text!r}")
        return cls(i, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        return f"{self.index}of{self.count}"

    def owns(self, sample: int) -> bool:
        return sample % self.count == self.index


@dataclass
class GenerateConfig:
    """Arguments of a generation job. All but ``batch_size``, ``device``-independent knobs and the
    shard define the dataset: resuming with a different value is refused."""

    weights: str
    out: str
    num_videos: int
    dataset: str = "dynamic"
    frames: int = 192
    fps: float = 32.0
    seed: int = 0
    splits: tuple[int, int, int] | None = None
    ef_range: tuple[float, float] = (10, 90)
    ef_from: str | None = None
    steps: int = 64
    dtype: str = "float32"
    name_prefix: str = "synthetic_"
    batch_size: int = 8
    decode_chunk_size: int = 64
    device: str = "cpu"
    shard: Shard = field(default_factory=Shard)
    progress: bool = True

    NON_IDENTITY = (
        "out",
        "batch_size",
        "decode_chunk_size",
        "device",
        "shard",
        "progress",
        "weights",
    )

    def identity(self, weights_sha: dict[str, str], ef_source_sha: str | None) -> dict:
        ident = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NON_IDENTITY}
        ident["splits"] = list(split_counts(self.num_videos, self.splits, self.dataset))
        ident["ef_range"] = list(self.ef_range)
        ident["ef_from"] = ef_source_sha
        ident["weights_sha256"] = weights_sha
        ident["device_type"] = torch.device(self.device).type
        return ident


def _weights_sha(root: str, dataset: str) -> dict[str, dict[str, str]]:
    """SHA-256 of each model folder's weights and config file."""
    return {
        name: {
            "weights": sha256_file(folder / "diffusion_pytorch_model.safetensors"),
            "config": sha256_file(folder / "config.json"),
        }
        for name, folder in EchoSyntheticPipeline.folders(root, dataset).items()
    }


def requested_ef(cfg: GenerateConfig, index: int, pool: Sequence[float] | None) -> float:
    """The EF (percent) of sample ``index``: a uniform integer in ``ef_range`` (inclusive), or a
    value drawn with replacement from ``pool`` (the EF column of ``--ef-from``)."""
    g = torch.Generator().manual_seed(sample_seed(cfg.seed, index, "ef"))
    if pool is not None:
        return float(pool[int(torch.randint(len(pool), (1,), generator=g))])
    lo, hi = int(cfg.ef_range[0]), int(cfg.ef_range[1])
    return float(torch.randint(lo, hi + 1, (1,), generator=g))


def _ef_pool(path: str | None) -> list[float] | None:
    if path is None:
        return None
    rows = read_filelist(path)
    try:
        pool = [float(r["EF"]) for r in rows if r["EF"] not in ("", None)]
    except ValueError as err:
        raise ValueError(f"{path}: EF column holds a non-number ({err})") from None
    if not pool:
        raise ValueError(f"{path}: no EF values")
    return pool


def _versions() -> dict[str, str | None]:
    out = {}
    for dist in ("torch", "numpy", "av", "safetensors", "triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    (folder / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with open(folder / STATE_DIR / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_journal(path: Path) -> list[dict]:
    """Entries of a journal; a torn last line (crash while appending) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(cut)
            os.fsync(fh.fileno())
    return [json.loads(line) for line in data[:cut].decode().splitlines() if line.strip()]


def _append(path: Path, entry: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _journals(folder: Path) -> list[Path]:
    return sorted((folder / STATE_DIR).glob("journal-*.jsonl"))


def _intact(folder: Path, entry: dict) -> bool:
    path = folder / "Videos" / f"{entry['FileName']}.avi"
    return path.is_file() and path.stat().st_size == entry["bytes"]


def rebuild_filelist(folder: Path) -> int:
    """Rewrite FileList.csv (sorted by sample index) from every journal; returns the row count."""
    entries: dict[int, dict] = {}
    for journal in _journals(folder):
        for entry in read_journal(journal):
            if _intact(folder, entry):
                entries[entry["index"]] = entry
    rows = [entries[i]["row"] for i in sorted(entries)]
    write_filelist(folder, rows)
    write_empty_tracings(folder)
    return len(rows)


def _fresh(folder: Path) -> bool:
    """Empty, or holding only what another shard's start has just created (lock, empty Videos)."""
    for item in folder.iterdir():
        if item.name == STATE_DIR and {p.name for p in item.iterdir()} <= {"lock"}:
            continue
        if item.name == "Videos" and item.is_dir() and not any(item.iterdir()):
            continue
        return False
    return True


def _refuse_foreign(folder: Path) -> None:
    if folder.exists() and not (folder / MANIFEST).exists() and not _fresh(folder):
        raise GenerationConflict(
            f"{folder} exists, is not empty and is not an echofast "
            "generation folder; refusing to write into it"
        )


def _prepare(folder: Path, manifest: dict) -> None:
    """Create the folder, or check that an existing one holds this very job."""
    existing = folder / MANIFEST
    if existing.exists():
        try:
            old = json.loads(existing.read_text())["arguments"]
        except (json.JSONDecodeError, KeyError) as err:
            raise GenerationConflict(
                f"{existing}: unreadable manifest ({err}); refusing to write into this folder"
            ) from None
        diff = {k: (old.get(k), v) for k, v in manifest["arguments"].items() if old.get(k) != v}
        diff.update({k: (v, None) for k, v in old.items() if k not in manifest["arguments"]})
        if diff:
            lines = "\n".join(
                f"  {k}: folder has {a!r}, this run asks {b!r}"
                for k, (a, b) in sorted(diff.items())
            )
            raise GenerationConflict(
                f"{folder} holds a dataset generated with other arguments; refusing to mix or "
                f"overwrite it (use another --out):\n{lines}"
            )
        return
    (folder / "Videos").mkdir(parents=True, exist_ok=True)
    atomic_write_text(existing, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def generate_dataset(cfg: GenerateConfig, pipe: EchoSyntheticPipeline | None = None) -> dict:
    """Run (or resume) a generation job; returns a summary dict."""
    folder = Path(cfg.out)
    counts = split_counts(cfg.num_videos, cfg.splits, cfg.dataset)
    pool = _ef_pool(cfg.ef_from)
    manifest = {
        "echofast_version": __version__,
        "arguments": cfg.identity(
            _weights_sha(cfg.weights, cfg.dataset),
            sha256_file(cfg.ef_from) if cfg.ef_from else None,
        ),
        "weights_root": str(Path(cfg.weights).resolve()),
        "seed_rule": SEED_RULE,
        "packages": _versions(),
        "file_names": f"{cfg.name_prefix}<index, 6 digits>",
        "esv_edv": "empty: synthetic videos have no measured volumes",
    }
    _refuse_foreign(folder)
    with _locked(folder):
        _prepare(folder, manifest)
        for tmp in (folder / "Videos").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    journal = folder / STATE_DIR / f"journal-{cfg.shard.tag}.jsonl"
    done = {e["index"] for j in _journals(folder) for e in read_journal(j) if _intact(folder, e)}
    owned = [i for i in range(cfg.num_videos) if cfg.shard.owns(i)]
    chunks = [owned[s : s + cfg.batch_size] for s in range(0, len(owned), cfg.batch_size)]
    todo = [c for c in chunks if not done.issuperset(c)]
    missing = sum(len(set(c) - done) for c in todo)
    if todo and pipe is None:
        pipe = EchoSyntheticPipeline.from_pretrained(
            cfg.weights, dataset=cfg.dataset, device=cfg.device
        )
    start = time.perf_counter()
    bar = tqdm(total=missing, unit="video", desc="generate", disable=not cfg.progress)
    for chunk in todo:
        efs = [requested_ef(cfg, i, pool) for i in chunk]
        out = pipe(
            efs,
            seed=cfg.seed,
            sample_indices=chunk,
            num_frames=cfg.frames,
            num_inference_steps=cfg.steps,
            batch_size=cfg.batch_size,
            decode_chunk_size=cfg.decode_chunk_size,
            dtype=cfg.dtype,
        )
        for i, ef, video in zip(chunk, efs, out.videos):
            if i in done:
                continue
            name = f"{cfg.name_prefix}{i:06d}"
            path = write_video(folder / "Videos" / f"{name}.avi", video, cfg.fps)
            row = {
                "FileName": name,
                "EF": f"{ef:g}",
                "ESV": None,
                "EDV": None,
                "FrameHeight": video.shape[1],
                "FrameWidth": video.shape[2],
                "FPS": f"{cfg.fps:g}",
                "NumberOfFrames": video.shape[0],
                "Split": split_of(i, counts),
            }
            _append(
                journal, {"index": i, "FileName": name, "bytes": path.stat().st_size, "row": row}
            )
            bar.update(1)
        bar.set_postfix(videos_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")
    bar.close()
    with _locked(folder):
        written = rebuild_filelist(folder)
    elapsed = time.perf_counter() - start
    return {
        "folder": str(folder),
        "generated": missing,
        "already_done": len(done),
        "in_dataset": written,
        "expected": cfg.num_videos,
        "seconds": elapsed,
        "complete": written == cfg.num_videos,
    }


def merge_datasets(out: str | os.PathLike, shards: Sequence[str | os.PathLike]) -> dict:
    """Combine shard folders of one job into ``out`` (videos hard-linked or copied)."""
    out = Path(out)
    manifests = []
    for shard in shards:
        path = Path(shard) / MANIFEST
        if not path.is_file():
            raise GenerationConflict(f"{shard}: not an echofast generation folder (no {MANIFEST})")
        manifests.append(json.loads(path.read_text()))
    first = manifests[0]["arguments"]
    for shard, m in zip(shards[1:], manifests[1:]):
        if m["arguments"] != first:
            keys = sorted(
                k for k in set(first) | set(m["arguments"]) if first.get(k) != m["arguments"].get(k)
            )
            raise GenerationConflict(
                f"{shard}: generated with other arguments than {shards[0]} (differs in {keys})"
            )
    _refuse_foreign(out)
    seen: dict[int, str] = {}
    with _locked(out):
        _prepare(out, manifests[0])
        for shard in shards:
            shard = Path(shard)
            for journal in _journals(shard):
                target = out / STATE_DIR / journal.name
                entries = [e for e in read_journal(journal) if _intact(shard, e)]
                for e in entries:
                    if e["index"] in seen and seen[e["index"]] != str(shard):
                        raise GenerationConflict(
                            f"sample {e['index']} is in both {seen[e['index']]} and {shard}"
                        )
                    seen[e["index"]] = str(shard)
                    src = shard / "Videos" / f"{e['FileName']}.avi"
                    dst = out / "Videos" / src.name
                    if not dst.exists():
                        try:
                            os.link(src, dst)
                        except OSError:
                            shutil.copy2(src, dst)
                existing = {e["index"] for e in read_journal(target)}
                for e in entries:
                    if e["index"] not in existing:
                        _append(target, e)
        written = rebuild_filelist(out)
    expected = first["num_videos"]
    return {
        "folder": str(out),
        "in_dataset": written,
        "expected": expected,
        "complete": written == expected,
    }
