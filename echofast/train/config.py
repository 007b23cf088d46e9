"""Training configs: the schema, the reference recipes as defaults, and loading/saving.

A config file (TOML, JSON, or YAML when PyYAML is installed) holds only what differs from the
defaults of its model type; every key it names must exist in the schema below (an unknown key
raises :class:`~echofast.errors.ConfigError` naming it, e.g. ``optim.lrr``). Float keys also take
numeric strings: YAML 1.1 (PyYAML) reads ``lr: 1e-4`` as the string ``"1e-4"``. The resolved config
(every key) is saved as ``train_config.json`` in the run folder and inside every checkpoint;
that JSON file is itself a valid ``--config``.

Schema (defaults: LIDM / LVDM / VAE where they differ)::

    seed = 42                      # model init and every per-sample random draw
    output_dir = "runs/<type>"     # checkpoints/, log.csv, loss.png, export/, train_config.json

    [model]
    type = "lidm"                  # vae | lidm | lvdm (set by `echofast train <type>`)
    config_file = ""               # a diffusers config.json to start from (default: reference)
    init_from = ""                 # a diffusers folder to initialise the weights from
    [model.config]                 # keys that override the architecture (diffusers config keys)

    [data]
    source = "files"               # "files": echofast.data.datasets; "random": random tensors
    root = ""                      # a dataset folder, or a list of folders (concatenated)
    split = "TRAIN"
    size = 112                     # VAE frames (FrameDataset)
    frames_per_video = 0           # VAE: 0 = every frame is an item; k = k random frames/video
    frames = 64                    # LVDM window (LatentVideoDataset)
    target_fps = 32.0              # LVDM resampling
    random_window = true           # LVDM: random window start
    num_workers = 4                # DataLoader workers per rank
    random_items = 64              # dataset length for source = "random"

    [optim]                        # AdamW
    lr = 3e-4 / 1e-4 / 5e-4
    betas = [0.9, 0.999]           # VAE [0.5, 0.9] (LDM)
    weight_decay = 0.01            # VAE 0.0
    eps = 1e-8
    max_grad_norm = 1.0            # VAE 0.0 (no clipping); 0 disables
    warmup_steps = 500             # linear from 0, then constant; VAE 0

    [train]
    max_steps = 500000 / 60000 / 100000
    batch_size = 256 / 16 / 32     # per rank; global = batch_size * world * grad_accum
    grad_accum = 1 / 1 / 2
    mixed_precision = "auto"       # auto | no | fp16 | bf16 (auto: fp16 on CUDA, fp32 on CPU;
                                   #  VAE default "no", as LDM); fp16/bf16 need CUDA
    compile = false                # torch.compile the model
    gradient_checkpointing = false # recompute each block in backward (less memory, ~1/3 slower)
    allow_tf32 = true
    device = "auto"                # auto | cpu | cuda
    checkpoint_every = 10000 / 10000 / 5000
    keep_checkpoints = 3           # newest kept; 0 keeps all
    log_every = 1                  # CSV row every N steps
    progress = true                # tqdm bar (rank 0)
    export_at_end = true           # write export/ (EMA weights, diffusers folder) at the end

    [ema]                          # diffusers EMAModel semantics
    enabled = true                 # VAE false (LDM's AutoencoderKL has no EMA)
    decay = 0.9999
    min_decay = 0.0
    update_after_step = 0
    use_warmup = true              # decay_t = 1 - (1 + t/inv_gamma)^-power; else (1+t)/(10+t)
    inv_gamma = 1.0
    power = 0.6666666666666666

    [diffusion]                    # LIDM / LVDM only
    noise_offset = 0.0 / 0.1       # noise += offset * randn per (sample, channel)
    [diffusion.scheduler]          # overrides of echofast.schedulers.REFERENCE_SCHEDULER_CONFIG
                                   #  (DDPMScheduler keys; see TrainConfig.noise_scheduler)

    [vae]                          # VAE only (LDM's LPIPSWithDiscriminator, minus LPIPS)
    reconstruction = "l1"          # l1 | l2, summed over pixels, averaged over the batch
    kl_weight = 1e-6
    sample_posterior = true
    disc_start = 50001             # optimizer step from which the discriminator is on
    disc_weight = 0.5              # times LDM's adaptive weight
    disc_layers = 3
    disc_channels = 64
    disc_lr = 0.0                  # 0: optim.lr
    perceptual_weight = 0.0        # LDM uses 1.0 with LPIPS; needs lpips_model
    lpips_model = ""               # LPIPS as torch.export (.pt2) or TorchScript file:
                                   #  (x, y) in [-1, 1] -> (N,) distances
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..schedulers import DDPMScheduler

MODEL_TYPES = ("vae", "lidm", "lvdm")
PRECISIONS = ("auto", "no", "fp16", "bf16")

#: EchoNet-Synthetic's architectures (spec, "Models"), as diffusers config keys.
REFERENCE_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 256, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 112,
        "scaling_factor": 0.18215,
    },
    "lidm": {
        "sample_size": 14,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["AttnUpBlock2D"] * 3,
        "block_out_channels": [128, 256, 256, 512],
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "dropout": 0.0,
        "act_fn": "silu",
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
    },
    "lvdm": {
        "sample_size": 14,
        "in_channels": 8,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
        "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
        "block_out_channels": [128, 256, 256, 512],
        "addition_time_embed_dim": 1,
        "projection_class_embeddings_input_dim": 1,
        "layers_per_block": 2,
        "cross_attention_dim": 1,
        "transformer_layers_per_block": 1,
        "num_attention_heads": [8, 16, 16, 32],
        "num_frames": 64,
    },
}


# ---- schema --------------------------------------------------------------------------------

# Field metadata "kind" overrides the type inferred from the default: "str_or_list" (a string
# or a list of strings), "dict" (free-form table), "pair" (two floats).


@dataclass
class ModelSection:
    type: str = "lidm"
    config_file: str = ""
    init_from: str = ""
    config: dict = field(default_factory=dict, metadata={"kind": "dict"})


@dataclass
class DataSection:
    source: str = "files"
    root: Any = field(default="", metadata={"kind": "str_or_list"})
    split: str = "TRAIN"
    size: int = 112
    frames_per_video: int = 0
    frames: int = 64
    target_fps: float = 32.0
    random_window: bool = True
    num_workers: int = 4
    random_items: int = 64


@dataclass
class OptimSection:
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999], metadata={"kind": "pair"})
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 500


@dataclass
class TrainSection:
    max_steps: int = 500_000
    batch_size: int = 256
    grad_accum: int = 1
    mixed_precision: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    device: str = "auto"
    checkpoint_every: int = 10_000
    keep_checkpoints: int = 3
    log_every: int = 1
    progress: bool = True
    export_at_end: bool = True


@dataclass
class EMASection:
    enabled: bool = True
    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 2 / 3


@dataclass
class DiffusionSection:
    noise_offset: float = 0.0
    scheduler: dict = field(default_factory=dict, metadata={"kind": "dict"})


@dataclass
class VAELossSection:
    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    disc_start: int = 50_001
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float = 0.0
    perceptual_weight: float = 0.0
    lpips_model: str = ""


@dataclass
class TrainConfig:
    seed: int = 42
    output_dir: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    ema: EMASection = field(default_factory=EMASection)
    diffusion: DiffusionSection | None = None
    vae: VAELossSection | None = None

    # ---- derived --------------------------------------------------------------------------

    def architecture(self) -> dict[str, Any]:
        """The model config: reference (or ``config_file`` / ``init_from``) + overrides."""
        m = self.model
        if m.init_from and (m.config_file or m.config):
            raise ConfigError(
                "model.init_from takes the architecture from the folder's config.json; "
                "do not also set model.config_file or model.config"
            )
        if m.init_from:
            base = _read_json(Path(m.init_from) / "config.json", "model.init_from")
        elif m.config_file:
            base = _read_json(Path(m.config_file), "model.config_file")
        else:
            base = copy.deepcopy(REFERENCE_ARCHITECTURES[m.type])
        base = {k: v for k, v in base.items() if not k.startswith("_")}
        base.update(copy.deepcopy(m.config))
        return base

    def scheduler_config(self) -> dict[str, Any]:
        from ..schedulers import REFERENCE_SCHEDULER_CONFIG

        cfg = dict(REFERENCE_SCHEDULER_CONFIG)
        if self.diffusion is not None:
            cfg.update(self.diffusion.scheduler)
        return cfg

    def noise_scheduler(self, source: str = "config") -> DDPMScheduler:
        """The training noise schedule: a ``DDPMScheduler`` of :meth:`scheduler_config`.

        ``diffusion.scheduler`` takes ``DDPMScheduler``'s keys. Training uses the betas
        (``num_train_timesteps``, ``beta_*``, ``trained_betas``, ``rescale_betas_zero_snr``)
        and ``prediction_type``; the other keys say how to sample the trained model (with
        ``train_config.json``), where echofast's pipelines need an affine step. Refused, with a
        :class:`ConfigError` naming ``source`` and the key: keys ``DDPMScheduler`` lacks,
        ``thresholding`` (sampling only, and no affine step), learned variances (the objective
        trains no variance), zero terminal SNR with epsilon prediction (x̂_0 is undefined at
        the last timestep), and a ``steps_offset`` the pipelines' default step count cannot
        take (the scheduler returned has that step count's timesteps set).
        """
        from ..schedulers import REFERENCE_NUM_INFERENCE_STEPS, DDPMScheduler
        from ..schedulers.ddpm import LEARNED_VARIANCE_TYPES

        def fail(key: str, value: Any, why: str) -> NoReturn:
            raise ConfigError(
                f"{source}: config key 'diffusion.scheduler.{key}': value {value!r} {why}"
            )

        known = DDPMScheduler.config_defaults()
        given = self.diffusion.scheduler if self.diffusion is not None else {}
        unknown = sorted(f"diffusion.scheduler.{k}" for k in set(given) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: unknown config key(s) {unknown} (diffusion.scheduler takes "
                f"echofast.schedulers.DDPMScheduler's keys: {sorted(known)})"
            )
        scheduler = DDPMScheduler.from_config(
            self.scheduler_config(), source=f"{source}: config key 'diffusion.scheduler'"
        )
        c = scheduler.config
        if c.thresholding:
            fail(
                "thresholding",
                c.thresholding,
                "is not supported in training: dynamic thresholding changes sampling only, "
                "and the fused step of echofast's pipelines refuses it",
            )
        if c.variance_type in LEARNED_VARIANCE_TYPES:
            fail(
                "variance_type",
                c.variance_type,
                "is not supported in training: a learned variance needs a model with twice "
                "the output channels and a variational-bound loss term, which the training "
                "objective does not have (use fixed_small, fixed_small_log or fixed_large)",
            )
        if c.rescale_betas_zero_snr and c.prediction_type == "epsilon":
            fail(
                "rescale_betas_zero_snr",
                c.rescale_betas_zero_snr,
                "needs prediction_type 'v_prediction' or 'sample' (arXiv:2305.08891): with "
                "zero terminal SNR, ᾱ = 0 at the last timestep, where an epsilon model's "
                "x̂_0 = (x_t - √(1-ᾱ)·ε̂)/√ᾱ is undefined",
            )
        steps = min(REFERENCE_NUM_INFERENCE_STEPS, c.num_train_timesteps)
        try:
            scheduler.set_timesteps(steps)
        except ValueError as err:
            fail(
                "steps_offset",
                c.steps_offset,
                f"does not fit the pipelines' default {steps} sampling steps ({err})",
            )
        return scheduler

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if v is not None}


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "ema": EMASection,
    "diffusion": DiffusionSection,
    "vae": VAELossSection,
}

#: Sections that exist only for some model types.
TYPE_SECTIONS = {"diffusion": ("lidm", "lvdm"), "vae": ("vae",)}

#: Per-type defaults that differ from the dataclass defaults (the reference recipes).
TYPE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "lidm": {
        "optim": {"lr": 3e-4},
        "train": {"max_steps": 500_000, "batch_size": 256},
        "diffusion": {"noise_offset": 0.0},
    },
    "lvdm": {
        "optim": {"lr": 1e-4},
        "train": {"max_steps": 60_000, "batch_size": 16},
        "diffusion": {"noise_offset": 0.1},
    },
    "vae": {
        # LDM's AutoencoderKL recipe (Adam(0.5, 0.9), lr base 2e-6 scaled to ~5e-4, batch 32,
        # accumulation 2, fp32, no clipping, no warm-up, no EMA).
        "optim": {
            "lr": 5e-4,
            "betas": [0.5, 0.9],
            "weight_decay": 0.0,
            "max_grad_norm": 0.0,
            "warmup_steps": 0,
        },
        "train": {
            "max_steps": 100_000,
            "batch_size": 32,
            "grad_accum": 2,
            "mixed_precision": "no",
            "checkpoint_every": 5_000,
        },
        "ema": {"enabled": False},
    },
}

#: Keys that may differ between a checkpoint's config and the config it is resumed with.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "data.root",
        "data.num_workers",
        "train.max_steps",
        "train.compile",
        "train.gradient_checkpointing",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.log_every",
        "train.progress",
        "train.export_at_end",
        "train.device",
    }
)


# ---- building ------------------------------------------------------------------------------


def default_config(model_type: str) -> TrainConfig:
    """The reference recipe for ``model_type``."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"config key 'model.type': value {model_type!r} is not supported "
            f"(supported: {list(MODEL_TYPES)})"
        )
    cfg = TrainConfig(output_dir=f"runs/{model_type}")
    cfg.model.type = model_type
    if model_type in TYPE_SECTIONS["diffusion"]:
        cfg.diffusion = DiffusionSection()
    else:
        cfg.vae = VAELossSection()
    for section, values in TYPE_DEFAULTS[model_type].items():
        obj = getattr(cfg, section)
        for key, value in values.items():
            setattr(obj, key, copy.deepcopy(value))
    return cfg


def config_from_dict(
    data: dict[str, Any], model_type: str | None = None, *, source: str = "config"
) -> TrainConfig:
    """Defaults of the model type, overridden by ``data``. Unknown keys raise, naming them.

    The type comes from ``model_type`` or ``data["model"]["type"]``; both given must agree.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of settings, got {type(data).__name__}")
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: 'model' must be a table, got {type(model).__name__}")
    file_type = model.get("type")
    if model_type is not None and file_type is not None and file_type != model_type:
        raise ConfigError(
            f"{source}: model.type is {file_type!r} but the command trains {model_type!r}"
        )
    kind = model_type or file_type
    if kind is None:
        raise ConfigError(f"{source}: model.type is not set (one of {list(MODEL_TYPES)})")
    if kind not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: config key 'model.type': value {kind!r} is not supported "
            f"(supported: {list(MODEL_TYPES)})"
        )
    cfg = default_config(kind)
    unknown: list[str] = []
    for key, value in data.items():
        if key in ("seed", "output_dir"):
            setattr(cfg, key, _coerce(key, value, getattr(cfg, key), None, source))
        elif key in SECTIONS:
            if key in TYPE_SECTIONS and kind not in TYPE_SECTIONS[key]:
                raise ConfigError(
                    f"{source}: section {key!r} does not apply to model type {kind!r} "
                    f"(it is for {list(TYPE_SECTIONS[key])})"
                )
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key!r} must be a table, got {value!r}")
            _fill(getattr(cfg, key), value, key, unknown, source)
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {unknown}")
    validate(cfg, source=source)
    return cfg


def _fill(obj: Any, values: dict, prefix: str, unknown: list[str], source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{prefix}.{key}"
        if key not in fields:
            unknown.append(path)
            continue
        f = fields[key]
        setattr(obj, key, _coerce(path, value, getattr(obj, key), f.metadata.get("kind"), source))


def _coerce(path: str, value: Any, default: Any, kind: str | None, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: config key {path!r}: expected {expected}, got {value!r}")

    if kind == "dict":
        if not isinstance(value, dict):
            raise bad("a table")
        return copy.deepcopy(value)
    if kind == "str_or_list":
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad("a string or a non-empty list of strings")
    if kind == "pair":
        if isinstance(value, (list, tuple)) and len(value) == 2:
            numbers = [_number(v) for v in value]
            if all(v is not None for v in numbers):
                return numbers
        raise bad("a list of two finite numbers")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        number = _number(value)
        if number is None:
            raise bad("a finite number" if isinstance(value, float) else "a number")
        return number
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise bad(type(default).__name__)  # pragma: no cover - every field is covered above


_NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None. Numeric strings count: YAML 1.1 (PyYAML) reads
    ``1e-4`` (no dot) as a string, and ``lr: "3e-4"`` means the number too."""
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def validate(cfg: TrainConfig, *, source: str = "config") -> None:
    """Range and choice checks; each error names its key."""

    def fail(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"{source}: config key {key!r}: value {value!r} {why}")

    def choice(key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            fail(key, value, f"is not supported (supported: {list(allowed)})")

    def positive(key: str, value: float, *, zero: bool = False) -> None:
        if value < 0 or (value == 0 and not zero):
            fail(key, value, "must be " + ("non-negative" if zero else "positive"))

    choice("model.type", cfg.model.type, MODEL_TYPES)
    choice("data.source", cfg.data.source, ("files", "random"))
    choice("train.mixed_precision", cfg.train.mixed_precision, PRECISIONS)
    choice("train.device", cfg.train.device, ("auto", "cpu", "cuda"))
    if not cfg.output_dir:
        fail("output_dir", cfg.output_dir, "must name a folder")
    for key in (
        "data.size",
        "data.frames",
        "data.random_items",
        "train.max_steps",
        "train.batch_size",
        "train.grad_accum",
        "train.checkpoint_every",
        "train.log_every",
    ):
        section, name = key.split(".")
        positive(key, getattr(getattr(cfg, section), name))
    positive("data.target_fps", cfg.data.target_fps)
    positive("data.num_workers", cfg.data.num_workers, zero=True)
    positive("data.frames_per_video", cfg.data.frames_per_video, zero=True)
    positive("train.keep_checkpoints", cfg.train.keep_checkpoints, zero=True)
    positive("optim.lr", cfg.optim.lr)
    positive("optim.weight_decay", cfg.optim.weight_decay, zero=True)
    positive("optim.eps", cfg.optim.eps)
    positive("optim.max_grad_norm", cfg.optim.max_grad_norm, zero=True)
    positive("optim.warmup_steps", cfg.optim.warmup_steps, zero=True)
    for i, b in enumerate(cfg.optim.betas):
        if not 0 <= b < 1:
            fail(f"optim.betas[{i}]", b, "must be in [0, 1)")
    if not 0 <= cfg.ema.min_decay <= cfg.ema.decay <= 1:
        fail("ema.decay", cfg.ema.decay, f"must be in [ema.min_decay={cfg.ema.min_decay}, 1]")
    positive("ema.update_after_step", cfg.ema.update_after_step, zero=True)
    positive("ema.inv_gamma", cfg.ema.inv_gamma)
    positive("ema.power", cfg.ema.power)
    if cfg.data.source == "files" and not cfg.data.root:
        fail(
            "data.root",
            cfg.data.root,
            'must name the dataset folder (or set data.source = "random" for a smoke test)',
        )
    if cfg.diffusion is not None:
        positive("diffusion.noise_offset", cfg.diffusion.noise_offset, zero=True)
        cfg.noise_scheduler(source)
    if cfg.vae is not None:
        v = cfg.vae
        choice("vae.reconstruction", v.reconstruction, ("l1", "l2"))
        for key in ("kl_weight", "disc_weight", "disc_lr", "perceptual_weight"):
            positive(f"vae.{key}", getattr(v, key), zero=True)
        positive("vae.disc_start", v.disc_start, zero=True)
        positive("vae.disc_layers", v.disc_layers)
        positive("vae.disc_channels", v.disc_channels)
        if v.perceptual_weight > 0 and not v.lpips_model:
            fail(
                "vae.perceptual_weight",
                v.perceptual_weight,
                "needs vae.lpips_model: a torch.export (.pt2) or TorchScript file computing "
                "LPIPS(x, y) for images in [-1, 1] (echofast ships no LPIPS weights and "
                "downloads nothing); set "
                "vae.perceptual_weight = 0 to train without the perceptual loss",
            )
        if v.lpips_model and not Path(v.lpips_model).is_file():
            fail("vae.lpips_model", v.lpips_model, "is not a file")


# ---- files ---------------------------------------------------------------------------------


def _toml():
    """``tomllib`` (Python >= 3.11) or its backport ``tomli``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                "TOML configs need Python >= 3.11 or the tomli package; or use a .json config"
            ) from None
    return tomllib


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config key {key!r}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config key {key!r}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config key {key!r}: {path} does not hold a JSON object")
    return data


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a ``.toml``, ``.json`` or ``.yaml``/``.yml`` file into a dict (no defaults)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    if suffix == ".toml":
        tomllib = _toml()
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path}: YAML configs need PyYAML (pip install pyyaml); or use TOML"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    else:
        raise ConfigError(f"{path}: unknown config format {suffix!r} (use .toml, .json, .yaml)")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return data


PACKAGED_CONFIGS = Path(__file__).parent / "configs"
"""The reference recipes shipped with the package (``lidm.toml``, ``lvdm.toml``, ...)."""


def config_path(path: str | os.PathLike) -> Path:
    """``path`` if it names a file; else a packaged config of that name (``lidm`` or
    ``lidm.toml``: see :data:`PACKAGED_CONFIGS`) when one exists; else ``path`` (which then
    fails to read, naming it and the packaged names)."""
    path = Path(path)
    if path.is_file() or len(path.parts) != 1:
        return path
    for name in (path.name, f"{path.name}.toml"):
        if (PACKAGED_CONFIGS / name).is_file():
            return PACKAGED_CONFIGS / name
    return path


def load_config(
    path: str | os.PathLike,
    model_type: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    flags: list[str] | tuple[str, ...] = (),
) -> TrainConfig:
    """Read a config file (or a packaged one by name, see :func:`config_path`), apply
    ``key=value`` overrides (TOML values), resolve defaults. Errors name the file, and the
    overrides when there are some. ``flags``: overrides that the command's own options stand
    for (``--no-progress``: ``train.progress=false``), applied last and not named as ``--set``
    values."""
    data, source = read_config_with_overrides(path, overrides, flags=flags)
    return config_from_dict(data, model_type, source=source)


def read_config_with_overrides(
    path: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    flags: list[str] | tuple[str, ...] = (),
) -> tuple[dict[str, Any], str]:
    """The raw dict of a config file (or a packaged one by name, see :func:`config_path`) with
    ``key=value`` overrides, then ``flags`` (see :func:`load_config`), applied, and its source for
    messages (the file, and the overrides when there are some)."""
    path = config_path(path)
    try:
        data = read_config_file(path)
    except ConfigError as err:
        if path.is_file() or len(path.parts) != 1:
            raise
        names = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.toml"))
        raise ConfigError(f"{err} (nor is it a packaged config: {', '.join(names)})") from None
    for item in (*overrides, *flags):
        apply_override(data, item)
    return data, str(path) + (f" with --set {' '.join(overrides)}" if overrides else "")


def apply_override(data: dict[str, Any], item: str) -> None:
    """``"train.max_steps=10"`` → ``data["train"]["max_steps"] = 10`` (value parsed as TOML;
    a value that is not valid TOML is taken as a string)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_steps=100")
    tomllib = _toml()
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a table")
    node[parts[-1]] = value


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    from ..fsutil import atomic_write_text

    return atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if (
            isinstance(value, dict)
            and value
            and path not in ("model.config", "diffusion.scheduler")
        ):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved config dicts."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
