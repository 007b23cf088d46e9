"""``echofast generate``: a resumable, shardable job that writes an EchoNet-Dynamic-layout dataset.

Layout written into the output folder::

    Videos/<FileName>.avi        MJPEG, yuvj420p, best quality, at the FPS of the CSV
    FileList.csv                 FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split
    VolumeTracings.csv           header only (synthetic videos have no tracings)
    generation.json              arguments, seed rule, weights' SHA-256, package versions, the
                                 batch size and the shard rule
    privacy_report.json/.png     the privacy report (with ``--privacy``), or a report saying the
                                 dataset is NOT privacy-filtered
    .echofast/journal-<shard>.jsonl   one fsynced line per finished video

Crash safety: a video is written to a temporary file, synced and renamed; only then is its journal
line appended and synced. On restart, journaled videos whose file is intact are kept, stale
temporary files are removed (a shard's process holds ``.echofast/running-<shard>.lock`` while it
runs; temporary files of samples that another running shard owns are left alone), and the rest
are generated again. ``FileList.csv`` is rebuilt from the journals.

Videos are encoded by a :class:`~echofast.io.VideoWriter` (``writer_threads`` background threads,
at most two batches queued) while the next batch is generated; it journals in sample order, each
line after its file, exactly as writing inline does (``writer_threads=0``).
A folder made with different arguments is refused, never overwritten; one in which no video was
finished yet (a start that failed after creating it) is taken over by the corrected job. Arguments,
the EF source and the models are checked (the models loaded) before anything is written.

Batches and shards: every sample's randomness depends only on (seed, index), and the job's
samples are cut into chunks of ``batch_size`` consecutive indices ``[c·B, (c+1)·B)`` (the last may
be short), each generated as one batch (an interrupted chunk is recomputed whole). Shard ``i`` of
``N`` (``--shard i/N``) generates the chunks with ``c % N == i``, so shards (sharing one folder,
or in separate folders combined by :func:`merge_datasets`) and resumed runs write the same bytes
as one uninterrupted process with that batch size. ``generation.json`` records the batch size
(outside the dataset's identity: it changes float rounding, not what is sampled). Every shard and
every restart of a sharded job must use it (ownership depends on it; another value is refused); an
unsharded job may resume with another batch size, with a warning that the videos generated from
then on may differ by float rounding from an uninterrupted run. Folders of earlier versions
(no recorded batch size) keep their rule: shard ``i`` of ``N`` owns the samples with
``index % N == i``, batched in chunks of the run's ``batch_size``, so they resume and merge without
regenerating or duplicating anything; :func:`merge_datasets` refuses shards that record different
batch sizes (or rules).

Privacy (``privacy`` = a re-identification model folder, ``reference_latents`` = the real
training data encoded with the generator's VAE; see :mod:`echofast.privacy`):

1. the fail-closed rule (the model's test AUC must reach ``auc_threshold`` unless
   ``allow_weak_privacy``) and the τ calibration (cached in ``.echofast/privacy/``) run before
   anything is generated;
2. the LIDM draws ``M = ceil(oversample · num_videos)`` candidate images, candidate ``j`` from the
   ``"lidm"`` stream of index ``j`` (in chunks of ``batch_size``, each saved atomically);
3. the filter keeps the candidates whose max correlation with every real TRAIN reference frame is
   below τ, in index order: ``K = [k_0, k_1, ...]``;
4. attempt ``r`` animates candidate ``k_r`` with the EF and LVDM noise of index ``k_r`` (streams
   ``"ef"`` and ``"lvdm"``), in chunks of ``batch_size`` attempts; every ``privacy_frame_step``-th
   frame of the decoded uint8 video is re-encoded with the VAE and checked; a video with any
   frame at or above τ is dropped, and the next attempt fills its place. Video ``i`` of the
   dataset is the ``i``-th attempt that passed; its split follows ``i``.

Every outcome depends only on (seed, indices), and attempts are journaled
(``.echofast/privacy/attempts.jsonl``), so a resumed run gives the same dataset and report. Too
few kept candidates fail closed (:class:`~echofast.privacy.PrivacyError`). Sharding is not
supported with ``privacy`` (the replacement order is sequential).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import functools
import importlib.metadata
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.echonet import (
    REFERENCE_FRAMES,
    number_text,
    read_filelist,
    split_counts,
    split_of,
    write_empty_tracings,
    write_filelist,
)
from ..errors import BackendUnavailable, EchofastError
from ..fsutil import atomic_write, atomic_write_text, sha256_file
from ..io import VideoEncodeError, VideoWriter, stored_fps, write_video
from ..rng import sample_seed
from .echo_synthetic import DATASETS, EchoSyntheticPipeline

if TYPE_CHECKING:
    from ..privacy.report import FilterSetup

MANIFEST = "generation.json"
STATE_DIR = ".echofast"
BATCH_SIZE = "batch_size"
"""The manifest's key for the job's batch size (absent in folders of earlier versions)."""
SHARD_RULE = (
    "samples are cut into chunks c of batch_size consecutive indices [c*batch_size, "
    "(c+1)*batch_size), each generated as one batch; shard i of N generates the chunks with "
    "c % N == i"
)
SEED_RULE = (
    "sample i of a job with seed S draws from torch CPU generators seeded with "
    "echofast.rng.sample_seed(S, i, stream) = first 8 bytes (big-endian, 63 bits) of "
    "sha256('echofast:{stream}:{S}:{i}'); streams: 'lidm' (initial image latents, then one noise "
    "tensor per step with t > 0), 'lvdm' (same, for the video latents), 'ef' (requested EF)"
)


class GenerationConflict(EchofastError, RuntimeError):
    """The output folder holds a different job (or something that is not an echofast dataset)."""


class GenerationArgumentError(EchofastError, ValueError):
    """An argument of a generation job (or the EF source file) is invalid; the message names it."""


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
            source = "RANK/WORLD_SIZE"
        else:
            source = "--shard"
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise GenerationArgumentError(
                f"{source}: shard must look like 'i/N', got {text!r}"
            ) from None
        if not 0 <= i < n:
            raise GenerationArgumentError(
                f"{source}: shard index must satisfy 0 <= i < N, got {text!r}"
            )
        return cls(i, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        return f"{self.index}of{self.count}"

    def owns(self, sample: int, batch_size: int | None) -> bool:
        """Whether this shard generates ``sample``: its chunk ``sample // batch_size`` satisfies
        ``chunk % count == index``; ``batch_size`` None is the rule of folders written before the
        batch size was recorded (``sample % count == index``)."""
        unit = sample if batch_size is None else sample // batch_size
        return unit % self.count == self.index

    def chunks(self, num_videos: int, batch_size: int, rule: int | None) -> list[list[int]]:
        """This shard's samples of a job of ``num_videos``, in the batches of ``batch_size`` that
        it generates. ``rule`` is the folder's recorded batch size (None: the per-sample rule); a
        sharded job runs with ``batch_size == rule``, so its batches are exactly the chunks
        ``[c·B, (c+1)·B)`` of a single-process run."""
        owned = [i for i in range(num_videos) if self.owns(i, rule)]
        return [owned[s : s + batch_size] for s in range(0, len(owned), batch_size)]


UNRECORDED_DEFAULTS = {"decode_dtype": "float32", "privacy_shift_tolerance": 0}
"""Arguments that ``generation.json`` leaves out at these values (folders written before the
options existed resume unchanged); a conflict message shows the value, not "absent"."""


@dataclass
class GenerateConfig:
    """Arguments of a generation job. All but ``NON_IDENTITY`` define the dataset: resuming with a
    different value is refused. ``batch_size`` is recorded apart (see the module docstring)."""

    weights: str
    out: str
    num_videos: int
    dataset: str = "dynamic"
    frames: int | None = None
    """Frames per video; None: the reference dataset's (192 dynamic, 128 pediatric)."""
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
    privacy: str | None = None
    """Re-identification model folder: filter the dataset (see the module docstring)."""
    reference_latents: str | None = None
    """The real latent dataset (``echofast encode`` with this job's VAE): TRAIN + TEST splits."""
    oversample: float = 2.0
    auc_threshold: float = 0.9
    allow_weak_privacy: bool = False
    privacy_percentile: float = 95.0
    privacy_frame_step: int = 8
    """Reference frames per real clip and checked frames per generated video: every k-th
    (0: frame 0 only)."""
    privacy_normalization: str | None = None
    """Override of the model's input normalisation ("frame", "clip" or "channel")."""
    privacy_shift_tolerance: int = 0
    """Also match frames moved by up to this many latent pixels (0: exact, the reference)."""
    allow_pickle: bool = False
    check_vae: bool = True
    """Refuse UNets whose exports record training latents of another VAE than the root's."""
    writer_threads: int = 1
    """Threads that encode and write videos while the next batch is generated (0: write inline
    in the generating thread; the files are the same)."""
    decode_dtype: str = "float32"
    """VAE decode precision (float32, float16, bfloat16): part of the dataset's identity when not
    float32 (reduced precision changes pixels; see tests/models/test_vae_precision.py)."""
    cuda_graphs: bool | None = None
    """UNet calls replayed as CUDA graphs: None = when supported, True = required, False = never
    (same outputs; not part of the identity)."""

    NON_IDENTITY = (
        "out",
        "batch_size",
        "decode_chunk_size",
        "device",
        "shard",
        "progress",
        "weights",
        "allow_pickle",
        "check_vae",
        "writer_threads",
        "cuda_graphs",
    )
    PRIVACY_KEYS = (
        "privacy",
        "reference_latents",
        "oversample",
        "auc_threshold",
        "allow_weak_privacy",
        "privacy_percentile",
        "privacy_frame_step",
        "privacy_normalization",
        "privacy_shift_tolerance",
    )

    def __post_init__(self) -> None:
        if self.frames is None:  # an unknown dataset is refused with the other arguments
            self.frames = REFERENCE_FRAMES.get(self.dataset, REFERENCE_FRAMES["dynamic"])

    def video_kwargs(self) -> dict:
        """The sampling arguments of the job's video pipeline calls."""
        return dict(
            seed=self.seed,
            num_frames=self.frames,
            num_inference_steps=self.steps,
            batch_size=self.batch_size,
            decode_chunk_size=self.decode_chunk_size,
            dtype=self.dtype,
            decode_dtype=self.decode_dtype,
            cuda_graphs=self.cuda_graphs,
        )

    def identity(
        self,
        weights_sha: dict[str, str],
        ef_source_sha: str | None,
        privacy: dict | None = None,
    ) -> dict:
        """What defines the dataset. Privacy keys appear only with ``privacy`` (the model and
        reference by digest, not by path)."""
        skip = set(self.NON_IDENTITY) | set(self.PRIVACY_KEYS)
        ident = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if self.privacy is not None:
            ident.update({k: getattr(self, k) for k in self.PRIVACY_KEYS})
            ident["privacy"] = privacy
            ident.pop("reference_latents")
        ident["splits"] = list(split_counts(self.num_videos, self.splits, self.dataset))
        ident["ef_range"] = list(self.ef_range)
        ident["ef_from"] = ef_source_sha
        ident["weights_sha256"] = weights_sha
        ident["device_type"] = torch.device(self.device).type
        # datasets from before these options existed resume unchanged
        for key, default in UNRECORDED_DEFAULTS.items():
            if key in ident and ident[key] == default:
                ident.pop(key)
        return ident


def _weights_sha(root: str, dataset: str, allow_pickle: bool = False) -> dict[str, dict]:
    """SHA-256 of the files each model folder's weights load from (the weights file; of a
    sharded folder the index, and each shard under ``"shards"``), of its config file, and of the
    noise schedule it records (``scheduler_config.json``, written by ``echofast train export``),
    if any. Missing or refused files raise as loading them would."""
    from ..models.base import CONFIG_NAME as MODEL_CONFIG
    from ..models.base import ModelBase
    from ..schedulers import CONFIG_NAME
    from ..weights_io import read_folder_config

    digests: dict[str, dict] = {}
    for name, folder in EchoSyntheticPipeline.folders(root, dataset).items():
        read_folder_config(folder, MODEL_CONFIG)
        first, *shards = ModelBase.weights_files(folder, allow_pickle=allow_pickle)
        config = sha256_file(folder / MODEL_CONFIG)
        digests[name] = {"weights": sha256_file(first), "config": config}
        if shards:
            digests[name]["shards"] = {p.name: sha256_file(p) for p in shards}
        if (folder / CONFIG_NAME).is_file():
            digests[name]["scheduler"] = sha256_file(folder / CONFIG_NAME)
    return digests


def ef_bounds(ef_range: Sequence[float]) -> tuple[int, int]:
    """The integers ``(ceil(LO), floor(HI))`` that ``requested_ef`` draws between; a range that is
    not two finite numbers with 0 <= LO <= HI <= 100 holding an integer is refused."""
    if isinstance(ef_range, (str, bytes)) or not isinstance(ef_range, Sequence):
        raise GenerationArgumentError(f"--ef-range needs LO and HI, got {ef_range!r}")
    if len(ef_range) != 2:
        raise GenerationArgumentError(f"--ef-range needs LO and HI, got {list(ef_range)!r}")
    lo, hi = ef_range
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (lo, hi)):
        raise GenerationArgumentError(f"--ef-range must be two numbers, got {lo!r} {hi!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise GenerationArgumentError(f"--ef-range must be finite numbers, got {lo!r} {hi!r}")
    if lo > hi:
        raise GenerationArgumentError(f"--ef-range needs LO <= HI, got {lo:g} {hi:g}")
    if lo < 0 or hi > 100:
        raise GenerationArgumentError(
            f"--ef-range must lie within 0 100 (EF is a percentage), got {lo:g} {hi:g}"
        )
    first, last = math.ceil(lo), math.floor(hi)
    if first > last:
        raise GenerationArgumentError(
            f"--ef-range {lo:g} {hi:g} holds no integer (EFs are drawn as integers)"
        )
    return first, last


def requested_ef(cfg: GenerateConfig, index: int, pool: Sequence[float] | None) -> float:
    """The EF (percent) of sample ``index``: a uniform integer in ``ef_range`` (inclusive), or a
    value drawn with replacement from ``pool`` (the EF column of ``--ef-from``)."""
    g = torch.Generator().manual_seed(sample_seed(cfg.seed, index, "ef"))
    if pool is not None:
        return float(pool[int(torch.randint(len(pool), (1,), generator=g))])
    lo, hi = ef_bounds(cfg.ef_range)
    return float(torch.randint(lo, hi + 1, (1,), generator=g))


def _ef_pool(path: str | None) -> list[float] | None:
    """The EF values of ``path`` (a FileList.csv), each a number in 0..100; refused naming the
    file and the row."""
    if path is None:
        return None
    try:
        rows = read_filelist(path)
    except (UnicodeDecodeError, csv.Error) as err:
        raise GenerationArgumentError(f"{path}: not a readable UTF-8 CSV file ({err})") from None
    except ValueError as err:
        raise GenerationArgumentError(f"--ef-from {err}") from None
    except OSError as err:
        raise GenerationArgumentError(
            f"--ef-from {path}: cannot be read ({err.strerror or err})"
        ) from None
    pool = []
    for number, row in enumerate(rows, start=1):
        text = row["EF"]
        if text in ("", None):
            continue
        where = f"{path}: row {number} (FileName {row.get('FileName')!r})"
        try:
            value = float(text)
        except ValueError:
            raise GenerationArgumentError(f"{where}: EF {text!r} is not a number") from None
        if not math.isfinite(value):
            raise GenerationArgumentError(f"{where}: EF {text!r} is not finite")
        if not 0 <= value <= 100:
            raise GenerationArgumentError(f"{where}: EF {text!r} is outside 0..100 (a percentage)")
        pool.append(value)
    if not pool:
        raise GenerationArgumentError(f"{path}: no EF values")
    return pool


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that this torch can use; refused with the reason otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise GenerationArgumentError(
            f"--device {device!r} is not a torch device ({err})"
        ) from None
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise GenerationArgumentError(
                f"--device {device!r}: this torch ({torch.__version__}) was built without CUDA"
            )
        count = torch.cuda.device_count()
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise GenerationArgumentError(f"--device {device!r}: {count} CUDA device(s) available")
    elif dev.type == "meta":
        raise GenerationArgumentError(f"--device {device!r} holds no data: use cpu or cuda")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, ImportError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise GenerationArgumentError(
                f"--device {device!r}: this torch ({torch.__version__}) cannot use it ({first})"
            ) from None
    return dev


def _check_avi_rate(fps: float) -> None:
    """``--fps`` must be a frame rate that an AVI stores: checked by writing a one-frame video,
    as the job's writer does, into a temporary folder (not the job's)."""
    with tempfile.TemporaryDirectory(prefix="echofast-fps-") as tmp:
        path = Path(tmp) / "probe.avi"
        try:
            write_video(path, torch.zeros(1, 2, 2, dtype=torch.uint8), fps)
        except VideoEncodeError as err:
            raise GenerationArgumentError(
                f"--fps {fps:g}: {str(err).removeprefix(f'{path}: ')}"
            ) from None


TEMPORARY_SUFFIX = ".avi.XXXXXXXX.tmp"
"""What a video's temporary file adds to its name (after a leading dot; see ``atomic_write``)."""


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) that the file system of ``folder``, or of its nearest
    existing ancestor, allows (255 where it cannot be asked)."""
    for parent in (folder, *folder.parents):
        if parent.is_dir():
            try:
                return os.pathconf(parent, "PC_NAME_MAX")
            except (OSError, ValueError):
                break
    return 255


def _check_name_prefix(cfg: GenerateConfig) -> None:
    """``--name-prefix`` must make plain file names inside ``Videos/`` (no path separator or
    control character) that, with the temporary file's additions, the file system allows."""
    prefix = cfg.name_prefix
    if not isinstance(prefix, str):
        raise GenerationArgumentError(f"--name-prefix must be a string, got {prefix!r}")
    bad = sorted({c for c in prefix if c in (os.sep, os.altsep) or not c.isprintable()})
    if bad:
        raise GenerationArgumentError(
            f"--name-prefix {prefix!r} holds {bad}: file names of videos take no path "
            "separators or control characters"
        )
    last = cfg.num_videos - 1
    size = len(os.fsencode(f".{prefix}{last:06d}{TEMPORARY_SUFFIX}"))
    limit = _name_max(Path(cfg.out).absolute())
    if size > limit:
        raise GenerationArgumentError(
            f"--name-prefix is too long ({len(os.fsencode(prefix))} bytes): video {last}'s "
            f"temporary file name would take {size} bytes, over the {limit}-byte limit of the "
            f"file system of {cfg.out}"
        )


def _check_sampling(cfg: GenerateConfig, device: torch.device) -> None:
    """Refuse what sampling would refuse at its start: the precisions, forced CUDA graphs that
    cannot run, a step count that the LIDM's or the LVDM's sampler (the schedule its folder
    records, else the reference sampler: see :func:`~echofast.pipelines.common.model_scheduler`)
    does not have."""
    from .common import PRECISIONS, check_precision, model_scheduler
    from .graphs import ENV_VAR, _disabled_by_env

    if not isinstance(cfg.dtype, str) or cfg.dtype not in PRECISIONS:
        raise GenerationArgumentError(
            f"--dtype must be one of {list(PRECISIONS)}, got {cfg.dtype!r}"
        )
    try:
        check_precision(cfg.dtype, device)
    except ValueError as err:
        raise GenerationArgumentError(f"--dtype {cfg.dtype}: {err}") from None
    if not isinstance(cfg.decode_dtype, str) or cfg.decode_dtype not in PRECISIONS:
        raise GenerationArgumentError(
            f"--decode-dtype must be one of {list(PRECISIONS)}, got {cfg.decode_dtype!r}"
        )
    if cfg.cuda_graphs is not None and not isinstance(cfg.cuda_graphs, bool):
        raise GenerationArgumentError(
            "--cuda-graphs must be auto, on or off (cuda_graphs None, True or False), got "
            f"{cfg.cuda_graphs!r}"
        )
    if cfg.cuda_graphs is True:
        reasons = []
        if device.type != "cuda":
            reasons.append(f"--cuda-graphs on: --device {cfg.device!r} is not a CUDA device")
        if _disabled_by_env():
            reasons.append(f"--cuda-graphs on: disabled by {ENV_VAR}={os.environ[ENV_VAR]!r}")
        if reasons:
            raise BackendUnavailable("unet_call", "cuda_graph", reasons)
    root = Path(cfg.weights)
    for folder in (root / DATASETS[cfg.dataset], root / "lvdm"):
        scheduler = model_scheduler(folder)
        try:
            scheduler.set_timesteps(cfg.steps)
        except ValueError as err:
            raise GenerationArgumentError(f"--steps {cfg.steps}: {folder.name}: {err}") from None


def _check_privacy_arguments(cfg: GenerateConfig) -> None:
    """The privacy options of a filtered job (see :func:`_generate_private`)."""
    from ..privacy.data import ShiftToleranceError, check_reference_shift_tolerance
    from ..privacy.model import NORMALIZATIONS

    if cfg.privacy is None or cfg.reference_latents is None:
        raise GenerationArgumentError(
            "privacy filtering needs both --privacy and --reference-latents"
        )
    if cfg.shard.count != 1:
        raise GenerationArgumentError(
            "--privacy does not support sharding (dropped videos are replaced in order); run "
            "one process per dataset"
        )
    numbers = {
        "--oversample": (cfg.oversample, "a finite number >= 1", lambda v: 1 <= v < math.inf),
        "--auc-threshold": (cfg.auc_threshold, "a number in [0, 1]", lambda v: 0 <= v <= 1),
        "--privacy-percentile": (cfg.privacy_percentile, "in (0, 100)", lambda v: 0 < v < 100),
    }
    for option, (value, what, ok) in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise GenerationArgumentError(f"{option} must be {what}, got {value!r}")
    for option, value in (
        ("--privacy-frame-step", cfg.privacy_frame_step),
        ("--privacy-shift-tolerance", cfg.privacy_shift_tolerance),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GenerationArgumentError(f"{option} must be an int >= 0, got {value!r}")
    if cfg.privacy_normalization not in (None, *NORMALIZATIONS):
        raise GenerationArgumentError(
            f"--privacy-normalization must be one of {list(NORMALIZATIONS)}, got "
            f"{cfg.privacy_normalization!r}"
        )
    try:
        check_reference_shift_tolerance(
            cfg.privacy_shift_tolerance, cfg.reference_latents, option="--privacy-shift-tolerance"
        )
    except ShiftToleranceError as err:
        raise GenerationArgumentError(str(err)) from None


def _check_arguments(cfg: GenerateConfig) -> None:
    """Refuse invalid arguments (typed errors naming them) before anything is read or written,
    including every one that sampling would refuse at its start."""
    for key in ("num_videos", "frames", "steps", "batch_size", "decode_chunk_size"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GenerationArgumentError(f"{key} must be an int >= 1, got {value!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise GenerationArgumentError(f"--seed must be an int, got {cfg.seed!r}")
    fps = cfg.fps
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps):
        raise GenerationArgumentError(f"fps must be a finite number, got {fps!r}")
    if fps <= 0:
        raise GenerationArgumentError(f"fps must be > 0, got {fps!r}")
    _check_avi_rate(fps)
    ef_bounds(cfg.ef_range)
    if cfg.dataset not in DATASETS:
        raise GenerationArgumentError(
            f"--dataset must be one of {list(DATASETS)}, got {cfg.dataset!r}"
        )
    try:
        split_counts(cfg.num_videos, cfg.splits, cfg.dataset)
    except (TypeError, ValueError) as err:
        raise GenerationArgumentError(f"--splits: {err}") from None
    if not isinstance(cfg.shard, Shard):
        raise GenerationArgumentError(f"shard must be a Shard, got {cfg.shard!r}")
    if isinstance(cfg.writer_threads, bool) or not isinstance(cfg.writer_threads, int):
        raise GenerationArgumentError(
            f"--writer-threads: writer threads must be an int >= 0, got {cfg.writer_threads!r}"
        )
    if cfg.writer_threads < 0:
        raise GenerationArgumentError(
            f"--writer-threads: writer threads must be >= 0, got {cfg.writer_threads}"
        )
    _check_name_prefix(cfg)
    _check_sampling(cfg, check_device(cfg.device))
    if cfg.privacy is not None or cfg.reference_latents is not None:
        _check_privacy_arguments(cfg)


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


RUNNING = "running-{tag}.lock"
_RUNNING_TAG = re.compile(r"running-(\d+)of(\d+)\.lock")


@contextlib.contextmanager
def _running(folder: Path, shard: Shard) -> Iterator[None]:
    """Held (under the folder lock) while this shard's job runs in ``folder``: a second process
    for the same shard is refused, other processes leave this shard's temporary files alone."""
    path = folder / STATE_DIR / RUNNING.format(tag=shard.tag)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GenerationConflict(
                f"{folder}: shard {shard} is being generated by another process right now "
                f"({path} is locked)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _others_running(folder: Path, own: Shard | None) -> list[Shard | None]:
    """The shards that other processes are generating in ``folder`` now (None: a lock file of
    unknown form). Call under the folder lock (runners take their lock under it)."""
    found: list[Shard | None] = []
    for path in sorted((folder / STATE_DIR).glob(RUNNING.format(tag="*"))):
        match = _RUNNING_TAG.fullmatch(path.name)
        shard = Shard(int(match[1]), int(match[2])) if match else None
        if own is not None and shard == own:
            continue
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                found.append(shard)
            else:
                fcntl.flock(fh, fcntl.LOCK_UN)
    return found


def _remove_stale_temporaries(folder: Path, cfg: GenerateConfig, rule: int | None) -> None:
    """Remove the temporary video files that no running process may be writing: those of
    samples that no other running shard owns under the folder's ``rule`` (all of them when no
    other shard runs)."""
    others = _others_running(folder, cfg.shard)
    pattern = re.compile(rf"\.{re.escape(cfg.name_prefix)}(\d+)\.avi\..*\.tmp")
    for tmp in (folder / "Videos").glob(".*.tmp"):
        if others:
            match = pattern.fullmatch(tmp.name)
            if match is None or any(s is None or s.owns(int(match[1]), rule) for s in others):
                continue
        tmp.unlink(missing_ok=True)


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


def _lock_file(name: str) -> bool:
    return name == "lock" or _RUNNING_TAG.fullmatch(name) is not None


_ROOT_TEMPORARY = re.compile(
    rf"\.(?:{re.escape(MANIFEST)}|FileList\.csv|VolumeTracings\.csv|privacy_report\.(?:json|png))"
    r"\.[a-z0-9_]{8}\.tmp"
)
"""The temporary file (:func:`~echofast.fsutil.atomic_write`'s ``.<name>.<8 characters>.tmp``)
that a job killed while writing one of its files in the folder's root leaves. Those files are
written under the folder lock only, so one found under the lock is stale."""


def _remove_stale_writes(folder: Path) -> None:
    """Remove what killed writes of the root's files left (call under the folder lock)."""
    for item in folder.iterdir():
        if _ROOT_TEMPORARY.fullmatch(item.name) and item.is_file():
            item.unlink(missing_ok=True)


def _fresh(folder: Path) -> bool:
    """Empty, or holding only what another shard's start has just created (locks, empty Videos)
    or a start killed while writing the manifest left (its temporary file)."""
    for item in folder.iterdir():
        if _ROOT_TEMPORARY.fullmatch(item.name) and item.is_file():
            continue
        if (
            item.name == STATE_DIR
            and item.is_dir()
            and all(_lock_file(p.name) for p in item.iterdir())
        ):
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


def read_manifest(path: Path) -> dict:
    """A generation.json; GenerationConflict naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GenerationConflict(f"{path}: unreadable generation manifest ({err})") from None
    args = data.get("arguments") if isinstance(data, dict) else None
    if not isinstance(args, dict) or not isinstance(args.get("num_videos"), int):
        raise GenerationConflict(
            f"{path}: not an echofast generation manifest (needs an 'arguments' object with "
            "'num_videos')"
        )
    batch = data.get(BATCH_SIZE)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise GenerationConflict(f"{path}: '{BATCH_SIZE}' must be an int >= 1, got {batch!r}")
    return data


def recorded_batch_size(folder: str | os.PathLike) -> int | None:
    """The batch size that ``folder``'s generation.json records (None: no manifest, or one of an
    earlier version)."""
    path = Path(folder) / MANIFEST
    return read_manifest(path).get(BATCH_SIZE) if path.is_file() else None


def _rule_text(batch_size: int | None) -> str:
    if batch_size is None:
        return "no batch size (an earlier echofast's folder: shards own samples by index)"
    return f"batch size {batch_size}"


def _other_batch_size(
    path: Path, recorded: int | None, given: int | None, own: Shard | None
) -> None:
    """A started job resumed with another batch size than ``path`` records: refused for a merge
    (``own`` None) and for a shard of a sharded job, a warning for an unsharded job."""
    if own is None:
        raise GenerationConflict(
            f"{path} records {_rule_text(recorded)}; the shards merged into it record "
            f"{_rule_text(given)}: refusing to mix ownership rules (use another --out)"
        )
    if own.count > 1:
        raise GenerationConflict(
            f"{path} records batch size {recorded}, this run (shard {own}) asks {given}: every "
            f"shard and restart of a sharded job must use batch size {recorded}, which decides "
            f"the samples each shard owns (pass --batch-size {recorded}, or leave it out)"
        )
    warnings.warn(
        f"{path} records batch size {recorded}, this run uses {given}: videos generated from now "
        "on may differ by float rounding from an uninterrupted run's (pass --batch-size "
        f"{recorded}, or leave it out, for identical bytes)",
        stacklevel=2,
    )


def _manifest_matches(folder: Path, manifest: dict) -> bool:
    """Whether ``folder`` holds a manifest with these very arguments (read-only)."""
    path = folder / MANIFEST
    return path.is_file() and read_manifest(path)["arguments"] == manifest["arguments"]


def _unstarted(folder: Path, own: Shard | None) -> bool:
    """No video of the folder's job was finished and no other process works in it: a start that
    failed after creating the folder, which a corrected job may take over."""
    state = folder / STATE_DIR
    for item in state.iterdir() if state.is_dir() else ():
        if _lock_file(item.name):
            continue
        if item.name.startswith("journal-") and item.is_file() and item.stat().st_size == 0:
            continue
        return False
    videos = folder / "Videos"
    if videos.is_dir() and any(not p.name.endswith(".tmp") for p in videos.iterdir()):
        return False
    names = {p.name for p in folder.iterdir()}
    return names <= {MANIFEST, STATE_DIR, "Videos"} and not _others_running(folder, own)


def _shown(key: str, value: object) -> object:
    """An argument's value in a conflict message: an unrecorded default as that default."""
    return UNRECORDED_DEFAULTS.get(key) if value is None else value


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` of every value that differs, sorted; nested dicts
    (e.g. the weights' digests per model) are compared key by key (None: absent)."""
    out: list[tuple[str, object, object]] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def _prepare(folder: Path, manifest: dict, own: Shard | None = None) -> int | None:
    """Create the folder, or check that an existing one holds this very job (one whose job never
    finished a video is taken over). ``own``: this run's shard (None: a merge, which must match
    the folder's batch size exactly). Returns the batch size that the folder records (None: an
    earlier version's folder, whose shards own samples by index). Call under the folder lock."""
    existing = folder / MANIFEST
    given = manifest.get(BATCH_SIZE)
    if existing.exists():
        data = read_manifest(existing)
        old, recorded = data["arguments"], data.get(BATCH_SIZE)
        diff = _differences(old, manifest["arguments"])
        if not diff and (recorded == given or (recorded is None and own is not None)):
            return recorded
        if not _unstarted(folder, own):
            if not diff:
                _other_batch_size(existing, recorded, given, own)
                return recorded
            lines = "\n".join(
                f"  {k}: folder has {_shown(k, a)!r}, this run asks {_shown(k, b)!r}"
                for k, a, b in diff
            )
            raise GenerationConflict(
                f"{folder} holds a dataset generated with other arguments; refusing to mix or "
                f"overwrite it (use another --out):\n{lines}"
            )
    (folder / "Videos").mkdir(parents=True, exist_ok=True)
    atomic_write_text(existing, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return given


def _writer(cfg: GenerateConfig) -> VideoWriter:
    """The job's video writer: ``cfg.writer_threads`` workers, at most two batches queued."""
    return VideoWriter(cfg.writer_threads, max_pending=2 * max(1, cfg.batch_size))


def _row(cfg: GenerateConfig, name: str, ef: float, video: torch.Tensor, split: str) -> dict:
    """The FileList.csv row of a uint8 (T, H, W) video."""
    return {
        "FileName": name,
        "EF": number_text(ef),
        "ESV": None,
        "EDV": None,
        "FrameHeight": video.shape[1],
        "FrameWidth": video.shape[2],
        "FPS": f"{float(stored_fps(cfg.fps)):.10g}",  # the AVI's rate: 29.97 or 29.97002997
        "NumberOfFrames": video.shape[0],
        "Split": split,
    }


def _journal_video(journal: Path, index: int, row: dict, bar: tqdm | None, path: Path) -> None:
    """Journal a video whose file ``path`` is in place (the writer's step after the write)."""
    entry = {"index": index, "FileName": row["FileName"], "bytes": path.stat().st_size, "row": row}
    _append(journal, entry)
    if bar is not None:
        bar.update(1)


def _load(cfg: GenerateConfig) -> EchoSyntheticPipeline:
    return EchoSyntheticPipeline.from_pretrained(
        cfg.weights,
        dataset=cfg.dataset,
        device=cfg.device,
        allow_pickle=cfg.allow_pickle,
        check_vae=cfg.check_vae,
    )


@contextlib.contextmanager
def _prepared(
    folder: Path, cfg: GenerateConfig, manifest: dict, pipe: EchoSyntheticPipeline | None
) -> Iterator[tuple[EchoSyntheticPipeline | None, int | None]]:
    """Load the models unless ``folder`` already holds this job (a bad weights root fails before
    anything is written), prepare the folder, and hold this shard's running lock while the
    caller generates. Yields the pipeline (None: the caller loads it when it needs it) and the
    folder's recorded batch size (see :func:`_prepare`)."""
    if pipe is None and not _manifest_matches(folder, manifest):
        pipe = _load(cfg)
    with contextlib.ExitStack() as running:
        with _locked(folder):
            running.enter_context(_running(folder, cfg.shard))
            _remove_stale_writes(folder)
            rule = _prepare(folder, manifest, cfg.shard)
            _remove_stale_temporaries(folder, cfg, rule)
        _check_writable(folder / "Videos")
        yield pipe, rule


def _check_writable(videos: Path) -> None:
    """Refuse, before any sampling, a videos folder that cannot take new files."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=videos)
    except OSError as err:
        raise type(err)(f"{videos}: cannot write videos here ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def generate_dataset(cfg: GenerateConfig, pipe: EchoSyntheticPipeline | None = None) -> dict:
    """Run (or resume) a generation job; returns a summary dict. Arguments, the EF source and the
    models are checked before anything is written (a new job loads the models first)."""
    _check_arguments(cfg)
    if cfg.privacy is not None or cfg.reference_latents is not None:
        return _generate_private(cfg, pipe)
    folder = Path(cfg.out)
    counts = split_counts(cfg.num_videos, cfg.splits, cfg.dataset)
    pool = _ef_pool(cfg.ef_from)
    manifest = {
        "echofast_version": __version__,
        "arguments": cfg.identity(
            _weights_sha(cfg.weights, cfg.dataset, cfg.allow_pickle),
            sha256_file(cfg.ef_from) if cfg.ef_from else None,
        ),
        "weights_root": str(Path(cfg.weights).resolve()),
        "seed_rule": SEED_RULE,
        BATCH_SIZE: cfg.batch_size,
        "shard_rule": SHARD_RULE,
        "packages": _versions(),
        "file_names": f"{cfg.name_prefix}<index, 6 digits>",
        "esv_edv": "empty: synthetic videos have no measured volumes",
    }
    _refuse_foreign(folder)
    with _prepared(folder, cfg, manifest, pipe) as (pipe, rule):
        return _generate_videos(cfg, pipe, folder, counts, pool, rule)


def _generate_videos(
    cfg: GenerateConfig,
    pipe: EchoSyntheticPipeline | None,
    folder: Path,
    counts: tuple[int, int, int],
    pool: list[float] | None,
    rule: int | None,
) -> dict:
    """The generation loop of a prepared folder (this shard's running lock held) that records
    batch size ``rule`` (None: an earlier version's per-sample ownership)."""
    journal = folder / STATE_DIR / f"journal-{cfg.shard.tag}.jsonl"
    done = {e["index"] for j in _journals(folder) for e in read_journal(j) if _intact(folder, e)}
    chunks = cfg.shard.chunks(cfg.num_videos, cfg.batch_size, rule)
    todo = [c for c in chunks if not done.issuperset(c)]
    missing = sum(len(set(c) - done) for c in todo)
    if todo and pipe is None:
        pipe = _load(cfg)
    start = time.perf_counter()
    bar = tqdm(total=missing, unit="video", desc="generate", disable=not cfg.progress)
    with _writer(cfg) as writer:
        for chunk in todo:
            efs = [requested_ef(cfg, i, pool) for i in chunk]
            out = pipe(efs, sample_indices=chunk, progress=cfg.progress, **cfg.video_kwargs())
            for i, ef, video in zip(chunk, efs, out.videos):
                if i in done:
                    continue
                name = f"{cfg.name_prefix}{i:06d}"
                row = _row(cfg, name, ef, video, split_of(i, counts))
                writer.write(
                    folder / "Videos" / f"{name}.avi",
                    video,
                    cfg.fps,
                    then=functools.partial(_journal_video, journal, i, row, bar),
                )
    bar.close()
    with _locked(folder):
        written = rebuild_filelist(folder)
        _write_not_filtered(folder, cfg.seed)
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
    """Combine shard folders of one job into ``out`` (videos hard-linked or copied). Every check
    (manifests, recorded batch sizes, shards given twice, samples in two shards) is done before
    ``out`` is touched."""
    out = Path(out)
    if not shards:
        raise GenerationArgumentError("merge needs at least one shard folder")
    given: dict[Path, str] = {}
    for shard in shards:
        key = Path(shard).resolve()
        if key in given:
            raise GenerationConflict(f"{shard}: given twice (also as {given[key]})")
        given[key] = str(shard)
    manifests = []
    for shard in shards:
        path = Path(shard) / MANIFEST
        if not path.is_file():
            raise GenerationConflict(f"{shard}: not an echofast generation folder (no {MANIFEST})")
        manifests.append(read_manifest(path))
    first = manifests[0]["arguments"]
    for shard, m in zip(shards[1:], manifests[1:]):
        if m["arguments"] != first:
            keys = sorted(
                k for k in set(first) | set(m["arguments"]) if first.get(k) != m["arguments"].get(k)
            )
            raise GenerationConflict(
                f"{shard}: generated with other arguments than {shards[0]} (differs in {keys})"
            )
        if m.get(BATCH_SIZE) != manifests[0].get(BATCH_SIZE):
            raise GenerationConflict(
                f"{shard}: its {MANIFEST} records {_rule_text(m.get(BATCH_SIZE))}, that of "
                f"{shards[0]} {_rule_text(manifests[0].get(BATCH_SIZE))}: shards of one job share "
                "the batch size that decides which samples each shard owns"
            )
    seen: dict[int, str] = {}
    plan: list[tuple[Path, Path, list[dict]]] = []
    for shard in map(Path, shards):
        for journal in _journals(shard):
            entries = [e for e in read_journal(journal) if _intact(shard, e)]
            for e in entries:
                if e["index"] in seen and seen[e["index"]] != str(shard):
                    raise GenerationConflict(
                        f"sample {e['index']} is in both {seen[e['index']]} and {shard}"
                    )
                seen[e["index"]] = str(shard)
            plan.append((shard, journal, entries))
    _refuse_foreign(out)
    with _locked(out):
        _remove_stale_writes(out)
        _prepare(out, manifests[0])
        if not _others_running(out, None):  # what a killed merge's copies left
            for tmp in (out / "Videos").glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        for shard, journal, entries in plan:
            target = out / STATE_DIR / journal.name
            for e in entries:
                src = shard / "Videos" / f"{e['FileName']}.avi"
                dst = out / "Videos" / src.name
                if not _intact(out, e):
                    _bring_video(src, dst)
            existing = {e["index"] for e in read_journal(target)}
            for e in entries:
                if e["index"] not in existing:
                    _append(target, e)
        written = rebuild_filelist(out)
        _write_not_filtered(out, first.get("seed"))
    expected = first["num_videos"]
    return {
        "folder": str(out),
        "in_dataset": written,
        "expected": expected,
        "complete": written == expected,
    }


def _bring_video(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst``, or copy it where linking fails, replacing what ``dst`` holds
    (a cut copy); a copy is written beside ``dst`` and renamed, so a kill leaves no cut video."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        atomic_write(dst, lambda tmp: shutil.copy2(src, tmp))


# ---- privacy -------------------------------------------------------------------------------

PRIVACY_DIR = "privacy"
PRIVACY_RULE = (
    "candidate j = LIDM sample of index j (j < ceil(oversample * num_videos)); kept iff its max "
    "re-identification correlation with every real TRAIN reference frame < tau; attempt r "
    "animates the r-th kept candidate k_r with the 'ef' and 'lvdm' streams of index k_r; every "
    "privacy_frame_step-th decoded frame is re-encoded and checked, any frame >= tau drops the "
    "video; video i is the i-th attempt that passed"
)
NOT_FILTERED_REASON = (
    "generated without --privacy: no re-identification filter was applied; do not share this "
    "dataset as privacy-preserving"
)


def _write_not_filtered(folder: Path, seed: int | None) -> None:
    from ..privacy.report import not_filtered_report, write_report

    write_report(folder, not_filtered_report(NOT_FILTERED_REASON, {"seed": seed}))


def _check_reference_vae(reference: str, vae_dir: Path) -> str:
    """The reference latents must come from this job's VAE (else correlations mean nothing)."""
    from ..data.encode import MANIFEST as ENCODE_MANIFEST
    from ..data.encode import _vae_digest
    from ..privacy.filter import PrivacyError

    path = Path(reference) / ENCODE_MANIFEST
    if not path.is_file():
        raise PrivacyError(
            f"{path} is missing: cannot verify that {reference} was encoded with {vae_dir} "
            "(encode the real data with `echofast encode --vae` of these weights)"
        )
    theirs = json.loads(path.read_text()).get("vae_sha256")
    ours = _vae_digest(vae_dir)
    if theirs != ours:
        raise PrivacyError(
            f"{reference} was encoded with another VAE ({theirs}) than {vae_dir} ({ours}); "
            "latents of different VAEs cannot be compared"
        )
    return ours


def _load_chunk(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor("latents")
    except Exception:  # noqa: BLE001 - a torn file is regenerated
        return None


def _candidates(cfg: GenerateConfig, pipe, state: Path, count: int, progress: bool) -> torch.Tensor:
    """LIDM candidates 0..count-1 in chunks of ``batch_size`` (each chunk saved atomically)."""
    from safetensors.torch import save_file

    out = []
    bar = tqdm(total=count, unit="image", desc="LIDM candidates", disable=not progress)
    for s in range(0, count, cfg.batch_size):
        idx = list(range(s, min(s + cfg.batch_size, count)))
        path = state / f"candidates-{s:07d}-{len(idx)}.safetensors"
        lat = _load_chunk(path)
        if lat is None:
            lat = (
                pipe.lidm_pipe(
                    len(idx),
                    seed=cfg.seed,
                    sample_indices=idx,
                    num_inference_steps=cfg.steps,
                    batch_size=cfg.batch_size,
                    dtype=cfg.dtype,
                    cuda_graphs=cfg.cuda_graphs,
                    progress=progress,
                )
                .latents.cpu()
                .contiguous()
            )
            atomic_write(path, lambda tmp, t=lat: save_file({"latents": t}, tmp))
        out.append(lat)
        bar.update(len(idx))
    bar.close()
    return torch.cat(out)


def _check_videos(flt, vae, videos: torch.Tensor, step: int) -> list[tuple[float, str, int, int]]:
    """Per uint8 video (T, H, W): re-encode every ``step``-th frame (frame 0 only for 0) with the
    VAE, normalise that clip as the model's reference clips, score: (max correlation, nearest
    real clip, its frame, the video frame)."""
    from ..data.encode import encode_frames
    from ..privacy.data import frames_from_clips, select_frames

    out = []
    for video in videos:
        idx = select_frames(video.shape[0], step)
        lat = encode_frames(vae, video[idx], batch_size=len(idx), device=vae.device)
        fs = frames_from_clips(
            [lat], ["video"], frame_step=1, normalization=flt.model.normalization
        )
        s = flt.score_frame_set(fs)
        out.append(
            (
                float(s.max_corr[0]),
                s.nearest_clip[0],
                int(s.nearest_frame[0]),
                idx[int(s.candidate_frame[0])],
            )
        )
    return out


def _journal_private(journal: Path, index: int, row: dict, attempt, path: Path) -> None:
    """Journal a passed video whose file is in place, then its attempt (``attempt()``, or None
    when the attempt is journaled already)."""
    _journal_video(journal, index, row, None, path)
    if attempt is not None:
        attempt()


def _generate_private(cfg: GenerateConfig, pipe: EchoSyntheticPipeline | None) -> dict:
    from ..privacy.filter import model_digest, reference_digest
    from ..privacy.report import setup_filter

    folder = Path(cfg.out)
    counts = split_counts(cfg.num_videos, cfg.splits, cfg.dataset)
    pool = _ef_pool(cfg.ef_from)
    vae_dir = EchoSyntheticPipeline.folders(cfg.weights, cfg.dataset)["vae"]
    vae_digest = _check_reference_vae(cfg.reference_latents, vae_dir)
    privacy_ident = {
        "model": model_digest(cfg.privacy, cfg.allow_pickle),
        "reference_latents_digest": reference_digest(cfg.reference_latents),
        "reference_vae": vae_digest,
    }
    manifest = {
        "echofast_version": __version__,
        "arguments": cfg.identity(
            _weights_sha(cfg.weights, cfg.dataset, cfg.allow_pickle),
            sha256_file(cfg.ef_from) if cfg.ef_from else None,
            privacy_ident,
        ),
        "weights_root": str(Path(cfg.weights).resolve()),
        "seed_rule": SEED_RULE,
        BATCH_SIZE: cfg.batch_size,
        "privacy_rule": PRIVACY_RULE,
        "packages": _versions(),
        "file_names": f"{cfg.name_prefix}<index, 6 digits>",
        "esv_edv": "empty: synthetic videos have no measured volumes",
    }
    _refuse_foreign(folder)
    state = folder / STATE_DIR / PRIVACY_DIR
    cache = state / "reference.safetensors"
    start = time.perf_counter()
    # the fail-closed check and the calibration come first: a refused job leaves no folder
    setup = setup_filter(
        cfg.privacy,
        cfg.reference_latents,
        percentile=cfg.privacy_percentile,
        frame_step=cfg.privacy_frame_step,
        auc_threshold=cfg.auc_threshold,
        allow_weak_privacy=cfg.allow_weak_privacy,
        normalization=cfg.privacy_normalization,
        allow_pickle=cfg.allow_pickle,
        device=cfg.device,
        progress=cfg.progress,
        cache=cache if cache.is_file() else None,
        shift_tolerance=cfg.privacy_shift_tolerance,
    )
    with _prepared(folder, cfg, manifest, pipe) as (pipe, _):
        return _generate_private_videos(cfg, pipe, folder, manifest, setup, start, pool, counts)


def _generate_private_videos(
    cfg: GenerateConfig,
    pipe: EchoSyntheticPipeline | None,
    folder: Path,
    manifest: dict,
    setup: FilterSetup,
    start: float,
    pool: list[float] | None,
    counts: tuple[int, int, int],
) -> dict:
    """The privacy-filtered generation of a prepared folder (the running lock held)."""
    from ..privacy.data import select_frames
    from ..privacy.filter import PrivacyError
    from ..privacy.report import build_report, not_filtered_report, write_report

    state = folder / STATE_DIR / PRIVACY_DIR
    cache = state / "reference.safetensors"
    state.mkdir(parents=True, exist_ok=True)
    for tmp in state.glob(".*.tmp"):  # a killed run's atomic writes (the job is never sharded)
        tmp.unlink(missing_ok=True)
    if not cache.is_file():
        setup.filter.save(cache)
    flt = setup.filter
    journal = folder / STATE_DIR / f"journal-{cfg.shard.tag}.jsonl"
    attempts_path = state / "attempts.jsonl"
    with _locked(folder):
        attempts = {e["attempt"]: e for e in read_journal(attempts_path)}
    done = {e["index"] for j in _journals(folder) for e in read_journal(j) if _intact(folder, e)}

    n_cand = math.ceil(cfg.oversample * cfg.num_videos - 1e-9)
    passed_known = sum(1 for e in attempts.values() if e["passed"])
    need_work = passed_known < cfg.num_videos or len(done) < cfg.num_videos
    if need_work and pipe is None:
        pipe = _load(cfg)
    if pipe is None:
        cands = torch.cat([_load_chunk(p) for p in sorted(state.glob("candidates-*.safetensors"))])
    else:
        cands = _candidates(cfg, pipe, state, n_cand, cfg.progress)
    if cands.shape[0] != n_cand:
        raise PrivacyError(f"{state}: holds {cands.shape[0]} candidates, expected {n_cand}")
    cand_scores = flt.score_clips(
        list(cands), [f"candidate_{j:06d}" for j in range(n_cand)], frame_step=0
    )
    kept = [j for j in range(n_cand) if cand_scores.kept[j]]

    step = cfg.privacy_frame_step
    slot = 0
    bar = tqdm(
        total=cfg.num_videos, unit="video", desc="generate (private)", disable=not cfg.progress
    )
    failure = None
    with _writer(cfg) as writer:
        for c0 in range(0, len(kept), cfg.batch_size):
            if slot >= cfg.num_videos:
                break
            chunk = list(range(c0, min(c0 + cfg.batch_size, len(kept))))
            slots = [attempts[r]["slot"] for r in chunk if r in attempts and attempts[r]["passed"]]
            if all(r in attempts for r in chunk) and all(
                i in done for i in slots if i < cfg.num_videos
            ):
                slot += sum(1 for r in chunk if attempts[r]["passed"])
                bar.update(min(slot, cfg.num_videos) - bar.n)
                continue
            idx = [kept[r] for r in chunk]
            efs = [requested_ef(cfg, j, pool) for j in idx]
            videos = pipe.lvdm_pipe(
                cands[idx], efs, sample_indices=idx, progress=cfg.progress, **cfg.video_kwargs()
            ).videos
            checks = _check_videos(flt, pipe.vae, videos, step)
            for r, j, ef, video, (v, near, near_f, vid_f) in zip(chunk, idx, efs, videos, checks):
                ok = v < flt.tau
                entry = {
                    "attempt": r,
                    "candidate": j,
                    "max_correlation": v,
                    "nearest_real_clip": near,
                    "nearest_real_frame": near_f,
                    "video_frame": vid_f,
                    "passed": ok,
                    "slot": slot if ok else None,
                    "EF": number_text(ef),
                }
                new_attempt = None
                if r not in attempts:
                    new_attempt = functools.partial(_append, attempts_path, entry)
                    attempts[r] = entry
                if ok and slot < cfg.num_videos and slot not in done:
                    name = f"{cfg.name_prefix}{slot:06d}"
                    row = _row(cfg, name, ef, video, split_of(slot, counts))
                    writer.write(
                        folder / "Videos" / f"{name}.avi",
                        video,
                        cfg.fps,
                        then=functools.partial(_journal_private, journal, slot, row, new_attempt),
                    )
                elif new_attempt is not None:
                    writer.call(new_attempt)
                if ok:
                    slot += 1
            bar.update(min(slot, cfg.num_videos) - bar.n)
    bar.close()
    if slot < cfg.num_videos:
        failure = (
            f"the candidate pool is exhausted: {len(kept)} of {n_cand} LIDM candidates passed the "
            f"image filter and {slot} of {cfg.num_videos} videos passed the video check; use a "
            "larger --oversample (in a new --out)"
        )

    # the report covers the attempts up to the num_videos-th pass (later ones are surplus)
    used, passes = [], 0
    for r in sorted(attempts):
        if passes >= cfg.num_videos:
            break
        used.append(attempts[r])
        passes += attempts[r]["passed"]
    dropped = [e for e in used if not e["passed"]]
    video_frames = len(select_frames(cfg.frames, step))
    report_counts = {
        "real_train_clips": setup.reference_info["train_clips"],
        "real_test_clips": setup.reference_info["test_clips"],
        "candidates": n_cand,
        "kept": len(kept),
        "dropped_image_level": n_cand - len(kept),
        "video_attempts": len(used),
        "dropped_video_level": len(dropped),
        "videos": passes,
        "videos_requested": cfg.num_videos,
        "frames_checked_per_video": video_frames,
    }
    extra = {
        "video_check": {
            "frame_step": step,
            "rule": "every frame_step-th frame of each decoded uint8 video re-encoded with the "
            "job's VAE (posterior mean x scaling_factor), normalised as a clip, compared with "
            "every real TRAIN reference frame; any frame >= tau drops the video",
            "dropped": [
                {
                    k: e[k]
                    for k in (
                        "candidate",
                        "max_correlation",
                        "nearest_real_clip",
                        "nearest_real_frame",
                        "video_frame",
                    )
                }
                for e in dropped
            ],
        },
        "oversample": cfg.oversample,
        "complete": failure is None,
        "generator_weights_sha256": manifest["arguments"]["weights_sha256"],
    }
    seeds = {
        "seed": cfg.seed,
        "seed_rule": SEED_RULE,
        "candidates": "candidate j: LIDM stream index j",
        "videos": "attempt r animates kept candidate k_r with the 'ef' and 'lvdm' streams of "
        "index k_r",
    }
    with _locked(folder):
        written = rebuild_filelist(folder)
        if failure is None:
            report = build_report(
                setup,
                candidate_scores=cand_scores,
                counts=report_counts,
                seeds=seeds,
                video_scores=np.array([e["max_correlation"] for e in used]),
                extra=extra,
            )
        else:
            report = not_filtered_report(f"INCOMPLETE: {failure}", seeds)
            report["counts"] = report_counts
        write_report(folder, report)
    if failure is not None:
        raise PrivacyError(f"{folder}: {failure}")
    return {
        "folder": str(folder),
        "generated": max(0, written - len(done)),
        "already_done": len(done),
        "in_dataset": written,
        "expected": cfg.num_videos,
        "seconds": time.perf_counter() - start,
        "complete": written == cfg.num_videos,
        "privacy": {
            "status": report["status"],
            "tau": flt.tau,
            "test_auc": setup.model_info["test_auc"]["auc"],
            **report_counts,
        },
    }
