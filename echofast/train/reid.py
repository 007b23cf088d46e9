"""``echofast train reid``: the privacy filter's re-identification model on a latent dataset.

The reference recipe (``echosyn/privacy/train.py`` with ``config_<dataset>.json``): pairs as in
:mod:`echofast.privacy.data` (one pair per TRAIN video per epoch, anchors in a seeded random
order; same video, another frame = 1; another video = 0), BCE-with-logits on the pair head,
Adam (lr 1e-4), batch 128, up to 1,000 epochs, early stopping when the validation loss (fixed,
seeded VAL pairs) has not improved for 50 epochs, the best-validation weights kept. Fixed from the
reference (whose test step crashed): the test-split ROC AUC with a bootstrap 95% CI (10,000
resamples) is computed with the best weights and saved beside them.

Config (TOML/JSON/YAML; only what differs from these defaults)::

    seed = 42
    output_dir = "runs/reid"
    name = "reidentification"       # the exported model folder: <output_dir>/<name>/

    [model]
    architecture = "ResNet-50"      # or "ResNet" with layers/width below (small test models)
    layers = [3, 4, 6, 3]
    width = 64
    n_features = 128
    normalization = "frame"         # frame | clip (the reference's "pmone" per video) |
                                    #  channel (per frame and channel)
    init_weights = ""               # safetensors file to start from (e.g. ImageNet ResNet-50
                                    #  converted); random initialisation otherwise

    [data]
    root = ""                       # latent dataset (echofast encode): TRAIN/VAL/TEST splits
    pairs_per_video = 1             # training pairs per TRAIN video per epoch
    eval_pairs_per_video = 1        # VAL and TEST pairs per video (fixed, seeded)

    [augment]                       # echofast addition (the reference has none): edited
    enabled = false                 #  frames in training pairs, so that the filter also catches
    max_shift = 0                   #  lightly edited copies of real frames (privacy-audit);
    gain = 0.1                      #  see echofast.privacy.data.Augmentation and README,
    offset = 0.1                    #  Privacy (shifts are better left to the filter's
    noise = 0.05                    #  shift tolerance: measured)
    copy_positives = 0.0            # share of positives that pair a frame with itself (edited)

    [optim]
    lr = 1e-4                       # Adam, as the reference

    [train]
    batch_size = 128
    max_epochs = 1000
    patience = 50                   # early stopping on the validation loss; 0 = never stop
    device = "auto"                 # auto | cpu | cuda
    checkpoint_every = 1            # epochs
    keep_checkpoints = 2
    progress = true

    [eval]
    bootstrap = 10000
    ci = 0.95

Output folder: ``train_config.json``, ``checkpoints/epoch-N.pt`` (model, best model, optimizer,
early-stopping state, history; atomically), ``log.csv`` (epoch, train_loss, val_loss, time),
``loss.png`` (validation loss per epoch), and ``<name>/``: ``config.json``,
``<name>_best_network.safetensors`` (the best weights), ``evaluation.json`` (test AUC + CI,
pairs, best epoch) and ``test_scores.csv``. ``--resume`` continues from the newest checkpoint
exactly (pairs are seeded by (seed, epoch, position), so a resumed run equals an uninterrupted
one); resuming a finished run only redoes the evaluation and export.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError, NonFiniteError
from ..fsutil import atomic_folder, atomic_write, atomic_write_text
from .config import _fill, config_changes, read_config_with_overrides
from .loop import TrainingConflict, write_loss_plot

CHECKPOINT_FORMAT = "echofast-reid-checkpoint"
CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"^epoch-(\d+)\.pt$")
RESUMABLE = frozenset(
    {
        "output_dir",
        "data.root",
        "train.max_epochs",
        "train.device",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.progress",
    }
)


@dataclass
class ReidModelSection:
    architecture: str = "ResNet-50"
    layers: list = field(default_factory=lambda: [3, 4, 6, 3])
    width: int = 64
    n_features: int = 128
    normalization: str = "frame"
    init_weights: str = ""


@dataclass
class ReidDataSection:
    root: str = ""
    pairs_per_video: int = 1
    eval_pairs_per_video: int = 1


@dataclass
class ReidAugmentSection:
    enabled: bool = False
    max_shift: int = 0
    gain: float = 0.1
    offset: float = 0.1
    noise: float = 0.05
    copy_positives: float = 0.0

    def augmentation(self):
        """The :class:`~echofast.privacy.data.Augmentation`, or None when disabled."""
        from ..privacy.data import Augmentation

        if not self.enabled:
            return None
        fields = dataclasses.asdict(self)
        fields.pop("enabled")
        return Augmentation(**fields)


@dataclass
class ReidOptimSection:
    lr: float = 1e-4


@dataclass
class ReidTrainSection:
    batch_size: int = 128
    max_epochs: int = 1000
    patience: int = 50
    device: str = "auto"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass
class ReidEvalSection:
    bootstrap: int = 10_000
    ci: float = 0.95


@dataclass
class ReidConfig:
    seed: int = 42
    output_dir: str = "runs/reid"
    name: str = "reidentification"
    model: ReidModelSection = field(default_factory=ReidModelSection)
    data: ReidDataSection = field(default_factory=ReidDataSection)
    augment: ReidAugmentSection = field(default_factory=ReidAugmentSection)
    optim: ReidOptimSection = field(default_factory=ReidOptimSection)
    train: ReidTrainSection = field(default_factory=ReidTrainSection)
    eval: ReidEvalSection = field(default_factory=ReidEvalSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = ("model", "data", "augment", "optim", "train", "eval")
#: Entries of output_dir that the run writes itself: not usable as ``name``.
_RESERVED_NAMES = frozenset({"checkpoints", "log.csv", "loss.png", "train_config.json"})


def reid_config_from_dict(data: dict[str, Any], *, source: str = "config") -> ReidConfig:
    """Defaults overridden by ``data``; unknown keys and bad values raise ConfigError naming
    them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of settings")
    cfg = ReidConfig()
    unknown: list[str] = []
    for key, value in data.items():
        if key in ("seed", "output_dir", "name"):
            default = getattr(cfg, key)
            ok = isinstance(value, type(default)) and not isinstance(value, bool)
            if not ok:
                raise ConfigError(
                    f"{source}: config key {key!r}: expected {type(default).__name__}, "
                    f"got {value!r}"
                )
            setattr(cfg, key, value)
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key!r} must be a table, got {value!r}")
            value = dict(value)
            if key == "model" and "layers" in value:
                cfg.model.layers = value.pop("layers")
            _fill(getattr(cfg, key), value, key, unknown, source)
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {unknown}")
    _validate(cfg, source)
    return cfg


def _validate(cfg: ReidConfig, source: str) -> None:
    def fail(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"{source}: config key {key!r}: value {value!r} {why}")

    m = cfg.model
    if m.architecture not in ("ResNet-50", "ResNet"):
        fail("model.architecture", m.architecture, "is not supported (ResNet-50 or ResNet)")
    if not (
        isinstance(m.layers, list)
        and len(m.layers) == 4
        and all(isinstance(v, int) and v > 0 for v in m.layers)
    ):
        fail("model.layers", m.layers, "must be 4 positive integers")
    if m.architecture == "ResNet-50" and (m.layers != [3, 4, 6, 3] or m.width != 64):
        fail(
            "model.architecture",
            m.architecture,
            "fixes layers [3, 4, 6, 3] and width 64; use 'ResNet'",
        )
    if m.normalization not in ("frame", "clip", "channel"):
        fail("model.normalization", m.normalization, "is not supported (frame, clip, channel)")
    if m.init_weights and not Path(m.init_weights).is_file():
        fail("model.init_weights", m.init_weights, "is not a file")
    for key, value in (
        ("model.width", m.width),
        ("model.n_features", m.n_features),
        ("data.pairs_per_video", cfg.data.pairs_per_video),
        ("data.eval_pairs_per_video", cfg.data.eval_pairs_per_video),
        ("train.batch_size", cfg.train.batch_size),
        ("train.max_epochs", cfg.train.max_epochs),
        ("train.checkpoint_every", cfg.train.checkpoint_every),
        ("eval.bootstrap", cfg.eval.bootstrap),
    ):
        if value < 1:
            fail(key, value, "must be >= 1")
    if cfg.train.batch_size < 2:
        fail("train.batch_size", cfg.train.batch_size, "must be >= 2 (batch norm)")
    if cfg.train.patience < 0 or cfg.train.keep_checkpoints < 0:
        fail("train.patience", cfg.train.patience, "and train.keep_checkpoints must be >= 0")
    a = cfg.augment
    if a.max_shift < 0:
        fail("augment.max_shift", a.max_shift, "must be >= 0")
    for key, value in (("augment.gain", a.gain), ("augment.offset", a.offset)):
        if not 0 <= value < 1:
            fail(key, value, "must be in [0, 1)")
    if not a.noise >= 0:
        fail("augment.noise", a.noise, "must be >= 0")
    if not 0 <= a.copy_positives <= 1:
        fail("augment.copy_positives", a.copy_positives, "must be in [0, 1]")
    if not cfg.optim.lr > 0:
        fail("optim.lr", cfg.optim.lr, "must be positive")
    if not 0 < cfg.eval.ci < 1:
        fail("eval.ci", cfg.eval.ci, "must be in (0, 1)")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        fail("train.device", cfg.train.device, "is not supported (auto, cpu, cuda)")
    if not cfg.data.root:
        fail("data.root", cfg.data.root, "must name a latent dataset (echofast encode)")
    if (
        cfg.name in ("", ".", "..")
        or cfg.name != cfg.name.strip()
        or any(c in cfg.name for c in "/\\")
        or any(ord(c) < 32 for c in cfg.name)
    ):
        fail(
            "name",
            cfg.name,
            "must be a plain folder name inside output_dir (not '.' or '..'; no path "
            "separators, NUL or other control characters, or surrounding spaces)",
        )
    if cfg.name in _RESERVED_NAMES:
        fail("name", cfg.name, f"is used by the run itself ({sorted(_RESERVED_NAMES)})")


def load_reid_config(
    path: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    flags: list[str] | tuple[str, ...] = (),
) -> ReidConfig:
    """Read a config file, or a packaged one by name (``reid``, ``reid_phantom``: see
    :func:`~echofast.train.config.config_path`), and apply ``key=value`` overrides. Errors name
    the file, and the overrides when there are some; ``flags`` as in
    :func:`~echofast.train.config.load_config`."""
    data, source = read_config_with_overrides(path, overrides, flags=flags)
    return reid_config_from_dict(data, source=source)


# ---- helpers ---------------------------------------------------------------------------------


def build_reid_model(cfg: ReidConfig):
    from ..privacy.model import ReIdentificationModel, load_init_weights

    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = ReIdentificationModel(
        n_channels=4,
        n_features=m.n_features,
        layers=tuple(m.layers),
        width=m.width,
        normalization=m.normalization,
    )
    if m.init_weights:
        load_init_weights(model, m.init_weights)
    return model


class EarlyStopping:
    """The reference's rule: stop once the validation loss has not improved (strictly) on its
    best for ``patience`` epochs (never with patience 0); a NaN loss stops."""

    def __init__(self, patience: int, best: float | None = None, bad: int = 0):
        self.patience, self.best, self.bad = patience, best, bad

    def step(self, value: float) -> bool:
        if self.patience == 0:
            return False
        if self.best is None:
            self.best = value
            return False
        if math.isnan(value):
            return True
        if value < self.best:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.bad >= self.patience


def _batches(n: int, batch_size: int) -> list[range]:
    """Consecutive batches; a last batch of one item joins the previous one (batch norm needs
    two samples in training mode)."""
    out = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] = range(out[-2].start, out[-1].stop)
        out.pop()
    return out


def _stack(pairs, idx: range):
    items = [pairs[i] for i in idx]
    return (
        torch.stack([a for a, _, _ in items]),
        torch.stack([b for _, b, _ in items]),
        torch.stack([y for _, _, y in items]).float(),
    )


def list_reid_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported with the file
        raise TrainingConflict(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingConflict(f"{path}: not an echofast re-identification checkpoint")
    return state


def _device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device': 'cuda' requested, but CUDA is not available")
    return torch.device("cuda" if pref in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


# ---- the trainer -----------------------------------------------------------------------------


def train_reid(cfg: ReidConfig, *, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or continue) a re-identification model; returns a summary dict."""
    from ..privacy.data import LatentClips, PairDataset
    from ..privacy.filter import evaluate_reid

    out = Path(cfg.output_dir)
    found = list_reid_checkpoints(out)
    ckpt = None
    if resume is not None and str(resume) != "latest":
        ckpt = Path(resume)
    elif resume is not None:
        ckpt = found[-1][1] if found else None
    elif found:
        raise TrainingConflict(
            f"{out}: holds checkpoints of a run; continue it with --resume, or choose "
            "another output_dir"
        )
    state = _load_checkpoint(ckpt) if ckpt is not None else None
    if state is not None:
        changed = [k for k in config_changes(state["config"], cfg.to_dict()) if k not in RESUMABLE]
        if changed:
            raise TrainingConflict(
                f"{ckpt}: the config differs from the checkpoint's in {changed} (only "
                f"{sorted(RESUMABLE)} may change when resuming)"
            )
    device = _device(cfg.train.device)
    norm = cfg.model.normalization
    train_clips = LatentClips(cfg.data.root, "TRAIN", normalization=norm)
    val_clips = LatentClips(cfg.data.root, "VAL", normalization=norm)
    test_clips = LatentClips(cfg.data.root, "TEST", normalization=norm)
    train_pairs = PairDataset(
        train_clips,
        seed=cfg.seed,
        pairs_per_video=cfg.data.pairs_per_video,
        augmentation=cfg.augment.augmentation(),
    )
    val_pairs = PairDataset(
        val_clips, seed=cfg.seed + 1, pairs_per_video=cfg.data.eval_pairs_per_video, shuffle=False
    )

    model = build_reid_model(cfg).to(device)
    best = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    es = EarlyStopping(cfg.train.patience)
    best_loss, best_epoch, epoch, stopped, elapsed0 = float("inf"), 0, 0, False, 0.0
    history: list[list[float]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        best.load_state_dict(state["best_model"])
        optimizer.load_state_dict(state["optimizer"])
        es = EarlyStopping(cfg.train.patience, state["es_best"], state["es_bad"])
        best_loss, best_epoch = state["best_loss"], state["best_epoch"]
        epoch, stopped, elapsed0 = state["epoch"], state["stopped"], state["elapsed"]
        history = [list(h) for h in state["history"]]

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / "train_config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    )
    bar = None
    if cfg.train.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.train.max_epochs,
            initial=epoch,
            desc="train reid",
            unit="epoch",
            file=sys.stderr,
        )
    t0 = time.time()
    try:
        while epoch < cfg.train.max_epochs and not stopped:
            train_pairs.set_epoch(epoch)
            model.train()
            losses = []
            for idx in _batches(len(train_pairs), cfg.train.batch_size):
                x1, x2, y = _stack(train_pairs, idx)
                logits = model(x1.to(device), x2.to(device)).reshape(-1)
                loss = loss_fn(logits, y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            model.eval()
            with torch.no_grad():
                val = []
                for idx in _batches(len(val_pairs), cfg.train.batch_size):
                    x1, x2, y = _stack(val_pairs, idx)
                    logits = model(x1.to(device), x2.to(device)).reshape(-1)
                    val.append(float(loss_fn(logits, y.to(device))))
            train_loss, val_loss = float(np.mean(losses)), float(np.mean(val))
            if not math.isfinite(train_loss):
                raise NonFiniteError(
                    f"{out}: training loss is not finite ({train_loss}) in epoch {epoch + 1} "
                    "(try a lower optim.lr); the epoch was not saved"
                )
            epoch += 1
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best.load_state_dict(model.state_dict())
            stopped = es.step(val_loss)
            elapsed = elapsed0 + time.time() - t0
            history.append([epoch, train_loss, val_loss, round(elapsed, 3)])
            if bar is not None:
                bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", refresh=False)
                bar.update(1)
            if epoch % cfg.train.checkpoint_every == 0 or stopped or epoch == cfg.train.max_epochs:
                _save_checkpoint(
                    out,
                    cfg,
                    epoch,
                    model,
                    best,
                    optimizer,
                    es,
                    best_loss,
                    best_epoch,
                    stopped,
                    elapsed,
                    history,
                )
    finally:
        if bar is not None:
            bar.close()
    _write_log(out, history)

    from ..privacy.filter import reference_digest
    from ..privacy.model import EVALUATION_NAME

    result, labels, scores = evaluate_reid(
        best,
        test_clips,
        seed=cfg.seed + 2,
        pairs_per_video=cfg.data.eval_pairs_per_video,
        n_bootstrap=cfg.eval.bootstrap,
        ci=cfg.eval.ci,
        device=device,
    )
    evaluation = {
        "test_auc": result.to_dict(),
        "test_split": "TEST",
        "test_clips": len(test_clips),
        "reference_digest": reference_digest(cfg.data.root),
        "pairs_per_video": cfg.data.eval_pairs_per_video,
        "protocol": "reference pairs (same video, other frame = 1; other video = 0), fixed "
        f"seed {cfg.seed + 2}; score = sigmoid(logit); bootstrap resamples pairs",
        "best_epoch": best_epoch,
        "best_val_loss": best_loss,
        "epochs_run": epoch,
        "stopped_early": bool(stopped and epoch < cfg.train.max_epochs),
        "data_root": str(Path(cfg.data.root).resolve()),
        "echofast_version": __version__,
    }
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "score"])
    w.writerows([[int(y), repr(float(s))] for y, s in zip(labels, scores)])

    def fill(tmp: Path) -> None:
        extra = {"echofast_training": cfg.to_dict()}
        best.save_pretrained(tmp, extra_config=extra, name=cfg.name)
        text = json.dumps(evaluation, indent=2, sort_keys=True) + "\n"
        atomic_write_text(tmp / EVALUATION_NAME, text)
        atomic_write_text(tmp / "test_scores.csv", buf.getvalue())

    folder = atomic_folder(out / cfg.name, fill)
    return {
        "epochs": epoch,
        "best_epoch": best_epoch,
        "best_val_loss": best_loss,
        "stopped_early": evaluation["stopped_early"],
        "test_auc": result.auc,
        "ci": (result.ci_low, result.ci_high),
        "model": str(folder),
    }


def _save_checkpoint(
    out, cfg, epoch, model, best, optimizer, es, best_loss, best_epoch, stopped, elapsed, history
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "echofast_version": __version__,
        "epoch": epoch,
        "config": cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "best_model": {k: v.detach().cpu() for k, v in best.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "es_best": es.best,
        "es_bad": es.bad,
        "best_loss": best_loss,
        "best_epoch": best_epoch,
        "stopped": stopped,
        "elapsed": elapsed,
        "history": history,
    }
    path = out / "checkpoints" / f"epoch-{epoch:06d}.pt"
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    if cfg.train.keep_checkpoints:
        for _, old in list_reid_checkpoints(out)[: -cfg.train.keep_checkpoints]:
            old.unlink(missing_ok=True)


def _write_log(out: Path, history: list[list[float]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["epoch", "train_loss", "val_loss", "time"])
    w.writerows([[int(e), repr(tr), repr(va), repr(t)] for e, tr, va, t in history])
    atomic_write_text(out / "log.csv", buf.getvalue())
    if history:
        write_loss_plot(out / "loss.png", [int(h[0]) for h in history], [h[2] for h in history])


def main_train_reid(argv: list[str]) -> int:
    """``echofast train reid --config FILE [--resume] [--set KEY=VALUE]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="echofast train reid",
        description="Train the privacy filter's re-identification model on a latent dataset "
        "(echofast encode) with the reference recipe; saves the best weights with their "
        "test ROC AUC and bootstrap CI. Resumable.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="TOML, JSON or YAML config file, or a packaged config by name (reid, reid_phantom)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CKPT",
        help="continue from CKPT (default: newest)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    flags = ["train.progress=false"] if a.no_progress else []
    cfg = load_reid_config(a.config, a.set, flags=flags)
    s = train_reid(cfg, resume=a.resume)
    print(
        f"{cfg.output_dir}: {s['epochs']} epoch(s), best val loss {s['best_val_loss']:.5g} "
        "at epoch "
        f"{s['best_epoch']}{' (early stop)' if s['stopped_early'] else ''}; test AUC "
        f"{s['test_auc']:.4f} (95% CI {s['ci'][0]:.4f}-{s['ci'][1]:.4f}); model in {s['model']}"
    )
    return 0
