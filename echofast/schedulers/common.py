"""What DDPM and DDIM share: config handling, beta schedules, timestep spacing, forward process.

A scheduler's config is exactly its ``__init__`` keyword arguments (diffusers' names and
defaults), recorded at construction, so ``scheduler_config.json`` files move both ways between
echofast and diffusers. All schedule arithmetic is float32, as in diffusers; every method
returns tensors in the dtype of the sample it was given.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..config import Config, require
from ..errors import ConfigError, MissingFileError
from ..fsutil import atomic_write_text
from ..outputs import ModelOutput
from .diffusers_keys import DIFFUSERS_SCHEDULER_KEYS, DIFFUSERS_SCHEDULER_KEYS_VERSION

CONFIG_NAME = "scheduler_config.json"
DIFFUSERS_FORMAT_VERSION = "0.27.0"

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: DDPM also has these (diffusers' DDIMScheduler raises NotImplementedError for them).
DDPM_BETA_SCHEDULES = (*BETA_SCHEDULES, "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

TimestepLike = int | torch.Tensor | Sequence[int]
GeneratorLike = torch.Generator | list[torch.Generator] | None


def _require_number(key: str, value: Any, *, integer: bool = False, minimum: float = 0) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"config key {key!r}: value {value!r} must be {what} >= {minimum}")


@dataclass
class SchedulerOutput(ModelOutput):
    """Result of ``step``: ``out.prev_sample``, ``out["prev_sample"]`` or ``out[0]``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


# ---- beta schedules and timestep spacings --------------------------------------------------------


def _cosine_alpha_bar(t: float) -> float:
    """Nichol & Dhariwal's cosine schedule (s = 0.008)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    """The Laplace noise schedule (log-SNR of a Laplace distribution), as diffusers has it."""
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def _alpha_bar_betas(
    n: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> torch.Tensor:
    """Betas that discretise the continuous ᾱ(t), t in [0, 1], capped at ``max_beta``."""
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so that ᾱ at the last training timestep is 0 (Algorithm 1 of
    arXiv:2305.08891): √ᾱ shifted to end at 0 and scaled to keep its first value."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(
    schedule: str, n: int, beta_start: float, beta_end: float, trained: list[float] | None
) -> torch.Tensor:
    """The float32 betas of the training noise schedule (``n`` of them)."""
    if trained is not None:
        return torch.tensor(trained, dtype=torch.float32)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if schedule == "scaled_linear":  # linear in sqrt(beta): the latent-diffusion schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        return _alpha_bar_betas(n, _cosine_alpha_bar)
    if schedule == "laplace":
        return _alpha_bar_betas(n, _laplace_alpha_bar)
    if schedule == "sigmoid":  # sigmoid of 12 even steps from -6 to 6, scaled to the range
        ramp = torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float32))
        return ramp * (beta_end - beta_start) + beta_start
    raise ConfigError(f"config key 'beta_schedule': value {schedule!r} is not supported")


def spaced_timesteps(spacing: str, num_train: int, num_steps: int, offset: int) -> list[int]:
    """``num_steps`` descending training timesteps (Table 2 of arXiv:2305.08891).

    leading: multiples of ``num_train // num_steps`` from 0, plus ``offset``.
    trailing: ``round(num_train - i * num_train / num_steps) - 1`` for i = 0..num_steps-1.
    linspace: ``round(i * (num_train - 1) / (num_steps - 1))``, reversed.

    Rounding is numpy's float64 round-half-to-even on the float64 grid values (``np.arange`` /
    ``np.linspace``), so the steps equal diffusers' bit for bit; e.g. 1000 trailing 64 steps
    gives 999, 983, 968, 952, ... (15.625 apart). Where float rounding makes ``np.arange`` yield
    one value too many (trailing, 62 step counts of 1..1000 such as 61 and 103, whose diffusers
    schedule ends in a bogus timestep -1), the schedule stops after ``num_steps`` values.
    """
    if spacing == "leading":
        ratio = num_train // num_steps
        return [i * ratio + offset for i in reversed(range(num_steps))]
    if spacing == "trailing":
        grid = np.arange(num_train, 0, -num_train / num_steps)[:num_steps]
        return [int(v) - 1 for v in np.round(grid)]
    if spacing == "linspace":
        grid = np.linspace(0, num_train - 1, num_steps).round()
        return [int(v) for v in grid[::-1]]
    raise ConfigError(f"config key 'timestep_spacing': value {spacing!r} is not supported")


def per_sample(coeffs: Sequence[torch.Tensor], sample: torch.Tensor) -> list[torch.Tensor]:
    """(k,) float32 coefficients → (k, 1, ..., 1) on the sample's device, in one transfer."""
    stacked = torch.stack(list(coeffs)).to(sample.device)
    shape = (stacked.shape[1],) + (1,) * (sample.dim() - 1)
    return [c.reshape(shape) for c in stacked.unbind(0)]


# ---- the base class ------------------------------------------------------------------------------


class SchedulerBase:
    """Config, training schedule, timesteps and forward process of a discrete-time scheduler.

    Subclasses set ``diffusers_class`` and call ``self._setup(locals())`` first thing in
    ``__init__``; ``__init__``'s keyword arguments are the config keys.
    """

    diffusers_class: ClassVar[str]
    #: sibling classes whose own keys ``from_config`` drops silently from a config that names
    #: such a class or none (diffusers' ``DDIMScheduler.from_config(ddpm.config)`` idiom)
    convertible_from: ClassVar[tuple[str, ...]] = ()
    _registry: ClassVar[dict[str, type[SchedulerBase]]] = {}
    #: the ``beta_schedule`` values this class supports (those its diffusers class has)
    beta_schedules: ClassVar[tuple[str, ...]] = BETA_SCHEDULES
    order: ClassVar[int] = 1
    init_noise_sigma: float = 1.0

    config: Config
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor
    num_inference_steps: int | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "diffusers_class" in cls.__dict__:
            SchedulerBase._registry[cls.diffusers_class] = cls

    # ---- config ----------------------------------------------------------------------------

    @classmethod
    def config_defaults(cls) -> dict[str, Any]:
        params = inspect.signature(cls.__init__).parameters
        return {k: p.default for k, p in params.items() if k != "self"}

    def _setup(self, init_locals: dict[str, Any]) -> None:
        config = {k: init_locals[k] for k in self.config_defaults()}
        trained = config.get("trained_betas")
        if trained is not None:
            if isinstance(trained, (torch.Tensor, np.ndarray)):
                trained = trained.tolist()
            config["trained_betas"] = [float(b) for b in trained]
        self.config = Config(config)
        self._check_config()

        c = self.config
        self.betas = make_betas(
            c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.trained_betas
        )
        if c.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._alphas_cumprod_on: dict[torch.device, torch.Tensor] = {}
        self.num_inference_steps = None
        self._set_schedule(list(reversed(range(c.num_train_timesteps))), device=None)

    def _check_config(self) -> None:
        c = self.config
        _require_number("num_train_timesteps", c.num_train_timesteps, integer=True, minimum=1)
        _require_number("beta_start", c.beta_start)
        _require_number("beta_end", c.beta_end)
        require("beta_schedule", c.beta_schedule, self.beta_schedules)
        if c.trained_betas is not None and len(c.trained_betas) != c.num_train_timesteps:
            raise ConfigError(
                f"config key 'trained_betas': {len(c.trained_betas)} values, but "
                f"num_train_timesteps is {c.num_train_timesteps}"
            )
        require("clip_sample", c.clip_sample, (True, False))
        _require_number("clip_sample_range", c.clip_sample_range)
        require("prediction_type", c.prediction_type, PREDICTION_TYPES)
        require("thresholding", c.thresholding, (True, False))
        _require_number("dynamic_thresholding_ratio", c.dynamic_thresholding_ratio)
        if c.thresholding and c.dynamic_thresholding_ratio > 1:
            raise ConfigError(
                f"config key 'dynamic_thresholding_ratio': value {c.dynamic_thresholding_ratio!r} "
                "must be a quantile in [0, 1] when thresholding is on"
            )
        _require_number("sample_max_value", c.sample_max_value)
        require("timestep_spacing", c.timestep_spacing, TIMESTEP_SPACINGS)
        _require_number("steps_offset", c.steps_offset, integer=True)
        require("rescale_betas_zero_snr", c.rescale_betas_zero_snr, (True, False))

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, source: str = "scheduler config", **overrides: Any
    ) -> Any:
        """Build from a config dict (a diffusers ``scheduler_config.json`` or ``.config``).

        As in diffusers, ``_``-prefixed metadata is ignored, keys listed in
        ``_use_default_values`` take this class's defaults, and keyword arguments override
        config keys (``DDIMScheduler.from_config(config, timestep_spacing="trailing")``).
        Which keys load depends on the class the config names in ``_class_name``:

        - this class: the keys of other diffusers scheduler classes (any class's, as of
          diffusers :data:`~.diffusers_keys.DIFFUSERS_SCHEDULER_KEYS_VERSION`) are dropped with
          one warning naming them: diffusers keeps a source class's keys when it converts a
          config and saves them (the Stable Diffusion 2.x ``DDIMScheduler`` config carries
          PNDM's ``skip_prk_steps``); a key no diffusers scheduler has raises
          :class:`ConfigError` naming it (a typo, most likely).
        - none (an in-memory ``scheduler.config``): every key must be one of this class's; an
          unknown key raises :class:`ConfigError` naming it; but the keys only the sibling
          class (DDPM's, DDIM's) has are dropped (diffusers'
          ``DDIMScheduler.from_config(ddpm.config)`` idiom).
        - another scheduler class (``PNDMScheduler``, ``EulerDiscreteScheduler``, ...): the
          keys this class knows are kept, the others dropped with one warning naming them, as
          diffusers' ``from_config`` drops them (it logs them); the sibling's own keys are
          dropped without a warning from a config naming the sibling.

        Kept keys and overrides are validated: an unknown override or an unsupported value
        raises :class:`ConfigError` naming it.
        """
        return cls._from_config(config, source, overrides)

    @classmethod
    def _from_config(cls, config: Any, source: str, overrides: dict[str, Any]) -> Any:
        """:meth:`from_config`, for it and :meth:`from_pretrained` (its warning names the line
        that called them)."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        name = config.get("_class_name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{source}: config key '_class_name': {name!r} is not a class name")
        if name is not None and not name.endswith("Scheduler"):
            raise ConfigError(
                f"{source}: describes a {name!r}, which is no scheduler ({cls.__name__} loads "
                "the scheduler_config.json of a diffusers scheduler)"
            )
        used_defaults = config.get("_use_default_values", [])
        if not isinstance(used_defaults, list) or not all(
            isinstance(k, str) for k in used_defaults
        ):
            raise ConfigError(
                f"{source}: config key '_use_default_values': expected a list of key names, "
                f"got {used_defaults!r}"
            )
        known = cls.config_defaults()
        siblings = {
            k
            for other in cls.convertible_from
            if other in cls._registry
            for k in cls._registry[other].config_defaults()
        } - set(known)
        own = name in (cls.diffusers_class, cls.__name__)
        silent = siblings if name is None or name in cls.convertible_from else set()
        params = {
            k: v
            for k, v in config.items()
            if not k.startswith("_") and k not in used_defaults and k not in silent
        }
        if name is not None:
            foreign = set(params) - set(known)
            if own:  # other classes' keys, kept by diffusers' conversions
                foreign &= DIFFUSERS_SCHEDULER_KEYS
            dropped = sorted(foreign)
            if dropped:
                why = (
                    ": other diffusers scheduler classes' keys, which diffusers keeps when it "
                    "converts a config"
                    if own
                    else ""
                )
                warnings.warn(
                    f"{source}: {cls.__name__} ignores the {name!r} config's key(s) {dropped}, "
                    f"which it does not have{why} (diffusers' from_config ignores them too)",
                    stacklevel=3,
                )
            params = {k: v for k, v in params.items() if k not in foreign}
        hint = ""
        if name is None and set(params) - set(known):
            hint = (
                "; a config of another scheduler class loads, its other keys dropped, when "
                "its '_class_name' names that class"
            )
        elif own and set(params) - set(known):
            hint = (
                "; other diffusers scheduler classes' keys are dropped, but no diffusers "
                f"scheduler (as of diffusers {DIFFUSERS_SCHEDULER_KEYS_VERSION}) has these"
            )
        params.update(overrides)
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: config key(s) {unknown} not supported by {cls.__name__} "
                f"(known keys: {sorted(known)}{hint})"
            )
        try:
            return cls(**params)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, subfolder: str | None = None, **overrides: Any
    ) -> Any:
        """Load ``scheduler_config.json`` from a folder (e.g. a pipeline's ``scheduler/``);
        keyword arguments override its keys, as in :meth:`from_config`."""
        folder = Path(path) / subfolder if subfolder else Path(path)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise MissingFileError(f"{config_path}: scheduler config file is missing")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{config_path}: not valid JSON ({err})") from None
        return cls._from_config(config, str(config_path), overrides)

    def save_config(self, path: str | os.PathLike) -> Path:
        """Write ``scheduler_config.json`` into the folder ``path`` (diffusers loads it)."""
        from .. import __version__

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "_class_name": self.diffusers_class,
            "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
            "_echofast_version": __version__,
            **self.config,
        }
        target = folder / CONFIG_NAME
        atomic_write_text(target, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return target

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """diffusers' name for :meth:`save_config` (a scheduler's only saved state is its
        config)."""
        return self.save_config(path)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(dict(self.config), sort_keys=True)})"

    # ---- inference timesteps ---------------------------------------------------------------

    def _set_schedule(self, steps: list[int], device: torch.device | str | None) -> None:
        self._steps = steps
        self._index_of = {t: i for i, t in enumerate(steps)}
        self.timesteps = torch.tensor(steps, dtype=torch.long, device=device)

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> None:
        """Choose ``num_inference_steps`` timesteps (``self.timesteps``, descending)."""
        self._set_spaced(num_inference_steps, device)

    def _set_spaced(self, num_inference_steps: int, device: torch.device | str | None) -> None:
        n, num_train = num_inference_steps, self.config.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= num_train:
            raise ValueError(
                f"num_inference_steps must be an integer in 1..{num_train} "
                f"(num_train_timesteps), got {n!r}"
            )
        n = int(n)
        c = self.config
        steps = spaced_timesteps(c.timestep_spacing, num_train, n, c.steps_offset)
        if steps[0] >= num_train:
            raise ValueError(
                f"steps_offset {self.config.steps_offset} with {n} leading steps gives timestep "
                f"{steps[0]}, past the last training timestep {num_train - 1}"
            )
        self.num_inference_steps = n
        self._set_schedule(steps, device)

    def previous_timestep(self, timestep: TimestepLike) -> int | torch.Tensor:
        """The timestep a step from ``timestep`` lands on (-1: past the end of the chain)."""
        steps = self._timestep_list(timestep)
        prev = self._previous(steps)
        if isinstance(timestep, torch.Tensor):
            return torch.tensor(prev, dtype=torch.long).reshape(timestep.shape)
        if isinstance(timestep, Sequence):
            return prev
        return prev[0]

    def _previous(self, steps: list[int]) -> list[int]:
        raise NotImplementedError

    def scale_model_input(self, sample: torch.Tensor, timestep: TimestepLike | None = None):
        """The identity: DDPM and DDIM feed the model the sample as it is."""
        return sample

    # ---- per-sample timesteps --------------------------------------------------------------

    def _timestep_list(self, timestep: TimestepLike) -> list[int]:
        """Timesteps as host ints: one (shared by the batch) or one per sample."""
        if isinstance(timestep, torch.Tensor):
            if timestep.is_floating_point() or timestep.is_complex() or timestep.dim() > 1:
                raise ValueError(
                    f"timestep must be an integer scalar or 1-D tensor, got dtype "
                    f"{timestep.dtype} and shape {tuple(timestep.shape)}"
                )
            steps = timestep.reshape(-1).tolist()
        elif isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            steps = [int(timestep)]
        elif isinstance(timestep, Sequence) and not isinstance(timestep, str):
            steps = [int(t) for t in timestep]
        else:
            raise ValueError(f"timestep must be an int or an integer tensor, got {timestep!r}")
        if not steps:
            raise ValueError("timestep is empty")
        num_train = self.config.num_train_timesteps
        bad = [t for t in steps if not 0 <= t < num_train]
        if bad:
            raise ValueError(f"timestep(s) {bad[:4]} outside the training range 0..{num_train - 1}")
        return steps

    def _sample_timesteps(self, timestep: TimestepLike, sample: torch.Tensor) -> list[int]:
        steps = self._timestep_list(timestep)
        if len(steps) > 1 and len(set(steps)) == 1:
            steps = steps[:1]
        if len(steps) > 1 and len(steps) != sample.shape[0]:
            raise ValueError(
                f"got {len(steps)} timesteps for a batch of {sample.shape[0]} "
                f"(sample shape {tuple(sample.shape)})"
            )
        return steps

    def _alpha_prod(self, steps: list[int], before_start: torch.Tensor) -> torch.Tensor:
        """ᾱ at ``steps`` (float32, CPU); ``before_start`` for steps < 0."""
        idx = torch.tensor(steps, dtype=torch.long)
        return torch.where(idx >= 0, self.alphas_cumprod[idx.clamp(min=0)], before_start)

    # ---- forward process (training) --------------------------------------------------------

    def _cumprod_on(self, device: torch.device) -> torch.Tensor:
        cached = self._alphas_cumprod_on.get(device)
        if cached is None:
            cached = self._alphas_cumprod_on[device] = self.alphas_cumprod.to(device)
        return cached

    def _forward_coeffs(
        self, timesteps: TimestepLike, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) per sample, shaped to broadcast against ``like``, in the dtype
        :func:`_compute_dtype` gives for it."""
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.tensor(timesteps, dtype=torch.long)
        ac = self._cumprod_on(like.device)[timesteps.to(like.device).reshape(-1)]
        ac = ac.to(_compute_dtype(like))
        shape = (ac.shape[0],) + (1,) * (like.dim() - 1)
        return ac.sqrt().reshape(shape), (1 - ac).sqrt().reshape(shape)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: TimestepLike
    ) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, with one timestep per sample (or one for all); in fp32,
        or fp64 for fp64 samples."""
        a, s = self._forward_coeffs(timesteps, original_samples)
        dtype = a.dtype
        out = a * original_samples.to(dtype) + s * noise.to(dtype)
        return out.to(original_samples.dtype)

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: TimestepLike
    ) -> torch.Tensor:
        """v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0, the v-prediction training target; in fp32, or fp64 for
        fp64 samples."""
        a, s = self._forward_coeffs(timesteps, sample)
        dtype = a.dtype
        return (a * noise.to(dtype) - s * sample.to(dtype)).to(sample.dtype)

    # ---- prediction parametrisations -------------------------------------------------------

    def _predict_x0(
        self, model_output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor
    ) -> torch.Tensor:
        """x̂_0 from the model output (unclipped); all float32, ``a_t`` broadcastable."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
        if kind == "v_prediction":
            return a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
        return model_output

    def _x0_affine(self, a_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c0, c1) with x̂_0 = c0·x_t + c1·m for the configured prediction type."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return 1 / a_t.sqrt(), -(1 - a_t).sqrt() / a_t.sqrt()
        if kind == "v_prediction":
            return a_t.sqrt(), -(1 - a_t).sqrt()
        return torch.zeros_like(a_t), torch.ones_like(a_t)

    def _affine_step(self, steps: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def step_coefficients(self, timestep: TimestepLike, batch_size: int) -> torch.Tensor:
        """The step as an affine map, for fused step kernels: float32 (batch_size, 6) on the CPU,
        one row ``(c0, c1, c2, c3, c4, c5)`` per sample, such that ::

            x̂_0 = clip(c0·x_t + c1·m)        (clip: ``clip_bound``, or none)
            x_prev = c2·x̂_0 + c3·x_t + c4·m + c5·z

        with m the model output and z the step's noise; ``step`` computes the same map.
        Configs whose step is no such map (``thresholding``; DDPM's learned variances) raise
        :class:`ConfigError` naming the key."""
        self._check_affine()
        steps = self._timestep_list(timestep)
        if len(steps) == 1:
            steps = steps * batch_size
        if len(steps) != batch_size:
            raise ValueError(f"got {len(steps)} timesteps for a batch of {batch_size}")
        return self._affine_step(steps)

    @property
    def clip_bound(self) -> float | None:
        """|x̂_0| bound applied by ``step`` (``clip_sample_range``), or None without clipping."""
        return float(self.config.clip_sample_range) if self.config.clip_sample else None

    def step_needs_noise(self, timestep: TimestepLike) -> bool:
        """Whether ``step`` at ``timestep`` draws noise (then one float32 randn of the sample's
        shape from the generator(s))."""
        return False

    def _bound_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """x̂_0 after dynamic thresholding (``thresholding``), else clipping (``clip_sample``)."""
        c = self.config
        if c.thresholding:
            return self._threshold(x0)
        if c.clip_sample:
            return x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        return x0

    def _threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Imagen's dynamic thresholding (arXiv:2205.11487), per sample: s is the
        ``dynamic_thresholding_ratio`` quantile of |x̂_0| clamped to [1, ``sample_max_value``];
        x̂_0 is clamped to ±s and divided by s."""
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)

    def _check_affine(self) -> None:
        """Raise :class:`ConfigError` for a config whose step is not an affine map."""
        if self.config.thresholding:
            raise ConfigError(
                "config key 'thresholding': value True is not supported by step_coefficients "
                "(the fused step of echofast's pipelines): dynamic thresholding divides x̂_0 by "
                "a per-sample quantile, which is no affine map; use step()"
            )


def check_step_inputs(model_output: torch.Tensor, sample: torch.Tensor) -> None:
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} does not match sample shape "
            f"{tuple(sample.shape)}"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision (and fp32) tensors, fp64 for fp64 ones."""
    return torch.promote_types(x.dtype, torch.float32)
