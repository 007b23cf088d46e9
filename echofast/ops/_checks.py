"""Argument checks shared by the ops' public entry points (each raises ValueError naming the
op and the argument)."""

from __future__ import annotations

import math

import torch


def check_eps(op: str, eps: float) -> None:
    """``eps`` must be a finite number >= 0 (a negative or NaN eps gives NaN outputs)."""
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")


def check_devices(op: str, x_name: str, x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` that is not None must be on ``x``'s device."""
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(
                f"{op}: {name} {tuple(t.shape)} {t.dtype} is on {t.device}, {x_name} on {x.device}"
            )
