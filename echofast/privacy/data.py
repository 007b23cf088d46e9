"""Latent clips for the privacy filter and the re-identification trainer.

A latent dataset is what ``echofast encode`` writes (``FileList.csv`` + ``Latents/<name>
.safetensors``, key ``latents``: float32 (T, C, h, w) × scaling_factor). A candidate set is a
folder of such files (with or without ``FileList.csv``); a file may hold one image (C, h, w) or a
clip (T, C, h, w).

Normalisation (:func:`echofast.privacy.model.normalize_clip`) is applied to a whole clip before
frames are picked, the same way for real and synthetic clips: ``"clip"`` uses the clip's min and
max (an image is a one-frame clip), ``"frame"`` each frame's own.

Frame selection: ``frame_step = 0`` takes frame 0 of every clip (the reference's
``first_frame``), ``k > 0`` takes frames 0, k, 2k, ... .

Re-identification pairs (the reference's ``SiameseUSDataset``): for video ``a``, with probability
1/2 a different video ``b = (a + U{1..n−1}) mod n`` (label 0), else ``b = a`` (label 1); frame
``f_a`` uniform, ``f_b = (f_a + U{1..len_b − 1}) mod len_b`` (always another frame index).
Each pair draws from ``numpy.random.default_rng([seed, epoch, position])``.

Augmented pairs (an echofast addition, off by default: the reference trains without them). The
filter must catch copies of real frames that were lightly edited, and the reference pairs never
show the model an edited frame. With :class:`Augmentation` each pair member is independently
translated, re-scaled per channel and given Gaussian noise, with parameters drawn from the pair's
generator after the reference draws (so pairs and labels are the reference's), and with
probability ``copy_positives`` a positive pair's second frame is the anchor frame itself (then
both members are independently edited copies of one frame). Edits apply to the normalised
frame; with per-frame normalisation (``"frame"``, ``"channel"``) the edited frame is normalised
again, as the filter
normalises a candidate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import (
    LATENT_KEY,
    LATENT_SUFFIX,
    DatasetError,
    latent_folder,
    load_latents,
    read_latent_records,
    read_records,
)
from ..errors import EchofastError
from .model import normalize_clip


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(C, h, w) or (N, C, h, w) moved by (dy, dx) pixels (down, right), the vacated border
    edge-replicated."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x.clone()
    batch = x if x.dim() == 4 else x[None]
    pad = torch.nn.functional.pad(batch, (p, p, p, p), mode="replicate")
    out = pad[..., p - dy : p - dy + h, p - dx : p - dx + w].contiguous()
    return out if x.dim() == 4 else out[0]


class ShiftToleranceError(EchofastError, ValueError):
    """A shift tolerance that is not an int >= 0, or that leaves no interior of the latent frames
    (see :func:`max_shift_tolerance`)."""


def shift_offsets(tolerance: int) -> list[tuple[int, int]]:
    """Every (dy, dx) with |dy|, |dx| <= ``tolerance``, the identity first."""
    if tolerance < 0:
        raise ShiftToleranceError(f"shift tolerance must be >= 0, got {tolerance}")
    r = range(-tolerance, tolerance + 1)
    return [(0, 0)] + [(dy, dx) for dy in r for dx in r if (dy, dx) != (0, 0)]


def replace_ring(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., h, w) with its outer ``width``-pixel ring replaced by the edge-replicated interior."""
    if width == 0:
        return x
    inner = x[..., width:-width, width:-width]
    flat = inner.reshape(-1, 1, *inner.shape[-2:])
    out = torch.nn.functional.pad(flat, (width,) * 4, mode="replicate")
    return out.reshape(*x.shape[:-2], *out.shape[-2:])


def shifted_view(
    frames: torch.Tensor, dy: int, dx: int, normalization: str, ring: int = 0
) -> torch.Tensor:
    """Normalised frames (N, C, h, w) moved by (dy, dx), then their outer ``ring`` pixels
    replaced by the replicated interior, normalised again under per-frame normalisation
    (``"frame"``, ``"channel"``), as a moved candidate would be. With ``ring`` ≥ |dy|, |dx| a
    copy moved by (−dy, −dx) gives exactly the source's view with the same ring."""
    if not (dy or dx or ring):
        return frames
    y = replace_ring(translate(frames, dy, dx), ring)
    return normalize_clip(y, normalization) if normalization != "clip" else y


@dataclass(frozen=True)
class Augmentation:
    """Light edits of re-identification training frames (see the module docstring).

    A member is shifted by (dy, dx) uniform in ``[-max_shift, max_shift]``², each channel
    multiplied by U(1 − gain, 1 + gain) and offset by U(−offset, offset)·std, then
    N(0, (U(0, noise)·std)²) noise added (std: the frame's, before the edits)."""

    max_shift: int = 0
    gain: float = 0.1
    offset: float = 0.1
    noise: float = 0.05
    copy_positives: float = 0.0

    def apply(self, x: torch.Tensor, rng: np.random.Generator, normalization: str) -> torch.Tensor:
        """Edit one normalised (C, h, w) frame with parameters drawn from ``rng``."""
        c = x.shape[0]
        dy, dx = (int(v) for v in rng.integers(-self.max_shift, self.max_shift + 1, size=2))
        gain = torch.from_numpy(rng.uniform(1 - self.gain, 1 + self.gain, (c, 1, 1))).float()
        off = torch.from_numpy(rng.uniform(-self.offset, self.offset, (c, 1, 1))).float()
        sigma = float(rng.uniform(0, self.noise))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        std = x.std()
        y = translate(x, dy, dx) * gain + off * std
        y = y + sigma * std * torch.randn(x.shape, generator=gen)
        return normalize_clip(y, normalization) if normalization != "clip" else y


GALLERY = "the reference gallery (TRAIN)"
"""How frame-shape errors name the frames a filter compares with."""


class FrameShapeError(DatasetError):
    """Latent frames whose (C, h, w) differ from the others they are compared with."""


def clip_frame_shape(clip: torch.Tensor, where: str) -> tuple[int, int, int]:
    """(C, h, w) of a clip (T, C, h, w) or an image (C, h, w); ``where`` names it in errors."""
    if clip.dim() not in (3, 4):
        raise FrameShapeError(
            f"{where}: expected (T, C, h, w) or (C, h, w) latents, got shape {tuple(clip.shape)}"
        )
    c, h, w = (int(v) for v in clip.shape[-3:])
    return c, h, w


def check_frame_shape(
    clip: torch.Tensor, where: str, expected: Sequence[int] | None, expected_from: str
) -> tuple[int, ...]:
    """The frame shape of ``clip``; raises :class:`FrameShapeError` naming ``where``, its shape
    and ``expected`` (the shape of ``expected_from``) when they differ."""
    shape = clip_frame_shape(clip, where)
    if expected is not None and shape != tuple(expected):
        raise FrameShapeError(
            f"{where}: latent frames of shape {shape} (C, h, w), but {expected_from} has "
            f"frames of shape {tuple(expected)}"
        )
    return shape


def check_frame_shapes(
    clips: Sequence[torch.Tensor],
    sources: Sequence[str | os.PathLike],
    expected: Sequence[int] | None = None,
    expected_from: str = "",
) -> tuple[int, ...] | None:
    """The common frame shape (C, h, w) of ``clips``: each must have ``expected`` (the shape of
    ``expected_from``) when given, else the first clip's; errors name the clip's source. None
    for no clips and no ``expected``."""
    shape = tuple(expected) if expected is not None else None
    if expected is None and len(sources):
        expected_from = str(sources[0])
    for clip, where in zip(clips, sources):
        shape = check_frame_shape(clip, str(where), shape, expected_from)
    return shape


def max_shift_tolerance(frame_shape: Sequence[int]) -> int:
    """The largest shift tolerance R that latent frames (C, h, w) allow: R replaces each frame's
    outer R-pixel ring with its replicated interior, so an interior must be left, 2R < h and
    2R < w."""
    return (min(int(v) for v in frame_shape[-2:]) - 1) // 2


def check_shift_tolerance(
    tolerance: int,
    frame_shape: Sequence[int] | None = None,
    *,
    option: str = "shift_tolerance",
    frames_from: str = "the reference",
) -> int:
    """``tolerance`` as an int, refused with :class:`ShiftToleranceError` naming ``option``
    unless it is an int >= 0 and (with ``frame_shape``, that of ``frames_from``'s frames) at most
    :func:`max_shift_tolerance`."""
    if isinstance(tolerance, bool | np.bool_) or not isinstance(tolerance, int | np.integer):
        raise ShiftToleranceError(f"{option} must be an int >= 0, got {tolerance!r}")
    if tolerance < 0:
        raise ShiftToleranceError(f"{option} must be >= 0, got {tolerance}")
    if frame_shape is not None and tolerance > (most := max_shift_tolerance(frame_shape)):
        h, w = (int(v) for v in frame_shape[-2:])
        raise ShiftToleranceError(
            f"{option} {tolerance}: {frames_from} has {h}x{w} latent frames (shape "
            f"{tuple(int(v) for v in frame_shape)}), which allow a shift tolerance of at most "
            f"{most} (R replaces each frame's outer R-pixel ring with its interior: 2R must be "
            f"below {min(h, w)})"
        )
    return int(tolerance)


def split_frame_shape(root: str | os.PathLike, split: str = "TRAIN") -> tuple[int, int, int]:
    """(C, h, w) of the first clip of ``split`` of a latent dataset, read from its file's header
    (the latents are not loaded)."""
    from safetensors import safe_open

    records = read_latent_records(root, split)
    if not records:
        raise DatasetError(f"{root}: no encoded videos in split {split!r}")
    path = records[0].path
    try:
        with safe_open(str(path), framework="pt") as fh:
            shape = tuple(int(v) for v in fh.get_slice(LATENT_KEY).get_shape())
    except Exception as err:  # noqa: BLE001 - any unreadable file is named
        raise DatasetError(
            f"{path}: cannot read latents under key {LATENT_KEY!r} ({err})"
        ) from None
    if len(shape) not in (3, 4):
        raise FrameShapeError(
            f"{path}: expected (T, C, h, w) or (C, h, w) latents, got shape {shape}"
        )
    c, h, w = shape[-3:]
    return c, h, w


def check_reference_shift_tolerance(
    tolerance: int,
    reference: str | os.PathLike,
    *,
    option: str = "shift_tolerance",
    split: str = "TRAIN",
) -> int:
    """:func:`check_shift_tolerance` against the frame shape of ``reference``'s ``split`` (read
    from one file's header), before any frame is loaded; a tolerance of 0 reads nothing."""
    tolerance = check_shift_tolerance(tolerance, option=option)
    if tolerance:
        shape = split_frame_shape(reference, split)
        check_shift_tolerance(tolerance, shape, option=option, frames_from=f"{reference} ({split})")
    return tolerance


def read_clip(path: str | os.PathLike) -> torch.Tensor:
    """The latents of one file (:func:`~echofast.data.datasets.load_latents`); a file that cannot
    be read, or holds no ``latents`` tensor, is a :class:`DatasetError` naming it."""
    try:
        return load_latents(path)[0]
    except Exception as err:  # noqa: BLE001 - any unreadable file is named
        raise DatasetError(
            f"{path}: cannot read latents under key {LATENT_KEY!r} ({err})"
        ) from None


ENCODE_MANIFEST = "encode.json"
"""What ``echofast encode`` writes beside the latents: the VAE's digest and scaling factor."""


class EncodingMismatchError(DatasetError):
    """Candidate latents encoded with another VAE (or scaling factor) than the reference's."""


def _encoding(folder: Path) -> dict | None:
    path = folder / ENCODE_MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: unreadable manifest (not a JSON object)")
    return data


def check_same_encoding(candidates: str | os.PathLike, reference: str | os.PathLike) -> None:
    """Refuse candidates whose ``encode.json`` records another VAE or scaling factor than the
    reference's (latents of different VAEs cannot be compared); checked when both folders have
    one (an LIDM's candidates are sampled, not encoded, and have none)."""
    ours, theirs = _encoding(Path(candidates)), _encoding(Path(reference))
    if ours is None or theirs is None:
        return
    diff = [k for k in ("vae_sha256", "scaling_factor") if ours.get(k) != theirs.get(k)]
    if diff:
        values = "; ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in diff)
        raise EncodingMismatchError(
            f"{Path(candidates) / ENCODE_MANIFEST} and {Path(reference) / ENCODE_MANIFEST}: the "
            f"candidates were encoded with another VAE than the reference ({values}); latents "
            "of different VAEs cannot be compared"
        )


def select_frames(length: int, frame_step: int) -> list[int]:
    """Frame indices checked in a clip of ``length`` frames (see the module docstring)."""
    if frame_step < 0:
        raise ValueError(f"frame_step must be >= 0, got {frame_step}")
    if length < 1:
        return []
    return [0] if frame_step == 0 else list(range(0, length, frame_step))


@dataclass
class FrameSet:
    """Normalised frames of a collection of clips, with where each frame came from."""

    frames: torch.Tensor
    """(N, C, h, w) float32, normalised."""
    clip_index: torch.Tensor
    """(N,) long: index into ``names``."""
    frame_index: torch.Tensor
    """(N,) long: frame number within its clip."""
    names: list[str] = field(default_factory=list)
    """Clip names."""

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def num_clips(self) -> int:
        return len(self.names)


def frames_from_clips(
    clips: Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    frame_step: int,
    normalization: str,
    frame_shape: Sequence[int] | None = None,
    expected_from: str = GALLERY,
) -> FrameSet:
    """Normalise each clip (T, C, h, w) or image (C, h, w) and pick its frames. Every clip's
    frames must have ``frame_shape`` (C, h, w) (that of ``expected_from``) when given, else the
    first clip's (:class:`FrameShapeError` otherwise)."""
    check_frame_shapes(clips, names, frame_shape, expected_from)
    frames, cidx, fidx = [], [], []
    for i, clip in enumerate(clips):
        if clip.dim() == 3:
            clip = clip[None]
        if clip.shape[0] == 0:
            raise DatasetError(f"{names[i]}: latents hold no frames (shape {tuple(clip.shape)})")
        if not bool(torch.isfinite(clip).all()):
            raise DatasetError(f"{names[i]}: latents hold NaN or inf")
        idx = select_frames(clip.shape[0], frame_step)
        frames.append(normalize_clip(clip, normalization)[idx])
        cidx += [i] * len(idx)
        fidx += idx
    if not frames:
        return FrameSet(
            torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), []
        )
    return FrameSet(
        torch.cat(frames),
        torch.tensor(cidx, dtype=torch.long),
        torch.tensor(fidx, dtype=torch.long),
        list(names),
    )


def check_all_encoded(root: str | os.PathLike, split: str) -> None:
    """Refuse (:class:`DatasetError`) a latent dataset whose FileList.csv lists videos of
    ``split`` without their latent file: the filter's gallery (TRAIN) or calibration (TEST)
    would leave those patients out without a word (readers skip such rows)."""
    root = Path(root)
    folder = os.path.relpath(latent_folder(root), root)
    listed = read_records(root, split, folder=folder, suffix=LATENT_SUFFIX, require_files=False)
    missing = [r.path for r in listed if not r.path.is_file()]
    if missing:
        raise DatasetError(
            f"{root / 'FileList.csv'}: {len(missing)} of the {len(listed)} {split} videos it "
            f"lists have no latent file (first: {missing[0]}); the filter would not compare "
            "with them: encode them (echofast encode resumes) or remove their rows"
        )


def load_split_frames(
    root: str | os.PathLike,
    split: str,
    *,
    frame_step: int,
    normalization: str,
    progress: bool = False,
    frame_shape: Sequence[int] | None = None,
    expected_from: str = GALLERY,
) -> FrameSet:
    """Frames of every clip of ``split`` of a latent dataset (FileList order). Every clip's
    frames must have ``frame_shape`` (that of ``expected_from``) when given, else the first
    clip's; a :class:`FrameShapeError` names the file."""
    from tqdm.auto import tqdm

    records = read_latent_records(root, split)
    if not records:
        raise DatasetError(f"{root}: no encoded videos in split {split!r}")
    check_all_encoded(root, split)
    clips = [
        read_clip(r.path)
        for r in tqdm(records, desc=f"read {split}", unit="clip", disable=not progress)
    ]
    check_frame_shapes(clips, [r.path for r in records], frame_shape, expected_from)
    return frames_from_clips(
        clips, [r.name for r in records], frame_step=frame_step, normalization=normalization
    )


def candidate_files(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """(name, file) of every candidate latent file: the FileList rows when ``FileList.csv``
    exists, else every ``*.safetensors`` in ``Latents/`` (or the folder itself), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: candidate folder does not exist")
    if (folder / "FileList.csv").is_file():
        records = read_latent_records(folder, None)
        return [(r.name, r.path) for r in records]
    files = sorted(latent_folder(folder).glob(f"*{LATENT_SUFFIX}"))
    return [(p.name[: -len(LATENT_SUFFIX)], p) for p in files]


def load_candidates(
    folder: str | os.PathLike,
) -> tuple[list[str], list[Path], list[torch.Tensor]]:
    """(names, files, latents) of every candidate (:func:`candidate_files`); all must share one
    frame shape (a :class:`FrameShapeError` names the file)."""
    items = candidate_files(folder)
    if not items:
        raise DatasetError(f"{folder}: no candidate latent files (*{LATENT_SUFFIX})")
    names, paths, clips = [], [], []
    for name, path in items:
        clips.append(read_clip(path))
        names.append(name)
        paths.append(path)
    check_frame_shapes(clips, paths)
    return names, paths, clips


class LatentClips:
    """The clips of one split, held in memory, normalised once: ``frame(v, f)``."""

    def __init__(
        self, root: str | os.PathLike, split: str, *, normalization: str, min_frames: int = 2
    ):
        self.root, self.split = Path(root), split
        self.normalization = normalization
        records = read_latent_records(root, split)
        self.names: list[str] = []
        self.clips: list[torch.Tensor] = []
        self.skipped: list[str] = []
        self.frame_shape: tuple[int, ...] | None = None
        first = ""
        for r in records:
            x = read_clip(r.path)
            if x.dim() != 4 or x.shape[0] < min_frames:
                self.skipped.append(r.name)
                continue
            self.frame_shape = check_frame_shape(x, str(r.path), self.frame_shape, first)
            first = first or str(r.path)
            if not bool(torch.isfinite(x).all()):
                raise DatasetError(f"{r.path}: latents hold NaN or inf")
            self.names.append(r.name)
            self.clips.append(normalize_clip(x, normalization))
        if len(self.clips) < 2:
            raise DatasetError(
                f"{root}: split {split!r} has {len(self.clips)} clip(s) with >= {min_frames} "
                "frames; re-identification pairs need at least 2"
            )
        self.lengths = np.array([len(c) for c in self.clips], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.clips)

    def frame(self, video: int, index: int) -> torch.Tensor:
        return self.clips[video][index]


def sample_pair(
    rng: np.random.Generator, video: int, lengths: np.ndarray
) -> tuple[int, int, int, int, float]:
    """(a, f_a, b, f_b, label) for anchor video ``a = video`` (see the module docstring)."""
    n = len(lengths)
    if rng.uniform() < 0.5:
        b, label = (video + int(rng.integers(1, n))) % n, 0.0
    else:
        b, label = video, 1.0
    fa = int(rng.integers(lengths[video]))
    fb = (fa + int(rng.integers(1, lengths[b]))) % int(lengths[b])
    return video, fa, b, fb, label


class PairDataset(torch.utils.data.Dataset):
    """Pairs for positions ``0 .. len·pairs_per_video − 1`` of an epoch: position ``p`` anchors
    video ``order[p mod len]`` and draws from ``default_rng([seed, epoch, p])``. ``order`` is a
    permutation per epoch when ``shuffle`` (from ``default_rng([seed, epoch, 2**31])``, a key
    no pair position takes), else the file order.
    Items: ``(x1, x2, label)``."""

    def __init__(
        self,
        clips: LatentClips,
        *,
        seed: int,
        pairs_per_video: int = 1,
        shuffle: bool = True,
        augmentation: Augmentation | None = None,
    ):
        self.clips, self.seed = clips, int(seed)
        self.augmentation = augmentation
        self.pairs_per_video, self.shuffle = int(pairs_per_video), shuffle
        self.epoch = 0
        self._order: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.clips) * self.pairs_per_video

    def order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.clips)
            perm = (
                np.random.default_rng([self.seed, self.epoch, 2**31]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order = (self.epoch, perm)
        return self._order[1]

    def _rng(self, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(position)])

    def pair(self, position: int) -> tuple[int, int, int, int, float]:
        return self._draw(self._rng(position), position)

    def _draw(self, rng: np.random.Generator, position: int) -> tuple[int, int, int, int, float]:
        video = int(self.order()[position % len(self.clips)])
        a, fa, b, fb, y = sample_pair(rng, video, self.clips.lengths)
        aug = self.augmentation
        if aug is not None and y == 1.0 and rng.uniform() < aug.copy_positives:
            fb = fa
        return a, fa, b, fb, y

    def __getitem__(self, position: int):
        rng = self._rng(position)
        a, fa, b, fb, y = self._draw(rng, position)
        x1, x2 = self.clips.frame(a, fa), self.clips.frame(b, fb)
        aug = self.augmentation
        if aug is not None:
            norm = self.clips.normalization
            x1, x2 = aug.apply(x1, rng, norm), aug.apply(x2, rng, norm)
        return x1, x2, torch.tensor(y)
