"""DDPM ancestral sampling (Ho et al. 2020), step for step what diffusers' DDPMScheduler does."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..rng import randn_tensor
from .common import (
    DDPM_BETA_SCHEDULES,
    GeneratorLike,
    SchedulerBase,
    SchedulerOutput,
    TimestepLike,
    check_step_inputs,
    per_sample,
    require,
)

#: Variances whose σ comes from the model: its output has twice the sample's channels (the
#: prediction, then a variance value v per element).
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
#: None is fixed_small, as in diffusers (DPMSolver-family configs carry ``variance_type=None``).
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", *LEARNED_VARIANCE_TYPES, None)

#: A variance this small stands for zero (diffusers clamps before taking logs and roots).
MIN_VARIANCE = 1e-20


class DDPMScheduler(SchedulerBase):
    """Denoising diffusion probabilistic model sampler.

    One step from t to the next scheduled timestep s (s = -1 after the last):
    x̂_0 from the model output (clipped to ±``clip_sample_range`` if ``clip_sample``), then the
    posterior mean ``√ᾱ_s·β/(1−ᾱ_t)·x̂_0 + √α·(1−ᾱ_s)/(1−ᾱ_t)·x_t`` with α = ᾱ_t/ᾱ_s,
    β = 1 − α (ᾱ_{-1} = 1), plus ``σ·z`` when t > 0, σ² = max((1−ᾱ_s)/(1−ᾱ_t)·β, 1e-20).
    With steps_offset or trailing spacing the last step has t > 0 and s = -1: σ² is then 0,
    clamped to 1e-20, so noise is still drawn and adds 1e-10·z, as in diffusers.

    ``variance_type``: σ = √σ² (fixed_small; None too, as in diffusers), exp(½·log σ²)
    (fixed_small_log), √β (fixed_large); with a model output of 2C channels (prediction, then
    v): σ = √v (learned) or exp(½·((v+1)/2·log β + (1−(v+1)/2)·log σ²)) (learned_range).
    ``fixed_large_log`` is refused: diffusers' step scales its noise by √(log β) with
    log β < 0, so it returns NaN.
    """

    diffusers_class = "DDPMScheduler"
    convertible_from = ("DDIMScheduler",)
    beta_schedules = DDPM_BETA_SCHEDULES

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        variance_type: str | None = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._setup(locals())
        self.variance_type = variance_type
        self.custom_timesteps = False

    def _check_config(self) -> None:
        super()._check_config()
        if self.config.variance_type == "fixed_large_log":
            raise ConfigError(
                "config key 'variance_type': value 'fixed_large_log' is not supported: "
                "diffusers' DDPMScheduler.step scales its noise by sqrt(log(beta_t)), the root "
                "of a negative number, so every step with t > 0 gives NaN"
            )
        require("variance_type", self.config.variance_type, VARIANCE_TYPES)

    def _check_affine(self) -> None:
        super()._check_affine()
        if self.variance_type in LEARNED_VARIANCE_TYPES:
            raise ConfigError(
                f"config key 'variance_type': value {self.variance_type!r} is not supported by "
                "step_coefficients (the fused step of echofast's pipelines): the noise scale "
                "comes from the model output; use step()"
            )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        timesteps: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Choose the timesteps (``self.timesteps``, descending): ``num_inference_steps`` of
        them spaced by ``timestep_spacing``, or exactly ``timesteps`` (custom: integers,
        strictly descending, in 0..num_train_timesteps-1; ``steps_offset`` does not apply).
        Each step goes to the next timestep of the list, the last one to -1."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                "set_timesteps takes exactly one of num_inference_steps and timesteps, got "
                f"num_inference_steps={num_inference_steps!r} and timesteps={timesteps!r}"
            )
        if timesteps is None:
            self._set_spaced(num_inference_steps, device)
            self.custom_timesteps = False
            return
        steps = self._custom_steps(timesteps)
        self.num_inference_steps = len(steps)
        self.custom_timesteps = True
        self._set_schedule(steps, device)

    def _custom_steps(self, timesteps: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
        """``timesteps`` as a validated list of host ints."""
        if isinstance(timesteps, (torch.Tensor, np.ndarray)) and timesteps.ndim == 1:
            values = timesteps.tolist()
        elif isinstance(timesteps, Sequence) and not isinstance(timesteps, (str, bytes)):
            values = list(timesteps)
        else:
            raise ValueError(f"timesteps must be a 1-D sequence of integers, got {timesteps!r}")
        steps = []
        for t in values:
            if isinstance(t, bool):
                raise ValueError(f"timesteps must be integers, got {t!r} in {values}")
            try:
                steps.append(operator.index(t))
            except TypeError:
                raise ValueError(f"timesteps must be integers, got {t!r} in {values}") from None
        num_train = self.config.num_train_timesteps
        if not steps:
            raise ValueError("timesteps is empty")
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"timesteps must be strictly descending, got {steps}")
        if steps[0] >= num_train or steps[-1] < 0:
            raise ValueError(
                f"timesteps must lie in 0..{num_train - 1} (num_train_timesteps), got {steps}"
            )
        return steps

    def _previous(self, steps: list[int]) -> list[int]:
        """The next entry of ``self.timesteps`` (every t-1 before ``set_timesteps``)."""
        if self.num_inference_steps is None:
            return [t - 1 for t in steps]
        prev = []
        for t in steps:
            i = self._index_of.get(t)
            if i is None:
                raise ValueError(
                    f"timestep {t} is not one of the {len(self._steps)} timesteps set by "
                    f"set_timesteps ({self._steps[0]} ... {self._steps[-1]})"
                )
            prev.append(self._steps[i + 1] if i + 1 < len(self._steps) else -1)
        return prev

    def _coefficients(self, steps: list[int]) -> tuple[torch.Tensor, ...]:
        """float32 (ᾱ_t, x̂_0 coefficient, x_t coefficient, σ² clamped to 1e-20, β), CPU, one
        per entry of ``steps``."""
        a_t = self._alpha_prod(steps, torch.tensor(1.0))
        a_s = self._alpha_prod(self._previous(steps), torch.tensor(1.0))
        one_minus_a_t = 1 - a_t
        alpha = a_t / a_s
        beta = 1 - alpha
        variance = ((1 - a_s) / one_minus_a_t * beta).clamp(min=MIN_VARIANCE)
        x0_coeff = a_s.sqrt() * beta / one_minus_a_t
        xt_coeff = alpha.sqrt() * (1 - a_s) / one_minus_a_t
        return a_t, x0_coeff, xt_coeff, variance, beta

    def _fixed_std(
        self, steps: list[int], variance: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """σ of a fixed ``variance_type`` per entry of ``steps`` (0 where t == 0)."""
        if self.variance_type == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(variance))
        elif self.variance_type == "fixed_large":
            std = beta.sqrt()
        else:
            std = variance.sqrt()
        return torch.where(torch.tensor(steps) > 0, std, torch.zeros_like(std))

    def _affine_step(self, steps: list[int]) -> torch.Tensor:
        a_t, x0_coeff, xt_coeff, variance, beta = self._coefficients(steps)
        std = self._fixed_std(steps, variance, beta)
        c0, c1 = self._x0_affine(a_t)
        return torch.stack([c0, c1, x0_coeff, xt_coeff, torch.zeros_like(a_t), std], dim=1)

    def step_needs_noise(self, timestep: TimestepLike) -> bool:
        return max(self._timestep_list(timestep)) > 0

    def _split_learned(
        self, model_output: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, predicted variance v) from a learned-variance model output."""
        c = sample.shape[1] if sample.dim() > 1 else 0
        if model_output.shape != (sample.shape[0], 2 * c, *sample.shape[2:]):
            raise ValueError(
                f"variance_type {self.variance_type!r} needs a model_output of twice the "
                f"sample's channels (prediction, then variance) along dim 1: sample shape "
                f"{tuple(sample.shape)}, model_output shape {tuple(model_output.shape)}"
            )
        prediction, predicted_variance = torch.split(model_output, c, dim=1)
        return prediction, predicted_variance

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: GeneratorLike = None,
        return_dict: bool = True,
        *,
        noise: torch.Tensor | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step from ``timestep`` to ``previous_timestep(timestep)``.

        Args:
            model_output: the model's prediction (``prediction_type``), shaped like ``sample``;
                for ``learned``/``learned_range`` variances, the prediction and then the
                variance value along dim 1 (twice the sample's channels), as diffusers takes it.
            timestep: an int or 0-d tensor shared by the batch, or one timestep per sample.
            sample: x_t.
            generator: where z comes from when ``noise`` is None: exactly one float32
                ``randn`` of the sample's shape on the generator's device (one generator per
                sample with a list) per step with any t > 0, none when all t are 0.
            return_dict: ``False`` returns ``(prev_sample, pred_original_sample)``.
            noise: z for the t > 0 noise term, shaped like ``sample``; ignored where t == 0.
        """
        predicted_variance = None
        if self.variance_type in LEARNED_VARIANCE_TYPES:
            model_output, predicted_variance = self._split_learned(model_output, sample)
        check_step_inputs(model_output, sample)
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator to step(), not both")
        if noise is not None and noise.shape != sample.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} does not match sample shape "
                f"{tuple(sample.shape)}"
            )
        steps = self._sample_timesteps(timestep, sample)
        a_t, x0_coeff, xt_coeff, variance, beta = self._coefficients(steps)
        if predicted_variance is None:
            std_terms = (self._fixed_std(steps, variance, beta),)
        else:
            positive = (torch.tensor(steps) > 0).float()
            std_terms = (positive, torch.log(variance), torch.log(beta))
        a_t, x0_coeff, xt_coeff, *std_terms = per_sample(
            (a_t, x0_coeff, xt_coeff, *std_terms), sample
        )
        x_t = sample.float()
        x0 = self._bound_x0(self._predict_x0(model_output.float(), x_t, a_t))
        prev = x0_coeff * x0 + xt_coeff * x_t
        if max(steps) > 0:
            if noise is None:
                noise = randn_tensor(
                    tuple(sample.shape),
                    generator=generator,
                    device=sample.device,
                    dtype=torch.float32,
                )
            if predicted_variance is None:
                std = std_terms[0]
            else:
                std = self._learned_std(predicted_variance.float(), *std_terms)
            prev = prev + std * noise.float()
        out = (prev.to(sample.dtype), x0.to(sample.dtype))
        return SchedulerOutput(*out) if return_dict else out

    def _learned_std(
        self,
        v: torch.Tensor,
        positive: torch.Tensor,
        log_variance: torch.Tensor,
        log_beta: torch.Tensor,
    ) -> torch.Tensor:
        """σ from the model's variance output ``v`` (0 where t == 0): √v (learned), or
        exp(½·log σ̃²) with log σ̃² = (v+1)/2·log β + (1 − (v+1)/2)·log σ² (learned_range)."""
        if self.variance_type == "learned":
            std = v**0.5
        else:
            frac = (v + 1) / 2
            std = torch.exp(0.5 * (frac * log_beta + (1 - frac) * log_variance))
        return torch.where(positive > 0, std, torch.zeros_like(std))
