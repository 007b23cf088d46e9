"""DDPM ancestral sampling (Ho et al. 2020), step for step what diffusers' DDPMScheduler does."""

from __future__ import annotations

import torch

from ..rng import randn_tensor
from .common import (
    GeneratorLike,
    SchedulerBase,
    SchedulerOutput,
    TimestepLike,
    check_step_inputs,
    per_sample,
    require,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log")

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
    """

    diffusers_class = "DDPMScheduler"
    convertible_from = ("DDIMScheduler",)

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        variance_type: str = "fixed_small",
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

    def _check_config(self) -> None:
        super()._check_config()
        require("variance_type", self.config.variance_type, VARIANCE_TYPES)

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
        """float32 (ᾱ_t, x̂_0 coefficient, x_t coefficient, σ), CPU, one per entry of ``steps``."""
        a_t = self._alpha_prod(steps, torch.tensor(1.0))
        a_s = self._alpha_prod(self._previous(steps), torch.tensor(1.0))
        one_minus_a_t = 1 - a_t
        alpha = a_t / a_s
        beta = 1 - alpha
        variance = ((1 - a_s) / one_minus_a_t * beta).clamp(min=MIN_VARIANCE)
        if self.variance_type == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(variance))
        else:
            std = variance.sqrt()
        std = torch.where(torch.tensor(steps) > 0, std, torch.zeros_like(std))
        x0_coeff = a_s.sqrt() * beta / one_minus_a_t
        xt_coeff = alpha.sqrt() * (1 - a_s) / one_minus_a_t
        return a_t, x0_coeff, xt_coeff, std

    def _affine_step(self, steps: list[int]) -> torch.Tensor:
        a_t, x0_coeff, xt_coeff, std = self._coefficients(steps)
        c0, c1 = self._x0_affine(a_t)
        return torch.stack([c0, c1, x0_coeff, xt_coeff, torch.zeros_like(a_t), std], dim=1)

    def step_needs_noise(self, timestep: TimestepLike) -> bool:
        return max(self._timestep_list(timestep)) > 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        generator: GeneratorLike = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step from ``timestep`` to ``previous_timestep(timestep)``.

        Args:
            model_output: the model's prediction (``prediction_type``), shaped like ``sample``.
            timestep: an int or 0-d tensor shared by the batch, or one timestep per sample.
            sample: x_t.
            noise: z for the t > 0 noise term, shaped like ``sample``; ignored where t == 0.
            generator: where z comes from when ``noise`` is None: exactly one float32
                ``randn`` of the sample's shape on the generator's device (one generator per
                sample with a list) per step with any t > 0, none when all t are 0.
            return_dict: ``False`` returns ``(prev_sample, pred_original_sample)``.
        """
        check_step_inputs(model_output, sample)
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator to step(), not both")
        if noise is not None and noise.shape != sample.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} does not match sample shape "
                f"{tuple(sample.shape)}"
            )
        steps = self._sample_timesteps(timestep, sample)
        a_t, x0_coeff, xt_coeff, std = per_sample(self._coefficients(steps), sample)
        x_t = sample.float()
        x0 = self._clip(self._predict_x0(model_output.float(), x_t, a_t))
        prev = x0_coeff * x0 + xt_coeff * x_t
        if max(steps) > 0:
            if noise is None:
                noise = randn_tensor(
                    tuple(sample.shape),
                    generator=generator,
                    device=sample.device,
                    dtype=torch.float32,
                )
            prev = prev + std * noise.float()
        out = (prev.to(sample.dtype), x0.to(sample.dtype))
        return SchedulerOutput(*out) if return_dict else out
