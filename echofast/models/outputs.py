"""Model outputs that behave like diffusers' ``BaseOutput`` (attribute, key and index access)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..outputs import ModelOutput
from ..rng import randn_tensor


@dataclass
class SampleOutput(ModelOutput):
    """Output of a UNet or a VAE decoder: ``sample``."""

    sample: torch.Tensor


class DiagonalGaussian:
    """Diagonal Gaussian posterior from (N, 2·C, ...) moments: mean, then log-variance.

    The log-variance is clamped to [-30, 20] as in the LDM/diffusers VAEs.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(
        self, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        noise = randn_tensor(
            tuple(self.mean.shape),
            generator=generator,
            device=self.parameters.device,
            dtype=self.parameters.dtype,
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL divergence to ``other`` (default: the standard normal), summed over C, H, W."""
        dims = list(range(1, self.mean.dim()))
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over C, H, W."""
        dims = list(range(1, self.mean.dim()))
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(
            np.log(2.0 * np.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims
        )


@dataclass
class EncoderOutput(ModelOutput):
    """Output of ``VAE.encode``: ``latent_dist``."""

    latent_dist: DiagonalGaussian
