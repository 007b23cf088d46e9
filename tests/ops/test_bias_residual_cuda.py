"""The COMPILED Triton bias_residual kernel on a CUDA device, against an fp64 formula, on the
LVDM resblocks' frame-batched channels-last shapes (320 frames of 16×16, C = 320 and 640) and an
awkward one (C = 37). fp32 <= 1e-6 relative; fp16/bf16 within one rounding of the exact value and
within 2x plain PyTorch's error (its unfused ops, rounded after each)."""

from __future__ import annotations

import pytest
import torch
from support.markers import COMPILED_TRITON_ON_GPU
from support.oracles import bias_residual_oracle

from echofast.ops import bias_residual, bias_residual_reference

pytestmark = COMPILED_TRITON_ON_GPU

ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("shape", "form"),
    [
        ((320, 320, 16, 16), "shortcut"),
        ((320, 640, 8, 8), "mix"),
        ((7, 37, 5, 3), "shortcut"),
    ],
    ids=str,
)
def test_matches_fp64(shape, form, dtype):
    g = torch.Generator("cuda").manual_seed(shape[1])
    c = shape[1]

    def draw(*size):
        return torch.randn(*size, generator=g, device="cuda").to(dtype)

    y = draw(*shape).contiguous(memory_format=torch.channels_last)
    r = draw(*shape).contiguous(memory_format=torch.channels_last)
    b = draw(c)
    b2 = draw(c) if form == "shortcut" else None
    w = torch.rand(1, generator=g, device="cuda").to(dtype) if form == "mix" else None
    want = bias_residual_oracle(y, r, b, b2, w)
    plain = bias_residual_reference(y, residual=r, bias=b, bias2=b2, weight=w)
    with torch.no_grad():
        out = bias_residual(
            y.clone(memory_format=torch.channels_last),
            residual=r,
            bias=b,
            bias2=b2,
            weight=w,
            backend="triton",
        )
    err = (out.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-6 * want.abs().max().item()
        return
    plain_err = (plain.double() - want).abs().max().item()
    assert err <= 2 * max(plain_err, ULP[dtype] / 2 * want.abs().max().item())
    assert ((out.double() - want).abs() / want.abs().clamp_min(1.0)).max() <= ULP[dtype]
