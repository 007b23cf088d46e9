"""The training loop shared by the VAE, LIDM and LVDM trainers.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` samples on each of the
``world`` ranks: a global batch of ``G = batch_size · world · grad_accum`` samples.

Data order. The run reads an endless stream of dataset indices: the concatenation of one
permutation per epoch (epoch ``e``'s is ``randperm`` from ``sample_seed(seed, e, "epoch")``).
Optimizer step ``s`` takes stream positions ``[s·G, (s+1)·G)``; its micro-batch ``a`` on rank
``r`` takes the ``batch_size`` positions starting at ``s·G + (a·world + r)·batch_size``. So the
samples of a global batch, and every random number drawn for them (seeded by their position),
are the same for any split of ``G`` into ranks × accumulation × batch, and the sampler's
position after ``s`` steps is simply ``s·G``: resuming needs no data-loader state. Items are
fetched with torch's, NumPy's and Python's global RNGs seeded from the position (stream
``"data"``), so a dataset that draws random windows/frames from them is reproducible too; a
dataset with ``set_epoch`` (``echofast.data.datasets``, seeded per (seed, epoch, index)) gets
epoch ``position // len(dataset)``.
A batch may straddle two epochs.

Per step: forward/backward per micro-batch (loss / grad_accum; DDP syncs on the last one), fp16
GradScaler unscale, grad-norm clip of the model's parameters (``optim.max_grad_norm``, 0 = off;
the VAE's discriminator is not clipped, as in LDM), AdamW step(s), LR schedule
step (linear warm-up from 0 over ``optim.warmup_steps``, then constant: diffusers'
``constant_with_warmup``; not stepped when fp16 skips a step), EMA update (every step, as the
reference). Ranks: ``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the process group
uses ``env://`` with NCCL on CUDA and Gloo on CPU. Multi-node runs need ``output_dir`` on a
shared filesystem (every rank reads the checkpoint to resume).

Files in ``output_dir``: ``train_config.json`` (resolved config), ``checkpoints/step-N.pt``
(written atomically: model, EMA, optimizer(s), LR schedule(s), GradScaler, step, every rank's
RNG states, sampler position, config), ``log.csv`` (step, loss, lr, time [s], extra terms; loss
is the mean over the ``log_every`` steps ending at ``step``, over all ranks), ``loss.png`` (loss
curve, written at the end) and ``export/`` (the released weights, a diffusers folder with the
training noise schedule for the LIDM/LVDM, replaced as a whole: see :func:`export_checkpoint`).
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from .. import __version__
from ..errors import ConfigError, EchofastError, NonFiniteError
from ..figures import write_loss_plot
from ..fsutil import atomic_folder, atomic_write
from ..models.provenance import EXPORT_INFO_NAME
from ..rng import sample_seed
from ..schedulers import CONFIG_NAME as SCHEDULER_CONFIG_NAME
from ..weights_io import check_state_dict
from .config import RESUMABLE_CHANGES, TrainConfig, config_changes, config_from_dict, save_config
from .ema import EMA
from .objectives import build_objective

CHECKPOINT_FORMAT = "echofast-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LOG_NAME = "log.csv"
PLOT_NAME = "loss.png"
EXPORT_DIR = "export"
_CKPT_RE = re.compile(r"^step-(\d+)\.pt$")


class TrainingConflict(EchofastError, RuntimeError):
    """``output_dir`` holds another run, or a checkpoint does not fit the config."""


def model_class(model_type: str):
    from ..models import LIDM, LVDM, VAE

    return {"vae": VAE, "lidm": LIDM, "lvdm": LVDM}[model_type]


# ---- data ------------------------------------------------------------------------------------


class StreamBatchSampler:
    """Micro-batches of ``(position, index)`` pairs for one rank, from ``start_step`` on, forever.

    See the module docstring for the layout of the stream.
    """

    def __init__(
        self,
        num_items: int,
        *,
        batch_size: int,
        world: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ):
        if num_items < 1:
            raise ValueError("the training dataset is empty")
        self.n = num_items
        self.batch, self.world, self.rank, self.accum = batch_size, world, rank, grad_accum
        self.seed, self.start_step = seed, start_step
        self.global_batch = batch_size * world * grad_accum
        self._perms: dict[int, torch.Tensor] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, "epoch"))
            perm = torch.randperm(self.n, generator=g)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return int(perm[offset])

    def positions(self, step: int, micro: int) -> range:
        start = step * self.global_batch + (micro * self.world + self.rank) * self.batch
        return range(start, start + self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            for micro in range(self.accum):
                yield [(p, self.index(p)) for p in self.positions(step, micro)]
            step += 1


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """``dataset.set_epoch(epoch)`` where it has one (also inside a ``ConcatDataset``)."""
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            set_epoch(part, epoch)
    elif hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


class PositionedDataset(Dataset):
    """``dataset[idx]`` for stream position ``p``: the dataset's epoch is set to ``p // len``
    (datasets seeded per ``(seed, epoch, index)``, as ``echofast.data.datasets``), and torch's,
    NumPy's and Python's global RNGs are seeded from ``p`` (datasets that use those)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        position, index = key
        set_epoch(self.dataset, position // len(self.dataset))
        s = sample_seed(self.seed, position, "data")
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)
            np.random.seed(s % 2**32)
            random.seed(s)
            try:
                item = self.dataset[index]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
        return position, item


def collate(items: list) -> tuple[torch.Tensor, Any]:
    positions = torch.tensor([p for p, _ in items], dtype=torch.long)
    return positions, default_collate([item for _, item in items])


class RandomItems(Dataset):
    """Random items with the structure of the real datasets (``data.source = "random"``).

    Item ``i`` depends only on (seed, i). VAE: smooth grayscale frames in [-1, 1] (C, s, s);
    LIDM: smooth latents (C, s, s); LVDM: dict(latents (T, C, s, s), ef, cond, valid, name) with a
    per-video pattern moving over time.
    """

    def __init__(self, model_type: str, length: int, arch: dict, frames: int, seed: int):
        self.kind, self.length, self.frames, self.seed = model_type, length, frames, seed
        size = arch.get("sample_size") or 14
        self.size = size if isinstance(size, int) else int(size[0])
        self.channels = arch["in_channels"] if model_type != "lvdm" else arch["out_channels"]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(sample_seed(self.seed, int(i), "random-items"))
        s, c = self.size, self.channels
        if self.kind == "vae":
            low = torch.randn(1, 1, 3, 3, generator=g)
            img = torch.nn.functional.interpolate(
                low, size=(s, s), mode="bilinear", align_corners=False
            )
            return torch.tanh(img[0]).expand(c, s, s).contiguous()
        if self.kind == "lidm":  # smooth latents: learnable spatial structure
            low = torch.randn(1, c, 3, 3, generator=g)
            return torch.nn.functional.interpolate(
                low, size=(s, s), mode="bilinear", align_corners=False
            )[0]
        base = torch.randn(c, s, s, generator=g)
        phase = torch.rand(1, generator=g) * 2 * math.pi
        t = torch.arange(self.frames, dtype=torch.float32)[:, None, None, None]
        wave = torch.sin(2 * math.pi * t / 16 + phase)
        latents = base[None] * (1 + 0.3 * wave) + 0.1 * torch.randn(
            self.frames, c, s, s, generator=g
        )
        valid = int(torch.randint(self.frames // 2, self.frames + 1, (1,), generator=g))
        latents[valid:] = 0
        j = int(torch.randint(0, valid, (1,), generator=g))
        return {
            "latents": latents,
            "ef": float(torch.rand(1, generator=g)),
            "cond": latents[j].clone(),
            "valid": valid,
            "name": f"random_{i}",
        }


def latents_vae(cfg: TrainConfig) -> dict[str, Any] | None:
    """The VAE that encoded the config's latent datasets, as their manifests record it (None
    for the VAE itself, random data, or latents without a manifest)."""
    if cfg.model.type == "vae" or cfg.data.source == "random":
        return None
    roots = [cfg.data.root] if isinstance(cfg.data.root, str) else list(cfg.data.root)
    return _check_one_vae(roots)


def build_dataset(cfg: TrainConfig, arch: dict) -> Dataset:
    """The training set of the config's ``data`` section (``echofast.data.datasets``)."""
    d = cfg.data
    if d.source == "random":
        return RandomItems(cfg.model.type, d.random_items, arch, d.frames, cfg.seed)
    try:
        from ..data import datasets as D
    except ImportError as err:
        raise ConfigError(f"data.source = 'files' needs echofast.data.datasets ({err})") from None
    roots = [d.root] if isinstance(d.root, str) else list(d.root)
    if cfg.model.type != "vae":
        _check_one_vae(roots)
    parts: list[Dataset] = []
    for k, root in enumerate(roots):
        # item randomness from (seed_k, epoch, index); the loader sets the epoch per position
        seed = sample_seed(cfg.seed, k, "dataset")
        if cfg.model.type == "vae":
            parts.append(
                D.FrameDataset(
                    root,
                    split=d.split,
                    size=d.size,
                    frames_per_video=d.frames_per_video or None,
                    seed=seed,
                )
            )
        elif cfg.model.type == "lidm":
            parts.append(D.LatentFrameDataset(root, split=d.split, seed=seed))
        else:
            parts.append(
                D.LatentVideoDataset(
                    root,
                    split=d.split,
                    frames=d.frames,
                    target_fps=d.target_fps,
                    random_window=d.random_window,
                    seed=seed,
                )
            )
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _check_one_vae(roots: Sequence[str]) -> dict[str, Any] | None:
    """Refuse latent datasets encoded with different VAEs (or scaling factors) in one run: the
    roots' ``echofast encode`` manifests must agree (a root without one is not compared).
    Returns the VAE they record (``vae_sha256``, ``scaling_factor``; None: no manifest), which
    checkpoints and exports keep (:mod:`echofast.models.provenance`)."""
    from ..data.encode import MANIFEST

    first: tuple[str, tuple[Any, Any]] | None = None
    for root in roots:
        path = Path(root) / MANIFEST
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text())
            vae = (manifest["vae_sha256"], manifest["scaling_factor"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"config key 'data.root': {path}: unreadable latent dataset manifest "
                f"({type(err).__name__}: {err})"
            ) from None
        if first is None:
            first = (root, vae)
        elif vae != first[1]:
            raise ConfigError(
                f"config key 'data.root': {first[0]} and {root} hold latents of different VAEs "
                f"({MANIFEST}: vae_sha256 {first[1][0]} vs {vae[0]}, scaling_factor "
                f"{first[1][1]} vs {vae[1]}); encode every dataset with the VAE that will "
                "decode the samples"
            )
    return None if first is None else {"vae_sha256": first[1][0], "scaling_factor": first[1][1]}


# ---- distributed -----------------------------------------------------------------------------


class Dist:
    """Rank/world from torchrun's environment; initialises (and owns) the process group."""

    def __init__(self, device_pref: str):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "config key 'train.device': 'cuda' requested, but CUDA is not available"
            )
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            # DDP imports torch.distributed.nn.functional lazily; imported once the group exists,
            # its functions keep the group as a default argument, so destroy_process_group cannot
            # free it and Gloo's threads run into interpreter shutdown, where one can abort the
            # process (SIGABRT, "terminate called without an active exception")
            importlib.import_module("torch.distributed.nn.functional")
            dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
            self.owns_group = True
        if self.world > 1:
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self, *, finished: bool) -> None:
        """Destroy the group this process made. After a finished run the ranks first meet at a
        barrier, so that no rank tears its part of the group down, and exits, while a peer's
        collectives may still be in flight (once, under load, with torch 2.5.1, the second rank
        of a finished two-rank Gloo run hung in ``destroy_process_group`` after the first had
        exited). After an error a rank leaves at once: a barrier would wait on peers stuck in
        another collective."""
        if self.owns_group:
            import torch.distributed as dist

            if finished:
                dist.barrier()
            dist.destroy_process_group()


# ---- RNG states ------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors/ints (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---- checkpoints -----------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


_CKPT_TEMPORARY_RE = re.compile(r"\.step-\d+\.pt\.[a-z0-9_]{8}\.tmp")
"""The temporary file of a checkpoint write (:func:`~echofast.fsutil.atomic_write`) cut short."""
_EXPORT_TEMPORARY_RE = re.compile(rf"\.{EXPORT_DIR}\.[a-z0-9_]{{8}}\.tmp")
"""The temporary folder of an export (:func:`~echofast.fsutil.atomic_folder`) cut short."""


def _remove_stale_writes(output_dir: Path) -> None:
    """Remove what checkpoint writes and the export of a killed run left: partial checkpoints,
    each about as large as a whole one, and a partial export folder (call on the main rank
    before the run writes either)."""
    folder = output_dir / CHECKPOINT_DIR
    for path in folder.iterdir() if folder.is_dir() else ():
        if _CKPT_TEMPORARY_RE.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
    for path in output_dir.iterdir():
        if _EXPORT_TEMPORARY_RE.fullmatch(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is reported with the file
        raise TrainingConflict(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingConflict(f"{path}: not an echofast training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrainingConflict(
            f"{path}: checkpoint version {state.get('version')} (this echofast reads "
            f"{CHECKPOINT_VERSION})"
        )
    bad = [
        key for key in ("config", "model_config", "model") if not isinstance(state.get(key), dict)
    ]
    if not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool):
        bad.append("step")
    ema = state.get("ema")
    if ema is not None and not (isinstance(ema, dict) and isinstance(ema.get("shadow"), dict)):
        bad.append("ema")
    if bad:
        raise TrainingConflict(
            f"{path}: checkpoint entries {bad} are missing or malformed (not a checkpoint that "
            "echofast wrote whole)"
        )
    return state


def resolve_resume(resume: str | os.PathLike | None, output_dir: str) -> Path | None:
    """``"latest"`` → the newest checkpoint in ``output_dir`` (None when there is none)."""
    if resume is None:
        return None
    if str(resume) == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    return Path(resume)


#: Architecture keys that count blocks or layers: each must be >= 1 (an int or a list of ints).
_COUNT_KEYS = ("layers_per_block", "transformer_layers_per_block")


def _check_counts(arch: dict[str, Any], key: str) -> None:
    for name in _COUNT_KEYS:
        value = arch.get(name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
        ):
            raise ConfigError(
                f"training config: config key '{key}.{name}': value {value!r} must be an "
                "integer >= 1 (or a list of them)"
            )


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model of the config; an architecture the model cannot be built from raises
    :class:`ConfigError` naming ``model.config`` (or ``model.init_from``)."""
    cls = model_class(cfg.model.type)
    key = "model.init_from" if cfg.model.init_from else "model.config"
    arch = cfg.architecture()
    _check_counts(arch, key)
    if cfg.model.init_from:
        return cls.from_pretrained(cfg.model.init_from)
    try:
        return cls.from_config(arch, source="training config (model)")
    except ConfigError as err:
        raise ConfigError(f"config key 'model.config': {err}") from None
    except Exception as err:  # noqa: BLE001 - any construction failure comes from the config
        raise ConfigError(
            f"training config: config key 'model.config': cannot build the "
            f"{cfg.model.type.upper()} from this architecture ({type(err).__name__}: {err})"
        ) from None


def _item_channels(model_type: str, item: Any) -> tuple[int, str] | None:
    """The channel count of one dataset item and its layout; None for an unknown structure."""
    if model_type == "lvdm":
        latents = item.get("latents") if isinstance(item, dict) else None
        if isinstance(latents, torch.Tensor) and latents.dim() == 4:
            return int(latents.shape[1]), f"latent windows (T, C, h, w) = {tuple(latents.shape)}"
        return None
    if isinstance(item, torch.Tensor) and item.dim() == 3:
        what = "frames" if model_type == "vae" else "latents"
        return int(item.shape[0]), f"{what} (C, h, w) = {tuple(item.shape)}"
    return None


def check_data_fits_model(
    cfg: TrainConfig, arch: dict[str, Any], dataset: Dataset, source: str
) -> None:
    """Compare the channels of the dataset's first item with the model's ``in_channels`` /
    ``out_channels``; a mismatch raises :class:`ConfigError` naming both (``source`` names the
    dataset). Global RNGs are left as they were."""
    if len(dataset) == 0:
        return
    _, item = PositionedDataset(dataset, cfg.seed)[(0, 0)]
    found = _item_channels(cfg.model.type, item)
    if found is None:
        return
    c, what = found
    need = {"in_channels": 2 * c if cfg.model.type == "lvdm" else c, "out_channels": c}
    if cfg.model.type == "lvdm":
        rule = (
            f"the LVDM needs in_channels = 2·C = {2 * c} (latents + conditioning frame) and "
            f"out_channels = C = {c}"
        )
    else:
        rule = f"the {cfg.model.type.upper()} needs in_channels = out_channels = C = {c}"
    key = "model.init_from" if cfg.model.init_from else "model.config"
    for name, value in need.items():
        if arch.get(name) != value:
            raise ConfigError(
                f"config key '{key}.{name}' = {arch.get(name)!r} does not fit the data: {source} "
                f"gives {c}-channel {what}; {rule}"
            )


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    weights: str = "ema",
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint's weights as a diffusers folder (``config.json`` + safetensors) and,
    for the LIDM and the LVDM, the noise schedule they were trained with
    (:meth:`TrainConfig.noise_scheduler`) as ``scheduler_config.json``, a ``DDPMScheduler``
    config: echofast's pipelines sample the model with it (``from_pretrained``), and diffusers'
    model loading ignores the file.

    ``weights``: ``"ema"`` (the released weights; falls back to the model's weights when the run
    had no EMA) or ``"model"`` (the raw trained weights); weights that do not fit the model, or
    hold NaN or inf, are refused (:class:`WeightsError` naming the checkpoint and the key) before
    anything is written. Which were written, the checkpoint and its step are recorded in the
    folder's ``echofast_export.json`` (:mod:`echofast.models.provenance`), with the VAE of the
    training latents (checked when a pipeline loads the folder beside a VAE).

    ``out`` must be missing, empty, or hold an export of the same model (same class and
    architecture: e.g. an earlier export of this run), which is replaced. Another model folder is
    replaced only with ``overwrite``; a folder that holds anything else (a dataset, a run) is
    never written into. The folder is written beside ``out`` and renamed into place, so an
    interrupted export leaves the old folder (or none), never a mix.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    state = load_checkpoint(checkpoint)
    cls = model_class(state["config"]["model"]["type"])
    model = cls.from_config(state["model_config"], source=f"{checkpoint} (model config)")
    noise_scheduler = None
    if state["config"]["model"]["type"] in ("lidm", "lvdm"):
        source = f"{checkpoint} (config)"
        noise_scheduler = config_from_dict(state["config"], source=source).noise_scheduler(source)
    written = "ema" if weights == "ema" and state.get("ema") is not None else "model"
    chosen = {**state["model"], **state["ema"]["shadow"]} if written == "ema" else state["model"]
    check_state_dict(model, chosen, f"{checkpoint} ({written} weights)")
    model.load_state_dict(chosen)
    out = Path(out)
    _export_target(out, cls.diffusers_class, dict(model.config), overwrite)
    info = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": int(state["step"]),
        "weights_requested": weights,
        "weights": written,
        "latents_vae": state.get("latents_vae"),
    }

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        if noise_scheduler is not None:
            noise_scheduler.save_config(folder)
        (folder / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")

    return atomic_folder(out, fill)


def _export_target(out: Path, class_name: str, arch: dict[str, Any], overwrite: bool) -> None:
    """Raise :class:`TrainingConflict` unless ``out`` is missing, empty, or a folder the export
    may replace."""
    if out.exists() and not out.is_dir():
        raise TrainingConflict(f"{out} exists and is not a folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    config_path = out / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise TrainingConflict(
            f"{out} exists, is not empty and is not a model folder (no readable config.json "
            "with a _class_name); refusing to write into it: choose another --out"
        )
    if overwrite:
        return
    from ..models.base import WEIGHTS_STEM

    theirs = {k: v for k, v in config.items() if not k.startswith("_")}
    if config["_class_name"] != class_name or theirs != json.loads(json.dumps(arch)):
        raise TrainingConflict(
            f"{out} holds another model (a {config['_class_name']} with another config than "
            f"this {class_name} checkpoint's); use --overwrite to replace it, or choose "
            "another --out"
        )
    extra = sorted(
        p.name
        for p in out.iterdir()
        if p.name not in ("config.json", SCHEDULER_CONFIG_NAME, EXPORT_INFO_NAME)
        and not p.name.startswith(WEIGHTS_STEM)
    )
    if extra:
        raise TrainingConflict(
            f"{out} holds this model's export and other files {extra[:5]}; use --overwrite "
            "to replace the whole folder, or choose another --out"
        )


# ---- logging ---------------------------------------------------------------------------------


class CSVLog:
    def __init__(self, path: Path, columns: Sequence[str], resume_step: int | None):
        self.path, self.columns = path, list(columns)
        rows: list[list[str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header == self.columns:
                    rows = [r for r in reader if r and int(r[0]) <= resume_step]
        kept = io.StringIO()
        csv.writer(kept).writerows([self.columns, *rows])
        # replaced whole: a run killed here keeps the earlier run's log (truncating it first lost
        # every row when the kill came before they were written back)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(kept.getvalue().encode()))
        self.fh = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.writer = csv.writer(self.fh)

    def write(self, values: dict[str, float]) -> None:
        self.writer.writerow([_fmt(values.get(c, "")) for c in self.columns])
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v)


def read_log(path: str | os.PathLike) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    return steps, losses


# ---- the loop --------------------------------------------------------------------------------


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        return torch.float16 if device.type == "cuda" else None
    if mp == "no":
        return None
    if device.type != "cuda":
        raise ConfigError(
            f"config key 'train.mixed_precision': {mp!r} needs a CUDA device; on "
            f'{device.type} use "no" or "auto" (fp32)'
        )
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mp]


def _lr_lambda(warmup: int):
    def fn(step: int) -> float:  # diffusers' get_constant_schedule_with_warmup
        return step / max(1.0, warmup) if step < warmup else 1.0

    return fn


def train(
    cfg: TrainConfig,
    *,
    dataset: Dataset | None = None,
    resume: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run (or continue) a training job; returns a summary dict.

    ``dataset``: any map-style dataset whose items have the structure of the model type's
    dataset (default: built from ``cfg.data``). ``resume``: a checkpoint path or ``"latest"``
    (``"latest"`` with no checkpoint yet starts from scratch).
    """
    dist = Dist(cfg.train.device)
    finished = False
    try:
        summary = _train(cfg, dist, dataset, resume)
        finished = True
        return summary
    finally:
        dist.close(finished=finished)


def _train(cfg: TrainConfig, dist: Dist, dataset: Dataset | None, resume) -> dict[str, Any]:
    device = dist.device
    amp_dtype = _precision(cfg, device)
    out = Path(cfg.output_dir)
    ckpt_path = resolve_resume(resume, cfg.output_dir)
    if ckpt_path is None and list_checkpoints(out):
        raise TrainingConflict(
            f"{out}: holds checkpoints of a run; continue it with --resume (or resume="
            f"'latest'), or choose another output_dir"
        )
    state = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if state is not None:
        changed = [
            k for k in config_changes(state["config"], cfg.to_dict()) if k not in RESUMABLE_CHANGES
        ]
        if changed:
            raise TrainingConflict(
                f"{ckpt_path}: the config differs from the checkpoint's in {changed} (only "
                f"{sorted(RESUMABLE_CHANGES)} may change when resuming)"
            )
        if int(state["step"]) > cfg.train.max_steps:
            raise TrainingConflict(
                f"{ckpt_path}: the run is already at step {int(state['step'])}, past "
                f"train.max_steps = {cfg.train.max_steps}; nothing to train (raise "
                "train.max_steps to continue, or export a checkpoint with `echofast train "
                "export`)"
            )
    dist.barrier()
    if device.type == "cuda" and cfg.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # model, objective, optimizers (identical initialisation on every rank)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    arch = dict(model.config)
    model.to(device).train()
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    objective = build_objective(cfg, model)
    aux = objective.aux_modules()
    for m in aux.values():
        m.to(device).train()
    o = cfg.optim
    opt_kw = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, **opt_kw)
    aux_lr = (cfg.vae.disc_lr or o.lr) if cfg.vae is not None else o.lr
    aux_opts = {k: torch.optim.AdamW(m.parameters(), lr=aux_lr, **opt_kw) for k, m in aux.items()}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(o.warmup_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ema = None
    if cfg.ema.enabled:
        e = cfg.ema
        ema = EMA(
            model,
            decay=e.decay,
            min_decay=e.min_decay,
            update_after_step=e.update_after_step,
            use_warmup=e.use_warmup,
            inv_gamma=e.inv_gamma,
            power=e.power,
        )

    # seed the global RNGs per rank (dropout etc.); a checkpoint's states replace these
    rank_seed = sample_seed(cfg.seed, dist.rank, "global")
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)

    start_step, elapsed0 = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        for k, m in aux.items():
            m.load_state_dict(state["aux"][k])
            aux_opts[k].load_state_dict(state["aux_optimizers"][k])
        scaler.load_state_dict(state["scaler"])
        start_step, elapsed0 = int(state["step"]), float(state["elapsed"])

    net: nn.Module = objective.module
    if cfg.train.compile:
        net = torch.compile(net)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the LVDM's cross-attention of one context token (the EF) is exactly to_out(to_v(ctx)):
        # its queries, keys and their norm take no part in the loss (diffusers computes them
        # and gets exact-zero gradients), so DDP must not wait for their gradients
        net = DDP(
            net,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.model.type == "lvdm",
        )

    # data (checked against the model before any file is written)
    trained_on = latents_vae(cfg) if dataset is None else None
    if dataset is None:
        dataset = build_dataset(cfg, arch)
        source = (
            f"data.root {cfg.data.root!r}"
            if cfg.data.source == "files"
            else "data.source = 'random'"
        )
    else:
        source = "the given dataset"
    check_data_fits_model(cfg, arch, dataset, source)
    t = cfg.train
    if dist.main and t.export_at_end:
        try:
            _export_target(out / EXPORT_DIR, model.diffusers_class, arch, overwrite=False)
        except TrainingConflict as err:
            raise TrainingConflict(
                f"{err} (the trainer writes the released weights to {out / EXPORT_DIR}: move "
                "that folder away, or set train.export_at_end = false)"
            ) from None
    sampler = StreamBatchSampler(
        len(dataset),
        batch_size=t.batch_size,
        world=dist.world,
        rank=dist.rank,
        grad_accum=t.grad_accum,
        seed=cfg.seed,
        start_step=start_step,
    )
    loader = DataLoader(
        PositionedDataset(dataset, cfg.seed),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)  # draws the workers' base seed from the global RNG: before restoring

    if state is not None:
        rngs = state["rng"]
        if len(rngs) == dist.world:
            set_rng_state(rngs[dist.rank])
        elif dist.main:
            warnings.warn(
                f"{ckpt_path}: saved by {len(rngs)} rank(s), resumed on {dist.world}: "
                "global RNG states are not restored (data and noise still are)",
                stacklevel=2,
            )

    # outputs (rank 0)
    log = None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_writes(out)
        save_config(cfg, out / "train_config.json")
        log = CSVLog(
            out / LOG_NAME,
            ("step", "loss", "lr", "time", *objective.columns),
            start_step if state is not None else None,
        )

    def checkpoint(step: int, elapsed: float) -> Path:
        rngs = dist.gather_objects(rng_state())
        path = out / CHECKPOINT_DIR / f"step-{step:08d}.pt"
        if dist.main:
            payload = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "echofast_version": __version__,
                "step": step,
                "elapsed": elapsed,
                "config": cfg.to_dict(),
                "model_config": _plain(arch),
                "model": _cpu(model.state_dict()),
                "ema": ema.state_dict() if ema is not None else None,
                "latents_vae": trained_on,
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "aux": {k: _cpu(m.state_dict()) for k, m in aux.items()},
                "aux_optimizers": {k: v.state_dict() for k, v in aux_opts.items()},
                "scaler": scaler.state_dict(),
                "rng": rngs,
                "world_size": dist.world,
                "sampler": {
                    "position": step * sampler.global_batch,
                    "global_batch": sampler.global_batch,
                    "seed": cfg.seed,
                },
            }
            atomic_write(path, lambda tmp: torch.save(payload, tmp))
            if t.keep_checkpoints:
                for _, old in list_checkpoints(out)[: -t.keep_checkpoints]:
                    old.unlink(missing_ok=True)
        dist.barrier()
        return path

    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype))
        if amp_dtype is not None
        else contextlib.nullcontext
    )
    bar = None
    if dist.main and t.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=t.max_steps,
            initial=start_step,
            desc=f"train {cfg.model.type}",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    step = start_step
    t_start = time.time()
    last_ckpt: Path | None = ckpt_path
    interval_sum = torch.zeros(1 + len(objective.columns), dtype=torch.float64, device=device)
    interval_n = 0
    last_loss = float("nan")
    try:
        while step < t.max_steps:
            lr = optimizer.param_groups[0]["lr"]
            step_sum = torch.zeros_like(interval_sum)
            for micro in range(t.grad_accum):
                positions, batch = next(batches)
                sync = micro == t.grad_accum - 1
                ctx = net.no_sync() if (dist.world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    with autocast():
                        loss, logs = objective.loss(net, batch, positions, step, device)
                    scaler.scale(loss / t.grad_accum).backward()
                step_sum[0] += loss.detach().double()
                for i, c in enumerate(objective.columns):
                    step_sum[1 + i] += logs.get(c, 0.0)
            _sync_aux_grads(aux, dist)
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
                for k, v in aux_opts.items():
                    if _has_grads(aux[k]):
                        scaler.unscale_(v)
            if o.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(optimizer)
            for k, v in aux_opts.items():
                if _has_grads(aux[k]):
                    scaler.step(v)
            scaler.update()
            skipped = scaler.is_enabled() and scaler.get_scale() < scale
            optimizer.zero_grad(set_to_none=True)
            for v in aux_opts.values():
                v.zero_grad(set_to_none=True)
            if not skipped:
                scheduler.step()
            if ema is not None:
                ema.step(model.parameters())
            _sync_aux_buffers(aux, dist)
            step += 1
            interval_sum += step_sum / t.grad_accum
            interval_n += 1

            if step % t.log_every == 0 or step == t.max_steps:
                mean = dist.all_reduce_mean(interval_sum / interval_n).tolist()
                interval_sum.zero_()
                interval_n = 0
                last_loss = mean[0]
                elapsed = elapsed0 + time.time() - t_start
                if log is not None:
                    row = {"step": step, "loss": mean[0], "lr": lr, "time": round(elapsed, 3)}
                    row.update(zip(objective.columns, mean[1:]))
                    log.write(row)
                if bar is not None:
                    rate = (step - start_step) / max(time.time() - t_start, 1e-9)
                    bar.set_postfix(
                        loss=f"{mean[0]:.4g}",
                        lr=f"{lr:.3g}",
                        steps_per_s=f"{rate:.3g}",
                        refresh=False,
                    )
                if not math.isfinite(last_loss) and not scaler.is_enabled():
                    raise NonFiniteError(
                        f"{out}: training loss is not finite ({last_loss}) in the "
                        f"{t.log_every} step(s) up to step {step} (try a lower optim.lr)"
                    )
            if bar is not None:
                bar.update(1)
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                last_ckpt = checkpoint(step, elapsed0 + time.time() - t_start)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        del batches

    if dist.main and step == start_step and (out / LOG_NAME).is_file():
        logged = read_log(out / LOG_NAME)[1]
        last_loss = logged[-1] if logged else last_loss
    summary: dict[str, Any] = {
        "step": step,
        "steps_trained": step - start_step,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "loss": last_loss,
        "log": str(out / LOG_NAME),
        "seconds": time.time() - t_start,
        "world_size": dist.world,
        "global_batch": sampler.global_batch,
    }
    if dist.main:
        steps, losses = read_log(out / LOG_NAME)
        write_loss_plot(out / PLOT_NAME, steps, losses)
        summary["plot"] = str(out / PLOT_NAME)
        if t.export_at_end and last_ckpt is not None:
            summary["export"] = str(export_checkpoint(last_ckpt, out / EXPORT_DIR))
    dist.barrier()
    return summary


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _has_grads(module: nn.Module) -> bool:
    return any(p.grad is not None for p in module.parameters())


def _sync_aux_grads(aux: dict[str, nn.Module], dist: Dist) -> None:
    """Average the auxiliary modules' gradients over ranks (they are not DDP-wrapped)."""
    if dist.world == 1:
        return
    for m in aux.values():
        for p in m.parameters():
            if p.grad is not None:
                dist.all_reduce_mean(p.grad)


def _sync_aux_buffers(aux: dict[str, nn.Module], dist: Dist) -> None:
    """Rank 0's BatchNorm statistics everywhere (as DDP's ``broadcast_buffers``)."""
    if dist.world == 1:
        return
    import torch.distributed as tdist

    for m in aux.values():
        for b in m.buffers():
            tdist.broadcast(b, 0)


def config_of_checkpoint(path: str | os.PathLike) -> TrainConfig:
    state = load_checkpoint(path)
    return config_from_dict(state["config"], source=f"{path} (config)")
