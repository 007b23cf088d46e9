"""EchoNet-Synthetic's models, loading and saving diffusers-format folders."""

from .base import Config, ModelBase
from .lidm import LIDM
from .outputs import DiagonalGaussian, EncoderOutput, SampleOutput
from .vae import VAE

__all__ = [
    "LIDM",
    "VAE",
    "Config",
    "DiagonalGaussian",
    "EncoderOutput",
    "ModelBase",
    "SampleOutput",
]
