"""FrozenBatchNorm as a stand-in for torch's BatchNorm in eval mode (fresh state, state-dict keys,
frozen parameters) and randomize_'s draws for every layer kind it touches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from echofast.eval._layers import FrozenBatchNorm, randomize_


def test_fresh_frozen_batch_norm_is_a_fresh_eval_batch_norm():
    ours, ref = FrozenBatchNorm(5, eps=1e-3), nn.BatchNorm2d(5, eps=1e-3).eval()
    x = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    assert repr(ours) == "FrozenBatchNorm(5, eps=0.001)"


def test_frozen_batch_norm_takes_a_batch_norm_state_dict():
    ref = nn.BatchNorm3d(4, eps=1e-3).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in (ref.weight, ref.bias, ref.running_mean):
            tensor.normal_(generator=g)
        ref.running_var.uniform_(0.5, 2.0, generator=g)
    state = {k: v for k, v in ref.state_dict().items() if k != "num_batches_tracked"}
    ours = FrozenBatchNorm(4, eps=1e-3)
    assert set(ours.state_dict()) == set(state)
    ours.load_state_dict(state, strict=True)
    assert not any(p.requires_grad for p in ours.parameters())
    x = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(24, 48, 5),
        nn.Conv3d(8, 600, 1),
        nn.Linear(100, 3000),
        FrozenBatchNorm(3000, 1e-3),
    )


def test_randomize_covers_2d_convolutions_biases_and_norm_affines():
    net = randomize_(_net(), torch.Generator().manual_seed(0))
    conv2d, conv3d, linear, bn = net
    assert float(conv2d.weight.detach().std()) == pytest.approx((2 / (24 * 25)) ** 0.5, rel=0.05)
    for bias in (conv3d.bias, linear.bias, bn.bias):
        assert float(bias.detach().std()) == pytest.approx(0.1, rel=0.15)
        assert float(bias.detach().mean()) == pytest.approx(0, abs=0.03)
    assert float(bn.weight.std()) == pytest.approx(0.1, rel=0.1)


def test_randomize_is_reproducible_with_a_seeded_generator():
    torch.manual_seed(123)
    a = randomize_(_net(), torch.Generator().manual_seed(7)).state_dict()
    torch.manual_seed(456)
    b = randomize_(_net(), torch.Generator().manual_seed(7)).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
