"""The privacy filter: embeddings, Pearson max-correlation, τ calibration, candidate scoring.

Correlation: the Pearson correlation of two embeddings is the dot product of their centred,
unit-norm versions (an all-constant embedding has correlation 0 with everything), so every
query's best match over a gallery is one matrix product and a row max. Queries are processed in
chunks of :data:`QUERY_CHUNK` rows (zero-padded to exactly that many, so every product has the
same shape and a query's result does not depend on how many queries came with it) against
gallery chunks of :data:`GALLERY_CHUNK` rows; fp32 on CPU or GPU with TF32 off. Ties keep the
first (lowest) gallery index.

Calibration (the reference's): embed the reference frames of every TRAIN and TEST clip; for each
TRAIN frame take its max correlation with any TEST frame; τ = the ``percentile`` (numpy's linear
interpolation, default 95) of these values. A candidate is kept iff its max correlation with
every TRAIN frame is < τ (for a candidate clip: every checked frame).

Shift tolerance (an echofast addition, ``shift_tolerance = r``, default 0 = the reference): every
frame's outer r-pixel ring is replaced by its replicated interior before embedding (gallery,
TEST and query frames alike), and a query frame (a candidate, or a TRAIN frame during
calibration) is also embedded moved by every (dy, dx) in [−r, r]² latent pixels (then ringed and
normalised again); its score is the max over those views. A copy moved by up to r pixels then
has one view identical to its source's embedding input (correlation 1, as an exact copy). The
same rule calibrates τ, so τ stays the percentile of what a real TRAIN frame scores against the
TEST frames. Costs (2r + 1)² embeddings per query frame.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EchofastError, WeightsError
from ..fsutil import sha256_file
from .data import (
    GALLERY,
    FrameSet,
    LatentClips,
    PairDataset,
    check_frame_shapes,
    check_reference_shift_tolerance,
    check_shift_tolerance,
    frames_from_clips,
    load_split_frames,
    shift_offsets,
    shifted_view,
)
from .metrics import AUCResult, bootstrap_auc
from .model import CONFIG_NAME, EVALUATION_NAME, ReIdentificationModel

QUERY_CHUNK = 256
GALLERY_CHUNK = 16384
EMBED_BATCH = 64
"""Frames per embedding call (zero-padded): a frame's embedding is the same whatever else is
embedded with it."""


class PrivacyError(EchofastError, RuntimeError):
    """The privacy filter cannot give its guarantee (weak model, too few candidates, bad data)."""


class StaleCacheError(PrivacyError):
    """A cached filter state lacks what this version of echofast needs (recalibrate)."""


# ---- embeddings and correlation ------------------------------------------------------------


@torch.no_grad()
def embed(
    model: ReIdentificationModel,
    frames: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "embed",
) -> torch.Tensor:
    """Eval-mode embeddings (N, D) fp32 CPU of normalised frames (N, C, h, w), in zero-padded
    batches of exactly :data:`EMBED_BATCH` frames (:meth:`ReIdentificationModel.embed_frames`).

    Raises:
        PrivacyError: an embedding is not finite.
    """
    try:
        return model.embed_frames(
            frames, batch_size=EMBED_BATCH, device=device, progress=progress, desc=desc
        )
    except WeightsError:
        raise PrivacyError(
            "re-identification embeddings are not finite (NaN/inf in the model?)"
        ) from None


def unit_rows(emb: torch.Tensor) -> torch.Tensor:
    """Centred, unit-norm rows (float64 arithmetic, fp32 result): Pearson correlation of two
    rows is the dot product of their unit rows."""
    e = emb.double()
    e = e - e.mean(dim=1, keepdim=True)
    norm = e.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, e / torch.where(norm > 0, norm, 1), 0 * e).float()


@contextlib.contextmanager
def _ieee_fp32() -> Iterator[None]:
    """fp32 matmuls without TF32 (TF32 would round correlations to ~1e-3)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@torch.no_grad()
def max_correlation(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the max Pearson correlation with any gallery row and that row's index.

    ``queries`` (Q, D) and ``gallery`` (G, D) are unit rows (:func:`unit_rows`). Returns fp32
    (Q,) values clamped to [−1, 1] and long (Q,) indices, on the CPU."""
    if gallery.shape[0] == 0:
        raise PrivacyError("the reference gallery is empty")
    device = torch.device(device) if device is not None else torch.device("cpu")
    q_all = queries.float()
    g_chunks = [
        gallery[s : s + GALLERY_CHUNK].to(device, torch.float32)
        for s in range(0, gallery.shape[0], GALLERY_CHUNK)
    ]
    values, index = [], []
    with _ieee_fp32():
        for s in range(0, q_all.shape[0], QUERY_CHUNK):
            q = q_all[s : s + QUERY_CHUNK].to(device)
            k = q.shape[0]
            if k < QUERY_CHUNK:
                q = torch.cat([q, q.new_zeros((QUERY_CHUNK - k, q.shape[1]))])
            best = torch.full((QUERY_CHUNK,), -float("inf"), device=device)
            arg = torch.zeros(QUERY_CHUNK, dtype=torch.long, device=device)
            offset = 0
            for g in g_chunks:
                v, i = (q @ g.T).max(dim=1)
                better = v > best
                best = torch.where(better, v, best)
                arg = torch.where(better, i + offset, arg)
                offset += g.shape[0]
            # |r| <= 1 exactly; fp32 rounding can exceed it by an ulp (identical embeddings)
            values.append(best[:k].clamp(-1.0, 1.0).cpu())
            index.append(arg[:k].cpu())
    if not values:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(values), torch.cat(index)


@dataclass
class Calibration:
    tau: float
    percentile: float
    values: np.ndarray
    """Max correlation of each TRAIN reference frame with any TEST reference frame."""


def max_correlation_views(
    views: Sequence[torch.Tensor],
    gallery: torch.Tensor,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`max_correlation` of several views of the same queries (a list of (Q, D) unit rows):
    per query the max over views, and the gallery row of the best view (ties: the first view)."""
    best, index = max_correlation(views[0], gallery, device=device)
    for view in views[1:]:
        v, i = max_correlation(view, gallery, device=device)
        better = v > best
        best, index = torch.where(better, v, best), torch.where(better, i, index)
    return best, index


def calibrate(
    train_unit: torch.Tensor | Sequence[torch.Tensor],
    test_unit: torch.Tensor,
    percentile: float = 95.0,
    *,
    device: torch.device | str | None = None,
) -> Calibration:
    """τ = ``percentile`` of each TRAIN frame's max correlation with any TEST frame
    (``train_unit``: the TRAIN unit rows, or a list of views of them; see shift tolerance)."""
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    views = [train_unit] if torch.is_tensor(train_unit) else list(train_unit)
    values, _ = max_correlation_views(views, test_unit, device=device)
    v = values.double().numpy()
    tau = float(np.percentile(v, percentile))
    if not np.isfinite(tau):
        raise PrivacyError(f"the privacy threshold is not finite ({tau})")
    return Calibration(tau=tau, percentile=float(percentile), values=v)


# ---- the model's strength ------------------------------------------------------------------


@torch.no_grad()
def evaluate_reid(
    model: ReIdentificationModel,
    clips: LatentClips,
    *,
    seed: int,
    pairs_per_video: int = 1,
    n_bootstrap: int = 10_000,
    ci: float = 0.95,
    device: torch.device | str | None = None,
) -> tuple[AUCResult, np.ndarray, np.ndarray]:
    """Test ROC AUC (+ bootstrap CI) of the pair head on the reference pair protocol with fixed
    pairs (seeded). Returns (result, labels, scores = sigmoid(logit))."""
    pairs = PairDataset(clips, seed=seed, pairs_per_video=pairs_per_video, shuffle=False)
    drawn = [pairs.pair(p) for p in range(len(pairs))]
    a = torch.stack([clips.frame(i, f) for i, f, _, _, _ in drawn])
    b = torch.stack([clips.frame(j, g) for _, _, j, g, _ in drawn])
    labels = np.array([y for *_, y in drawn], dtype=np.float64)
    if labels.min() == labels.max():
        raise PrivacyError(
            f"the test pairs of {clips.root} ({clips.split}) hold one class only; "
            "use more pairs per video"
        )
    device = torch.device(device) if device is not None else model.device
    ea, eb = embed(model, a, device=device), embed(model, b, device=device)
    was = model.training
    model.eval()
    logits = model.head(ea.to(device), eb.to(device)).float().cpu().reshape(-1)
    model.train(was)
    scores = torch.sigmoid(logits).double().numpy()
    return bootstrap_auc(labels, scores, n_bootstrap=n_bootstrap, ci=ci, seed=seed), labels, scores


# ---- digests -------------------------------------------------------------------------------


def model_digest(folder: str | os.PathLike, allow_pickle: bool = False) -> dict[str, str]:
    folder = Path(folder)
    weights = ReIdentificationModel.find_weights(folder, allow_pickle)
    return {
        "weights_file": weights.name,
        "weights_sha256": sha256_file(weights),
        "config_sha256": sha256_file(folder / CONFIG_NAME),
    }


def reference_digest(root: str | os.PathLike) -> str:
    """sha256 over FileList.csv, encode.json (if any) and each latent file's name and size (the
    latents themselves are not hashed: GBs)."""
    from ..data.datasets import read_latent_records

    root = Path(root)
    h = hashlib.sha256()
    for name in ("FileList.csv", "encode.json"):
        p = root / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"-") + b"\0")
    for r in read_latent_records(root, None):
        h.update(f"{r.name}\0{r.path.stat().st_size}\0".encode())
    return h.hexdigest()


def read_evaluation(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / EVALUATION_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        float(data["test_auc"]["auc"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise PrivacyError(f"{path}: unreadable evaluation ({err})") from None
    return data


# ---- the filter ----------------------------------------------------------------------------


@dataclass
class ClipScores:
    """Per candidate clip: max correlation over its checked frames and its nearest real frame."""

    names: list[str]
    max_corr: np.ndarray
    nearest_clip: list[str]
    nearest_frame: np.ndarray
    candidate_frame: np.ndarray
    """Which frame of the candidate gave the max."""
    kept: np.ndarray


class PrivacyFilter:
    """A re-identification model, its reference gallery (TRAIN frames) and τ.

    Build with :meth:`from_reference` (embeds TRAIN and TEST frames of a latent dataset and
    calibrates) or :meth:`load` (a cached state)."""

    def __init__(
        self,
        model: ReIdentificationModel,
        gallery_unit: torch.Tensor,
        gallery_clip: list[str],
        gallery_frame: np.ndarray,
        calibration: Calibration,
        *,
        frame_step: int,
        num_test_frames: int,
        num_train_clips: int,
        num_test_clips: int,
        frame_shape: Sequence[int],
        device: torch.device | str | None = None,
        shift_tolerance: int = 0,
    ):
        self.frame_shape = tuple(int(v) for v in frame_shape)
        """(C, h, w) of the reference frames: every frame scored must have it."""
        if len(self.frame_shape) != 3 or self.frame_shape[0] != model.n_channels:
            raise PrivacyError(
                f"reference frames of shape {self.frame_shape} (C, h, w) do not suit the "
                f"re-identification model, which takes {model.n_channels}-channel frames"
            )
        self.shift_tolerance = check_shift_tolerance(
            shift_tolerance, self.frame_shape, frames_from=GALLERY
        )
        self.model = model
        self.gallery_unit = gallery_unit
        self.gallery_clip = gallery_clip
        self.gallery_frame = gallery_frame
        self.calibration = calibration
        self.frame_step = frame_step
        self.num_test_frames = num_test_frames
        self.num_train_clips = num_train_clips
        self.num_test_clips = num_test_clips
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def tau(self) -> float:
        return self.calibration.tau

    @classmethod
    def from_reference(
        cls,
        model: ReIdentificationModel,
        reference: str | os.PathLike,
        *,
        percentile: float = 95.0,
        frame_step: int = 0,
        train_split: str = "TRAIN",
        test_split: str = "TEST",
        device: torch.device | str | None = None,
        progress: bool = False,
        shift_tolerance: int = 0,
    ) -> PrivacyFilter:
        norm = model.normalization
        r = check_reference_shift_tolerance(shift_tolerance, reference, split=train_split)
        offsets = shift_offsets(r)
        train = load_split_frames(
            reference, train_split, frame_step=frame_step, normalization=norm, progress=progress
        )
        if len(train) == 0:
            raise PrivacyError(f"{reference}: split {train_split!r} holds no reference frames")
        shape = tuple(train.frames.shape[1:])
        if shape[0] != model.n_channels:
            raise PrivacyError(
                f"{reference}: {train_split} latent frames of shape {shape} (C, h, w), but the "
                f"re-identification model takes {model.n_channels}-channel frames"
            )
        test = load_split_frames(
            reference,
            test_split,
            frame_step=frame_step,
            normalization=norm,
            progress=progress,
            frame_shape=shape,
            expected_from=f"{reference} {train_split}",
        )
        model = model.to(device or "cpu")
        g = unit_rows(
            embed(
                model,
                shifted_view(train.frames, 0, 0, norm, r),
                device=device,
                progress=progress,
                desc="TRAIN",
            )
        )
        t = unit_rows(
            embed(
                model,
                shifted_view(test.frames, 0, 0, norm, r),
                device=device,
                progress=progress,
                desc="TEST",
            )
        )
        views = [g] + [
            unit_rows(embed(model, shifted_view(train.frames, dy, dx, norm, r), device=device))
            for dy, dx in offsets[1:]
        ]
        cal = calibrate(views, t, percentile, device=device)
        return cls(
            model,
            g,
            [train.names[int(c)] for c in train.clip_index],
            train.frame_index.numpy(),
            cal,
            frame_step=frame_step,
            num_test_frames=len(test),
            num_train_clips=train.num_clips,
            num_test_clips=test.num_clips,
            frame_shape=shape,
            device=device,
            shift_tolerance=r,
        )

    # ---- cache ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Gallery, τ and calibration values as one safetensors file (atomic)."""
        from safetensors.torch import save_file

        from ..fsutil import atomic_write

        tensors = {
            "gallery_unit": self.gallery_unit.contiguous(),
            "gallery_frame": torch.from_numpy(np.asarray(self.gallery_frame, dtype=np.int64)),
            "calibration_values": torch.from_numpy(self.calibration.values.astype(np.float64)),
        }
        meta = {
            "tau": repr(self.calibration.tau),
            "percentile": repr(self.calibration.percentile),
            "frame_step": str(self.frame_step),
            "num_test_frames": str(self.num_test_frames),
            "num_train_clips": str(self.num_train_clips),
            "num_test_clips": str(self.num_test_clips),
            "shift_tolerance": str(self.shift_tolerance),
            "frame_shape": json.dumps(list(self.frame_shape)),
            "gallery_clip": json.dumps(self.gallery_clip),
        }
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: ReIdentificationModel,
        *,
        device: torch.device | str | None = None,
    ) -> PrivacyFilter:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            t = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iter
        if "frame_shape" not in meta:
            raise StaleCacheError(
                f"{path}: no reference frame shape (written by an older echofast); delete it to "
                "recalibrate"
            )
        cal = Calibration(
            tau=float(meta["tau"]),
            percentile=float(meta["percentile"]),
            values=t["calibration_values"].numpy(),
        )
        return cls(
            model.to(device or "cpu"),
            t["gallery_unit"],
            json.loads(meta["gallery_clip"]),
            t["gallery_frame"].numpy(),
            cal,
            frame_step=int(meta["frame_step"]),
            num_test_frames=int(meta["num_test_frames"]),
            num_train_clips=int(meta["num_train_clips"]),
            num_test_clips=int(meta["num_test_clips"]),
            frame_shape=json.loads(meta["frame_shape"]),
            device=device,
            shift_tolerance=int(meta.get("shift_tolerance", "0")),
        )

    # ---- scoring ----------------------------------------------------------------------------

    def check_clips(
        self, clips: Sequence[torch.Tensor], sources: Sequence[str | os.PathLike]
    ) -> None:
        """Raise :class:`~echofast.privacy.data.FrameShapeError` naming the first clip (T, C, h,
        w) or image (C, h, w) whose frames do not have the reference frames' shape: the
        re-identification model pools globally, so it would score them without complaint."""
        check_frame_shapes(clips, sources, self.frame_shape, GALLERY)

    def score_frames(
        self, frames: torch.Tensor, gallery_rows: torch.Tensor | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Max correlation (float64 of the fp32 value) and nearest gallery row of normalised
        frames (N, C, h, w); with a shift tolerance, the max over the moved views.
        ``gallery_rows``: score against these gallery rows only (indices into the subset)."""
        if len(frames):
            self.check_clips([frames[0]], ["frames to score"])
        norm = self.model.normalization
        r = self.shift_tolerance
        views = [
            unit_rows(embed(self.model, shifted_view(frames, dy, dx, norm, r), device=self.device))
            for dy, dx in shift_offsets(r)
        ]
        gallery = self.gallery_unit if gallery_rows is None else self.gallery_unit[gallery_rows]
        v, i = max_correlation_views(views, gallery, device=self.device)
        return v.double().numpy(), i.numpy()

    def score_frame_set(self, fs: FrameSet) -> ClipScores:
        """Per clip of ``fs``: the max over its frames (clips' frames are contiguous)."""
        v, idx = self.score_frames(fs.frames)
        clip = fs.clip_index.numpy()
        starts = (
            np.flatnonzero(np.r_[True, clip[1:] != clip[:-1]]) if len(clip) else np.zeros(0, int)
        )
        best = np.maximum.reduceat(v, starts) if len(v) else np.zeros(0)
        which = np.array(
            [s + int(np.argmax(v[s:e])) for s, e in zip(starts, np.r_[starts[1:], len(v)])],
            dtype=np.int64,
        )
        order = clip[starts] if len(starts) else np.zeros(0, int)
        if len(order) != fs.num_clips:
            raise PrivacyError("a candidate clip has no checked frame")
        g = idx[which] if len(which) else np.zeros(0, int)
        return ClipScores(
            names=[fs.names[int(c)] for c in order],
            max_corr=best,
            nearest_clip=[self.gallery_clip[int(i)] for i in g],
            nearest_frame=np.asarray(self.gallery_frame)[g] if len(g) else np.zeros(0, int),
            candidate_frame=fs.frame_index.numpy()[which] if len(which) else np.zeros(0, int),
            kept=best < self.tau,
        )

    def score_clips(
        self, clips: Sequence[torch.Tensor], names: Sequence[str], *, frame_step: int | None = None
    ) -> ClipScores:
        """Normalise each candidate clip/image as the reference clips were, check its frames
        (``frame_step``, default the reference's) and score it."""
        step = self.frame_step if frame_step is None else frame_step
        fs = frames_from_clips(
            clips,
            names,
            frame_step=step,
            normalization=self.model.normalization,
            frame_shape=self.frame_shape,
        )
        return self.score_frame_set(fs)
