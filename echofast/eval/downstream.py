"""Downstream EF regression: train an R(2+1)D on one dataset, test it on another.

The EchoNet-Dynamic protocol (``echonet video``, as the EchoNet-Synthetic authors ran it from
their fork ``HReynaud/echonet``):

- **data**: every FileList row of the split with an EF (rows with an empty EF are left out; a
  filled-in EF that is not a number in 0–100, or a listed video that is missing, is refused with
  an error naming the rows, as echonet refuses missing videos); grey frames repeated on 3 channels,
  normalised per channel by ``(x − mean)/std`` (EchoNet-Dynamic's constants
  ``mean = (32.66, 32.79, 33.08)``, ``std = (49.80, 49.89, 50.18)`` by default, or the training
  set's own); clips of ``frames`` = 32 frames every ``period`` = 2 frames at the file's frame
  rate; videos shorter than ``frames·period`` are zero-padded at the end; training clips start
  uniformly in ``[0, f − (frames−1)·period)`` and are augmented by zero-padding 12 pixels and
  cropping back at an offset uniform in ``[0, 24)`` (per axis);
- **model**: R(2+1)D-18, one output, output bias initialised to 55.6 (EchoNet's mean EF);
  optional initial weights in torchvision's layout (``--init-weights``; the reference starts from
  torchvision's Kinetics-400 weights, which echofast cannot download);
- **training**: MSE on EF (in %), SGD (momentum 0.9, lr 1e-4, weight decay 1e-4), batch 20,
  45 epochs, lr × 0.1 every 15 epochs (``optimizer="adamw"`` is an echofast option for short
  runs); each epoch = ``len(train) // global batch`` steps; after
  each epoch the loss on one random clip per VAL video; the weights with the lowest VAL loss are
  kept (``best.pt``);
- **test**: with the best weights, on the VAL split of ``--val`` and the TEST split of
  ``--test``: one random clip per video, and the mean prediction over *all* clips
  (``f − (frames−1)·period`` starts; test-time augmentation) — the reported numbers;
- **metrics**: R² (``1 − SS_res/SS_tot``), MAE, RMSE, each with a bootstrap interval (10,000
  resamples of the videos, 5th and 95th percentiles: ``echonet.utils.bootstrap``; RMSE's interval
  is the square root of MSE's).

Deliberate differences: the reference drops videos without two traced frames in
VolumeTracings.csv (synthetic sets have none; echofast keeps every row with an EF); randomness
(clip starts, crops, data order) is drawn from seeded generators per (seed, epoch, item), so a run
is reproducible and draws the same clips whatever the number of processes and data-loader workers
(batch-norm statistics still depend on the per-process batch, as under the reference's
``DataParallel``). The evaluation is sharded over processes and gives the same predictions as one
process.

Files in ``--out``: ``ef_config.json``, ``ef_inputs.json`` (digests of the FileLists and initial
weights read), ``log.csv`` (per epoch: train and VAL loss, VAL R², lr),
``checkpoints/epoch-NNN.pt`` (newest only; atomic), ``best.pt``, ``{val,test}_predictions.csv``,
``test_scatter.png``, ``test_bland_altman.png`` and ``results.json`` (written last). Re-running the
same command resumes after an interruption (a different configuration is refused) and, once
``results.json`` exists, only prints it. Multi-GPU: ``torchrun --nproc_per_node N -m echofast
evaluate ef ...`` (DDP; the global batch is ``batch_size × N``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..errors import EchofastError, first_of
from ..fsutil import atomic_write, atomic_write_text

ECHONET_MEAN = (32.660564, 32.79394, 33.07615)
ECHONET_STD = (49.802944, 49.89014, 50.17571)
RESULTS_FORMAT = "echofast-ef-evaluation"
CHECKPOINT_FORMAT = "echofast-ef-checkpoint"
#: Fewest bootstrap resamples accepted by ``evaluate ef`` (5th and 95th percentiles apart).
MIN_BOOTSTRAP = 20


class EvaluationConflict(EchofastError, RuntimeError):
    """The output folder holds a run with another configuration, or a bad checkpoint."""


@dataclass
class EFConfig:
    """Arguments of an EF evaluation run; everything but ``out``, ``num_workers``, ``device`` and
    ``progress`` defines the result (a resumed run must use the same values)."""

    train: str
    test: str
    out: str
    val: str | None = None
    """Dataset whose VAL split selects the best epoch (default: ``test``, as the reference)."""
    epochs: int = 45
    batch_size: int = 20
    optimizer: str = "sgd"
    """``sgd`` (the reference: momentum 0.9) or ``adamw`` (not in the reference; converges in far
    fewer steps, e.g. for small smoke tests)."""
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step_epochs: int = 15
    frames: int = 32
    period: int = 2
    """Sampling period of training clips (the reference uses 1 on 32-fps synthetic data)."""
    test_period: int = 2
    """Sampling period of VAL/TEST clips (the reference hard-codes 2)."""
    pad: int = 12
    normalization: str = "echonet"
    """``echonet`` (EchoNet-Dynamic's constants) or ``train`` (the training set's mean/std)."""
    width: int = 64
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    output_bias: float = 55.6
    init_weights: str | None = None
    allow_pickle: bool = False
    seed: int = 0
    bootstrap: int = 10_000
    num_workers: int = 4
    device: str = "auto"
    progress: bool = True
    NON_IDENTITY: ClassVar[tuple[str, ...]] = ("out", "num_workers", "device", "progress")

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        for k in self.NON_IDENTITY:
            d.pop(k)
        d["layers"] = list(self.layers)
        for k in ("train", "test", "val", "init_weights"):
            if d[k] is not None:
                d[k] = str(Path(d[k]).resolve())
        d["val"] = d["val"] or d["test"]
        return d

    def check(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.frames < 1 or self.period < 1:
            raise ValueError("need epochs >= 0, batch_size >= 1, frames >= 1, period >= 1")
        if self.test_period < 1 or self.pad < 0:
            raise ValueError("need test_period >= 1, pad >= 0")
        if self.bootstrap < MIN_BOOTSTRAP:
            raise ValueError(
                f"--bootstrap {self.bootstrap}: need at least {MIN_BOOTSTRAP} resamples for a "
                f"5th-95th percentile interval (the reference uses 10000)"
            )
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.normalization not in ("echonet", "train"):
            raise ValueError(
                f"normalization must be 'echonet' or 'train', got {self.normalization}"
            )


# ---- data -------------------------------------------------------------------------------------


class EFVideos(Dataset):
    """EF-labelled clips of an EchoNet-layout dataset (the reference's ``echonet.datasets.Echo``).

    ``mode="random"``: item = dict(video float32 (3, frames, H, W) one clip (with the pad-and-crop
    augmentation when ``pad``), ef, name). ``mode="all"``: item = dict(video float32 (3, f', H, W)
    the whole normalised (and end-padded) video, starts LongTensor of every clip start, ef, name).
    Randomness of item ``i``: ``numpy.random.default_rng([seed, epoch, i, stream])``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        frames: int,
        period: int,
        mean: tuple[float, ...] = ECHONET_MEAN,
        std: tuple[float, ...] = ECHONET_STD,
        mode: str = "random",
        pad: int | None = None,
        seed: int = 0,
        stream: int = 0,
    ):
        from ..data.datasets import DatasetError, listed_splits, read_records

        self.root = Path(root)
        filelist = self.root / "FileList.csv"
        labelled = [
            r
            for r in read_records(self.root, split, require_files=False)
            if (r.row.get("EF") or "").strip()
        ]
        bad = [_ef_label_problem(r) for r in labelled if r.ef is None or not 0 <= r.ef <= 100]
        if bad:
            shown = first_of(bad, "; ")
            raise DatasetError(
                f"{filelist}: {len(bad)} {split} row(s) have an EF that is not a percentage "
                f"(a number in 0-100): {shown}"
            )
        missing = [r for r in labelled if not r.path.is_file()]
        if missing:
            raise DatasetError(
                f"{filelist}: {len(missing)} {split} video(s) listed with an EF are missing "
                f"(echonet refuses such a dataset too): {first_of([str(r.path) for r in missing])}"
            )
        self.records = labelled
        if not self.records:
            raise DatasetError(
                f"{filelist}: no {split} videos with an EF (it lists splits "
                f"{listed_splits(self.root)})"
            )
        if mode not in ("random", "all"):
            raise ValueError(f"mode must be 'random' or 'all', got {mode!r}")
        self.frames, self.period, self.mode, self.pad = frames, period, mode, pad or None
        self.set_normalization(mean, std)
        self.seed, self.stream, self.epoch = seed, stream, 0

    def set_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Per-channel pixel mean and std (3 values each)."""
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def _video(self, index: int) -> torch.Tensor:
        from ..io import read_video

        grey = read_video(self.records[index].path)[0].to(torch.float32)
        x = (grey.unsqueeze(0) - self.mean) / self.std  # (3, f, H, W)
        need = self.frames * self.period
        if x.shape[1] < need:
            x = torch.cat([x, x.new_zeros(3, need - x.shape[1], *x.shape[2:])], 1)
        return x

    def starts(self, num_frames: int) -> int:
        """Number of clip starts of a (padded) video of ``num_frames`` frames."""
        return num_frames - (self.frames - 1) * self.period

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        x = self._video(index)
        ef = torch.tensor(rec.ef, dtype=torch.float32)
        if self.mode == "all":
            return {
                "video": x,
                "starts": torch.arange(self.starts(x.shape[1])),
                "ef": ef,
                "name": rec.name,
            }
        rng = np.random.default_rng([self.seed, self.epoch, int(index), self.stream])
        start = int(rng.integers(self.starts(x.shape[1])))
        clip = x[:, start + self.period * torch.arange(self.frames)]
        if self.pad:
            p = self.pad
            c, t, h, w = clip.shape
            padded = clip.new_zeros(c, t, h + 2 * p, w + 2 * p)
            padded[:, :, p : p + h, p : p + w] = clip
            i, j = (int(v) for v in rng.integers(0, 2 * p, 2))
            clip = padded[:, :, i : i + h, j : j + w].contiguous()
        return {"video": clip, "ef": ef, "name": rec.name}


def _ef_label_problem(record) -> str:
    """Why the filled-in EF of a FileList row is unusable: not a finite number, or outside
    0-100 (EF is a percentage)."""
    from ..data.datasets import _ef_problem

    if record.ef is None:
        return _ef_problem(record)
    return (
        f"row {record.row_number} (FileName {record.row.get('FileName')!r}): EF "
        f"{record.row['EF'].strip()!r} is outside 0-100"
    )


def training_mean_std(
    root: str | os.PathLike, samples: int = 128, seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean/std of up to ``samples`` random TRAIN videos (all frames), as
    ``echonet.utils.get_mean_and_std``; grey videos give three equal values."""
    from ..data.datasets import read_records
    from ..io import read_video

    records = read_records(root, "TRAIN")
    rng = np.random.default_rng([seed, 7])
    pick = rng.choice(len(records), min(samples, len(records)), replace=False)
    s1 = s2 = 0.0
    n = 0
    for i in sorted(int(k) for k in pick):
        x = read_video(records[i].path)[0].to(torch.float64)
        s1 += float(x.sum())
        s2 += float((x * x).sum())
        n += x.numel()
    mean = s1 / n
    std = math.sqrt(max(s2 / n - mean * mean, 1e-12))
    return (mean,) * 3, (std,) * 3


# ---- metrics ----------------------------------------------------------------------------------


def r2_score(y: np.ndarray, p: np.ndarray) -> float:
    """Coefficient of determination ``1 − Σ(y−p)²/Σ(y−ȳ)²``; for constant ``y`` scikit-learn's
    finite convention (1.0 for a perfect prediction, else 0.0), which bootstrap resamples of
    small sets can hit."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    ss_res = float(((y - p) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return 1.0 - ss_res / ss_tot


def mean_absolute_error(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.abs(np.asarray(y, np.float64) - np.asarray(p, np.float64)).mean())


def mean_squared_error(y: np.ndarray, p: np.ndarray) -> float:
    return float(((np.asarray(y, np.float64) - np.asarray(p, np.float64)) ** 2).mean())


def bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    func: Callable[[np.ndarray, np.ndarray], float],
    samples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(func(y, p), 5th, 95th percentile of func over resamples)`` as echonet's bootstrap:
    ``samples`` draws of len(y) indices with replacement; the sorted values at positions
    ``round(0.05·samples)`` and ``round(0.95·samples)``, clamped to the last position (echonet
    indexes past the end for ``samples`` <= 10)."""
    if samples < 1:
        raise ValueError(f"bootstrap needs samples >= 1, got {samples}")
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    rng = np.random.default_rng(seed)
    values = sorted(func(y[i], p[i]) for i in rng.integers(0, len(y), (samples, len(y))))
    last = samples - 1
    return (
        func(y, p),
        values[min(round(0.05 * samples), last)],
        values[min(round(0.95 * samples), last)],
    )


def regression_report(
    y: np.ndarray, p: np.ndarray, samples: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """R², MAE and RMSE with bootstrap intervals (``value``, ``ci_low``, ``ci_high``)."""

    def entry(v):
        return {"value": v[0], "ci_low": v[1], "ci_high": v[2]}

    mse = bootstrap(y, p, mean_squared_error, samples, seed)
    return {
        "n": int(len(y)),
        "r2": entry(bootstrap(y, p, r2_score, samples, seed)),
        "mae": entry(bootstrap(y, p, mean_absolute_error, samples, seed)),
        "rmse": entry(tuple(math.sqrt(v) for v in mse)),
    }


# ---- the run ----------------------------------------------------------------------------------


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    folder = out / "checkpoints"
    found = []
    if folder.is_dir():
        for p in folder.glob("epoch-*.pt"):
            try:
                found.append((int(p.stem.split("-")[1]), p))
            except (IndexError, ValueError):
                continue
    return sorted(found)


def _load_ckpt(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported with the file
        raise EvaluationConflict(
            f"{path}: unreadable checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise EvaluationConflict(f"{path}: not an echofast EF-evaluation checkpoint")
    return state


def _save(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


class _Log:
    COLUMNS = ("epoch", "train_loss", "val_loss", "val_r2", "lr", "seconds")

    def __init__(self, path: Path, keep_until: int):
        rows = []
        if path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < keep_until]
        self.path, self.rows = path, rows
        self._flush()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({k: row[k] for k in self.COLUMNS})
        self._flush()

    def _flush(self) -> None:
        lines = [",".join(self.COLUMNS)]
        lines += [",".join(str(r[k]) for k in self.COLUMNS) for r in self.rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def _predict_all(
    model, ds: EFVideos, indices, batch: int, device, workers: int, progress: bool, desc: str
):
    """Mean prediction over all clips of each video in ``indices``: {index: (mean, n_clips)}."""
    from tqdm.auto import tqdm

    loader = DataLoader(
        torch.utils.data.Subset(ds, list(indices)), batch_size=None, num_workers=workers
    )
    out: dict[int, tuple[float, int]] = {}
    frames = torch.arange(ds.frames) * ds.period
    with torch.no_grad():
        for k, item in zip(indices, tqdm(loader, desc=desc, disable=not progress, file=sys.stderr)):
            video = item["video"].to(device)
            preds = []
            for s in range(0, len(item["starts"]), batch):
                starts = item["starts"][s : s + batch]
                idx = (starts[:, None] + frames[None]).to(device)
                clips = video[:, idx].permute(1, 0, 2, 3, 4)  # (n, 3, frames, H, W)
                preds.append(model(clips).view(-1).double().cpu())
            p = torch.cat(preds)
            out[k] = (float(p.mean()), len(p))
    return out


def _predict_one(model, ds: EFVideos, indices, batch: int, device, workers: int):
    """One random clip per video: {index: prediction}."""
    loader = DataLoader(
        torch.utils.data.Subset(ds, list(indices)), batch_size=batch, num_workers=workers
    )
    preds: list[float] = []
    with torch.no_grad():
        for item in loader:
            preds.extend(model(item["video"].to(device)).view(-1).double().cpu().tolist())
    return dict(zip(indices, preds))


def _gather(dist, part: dict) -> dict:
    merged: dict = {}
    for d in dist.gather_objects(part):
        merged.update(d)
    return merged


#: SHA-256 of the files an evaluation read (its datasets' FileList.csv, the initial weights),
#: beside ef_config.json: a dataset regenerated at the same path is another evaluation.
INPUTS_NAME = "ef_inputs.json"


def _videos_digest(root: Path) -> str:
    """sha256 over the name and size of each video ``root``'s FileList lists (-1: missing): a
    dataset regenerated with the same FileList is other data. Sizes, not contents: hashing
    every video would read the whole dataset at each resume."""
    import hashlib

    from ..data.datasets import read_records

    h = hashlib.sha256()
    for r in read_records(root, require_files=False):
        size = r.path.stat().st_size if r.path.is_file() else -1
        h.update(f"{r.name}\0{size}\0".encode())
    return h.hexdigest()


#: ef_inputs.json keys added after the first release of the file: compared only when recorded
_LATER_KEYS = ("train videos", "val videos", "test videos")


def _input_digests(cfg: EFConfig) -> dict[str, str | None]:
    from ..fsutil import sha256_file

    roots = {"train": Path(cfg.train), "val": Path(cfg.val or cfg.test), "test": Path(cfg.test)}
    files = {f"{k} FileList.csv": root / "FileList.csv" for k, root in roots.items()}
    if cfg.init_weights:
        files["init weights"] = Path(cfg.init_weights)
    digests = {k: sha256_file(p) if p.is_file() else None for k, p in files.items()}
    return digests | {f"{k} videos": _videos_digest(root) for k, root in roots.items()}


def _check_inputs(path: Path, cfg: EFConfig) -> None:
    """Refuse to resume or return the results of ``path``'s evaluation when the files it read
    changed since (folders written before echofast recorded them have no such file; those
    written before the videos were recorded are checked for the rest)."""
    if not path.is_file():
        return
    old, now = json.loads(path.read_text()), _input_digests(cfg)
    keys = set(old) | set(now).difference(_LATER_KEYS)
    changed = sorted(k for k in keys if old.get(k) != now.get(k))
    if changed:
        raise EvaluationConflict(
            f"{path.parent} holds an EF evaluation of other data: {', '.join(changed)} changed "
            f"since it ran ({path.name}); choose another --out"
        )


def run_ef_evaluation(cfg: EFConfig) -> dict[str, Any]:
    """Train (or resume) and test; returns the results dict (also ``out/results.json``)."""
    from ..train.loop import Dist

    cfg.check()
    out = Path(cfg.out)
    ident = cfg.identity()
    results_path = out / "results.json"
    config_path = out / "ef_config.json"
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        if old != ident:
            diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            raise EvaluationConflict(
                f"{out} holds an EF evaluation with another configuration (differs in {diff}); "
                "choose another --out"
            )
        _check_inputs(out / INPUTS_NAME, cfg)
        if results_path.is_file():
            return json.loads(results_path.read_text())
    elif out.exists() and not out.is_dir():
        raise EvaluationConflict(f"{out} exists and is not a folder; choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise EvaluationConflict(f"{out} exists, is not empty and holds no EF evaluation")

    dist = Dist(cfg.device)
    finished = False
    try:
        results = _run(cfg, ident, dist, out)
        finished = True
        return results
    finally:
        dist.close(finished=finished)


def _run(cfg: EFConfig, ident: dict[str, Any], dist, out: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ..train.loop import (
        PositionedDataset,
        StreamBatchSampler,
        collate,
        rng_state,
        set_rng_state,
    )
    from .r2plus1d import R2Plus1D, load_backbone

    device = dist.device
    start_time = time.perf_counter()

    # every input is read before the run's identity is written: a wrong path leaves no folder
    val_root = cfg.val or cfg.test
    train_ds = EFVideos(
        cfg.train, "TRAIN", frames=cfg.frames, period=cfg.period, pad=cfg.pad, seed=cfg.seed
    )
    if cfg.normalization == "train":
        mean, std = training_mean_std(cfg.train, seed=cfg.seed)
    else:
        mean, std = ECHONET_MEAN, ECHONET_STD
    train_ds.set_normalization(mean, std)
    common = dict(frames=cfg.frames, mean=mean, std=std, seed=cfg.seed)
    val_ds = EFVideos(val_root, "VAL", period=cfg.test_period, stream=1, **common)
    EFVideos(cfg.test, "TEST", period=cfg.test_period, **common)  # tested after training

    torch.manual_seed(cfg.seed)
    model = R2Plus1D(1, width=cfg.width, layers=tuple(cfg.layers), output_bias=cfg.output_bias)
    if cfg.init_weights:
        load_backbone(model, cfg.init_weights, allow_pickle=cfg.allow_pickle)
    model.to(device)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out / "ef_config.json", json.dumps(ident, indent=2, sort_keys=True) + "\n"
        )
        inputs = json.dumps(_input_digests(cfg), indent=2, sort_keys=True)
        atomic_write_text(out / INPUTS_NAME, inputs + "\n")
    dist.barrier()
    if cfg.optimizer == "sgd":
        optim = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(optim, max(1, cfg.lr_step_epochs))

    global_batch = cfg.batch_size * dist.world
    steps_per_epoch = max(1, len(train_ds) // global_batch)
    start_epoch, best_loss = 0, math.inf
    found = _checkpoints(out)
    if found:
        state = _load_ckpt(found[-1][1])
        if state["config"] != ident:
            raise EvaluationConflict(f"{found[-1][1]}: made with another configuration")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best_loss = int(state["epoch"]) + 1, float(state["best_val_loss"])
        if len(state["rng"]) == dist.world:
            set_rng_state(state["rng"][dist.rank])

    net = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = StreamBatchSampler(
        len(train_ds),
        batch_size=cfg.batch_size,
        world=dist.world,
        rank=dist.rank,
        seed=cfg.seed,
        start_step=start_epoch * steps_per_epoch,
    )
    loader = DataLoader(
        PositionedDataset(train_ds, cfg.seed),
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    log = _Log(out / "log.csv", start_epoch) if dist.main else None
    mine = list(range(dist.rank, len(val_ds), dist.world))
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            net.train()
            total = torch.zeros(2, dtype=torch.float64, device=device)
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {epoch}",
                file=sys.stderr,
                disable=not (cfg.progress and dist.main),
            )
            for _ in bar:
                _, item = next(batches)
                x, y = item["video"].to(device), item["ef"].to(device)
                loss = F.mse_loss(net(x).view(-1), y)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                total += torch.stack(
                    [
                        loss.detach().double() * len(y),
                        torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                    ]
                )
                bar.set_postfix(loss=f"{loss.item():.3g}", refresh=False)
            train_loss = float(dist.all_reduce_mean(total)[0] / max(float(total[1]), 1))
            lr = optim.param_groups[0]["lr"]
            sched.step()
            # VAL: one random clip per video (new clips every epoch)
            model.eval()
            val_ds.set_epoch(epoch)
            preds = _gather(
                dist, _predict_one(model, val_ds, mine, cfg.batch_size, device, cfg.num_workers)
            )
            y = np.array([val_ds.records[i].ef for i in sorted(preds)])
            p = np.array([preds[i] for i in sorted(preds)])
            val_loss, val_r2 = mean_squared_error(y, p), r2_score(y, p)
            improved = val_loss < best_loss
            best_loss = min(best_loss, val_loss)
            rngs = dist.gather_objects(rng_state())
            if dist.main:
                # the log row first: a checkpoint of epoch e implies log rows 0..e
                log.add(
                    {
                        "epoch": epoch,
                        "train_loss": train_loss,
                        "val_loss": val_loss,
                        "val_r2": val_r2,
                        "lr": lr,
                        "seconds": round(time.perf_counter() - t0, 3),
                    }
                )
                payload = {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch,
                    "config": ident,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optim.state_dict(),
                    "scheduler": sched.state_dict(),
                    "best_val_loss": best_loss,
                    "val_loss": val_loss,
                    "mean": list(mean),
                    "std": list(std),
                    "rng": rngs,
                    "echofast_version": __version__,
                }
                if improved:
                    _save(out / "best.pt", payload)
                _save(out / "checkpoints" / f"epoch-{epoch:03d}.pt", payload)
                for _, old in _checkpoints(out)[:-1]:
                    old.unlink(missing_ok=True)
            dist.barrier()
    finally:
        del batches

    # ---- test with the best weights -------------------------------------------------------
    best_path = out / "best.pt"
    if best_path.is_file():
        model.load_state_dict(_load_ckpt(best_path)["model"])
    model.eval()
    results: dict[str, Any] = {}
    for split, root in (("val", val_root), ("test", cfg.test)):
        one_ds = EFVideos(root, split.upper(), period=cfg.test_period, stream=2, **common)
        all_ds = EFVideos(root, split.upper(), period=cfg.test_period, mode="all", **common)
        idx = list(range(dist.rank, len(all_ds), dist.world))
        one = _gather(
            dist, _predict_one(model, one_ds, idx, cfg.batch_size, device, cfg.num_workers)
        )
        every = _gather(
            dist,
            _predict_all(
                model,
                all_ds,
                idx,
                cfg.batch_size,
                device,
                cfg.num_workers,
                cfg.progress and dist.main,
                f"test {split}",
            ),
        )
        if not dist.main:
            continue
        order = sorted(every)
        y = np.array([all_ds.records[i].ef for i in order])
        p_all = np.array([every[i][0] for i in order])
        p_one = np.array([one[i] for i in order])
        results[split] = {
            "dataset": str(Path(root).resolve()),
            "all_clips": regression_report(y, p_all, cfg.bootstrap, cfg.seed),
            "one_clip": regression_report(y, p_one, cfg.bootstrap, cfg.seed),
        }
        rows = ["FileName,EF,Predicted,Clips,PredictedOneClip"]
        rows += [
            f"{all_ds.records[i].name},{all_ds.records[i].ef},{every[i][0]:.4f},{every[i][1]},"
            f"{one[i]:.4f}"
            for i in order
        ]
        atomic_write_text(out / f"{split}_predictions.csv", "\n".join(rows) + "\n")
        if split == "test":
            from ..figures import bland_altman_png, save_png, scatter_png

            r2 = results[split]["all_clips"]["r2"]["value"]
            title = f"TEST, ALL CLIPS: R² {r2:.3f}, N {len(y)}"
            save_png(out / "test_scatter.png", scatter_png(y, p_all, title))
            save_png(out / "test_bland_altman.png", bland_altman_png(y, p_all, title))
    summary: dict[str, Any] = {}
    if dist.main:
        best = _load_ckpt(best_path) if best_path.is_file() else None
        summary = {
            "format": RESULTS_FORMAT,
            "version": 1,
            "config": ident,
            "train_videos": len(train_ds),
            "best_epoch": None if best is None else int(best["epoch"]),
            "best_val_loss": None if best is None else float(best["val_loss"]),
            "normalization": {"mean": list(mean), "std": list(std)},
            "results": results,
            "figures": {"scatter": "test_scatter.png", "bland_altman": "test_bland_altman.png"},
            "predictions": {"val": "val_predictions.csv", "test": "test_predictions.csv"},
            "ci": f"bootstrap over videos, {cfg.bootstrap} resamples, 5th-95th percentile "
            "(echonet.utils.bootstrap); RMSE interval = sqrt of the MSE interval",
            "world_size": dist.world,
            "echofast_version": __version__,
            "seconds": round(time.perf_counter() - start_time, 3),
        }
        atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    return summary


# ---- command line -----------------------------------------------------------------------------


def main_evaluate(argv: list[str]) -> int:
    """``echofast evaluate ef``: the EchoNet-Dynamic EF regression downstream task."""
    import argparse

    p = argparse.ArgumentParser(
        prog="echofast evaluate",
        description="Downstream evaluation of a (synthetic) dataset. `ef`: train an R(2+1)D EF "
        "regressor on --train (EchoNet-Dynamic protocol) and report R², MAE and RMSE with "
        "bootstrap intervals on --test; resumable (re-run the same command); DDP under torchrun.",
    )
    sub = p.add_subparsers(dest="task", required=True)
    e = sub.add_parser("ef", help="EF regression (train on --train, test on --test)")
    d = EFConfig(train="", test="", out="")
    e.add_argument("--train", required=True, help="training dataset (its TRAIN split)")
    e.add_argument("--test", required=True, help="test dataset (its TEST split)")
    e.add_argument("--val", help="dataset whose VAL split picks the best epoch (default --test)")
    e.add_argument("--out", required=True, help="output folder (resumable)")
    e.add_argument("--epochs", type=int, default=d.epochs, help=f"({d.epochs})")
    e.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"per process ({d.batch_size})"
    )
    e.add_argument(
        "--optimizer",
        choices=("sgd", "adamw"),
        default=d.optimizer,
        help="sgd (the reference's, momentum 0.9) or adamw (faster for small runs)",
    )
    e.add_argument("--lr", type=float, default=d.lr, help=f"learning rate ({d.lr})")
    e.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"({d.weight_decay})")
    e.add_argument(
        "--lr-step-epochs",
        type=int,
        default=d.lr_step_epochs,
        help=f"lr x 0.1 every this many epochs ({d.lr_step_epochs})",
    )
    e.add_argument("--frames", type=int, default=d.frames, help=f"frames per clip ({d.frames})")
    e.add_argument(
        "--period",
        type=int,
        default=d.period,
        help=f"training clip sampling period ({d.period}; the reference uses 1 for "
        "32-fps synthetic videos)",
    )
    e.add_argument(
        "--test-period",
        type=int,
        default=d.test_period,
        help=f"VAL/TEST sampling period ({d.test_period})",
    )
    e.add_argument("--pad", type=int, default=d.pad, help=f"pad-and-crop augmentation ({d.pad})")
    e.add_argument(
        "--normalization",
        choices=("echonet", "train"),
        default=d.normalization,
        help="pixel mean/std: EchoNet-Dynamic's constants or the training set's",
    )
    e.add_argument("--width", type=int, default=d.width, help=f"R(2+1)D base width ({d.width})")
    e.add_argument("--layers", default="2,2,2,2", help="blocks per stage (2,2,2,2 = R(2+1)D-18)")
    e.add_argument(
        "--output-bias",
        type=float,
        default=d.output_bias,
        help=f"initial output bias ({d.output_bias}, EchoNet's mean EF)",
    )
    e.add_argument("--init-weights", help="torchvision-layout r2plus1d_18 weights to start from")
    e.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a pickled --init-weights with torch.load(weights_only=True)",
    )
    e.add_argument("--seed", type=int, default=d.seed)
    e.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples")
    e.add_argument("--num-workers", type=int, default=d.num_workers)
    e.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    e.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        layers = tuple(int(v) for v in a.layers.split(","))
    except ValueError:
        layers = ()
    if len(layers) != 4:
        raise ValueError(f"--layers needs 4 comma-separated counts, got {a.layers!r}")
    cfg = EFConfig(
        train=a.train,
        test=a.test,
        val=a.val,
        out=a.out,
        epochs=a.epochs,
        batch_size=a.batch_size,
        optimizer=a.optimizer,
        lr=a.lr,
        weight_decay=a.weight_decay,
        lr_step_epochs=a.lr_step_epochs,
        frames=a.frames,
        period=a.period,
        test_period=a.test_period,
        pad=a.pad,
        normalization=a.normalization,
        width=a.width,
        layers=layers,
        output_bias=a.output_bias,
        init_weights=a.init_weights,
        allow_pickle=a.allow_pickle,
        seed=a.seed,
        bootstrap=a.bootstrap,
        num_workers=a.num_workers,
        device=a.device,
        progress=not a.no_progress,
    )
    summary = run_ef_evaluation(cfg)
    if summary:
        test = summary["results"]["test"]["all_clips"]
        brief = {k: test[k]["value"] for k in ("r2", "mae", "rmse")}
        print(json.dumps({"out": str(Path(cfg.out) / "results.json"), "test_all_clips": brief}))
    return 0
