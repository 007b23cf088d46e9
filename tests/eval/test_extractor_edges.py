"""Building blocks and tensor layouts of the feature networks, against PyTorch references:
frozen batch norm, TF "SAME" convolutions and max pools, preprocessing, the stage-by-stage shapes
of the full-size I3D and R(2+1)D, and the branch layout of the Inception blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from echofast.eval._layers import FrozenBatchNorm, randomize_
from echofast.eval.i3d import I3D, MIXED, InceptionBlock, Unit3D, max_pool_same
from echofast.eval.inception import FIDInceptionV3, InceptionE
from echofast.eval.r2plus1d import R2Plus1D


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 7), (2, 3, 5, 4), (1, 3, 3, 5, 2)])
def test_frozen_batch_norm_is_batch_norm_in_eval_mode(shape):
    g = torch.Generator().manual_seed(len(shape))
    ref = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    ref = ref(3, eps=1e-3).eval()
    ours = FrozenBatchNorm(3, eps=1e-3)
    with torch.no_grad():
        for module in (ref, ours):  # small variances so that eps matters
            module.weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
            module.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))
            module.running_mean.copy_(torch.tensor([1.0, -0.5, 2.0]))
            module.running_var.copy_(torch.tensor([2e-3, 1e-3, 4.0]))
    x = torch.randn(shape, generator=g) * 3
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours(x[:1]), ref(x[:1]), rtol=1e-6, atol=1e-6)  # no batch stats


def test_extractor_batch_norms_use_tf_epsilon():
    with torch.device("meta"):
        nets = (I3D(), FIDInceptionV3())
    for net in nets:
        eps = {m.eps for m in net.modules() if isinstance(m, FrozenBatchNorm)}
        assert eps == {1e-3}


def test_randomize_draws_he_normal_weights_and_plausible_statistics():
    net = randomize_(
        nn.Sequential(nn.Conv3d(16, 64, 3), nn.Linear(300, 200), FrozenBatchNorm(4000, 1e-3)),
        torch.Generator().manual_seed(0),
    )
    for layer, fan_in in ((net[0], 16 * 27), (net[1], 300)):
        assert float(layer.weight.detach().std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
        assert float(layer.weight.detach().mean()) == pytest.approx(0, abs=0.01)
    bn = net[2]
    assert float(bn.running_var.min()) >= 1 and float(bn.running_var.max()) <= 1.5
    assert float(bn.running_mean.std()) == pytest.approx(0.1, rel=0.1)
    assert float(bn.weight.mean()) == pytest.approx(1, abs=0.01)


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's documented "SAME" padding: the odd extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def tf_same_pad(x: torch.Tensor, kernel, stride, value: float) -> torch.Tensor:
    pads = [tf_same_pads(x.shape[2 + d], kernel[d], stride[d]) for d in range(3)]
    widths = [(0, 0), (0, 0), *pads]
    return torch.from_numpy(np.pad(x.numpy(), widths, constant_values=value))


@pytest.mark.parametrize(
    "size,kernel,stride",
    [
        ((5, 6, 7), (3, 3, 3), (2, 2, 2)),
        ((4, 9, 8), (1, 3, 3), (1, 2, 2)),
        ((6, 7, 5), (2, 2, 2), (2, 2, 2)),
        ((3, 8, 11), (3, 3, 3), (1, 1, 1)),
        ((7, 10, 13), (7, 7, 7), (2, 2, 2)),
    ],
)
def test_same_max_pool_and_conv_match_tf_padding(size, kernel, stride):
    g = torch.Generator().manual_seed(sum(size))
    x = -1 - torch.rand(2, 3, *size, generator=g)  # negative: zero padding would win a max
    ref = F.max_pool3d(tf_same_pad(x, kernel, stride, -np.inf), kernel, stride)
    torch.testing.assert_close(max_pool_same(x, kernel, stride), ref, rtol=0, atol=0)
    unit = Unit3D(3, 4, kernel, stride, norm=False, relu=False, bias=True)
    randomize_(unit, g)
    expected = F.conv3d(
        tf_same_pad(x, kernel, stride, 0.0), unit.conv3d.weight, unit.conv3d.bias, stride
    )
    assert (expected < 0).any()  # relu=False keeps negative outputs
    torch.testing.assert_close(unit(x), expected, rtol=1e-5, atol=1e-5)


def test_i3d_inception_block_branches():
    """kinetics-i3d's Mixed blocks: 1x1 | 1x1 → 3x3x3 | 1x1 → 3x3x3 | SAME 3x3x3 max pool →
    1x1, concatenated in that order."""
    g = torch.Generator().manual_seed(5)
    block = randomize_(InceptionBlock(6, (2, 3, 4, 2, 3, 5)), g)
    x = torch.randn(1, 6, 3, 5, 4, generator=g)
    pooled = F.max_pool3d(tf_same_pad(x, (3, 3, 3), (1, 1, 1), -np.inf), 3, 1)
    expected = torch.cat(
        [block.b0(x), block.b1b(block.b1a(x)), block.b2b(block.b2a(x)), block.b3b(pooled)], 1
    )
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_i3d_preprocess_grey_equals_rgb_and_resizes_half_pixel():
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (2, 3, 40, 56), generator=g, dtype=torch.uint8)
    net = I3D()
    x = net.preprocess(grey)
    rgb = grey[:, :, None].expand(2, 3, 3, 40, 56)
    torch.testing.assert_close(net.preprocess(rgb), x)
    frames = grey.flatten(0, 1)[:, None].float()
    resized = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
    expected = (resized * 2 / 255 - 1).reshape(2, 3, 224, 224)
    assert x.shape == (2, 3, 3, 224, 224)
    for c in range(3):
        torch.testing.assert_close(x[:, c], expected, rtol=0, atol=1e-5)


def _output_shapes(net: nn.Module, names: list[str], run) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(_module, _inputs, out) -> None:
            shapes[name] = tuple(out.shape)

        return hook

    for name in names:
        net.get_submodule(name).register_forward_hook(record(name))
    run()
    return shapes


def test_full_size_i3d_shapes_follow_kinetics_i3d():
    """Time is downsampled 8× before the (2, 7, 7) average pool; logits are averaged over the
    remaining ``T/8 − 1`` steps."""
    with torch.device("meta"):
        net = I3D()
    names = ["Conv3d_1a_7x7", "Conv3d_2c_3x3", "Mixed_3c", "Mixed_4f", "Mixed_5c", "logits"]
    x = torch.empty(2, 3, 32, 224, 224, device="meta")
    assert _output_shapes(net, names, lambda: net.logits_of(x)) == {
        "Conv3d_1a_7x7": (2, 64, 16, 112, 112),
        "Conv3d_2c_3x3": (2, 192, 16, 56, 56),
        "Mixed_3c": (2, 480, 16, 28, 28),
        "Mixed_4f": (2, 832, 8, 14, 14),
        "Mixed_5c": (2, 1024, 4, 7, 7),
        "logits": (2, 400, 3, 1, 1),
    }
    assert net.logits_of(x).shape == (2, 400)


def _hollowed(make, identities, last: str, projection: nn.Module, seed: int) -> nn.Module:
    """``make()`` with the named children replaced by identities and ``last`` by ``projection``,
    then every parameter and buffer drawn at random (built on the meta device: no full-size
    initialisation)."""
    with torch.device("meta"):
        net = make()
    for name in identities:
        setattr(net, name, nn.Identity())
    setattr(net, last, projection.to("meta"))
    return randomize_(net.to_empty(device="cpu"), torch.Generator().manual_seed(seed))


def test_i3d_features_are_the_time_mean_of_the_logits():
    """Only the pools and the logits of the network run: the convolutions and Inception blocks
    are replaced by identities (and Mixed_5c by a 3 → 1024 channel projection)."""
    net = _hollowed(
        I3D,
        ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3", *MIXED),
        "Mixed_5c",
        nn.Conv3d(3, 1024, 1),
        seed=1,
    )
    seen: list[torch.Tensor] = []
    net.logits.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        feats = net.logits_of(torch.rand(2, 3, 9, 112, 112) * 2 - 1)
    assert seen[0].shape == (2, 400, 2, 1, 1)
    torch.testing.assert_close(feats, seen[0].mean(dim=(2, 3, 4)))


def test_full_size_r2plus1d_shapes_follow_torchvision():
    """torchvision's r2plus1d_18: stem stride (1, 2, 2), stages 2-4 halve time and space."""
    with torch.device("meta"):
        net = R2Plus1D(400)
    names = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    x = torch.empty(1, 3, 16, 112, 112, device="meta")
    assert _output_shapes(net, names, lambda: net(x)) == {
        "stem": (1, 64, 16, 56, 56),
        "layer1": (1, 64, 16, 56, 56),
        "layer2": (1, 128, 8, 28, 28),
        "layer3": (1, 256, 4, 14, 14),
        "layer4": (1, 512, 2, 7, 7),
        "fc": (1, 400),
    }


def test_r2plus1d_blocks_add_the_shortcut():
    net = R2Plus1D(1, width=4, layers=(2, 1, 1, 1)).eval()
    block = net.layer1[1]  # identity shortcut
    with torch.no_grad():
        block.conv2[1].weight.zero_()
        block.conv2[1].bias.zero_()  # the residual branch now outputs zeros
        x = torch.randn(2, 4, 3, 5, 5)
        torch.testing.assert_close(block(x.clone()), F.relu(x))


def test_r2plus1d_initialisation_and_config_checks():
    torch.manual_seed(0)  # the standard deviations below are estimates from one draw
    net = R2Plus1D(1, output_bias=55.6)
    assert float(net.fc.weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert float(net.fc.bias.detach()) == pytest.approx(55.6)
    conv = net.layer4[0].conv1[0][0]  # (1, 3, 3) conv, fan-out = out channels · 9
    fan_out = conv.weight.shape[0] * 9
    assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert net.config["stem_mid"] == 45
    for bad in ({"width": 0}, {"layers": (2, 0, 2, 2)}, {"layers": (2, 2, 2)}):
        with pytest.raises(ValueError, match="4 stages"):
            R2Plus1D(1, **bad)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_inception_e_branch_order_and_pooling(pool):
    """torchvision's / pytorch-fid's layout: 1x1 (320), 3x3 pair (768), double 3x3 pair (768),
    pool branch (192); the pool is TF's average without padding (Mixed_7b) or a 3x3 max pool
    with padding (Mixed_7c)."""
    block = randomize_(InceptionE(8, pool), torch.Generator().manual_seed(2))
    x = torch.randn(1, 8, 5, 6) * 2
    with torch.no_grad():
        out = block(x)
        a = block.branch3x3_1(x)
        d = block.branch3x3dbl_2(block.branch3x3dbl_1(x))
        if pool == "avg":
            pooled = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        else:
            pooled = F.max_pool2d(x, 3, 1, 1)
        expected = torch.cat(
            [
                block.branch1x1(x),
                block.branch3x3_2a(a),
                block.branch3x3_2b(a),
                block.branch3x3dbl_3a(d),
                block.branch3x3dbl_3b(d),
                block.branch_pool(pooled),
            ],
            1,
        )
    assert out.shape == (1, 2048, 5, 6)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_inception_pool3_is_the_spatial_mean_of_mixed_7c():
    """The Inception blocks before Mixed_7c are replaced by identities, Mixed_7c by a
    192 → 2048 channel projection: only the stem, its pools and the final pooling run."""
    with torch.device("meta"):
        mixed = [n for n, _ in FIDInceptionV3().named_children() if n.startswith("Mixed_")]
    net = _hollowed(FIDInceptionV3, mixed, "Mixed_7c", nn.Conv2d(192, 2048, 1), seed=3)
    seen: list[torch.Tensor] = []
    net.Mixed_7c.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        feats = net.pool3(torch.randn(1, 3, 91, 91))
    assert seen[0].shape == (1, 2048, 9, 9)
    torch.testing.assert_close(feats, seen[0].mean(dim=(2, 3)))
