"""Deterministic DDIM sampling (Song et al. 2021, η = 0), step for step as diffusers' DDIM."""

from __future__ import annotations

import numbers

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


class DDIMScheduler(SchedulerBase):
    """Denoising diffusion implicit model sampler (η = 0 by default: deterministic).

    One step from t to s = t − ``num_train_timesteps // num_inference_steps`` (diffusers'
    rule, also for trailing and linspace spacing, where s need not be the next scheduled
    timestep): x̂_0 and ε̂ from the model output (ε̂ from the *unclipped* x̂_0), x̂_0 clipped if
    ``clip_sample``, then ``x_s = √ᾱ_s·x̂_0 + √(1−ᾱ_s)·ε̂``. For s < 0, ᾱ_s is 1 with
    ``set_alpha_to_one`` and ᾱ_0 without. ``step(eta=η)`` with η > 0 adds noise as
    diffusers does; the fused step (``step_coefficients``) is the η = 0 map.
    """

    diffusers_class = "DDIMScheduler"
    convertible_from = ("DDPMScheduler",)

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._setup(locals())
        self.final_alpha_cumprod = (
            torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0].clone()
        )

    def _check_config(self) -> None:
        super()._check_config()
        require("set_alpha_to_one", self.config.set_alpha_to_one, (True, False))

    def _previous(self, steps: list[int]) -> list[int]:
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler: call set_timesteps() before stepping")
        stride = self.config.num_train_timesteps // self.num_inference_steps
        return [t - stride for t in steps]

    def _affine_step(self, steps: list[int]) -> torch.Tensor:
        a_t = self._alpha_prod(steps, self.final_alpha_cumprod)
        a_s = self._alpha_prod(self._previous(steps), self.final_alpha_cumprod)
        c0, c1 = self._x0_affine(a_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            e0, e1 = torch.zeros_like(a_t), torch.ones_like(a_t)
        elif kind == "v_prediction":
            e0, e1 = (1 - a_t).sqrt(), a_t.sqrt()
        else:
            e0, e1 = 1 / (1 - a_t).sqrt(), -a_t.sqrt() / (1 - a_t).sqrt()
        b = (1 - a_s).sqrt()
        return torch.stack([c0, c1, a_s.sqrt(), b * e0, b * e1, torch.zeros_like(a_t)], dim=1)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: GeneratorLike = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        noise: torch.Tensor | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One step from ``timestep`` to ``previous_timestep(timestep)``, diffusers' arguments.

        Args:
            model_output: the model's prediction (``prediction_type``), shaped like ``sample``.
            timestep: an int or 0-d tensor shared by the batch, or one timestep per sample.
            sample: x_t.
            eta: η ≥ 0, the weight of the step's noise: σ = η·√((1−ᾱ_s)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_s))
                and ``x_s = √ᾱ_s·x̂_0 + √(1−ᾱ_s−σ²)·ε̂ + σ·z``; 0 (DDIM) draws no noise,
                1 is DDPM-like.
            use_clipped_model_output: recompute ε̂ from the clipped (or thresholded) x̂_0.
            generator: with η > 0 and no noise given, z is one float32 ``randn`` of the
                sample's shape from it (one generator per sample with a list), drawn at every
                step, the last one included (as diffusers does).
            variance_noise: z itself (diffusers' name), shaped like ``sample``.
            return_dict: ``False`` returns ``(prev_sample, pred_original_sample)``.
            noise: z, echofast's name (the same argument as in DDPM's ``step``).

        With η = 0, ``generator``, ``variance_noise`` and ``noise`` are not used.
        """
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not eta >= 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        check_step_inputs(model_output, sample)
        if noise is not None and variance_noise is not None:
            raise ValueError("pass either noise or variance_noise to step(), not both")
        z = variance_noise if variance_noise is not None else noise
        if eta > 0 and z is not None:
            if generator is not None:
                raise ValueError("pass either variance_noise (noise) or generator, not both")
            if z.shape != sample.shape:
                raise ValueError(
                    f"variance_noise shape {tuple(z.shape)} does not match sample shape "
                    f"{tuple(sample.shape)}"
                )
        steps = self._sample_timesteps(timestep, sample)
        a_t = self._alpha_prod(steps, self.final_alpha_cumprod)
        a_s = self._alpha_prod(self._previous(steps), self.final_alpha_cumprod)
        if eta > 0:
            variance = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
            std = eta * variance.sqrt()
            a_t, a_s, std = per_sample((a_t, a_s, std), sample)
        else:
            a_t, a_s = per_sample((a_t, a_s), sample)

        x_t, out = sample.float(), model_output.float()
        x0 = self._predict_x0(out, x_t, a_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = out
        elif kind == "v_prediction":
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x_t
        else:
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x0 = self._bound_x0(x0)
        if use_clipped_model_output:
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        if eta > 0:
            prev = a_s.sqrt() * x0 + (1 - a_s - std**2).sqrt() * eps
            if z is None:
                z = randn_tensor(
                    tuple(sample.shape),
                    generator=generator,
                    device=sample.device,
                    dtype=torch.float32,
                )
            prev = prev + std * z.float()
        else:
            prev = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
        result = (prev.to(sample.dtype), x0.to(sample.dtype))
        return SchedulerOutput(*result) if return_dict else result
