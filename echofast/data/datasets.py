"""Readers of EchoNet-Dynamic-layout datasets (real or phantom) and of encoded latent datasets.

Layouts::

    video dataset                          latent dataset (``echofast encode``)
    <root>/FileList.csv                    <root>/FileList.csv   (the video rows; FPS and
    <root>/Videos/<FileName>.avi                                  NumberOfFrames of the latents)
                                           <root>/Latents/<FileName>.safetensors
                                               key "latents": float32 (T, 4, h, w), already
                                               × the VAE's scaling_factor; metadata "fps"

``FileName`` may carry the ``.avi`` extension or not (both occur in EchoNet releases); ``Split``
is upper-cased as echonet does, and the integer folds of the pediatric release map to
TRAIN (0–7), VAL (8), TEST (9), as the reference's encoding script does.

**Frame-rate resampling** (videos and latents alike), read from the reference's latent loader
(``echosyn/common/datasets.py``)::

    m = floor(target_fps / fps · n)                   # resampled length (here at least 1)
    idx[i] = round(i · n / m)   for i in range(m)     # np.linspace(0, n, m, endpoint=False).round()

``n / m`` is ``fps / target_fps`` up to the floor, so this is "nearest original frame at time
``i / target_fps``" (``round`` is numpy's half-to-even, as in the reference). With
``random_window`` (training) a phase offset drawn uniformly from ``[0, idx[1])`` is added (as the
reference does) and indices past the end are dropped. Note the reference's *video* loader uses
``linspace(0, n − 1, m)`` (spacing ``(n − 1)/m``); we use the latent loader's ``n/m`` for both so
that a video and its latents give the same frames.

**Windows**: ``frames`` consecutive resampled frames; the start is uniform over
``[0, m − frames]`` when training (the reference's ``np.arange(0, m − frames)`` never picks the
last start: fixed here) and 0 otherwise. Shorter clips are zero-padded at the end and ``valid``
says how many frames are real (the reference's ``padding``). The reference also drops clips
that last no longer than a window (its ``Duration > duration_seconds``: one lasting exactly a
window is dropped too); ``drop_short=True`` does that here.

**Randomness**: with ``seed=None`` every item draws from fresh OS entropy (different in every
DataLoader worker and epoch). With a seed, item ``i`` in epoch ``e`` draws from
``numpy.random.default_rng([seed, e, i])``: reproducible, independent of workers and order; call
``set_epoch(e)`` before each epoch (as with a DistributedSampler; persistent workers keep the
epoch they were started with).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EchofastError, first_of

LATENTS_DIR = "Latents"
LATENT_SUFFIX = ".safetensors"
LATENT_KEY = "latents"
_FOLDS = {**{str(i): "TRAIN" for i in range(8)}, "8": "VAL", "9": "TEST"}


class DatasetError(EchofastError, ValueError):
    """A dataset folder or FileList.csv is missing, malformed or selects no videos."""


# ------------------------------------------------------------------------------------------
# FileList.csv
# ------------------------------------------------------------------------------------------


def strip_avi(name: str) -> str:
    """``FileName`` without a trailing ``.avi`` (any case)."""
    return name[:-4] if name.lower().endswith(".avi") else name


def normalize_split(value: str) -> str:
    """``train`` → ``TRAIN``; integer folds 0–7/8/9 → TRAIN/VAL/TEST."""
    text = str(value).strip()
    return _FOLDS.get(text, text.upper())


def _split_set(split: str | Iterable[str] | None) -> set[str] | None:
    if split is None:
        return None
    names = [split] if isinstance(split, str) else list(split)
    wanted = {normalize_split(s) for s in names}
    return None if "ALL" in wanted else wanted


@dataclass(frozen=True)
class VideoRecord:
    """One FileList.csv row."""

    name: str
    """FileName without extension."""
    path: Path
    """The video (or latent) file."""
    split: str
    ef: float | None
    fps: float | None
    num_frames: int | None
    row: dict
    """The CSV row as read (strings)."""
    row_number: int
    """The row's place among FileList.csv's rows, from 1, the header not counted (as errors
    name it)."""


def _number(row: dict, key: str, kind: type) -> float | int | None:
    """``row[key]`` as a finite number of ``kind``; None when empty, not a number or not
    finite."""
    try:
        number = float((row.get(key) or "").strip())
    except ValueError:
        return None
    return kind(number) if math.isfinite(number) else None


def _field_count(row: dict) -> int:
    """The fields of a ``csv.DictReader`` row as the file has them: those of a short row are
    None, those beyond the header are listed under the key None."""
    return sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))


def listed_splits(root: str | os.PathLike) -> str:
    """The splits ``root/FileList.csv`` lists, for messages about a split it has no rows of:
    ``"TEST, TRAIN"`` (a blank Split cell is ``(blank)``), or ``"none"``."""
    names = {r.split or "(blank)" for r in read_records(root, None, require_files=False)}
    return ", ".join(sorted(names)) or "none"


def read_records(
    root: str | os.PathLike,
    split: str | Iterable[str] | None = None,
    *,
    folder: str = "Videos",
    suffix: str = ".avi",
    require_files: bool = True,
    filelist: str | os.PathLike | None = None,
) -> list[VideoRecord]:
    """Rows of ``root/FileList.csv`` in file order, restricted to ``split`` (a name, a list of
    names, or None/"ALL" for every row), with the file path ``root/folder/<name><suffix>``.

    With ``require_files`` rows whose file does not exist are skipped (as the reference does).
    The file is UTF-8, with or without a byte order mark (as spreadsheet programs save it).
    Raises :class:`DatasetError` naming the file for a missing or malformed FileList.csv, and
    for two rows naming the same video (``a`` and ``a.avi`` too), whatever their splits: the
    video would be counted twice, or be in two splits.
    """
    root = Path(root)
    path = Path(filelist) if filelist is not None else root / "FileList.csv"
    if not path.is_file():
        raise DatasetError(f"{path}: no FileList.csv (is {root} an EchoNet-layout dataset?)")
    columns: list[str] | None = None
    rows: list[dict] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            missing = {"FileName"} - set(columns)
            if missing:
                raise DatasetError(f"{path}: FileList lacks column(s) {sorted(missing)}")
            for row in reader:
                rows.append(row)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err})") from None
    except csv.Error as err:
        where = "the header" if columns is None else f"row {len(rows) + 1}"
        raise DatasetError(
            f"{path}: not a readable CSV file ({where}: {err}; an unmatched quote?)"
        ) from None
    wanted = _split_set(split)
    records = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        fields = _field_count(row)
        if fields != len(columns):
            raise DatasetError(
                f"{path}: row {number} (FileName {row.get('FileName')!r}) has {fields} fields, "
                f"the header {len(columns)} (a truncated or hand-edited file?)"
            )
        name = strip_avi((row.get("FileName") or "").strip())
        if not name:
            continue
        if name in seen:
            first = rows[seen[name] - 1].get("FileName")
            raise DatasetError(
                f"{path}: FileName {row.get('FileName')!r} (row {number}) names the same video "
                f"as {first!r} (row {seen[name]}); list each video once"
            )
        seen[name] = number
        split_name = normalize_split(row.get("Split") or "")
        if wanted is not None and split_name not in wanted:
            continue
        file = root / folder / f"{name}{suffix}"
        if require_files and not file.is_file():
            continue
        records.append(
            VideoRecord(
                name=name,
                path=file,
                split=split_name,
                ef=_number(row, "EF", float),
                fps=_number(row, "FPS", float),
                num_frames=_number(row, "NumberOfFrames", int),
                row=dict(row),
                row_number=number,
            )
        )
    return records


def _ef_problem(record: VideoRecord) -> str:
    """Where and why a record whose ``ef`` is None has none: its EF is empty, not a number or
    not finite."""
    where = f"row {record.row_number} (FileName {record.row.get('FileName')!r})"
    value = (record.row.get("EF") or "").strip()
    if not value:
        return f"{where}: EF is empty"
    try:
        float(value)
    except ValueError:
        return f"{where}: EF {value!r} is not a number"
    return f"{where}: EF {value!r} is not finite"


def _check_ef(records: Sequence[VideoRecord], filelist: Path, split, needed_by: str) -> None:
    """Raise :class:`DatasetError` unless every one of the (non-empty) ``records`` has an EF,
    naming ``filelist``, the ``EF`` column and each row without a usable one (row number,
    FileName, what is wrong); ``needed_by`` says what needs EF."""
    if "EF" not in records[0].row:
        columns = ", ".join(repr(c) for c in records[0].row)
        raise DatasetError(
            f"{filelist}: no column 'EF' (columns: {columns}), which {needed_by}; add it, or "
            "pass require_ef=False"
        )
    bad = [r for r in records if r.ef is None]
    if not bad:
        return
    shown = first_of([_ef_problem(r) for r in bad], "; ")
    raise DatasetError(
        f"{filelist}: {len(bad)} of {len(records)} row(s) of split {split!r} have no usable EF "
        f"in column 'EF', which {needed_by}: {shown}; fill in their EF or drop them, or pass "
        "require_ef=False"
    )


# ------------------------------------------------------------------------------------------
# Resampling and windows
# ------------------------------------------------------------------------------------------


def resample_indices(num_frames: int, fps: float, target_fps: float, offset: int = 0) -> np.ndarray:
    """Frame indices of a clip of ``num_frames`` at ``fps`` resampled to ``target_fps``:
    ``round(i · n / m)`` for ``i < m = max(1, floor(n · target_fps / fps))``, plus ``offset``,
    those ``>= n`` dropped (see the module docstring)."""
    n = int(num_frames)
    if n < 1:
        return np.zeros(0, dtype=np.int64)
    if not fps or fps <= 0 or not target_fps or target_fps <= 0:
        raise ValueError(f"fps and target_fps must be positive, got {fps}, {target_fps}")
    m = max(1, math.floor(target_fps / fps * n))
    idx = np.linspace(0, n, m, endpoint=False).round().astype(np.int64) + int(offset)
    return idx[idx < n]


def phase_offsets(num_frames: int, fps: float, target_fps: float) -> int:
    """Number of phase offsets the reference draws from: ``idx[1]`` if it exceeds 1, else 1."""
    idx = resample_indices(num_frames, fps, target_fps)
    return int(idx[1]) if len(idx) > 1 and idx[1] > 1 else 1


def window_indices(
    num_frames: int,
    fps: float,
    target_fps: float,
    frames: int,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, int]:
    """Indices of one window of ``frames`` resampled frames and its valid length.

    ``rng`` None: phase 0 and start 0 (evaluation). Else a phase offset uniform in
    ``[0, phase_offsets)`` and a start uniform in ``[0, m − frames]`` (training). The returned
    array has ``valid = min(frames, m)`` entries; the caller pads the rest."""
    offset = 0 if rng is None else int(rng.integers(phase_offsets(num_frames, fps, target_fps)))
    idx = resample_indices(num_frames, fps, target_fps, offset)
    if len(idx) == 0:
        idx = np.zeros(1, dtype=np.int64)
    start = 0
    if rng is not None and len(idx) > frames:
        start = int(rng.integers(len(idx) - frames + 1))
    idx = idx[start : start + frames]
    return idx, len(idx)


def pad_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Zero-pad (or cut) dim 0 to ``frames``."""
    if x.shape[0] >= frames:
        return x[:frames]
    pad = torch.zeros((frames - x.shape[0], *x.shape[1:]), dtype=x.dtype)
    return torch.cat([x, pad], 0)


def to_model_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 grey frames (..., H, W) → float32 (..., 3, H, W) in [-1, 1): ``x/128 − 1`` repeated
    on 3 channels (the reference's input convention)."""
    x = frames.to(torch.float32) / 128.0 - 1.0
    return x.unsqueeze(-3).expand(*x.shape[:-2], 3, *x.shape[-2:]).contiguous()


class _Seeded:
    """Per-item generators: fresh entropy without a seed, else ``[seed, epoch, index]``."""

    seed: int | None
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int, stream: int = 0) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([int(self.seed), self.epoch, int(index), stream])


def _ef_tensor(record: VideoRecord) -> torch.Tensor:
    """EF / 100 as a float32 0-d tensor; nan without an EF."""
    return torch.tensor(math.nan if record.ef is None else record.ef / 100.0, dtype=torch.float32)


def _require(records: list, root: Path, split, what: str) -> None:
    if not records:
        raise DatasetError(f"{root}: no {what} in split {split!r}")


# ------------------------------------------------------------------------------------------
# Pixel datasets
# ------------------------------------------------------------------------------------------


def _long_enough(records: list, frames: int, target_fps: float | None, drop_short: bool) -> list:
    """With ``drop_short``, only clips longer than one window at ``target_fps`` (the reference),
    or at the clip's own rate when ``target_fps`` is None: more than ``frames`` frames."""
    if not drop_short:
        return records
    if not target_fps:
        return [r for r in records if r.num_frames and r.num_frames > frames]
    return [
        r for r in records if r.fps and r.num_frames and r.num_frames / r.fps > frames / target_fps
    ]


class EchoVideoDataset(_Seeded, torch.utils.data.Dataset):
    """Clips of an EchoNet-layout video dataset, resampled to ``target_fps``, in windows.

    Item: ``dict(video=uint8 (frames, H, W) zero-padded, valid=int, ef=float32 tensor EF/100,
    fps=float target fps, name=str)``. Frames are grey levels as decoded (convert with
    :func:`to_model_pixels`). ``target_fps=None`` keeps the clip's own rate.

    ``require_ef`` (the default): every selected row must have a finite number in the EF
    column, else :class:`DatasetError` names the FileList, the column and each row without one.
    With ``require_ef=False`` (EF not needed) such rows give ``ef = nan``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] | None = "TRAIN",
        frames: int = 64,
        target_fps: float | None = 32,
        random_window: bool = True,
        seed: int | None = None,
        drop_short: bool = False,
        require_ef: bool = True,
    ):
        self.root = Path(root)
        self.frames, self.target_fps = int(frames), target_fps
        self.random_window, self.seed = random_window, seed
        records = _long_enough(read_records(self.root, split), self.frames, target_fps, drop_short)
        _require(records, self.root, split, "videos")
        if require_ef:
            _check_ef(records, self.root / "FileList.csv", split, "every item carries as 'ef'")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from ..io import read_video

        rec = self.records[index]
        video, fps = read_video(rec.path)
        fps = fps or rec.fps or 0.0
        target = self.target_fps or fps
        rng = self._rng(index) if self.random_window else None
        idx, valid = window_indices(len(video), fps, target, self.frames, rng)
        clip = pad_frames(video[torch.from_numpy(idx)], self.frames)
        return {
            "video": clip,
            "valid": valid,
            "ef": _ef_tensor(rec),
            "fps": float(target),
            "name": rec.name,
        }


class FrameDataset(_Seeded, torch.utils.data.Dataset):
    """Single frames for VAE training: float32 (3, size, size) in [-1, 1), ``x/128 − 1`` of the
    grey frame repeated on 3 channels (the reference's convention).

    ``frames_per_video=None``: every frame of every video is an item (the reference trains its
    VAE on all extracted frames; counts from NumberOfFrames, else from decoding the video once).
    An integer ``k``: ``k`` items per video, each a uniformly random frame (cheaper epochs).
    Frames of another size are resized (bilinear, antialiased).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] | None = "TRAIN",
        size: int | None = 112,
        frames_per_video: int | None = None,
        seed: int | None = None,
    ):
        self.root = Path(root)
        self.size, self.seed = size, seed
        self.records = read_records(self.root, split)
        _require(self.records, self.root, split, "videos")
        self.frames_per_video = frames_per_video
        if frames_per_video is None:
            counts = [r.num_frames or self._count(r.path) for r in self.records]
            self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._cache: dict[Path, torch.Tensor] = {}

    @staticmethod
    def _count(path: Path) -> int:
        from ..io import read_video

        return len(read_video(path)[0])

    def __len__(self) -> int:
        if self.frames_per_video is None:
            return int(self._starts[-1])
        return len(self.records) * int(self.frames_per_video)

    def _video(self, path: Path, upto: int | None) -> torch.Tensor:
        from ..io import read_video

        cached = self._cache.get(path)
        if cached is not None and (upto is None or len(cached) > upto):
            return cached
        video = read_video(path, max_frames=None if upto is None else upto + 1)[0]
        self._cache = {path: video}
        return video

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            index += len(self)
        if self.frames_per_video is None:
            v = int(np.searchsorted(self._starts, index, side="right") - 1)
            video = self._video(self.records[v].path, int(index - self._starts[v]))
            frame = video[min(int(index - self._starts[v]), len(video) - 1)]
        else:
            v = index // int(self.frames_per_video)
            video = self._video(self.records[v].path, None)
            frame = video[int(self._rng(index).integers(len(video)))]
        x = to_model_pixels(frame)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(
                x[None], size=(self.size, self.size), mode="bilinear", antialias=True
            )[0]
        return x


# ------------------------------------------------------------------------------------------
# Latent datasets
# ------------------------------------------------------------------------------------------


def latent_folder(root: str | os.PathLike) -> Path:
    """Where a latent dataset keeps its files: ``root/Latents`` (also accepted: ``root``)."""
    root = Path(root)
    return root / LATENTS_DIR if (root / LATENTS_DIR).is_dir() else root


def read_latent_records(
    root: str | os.PathLike, split: str | Iterable[str] | None = "TRAIN"
) -> list[VideoRecord]:
    """FileList rows of a latent dataset whose ``<name>.safetensors`` exists."""
    root = Path(root)
    folder = latent_folder(root)
    return read_records(root, split, folder=os.path.relpath(folder, root), suffix=LATENT_SUFFIX)


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """(T, C, h, w) float32 latents of one file and its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        return fh.get_tensor(LATENT_KEY).to(torch.float32), meta


class LatentVideoDataset(_Seeded, torch.utils.data.Dataset):
    """Windows of encoded videos for the LVDM trainer.

    Item: ``dict(latents=float32 (frames, C, h, w) window resampled to ``target_fps`` and
    zero-padded (already × scaling_factor), ef=float32 0-d tensor EF/100, cond=float32 (C, h, w)
    one latent frame drawn uniformly from the whole video, valid=int real frames in the window,
    name=str)``. The source rate is the FileList's FPS, else the file's ``fps`` metadata.
    ``random_window=False`` (evaluation): phase 0, start 0, and the conditioning frame drawn from
    a generator seeded with ``[seed or 0, epoch, index, 1]`` (deterministic; the trailing 1 keeps
    it apart from the training draws' ``[seed, epoch, index]``).

    ``require_ef`` (the default: the LVDM is conditioned on EF): every selected row must have a
    finite number in the EF column, else :class:`DatasetError` names the FileList, the column and
    each row without one. With ``require_ef=False`` such rows give ``ef = nan``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] | None = "TRAIN",
        frames: int = 64,
        target_fps: float | None = 32,
        random_window: bool = True,
        seed: int | None = None,
        drop_short: bool = False,
        require_ef: bool = True,
    ):
        self.root = Path(root)
        self.frames, self.target_fps = int(frames), target_fps
        self.random_window, self.seed = random_window, seed
        records = _long_enough(
            read_latent_records(self.root, split), self.frames, target_fps, drop_short
        )
        _require(records, self.root, split, "encoded videos")
        if require_ef:
            _check_ef(records, self.root / "FileList.csv", split, "conditions the LVDM")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        latents, meta = load_latents(rec.path)
        fps = rec.fps or float(meta.get("fps", 0) or 0)
        if fps <= 0:
            raise DatasetError(f"{rec.path}: no frame rate (FileList FPS or metadata 'fps')")
        target = self.target_fps or fps
        if self.random_window:
            rng = self._rng(index)
            idx, valid = window_indices(len(latents), fps, target, self.frames, rng)
        else:
            rng = np.random.default_rng([int(self.seed or 0), self.epoch, int(index), 1])
            idx, valid = window_indices(len(latents), fps, target, self.frames, None)
        cond = latents[int(rng.integers(len(latents)))]
        return {
            "latents": pad_frames(latents[torch.from_numpy(idx)], self.frames),
            "ef": _ef_tensor(rec),
            "cond": cond.clone(),
            "valid": valid,
            "name": rec.name,
        }


class LatentFrameDataset(_Seeded, torch.utils.data.Dataset):
    """One random latent frame per video per epoch for the LIDM trainer (the reference's "one
    random frame per video"). Item: float32 (C, h, w), already × scaling_factor. Only that frame
    is read from disk."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] | None = "TRAIN",
        seed: int | None = None,
    ):
        self.root = Path(root)
        self.seed = seed
        self.records = read_latent_records(self.root, split)
        _require(self.records, self.root, split, "encoded videos")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> torch.Tensor:
        from safetensors import safe_open

        rec = self.records[index]
        with safe_open(str(rec.path), framework="pt") as fh:
            part = fh.get_slice(LATENT_KEY)
            count = int(part.get_shape()[0])
            k = int(self._rng(index).integers(count))
            return part[k : k + 1][0].to(torch.float32)
