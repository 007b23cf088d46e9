"""Exponential moving average of a model's parameters, with diffusers' ``EMAModel`` semantics.

Per optimizer step ``n`` (1, 2, ...), with ``t = max(0, n - update_after_step - 1)``::

    decay_n = 0                                            if t == 0 (the EMA copies the weights)
            = 1 - (1 + t / inv_gamma) ** -power            if use_warmup (reference: power 2/3)
            = (1 + t) / (10 + t)                           otherwise
    decay_n = max(min(decay_n, decay), min_decay)
    ema    -= (1 - decay_n) * (ema - param)                (same arithmetic as diffusers)

With decay 0.9999 and power 2/3 the cap is reached after about 10^6 steps (decay 0.999 at
~31.6k steps, 0.9995 at ~89k). Parameters that do not require grad are copied. Only parameters
are averaged (echofast's models have no buffers); :meth:`copy_to` writes the average into a
model of the same architecture, which is what is released.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def ema_decay(
    optimization_step: int,
    *,
    decay: float = 0.9999,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_warmup: bool = True,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
) -> float:
    """The decay used at ``optimization_step`` (1-based), as ``EMAModel.get_decay``."""
    step = max(0, optimization_step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        value = 1 - (1 + step / inv_gamma) ** -power
    else:
        value = (1 + step) / (10 + step)
    return max(min(value, decay), min_decay)


class EMA:
    """Shadow copies of a model's named parameters (float32 on the parameters' device)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = True,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
    ):
        self.settings = dict(
            decay=decay,
            min_decay=min_decay,
            update_after_step=update_after_step,
            use_warmup=use_warmup,
            inv_gamma=inv_gamma,
            power=power,
        )
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for _, p in model.named_parameters()]
        self.optimization_step = 0
        self.cur_decay_value: float | None = None

    def get_decay(self, optimization_step: int) -> float:
        return ema_decay(optimization_step, **self.settings)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> float:
        params = list(parameters)
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} parameters, got {len(params)}")
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow, params) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow, params) if not p.requires_grad]
        if trained:
            s_list = [s for s, _ in trained]
            p_list = [p.detach() for _, p in trained]
            torch._foreach_sub_(s_list, torch._foreach_sub(s_list, p_list), alpha=1 - decay)
        for s, p in frozen:
            s.copy_(p)
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (same parameter names)."""
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing or len(params) != len(self.names):
            raise ValueError(f"model does not match the EMA's parameters (missing {missing[:4]})")
        for name, s in zip(self.names, self.shadow):
            params[name].copy_(s.to(params[name].dtype))

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}

    def state_dict(self) -> dict:
        return {
            "optimization_step": self.optimization_step,
            "settings": dict(self.settings),
            "shadow": self.averaged_state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if list(shadow) != self.names:
            raise ValueError("EMA state does not match the model's parameters")
        for s, name in zip(self.shadow, self.names):
            s.copy_(shadow[name])
        self.optimization_step = int(state["optimization_step"])
