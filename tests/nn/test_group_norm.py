"""``echofast.nn.GroupNorm`` as a drop-in ``torch.nn.GroupNorm``: every input rank torch takes
((N, C), (N, C, L), (N, C, H, W), (N, C, T, H, W) and beyond), the same values and gradients,
and interchangeable state dicts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from echofast.nn import GroupNorm

# (shape, groups): every rank torch.nn.GroupNorm accepts, odd sizes, 1 to 4 channels per group
SHAPES = [
    ((3, 6), 3),
    ((5, 12), 4),
    ((1, 7), 1),
    ((4, 10, 7), 5),
    ((3, 9, 5, 7), 3),
    ((2, 8, 3, 5, 3), 2),
    ((2, 4, 3, 1, 2, 3), 2),
]
IDS = [f"{len(s)}d-{'x'.join(map(str, s))}-g{g}" for s, g in SHAPES]


def _torch_norm(groups: int, channels: int, seed: int, affine: bool = True) -> torch.nn.GroupNorm:
    """torch's module with random affine parameters (the default 1 / 0 would hide mix-ups)."""
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-5, affine=affine)
    if affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(channels, generator=g) * 0.5 + 1)
            norm.bias.copy_(torch.randn(channels, generator=g) * 0.5)
    return norm


def _pair(groups: int, channels: int, seed: int, affine: bool = True):
    theirs = _torch_norm(groups, channels, seed, affine)
    ours = GroupNorm(groups, channels, eps=1e-5, affine=affine)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize(("shape", "groups"), SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_group_norm_for_every_input_rank(shape, groups, dtype):
    seed = sum(shape) * 7 + groups
    ours, theirs = _pair(groups, shape[1], seed)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1).to(dtype)
    y = ours(x)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, theirs(x))  # per-dtype tolerances of assert_close
    want = F.group_norm(x.float(), groups, theirs.weight.float(), theirs.bias.float(), 1e-5)
    ulp = torch.finfo(dtype).eps
    assert (y.float() - want).abs().max().item() <= ulp * want.abs().max().item()


@pytest.mark.parametrize(("shape", "groups"), SHAPES[:4], ids=IDS[:4])
def test_gradients_match_torch(shape, groups):
    seed = sum(shape) + groups
    ours, theirs = _pair(groups, shape[1], seed)
    ours, theirs = ours.double(), theirs.double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads = []
    for module in (ours, theirs):
        xr = x.clone().requires_grad_()
        (module(xr) * dy).sum().backward()
        grads.append((xr.grad, module.weight.grad, module.bias.grad))
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("affine", [True, False])
def test_state_dicts_are_interchangeable(affine):
    theirs = _torch_norm(4, 12, seed=3, affine=affine)
    ours = GroupNorm(4, 12, affine=affine, activation="silu")
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    back = torch.nn.GroupNorm(4, 12, affine=affine)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
        assert torch.equal(back.state_dict()[key], value)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours(x), F.silu(theirs(x)))


def test_modulation_and_add_on_flat_input():
    """(N, C) takes the op's extras too: scale / shift (N, C) and add (M, C)."""
    g = torch.Generator().manual_seed(5)
    ours, theirs = _pair(3, 9, seed=6)
    ours.activation = "silu"
    x = torch.randn(6, 9, generator=g)
    scale, shift, add = (torch.randn(rows, 9, generator=g) for rows in (6, 6, 2))
    y = ours(x, scale=scale, shift=shift, add=add)
    want = F.silu(theirs(x + add.repeat_interleave(3, 0)) * (1 + scale) + shift)
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("eps", [1e-6, 0.25])
def test_eps_is_the_modules(eps):
    """Low-variance groups (e.g. a VAE's 1e-6 norms on near-constant maps) depend on eps."""
    ours = GroupNorm(3, 6, eps=eps, activation="silu")
    x = torch.randn(2, 6, 5, 3, generator=torch.Generator().manual_seed(7)) * 1e-3
    want = F.silu(F.group_norm(x.double(), 3, eps=eps)).float()
    torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-5)


def test_input_without_channels_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, \*spatial\), got shape \(6,\)"):
        GroupNorm(3, 6)(torch.randn(6))


def test_repr_names_the_activation():
    plain = repr(torch.nn.GroupNorm(4, 8, eps=1e-6))
    assert repr(GroupNorm(4, 8, eps=1e-6, activation="silu")) == plain[:-1] + ", activation=silu)"
