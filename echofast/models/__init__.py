"""EchoNet-Synthetic's models, loading and saving diffusers-format folders."""

from .base import Config, ModelBase
from .lidm import LIDM
from .lvdm import LVDM
from .outputs import DiagonalGaussian, EncoderOutput, SampleOutput
from .vae import VAE

__all__ = [
    "LIDM",
    "LVDM",
    "VAE",
    "Config",
    "DiagonalGaussian",
    "EncoderOutput",
    "ModelBase",
    "SampleOutput",
]
