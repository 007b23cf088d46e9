"""What each Triton backend refuses, one argument at a time, with TRITON_INTERPRET=1 (so that the
CPU is not the reason): the reasons are what keeps an unsupported call off the kernels, on a GPU
as under the interpreter. Huge inputs are stride-0 views and devices other than the CPU are the
meta device, so that no case allocates or computes anything."""

from __future__ import annotations

import pytest
import torch

from echofast.ops import registered_ops


def _x(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def _huge(rows: int, width: int) -> torch.Tensor:
    return torch.zeros(1, width).expand(rows, width)


def _window(pred=None, latents=None, noise=None) -> tuple[tuple, dict]:
    latents = _x(1, 4, 2, 3, 3) if latents is None else latents
    pred = _x(1, 4, 2, 3, 3) if pred is None else pred
    return (pred, latents, _x(1, 6), noise), {}


CASES = {
    "attention: devices differ": (
        "attention",
        (_x(1, 1, 4, 16), _x(1, 1, 4, 16, device="meta"), _x(1, 1, 4, 16, device="meta")),
        {},
        "q, k, v are on different devices (cpu, meta, meta)",
    ),
    "attention: empty": (
        "attention",
        (_x(1, 1, 0, 16), _x(1, 1, 0, 16), _x(1, 1, 0, 16)),
        {},
        "empty input",
    ),
    "bias_residual: dtype": (
        "bias_residual",
        (_x(1, 4, 2, 2, dtype=torch.float64),),
        {},
        "dtype torch.float64 unsupported",
    ),
    "feed_forward: dtype": (
        "feed_forward",
        (_x(5, 8, dtype=torch.float64), _x(32, 8), None, _x(8, 16), None),
        {},
        "dtype torch.float64 unsupported",
    ),
    "feed_forward: residual rows": (
        "feed_forward",
        (_x(5, 8), _x(32, 8), None, _x(8, 16), None),
        {"residual": _x(5, 16)[:, ::2]},
        "residual has no rows with a unit last stride (strides (16, 2))",
    ),
    "geglu_linear: dtype": (
        "geglu_linear",
        (_x(5, 8, dtype=torch.float64), _x(32, 8, dtype=torch.float64)),
        {},
        "dtype torch.float64 unsupported",
    ),
    "geglu_linear: weight stride": (
        "geglu_linear",
        (_x(5, 8), _x(8, 32).t()),
        {},
        "weight has no unit stride along K",
    ),
    "geglu_linear: rows": ("geglu_linear", (_huge(2**31, 8), _x(32, 8)), {}, "too many rows"),
    "group_norm: dtype": (
        "group_norm",
        (_x(1, 4, 2, 2, dtype=torch.float64), 2),
        {},
        "dtype torch.float64 unsupported",
    ),
    "group_norm: weight dtype": (
        "group_norm",
        (_x(1, 4, 2, 2), 2, _x(4, dtype=torch.float64)),
        {},
        "weight dtype torch.float64 unsupported",
    ),
    "group_norm: shift device": (
        "group_norm",
        (_x(1, 4, 2, 2), 2),
        {"shift": _x(1, 4, device="meta")},
        "shift is on meta, x on cpu",
    ),
    "group_norm: 2D": ("group_norm", (_x(3, 4), 2), {}, "x must be 3D, 4D or 5D, got 2D"),
    "group_norm: empty": ("group_norm", (_x(0, 4, 2, 2), 2), {}, "x is empty"),
    "group_norm: group width": (
        "group_norm",
        (_x(1, 2050, 1, 1), 2),
        {},
        "C/G = 1025 channels per group > 1024",
    ),
    "group_norm: activation": (
        "group_norm",
        (_x(1, 4, 2, 2), 2),
        {"activation": "relu"},
        "activation 'relu' unsupported",
    ),
    "layer_norm: dtype": (
        "layer_norm",
        (_x(3, 8, dtype=torch.float64),),
        {},
        "dtype torch.float64 unsupported",
    ),
    "layer_norm: autograd": (
        "layer_norm",
        (_x(3, 8).requires_grad_(),),
        {},
        "autograd: the Triton LayerNorm is forward only",
    ),
    "add_layer_norm: autograd": (
        "add_layer_norm",
        (_x(3, 8), _x(3, 8).requires_grad_()),
        {},
        "autograd: the Triton LayerNorm is forward only",
    ),
    "window_step: dtype": (
        "window_step",
        *_window(pred=_x(1, 4, 2, 3, 3, dtype=torch.int32)),
        "pred dtype torch.int32 unsupported",
    ),
    "window_step: empty": ("window_step", *_window(latents=_x(0, 4, 2, 3, 3)), "latents are empty"),
    "window_step: size": (
        "window_step",
        *_window(latents=torch.zeros(1, 1, 1, 1, 1).expand(2, 2**30, 1, 1, 1)),
        "latents have 2147483648 elements (>= 2^31)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_unsupported_argument_keeps_the_call_off_the_triton_kernels(case, monkeypatch):
    name, args, kwargs, reason = CASES[case]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reasons = registered_ops()[name].backends["triton"].not_supported_reasons(*args, **kwargs)
    assert any(r.startswith(reason) for r in reasons), reasons
    assert not any("not CUDA" in r for r in reasons), reasons
