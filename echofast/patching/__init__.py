"""``echofast.patch(obj)``: run existing diffusers pipelines and models on echofast, in place.

::

    import echofast

    report = echofast.patch(unet)   # or a pipeline, a VAE, any diffusers module tree
    print(report)                   # what was replaced / patched / left alone, and why
    ...                             # the unchanged diffusers sampling loop
    echofast.unpatch(unet)          # original classes and attention processors again

Supported whole models (``UNetSpatioTemporalConditionModel``, ``UNet2DModel``,
``AutoencoderKL``) are served by echofast's ``LVDM``/``LIDM``/``VAE`` built around the diffusers
parameters; any other config or module tree has its GroupNorm+SiLU and attention call sites
patched onto echofast's fused ops. See :func:`patch`.
"""

from .core import PatchError, patch, unpatch
from .report import LeftAlone, PatchedSite, PatchReport, Replacement

__all__ = [
    "LeftAlone",
    "PatchError",
    "PatchReport",
    "PatchedSite",
    "Replacement",
    "patch",
    "unpatch",
]
