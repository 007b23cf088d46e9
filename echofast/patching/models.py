"""Whole-model replacement: a diffusers model's forward served by the echofast model of the same
config, built around the diffusers module's own parameters.

The echofast model is built on the meta device and each of its submodules then *uses the
parameter dict of the diffusers submodule at the same path* (state-dict keys are the same by
construction). Nothing is copied, and whatever later happens to the diffusers parameters —
``.to(device/dtype)``, ``load_state_dict`` (also with ``assign=True``), optimiser steps — is what
the echofast model computes with. Conv weights keep diffusers' layout; the echofast forward runs
its activations channels-last (``ModelBase.memory_format``) all the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from .core import SiteState


def _param_keys(module: nn.Module) -> dict[str, tuple[int, ...] | None]:
    return {k: (None if v is None else tuple(v.shape)) for k, v in module._parameters.items()}


def share_parameters(echo: nn.Module, diff: nn.Module) -> str | None:
    """Make every submodule of ``echo`` use the parameter dict of ``diff``'s submodule at the same
    path. Returns why that is impossible (and changes nothing then), or None when done."""
    echo_mods = dict(echo.named_modules())
    diff_mods = dict(diff.named_modules())
    pairs = []
    for path, em in echo_mods.items():
        if em._buffers:
            return f"echofast module {path or '<root>'} has buffers"
        dm = diff_mods.get(path)
        if not em._parameters:
            if dm is not None and dm._parameters:
                return f"parameters of {path} have no echofast counterpart"
            continue
        if dm is None:
            return f"no diffusers module at {path} (echofast expects parameters there)"
        if _param_keys(em) != _param_keys(dm):
            return (
                f"parameters of {path} differ: diffusers {_param_keys(dm)}, "
                f"echofast {_param_keys(em)}"
            )
        pairs.append((em, dm))
    for path, dm in diff_mods.items():
        if dm._buffers:
            return f"diffusers module {path or '<root>'} has buffers echofast does not use"
        if dm._parameters and path not in echo_mods:
            return f"parameters of {path} have no echofast counterpart"
    for em, dm in pairs:
        em._parameters = dm._parameters
    return None


def echofast_class(diff: nn.Module) -> tuple[type, str] | None:
    """(echofast class, kind) for a diffusers model class echofast has a model of."""
    from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel

    from ..models import LIDM, LVDM, VAE

    table = {
        UNetSpatioTemporalConditionModel: (LVDM, "lvdm"),
        UNet2DModel: (LIDM, "lidm"),
        AutoencoderKL: (VAE, "vae"),
    }
    return table.get(type(diff))


def build_echofast(diff: nn.Module) -> tuple[nn.Module | None, str]:
    """The echofast model for ``diff``'s config on the meta device, or (None, why not)."""
    found = echofast_class(diff)
    if found is None:
        return None, f"echofast has no model for {type(diff).__name__}"
    cls, _ = found
    config = {k: v for k, v in dict(diff.config).items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            echo = cls.from_config(config, source=f"{type(diff).__name__} config")
    except ConfigError as err:
        return None, f"config not supported by echofast.models.{cls.__name__}: {err}"
    return echo.eval(), ""


def _sync_mode(echo: nn.Module, diff: nn.Module) -> None:
    if echo.training != diff.training:
        echo.train(diff.training)


def _sync_checkpointing(echo: nn.Module, diff: nn.Module, enabled: bool) -> None:
    """Give ``echo`` the gradient checkpointing of ``diff`` (on or off, and diffusers'
    checkpointing function, whose ``func(block, *args)`` is echofast's convention too)."""
    from ..models.base import checkpoint_stage, set_gradient_checkpointing

    func = checkpoint_stage
    if enabled:
        func = next(
            (
                m._gradient_checkpointing_func
                for m in diff.modules()
                if getattr(m, "gradient_checkpointing", False)
                and callable(getattr(m, "_gradient_checkpointing_func", None))
            ),
            checkpoint_stage,
        )
    if (
        echo.gradient_checkpointing != enabled
        or getattr(echo, "_gradient_checkpointing_func", None) is not func
    ):
        set_gradient_checkpointing(echo, enabled, func)


def lvdm_forward(
    self: Any,
    st: SiteState,
    base: type,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    added_time_ids: torch.Tensor,
    return_dict: bool = True,
) -> Any:
    """``UNetSpatioTemporalConditionModel.forward`` run by :class:`echofast.models.LVDM`."""
    if torch.is_grad_enabled():
        _sync_checkpointing(st.echo, self, self.is_gradient_checkpointing)
    from diffusers.models.unets.unet_spatio_temporal_condition import (
        UNetSpatioTemporalConditionOutput,
    )

    _sync_mode(st.echo, self)
    with st.backend_context():
        (x,) = st.echo(sample, timestep, encoder_hidden_states, added_time_ids, return_dict=False)
    return UNetSpatioTemporalConditionOutput(sample=x) if return_dict else (x,)


def lidm_forward(
    self: Any,
    st: SiteState,
    base: type,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    class_labels: torch.Tensor | None = None,
    return_dict: bool = True,
) -> Any:
    """``UNet2DModel.forward`` run by :class:`echofast.models.LIDM`."""
    if class_labels is not None:
        return base.forward(self, sample, timestep, class_labels, return_dict)
    if torch.is_grad_enabled():
        _sync_checkpointing(st.echo, self, self.is_gradient_checkpointing)
    from diffusers.models.unets.unet_2d import UNet2DOutput

    _sync_mode(st.echo, self)
    with st.backend_context():
        (x,) = st.echo(sample, timestep, return_dict=False)
    return UNet2DOutput(sample=x) if return_dict else (x,)


def vae_encoder_forward(self: Any, st: SiteState, base: type, sample: torch.Tensor) -> Any:
    """diffusers ``Encoder.forward`` (of an ``AutoencoderKL``) run by echofast's VAE encoder."""
    if sample.dim() != 4:
        return base.forward(self, sample)
    if torch.is_grad_enabled():
        _sync_checkpointing(st.echo, self, self.gradient_checkpointing)
    _sync_mode(st.echo, self)
    with st.backend_context():
        h = st.echo(sample.contiguous(memory_format=torch.channels_last))
    return h.contiguous()


def vae_decoder_forward(
    self: Any,
    st: SiteState,
    base: type,
    sample: torch.Tensor,
    latent_embeds: torch.Tensor | None = None,
) -> Any:
    """diffusers ``Decoder.forward`` (of an ``AutoencoderKL``) run by echofast's VAE decoder."""
    if latent_embeds is not None or sample.dim() != 4:
        return base.forward(self, sample, latent_embeds)
    if torch.is_grad_enabled():
        _sync_checkpointing(st.echo, self, self.gradient_checkpointing)
    _sync_mode(st.echo, self)
    with st.backend_context():
        x = st.echo(sample.contiguous(memory_format=torch.channels_last))
    return x.contiguous()


FORWARDS = {
    "lvdm": lvdm_forward,
    "lidm": lidm_forward,
    "vae_encoder": vae_encoder_forward,
    "vae_decoder": vae_decoder_forward,
}
