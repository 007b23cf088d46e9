"""attention: every backend vs an fp64 oracle, odd shapes, strided inputs, errors."""

from __future__ import annotations

import math

import pytest
import torch

from echofast.ops import attention, use_backend

BACKENDS = ["torch", "sdpa"]


def _oracle(q, k, v, scale=None):
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * s, dim=-1)
    return p @ v.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("n", "heads", "lq", "lk", "d"),
    [
        (1, 1, 1, 1, 8),
        (3, 2, 17, 17, 16),
        (2, 4, 64, 64, 16),
        (5, 1, 97, 3, 32),
        (1, 3, 4, 50, 64),
    ],
)
def test_matches_fp64_oracle(backend, n, heads, lq, lk, d):
    g = torch.Generator().manual_seed(n * 1000 + lq)
    q, k, v = (torch.randn(n, heads, L, d, generator=g) for L in (lq, lk, lk))
    out = attention(q, k, v, backend=backend)
    ref = _oracle(q, k, v)
    assert out.shape == (n, heads, lq, d) and out.dtype == q.dtype
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_scale(backend):
    qkv = torch.randn(2, 10, 3 * 4 * 16)
    q, k, v = (t.view(2, 10, 4, 16).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    assert not q.is_contiguous()
    out = attention(q, k, v, scale=0.3, backend=backend)
    ref = _oracle(q, k, v, 0.3)
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_fp16_reference_error_bounded():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 33, 16, generator=g).half() for _ in range(3))
    out = attention(q, k, v, backend="torch")
    ref = _oracle(q, k, v)
    assert out.dtype == torch.float16
    assert (out.double() - ref).abs().max().item() <= 4 * torch.finfo(torch.float16).eps


def test_context_forcing_reaches_models():
    q = torch.randn(1, 1, 5, 8)
    with use_backend(attention="torch"):
        a = attention(q, q, q)
    torch.testing.assert_close(a, attention(q, q, q, backend="sdpa"))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 3, 8), (2, 3, 8), (2, 3, 8)), r"must be \(N, heads, L, D\)"),
        (((1, 2, 3, 8), (1, 2, 4, 8), (1, 2, 5, 8)), "shapes disagree"),
        (((1, 2, 3, 8), (1, 2, 4, 16), (1, 2, 4, 8)), "shapes disagree"),
    ],
)
def test_bad_shapes_are_named(shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v)
