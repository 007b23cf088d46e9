"""InceptionV3 as FID and IS implementations use it (the TF "2015-12-05" graph), in plain PyTorch.

This is the network behind StyleGAN2-ADA's / StyleGAN-V's ``inception-2015-12-05.pt`` and
pytorch-fid's ``FIDInceptionA/C/E``: the torchvision InceptionV3 layout (state-dict keys
``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_var``, ``fc.weight``, ...) with
the TF graph's differences:

- average pools inside the Inception blocks exclude the padding (``count_include_pad=False``);
- the last block (``Mixed_7c``) pools its branch with a 3×3 *max* pool, not an average pool;
- batch norm ``eps = 1e-3``; 1008 output classes; no auxiliary head; no input transform.

Input preprocessing follows StyleGAN's detector (the reference protocol's): uint8-range pixels
are resized to 299×299 by TF1's legacy bilinear resize (``align_corners=False`` without half-pixel
centres: output pixel ``j`` samples input position ``j·in/out``, clamped at the border), then
mapped by ``(x − 128)/128``. pytorch-fid instead resizes with PyTorch's half-pixel bilinear and
maps ``x/127.5 − 1``; its numbers differ slightly.

Outputs (:meth:`FIDInceptionV3.extract`): the 2048-d ``pool_3`` features (FID) and the softmax
of ``pool_3 @ fc.weight.T`` over 1008 classes *without* the output bias (IS; the original
implementation's "no output bias").

Weights: a safetensors file with these keys, or pytorch-fid's ``pt_inception-2015-12-05-*.pth``
(torch state dict, same keys; read only with ``allow_pickle`` via ``weights_only=True``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import FrozenBatchNorm
from .weights import assign_weights, read_weights_file, tensor_dict

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Conv (no bias) → batch norm (eps 1e-3) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool="avg"``: ``Mixed_7b`` (average pool without padding); ``"max"``: ``Mixed_7c``."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def legacy_resize_matrix(n_in: int, n_out: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n_out, n_in) interpolation matrix of TF1's ``resize_bilinear(align_corners=False)``:
    output ``j`` samples ``s = j·n_in/n_out`` between ``floor(s)`` and
    ``min(floor(s)+1, n_in−1)``."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().clamp(max=n_in - 1)
    w = src - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=n_in - 1)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - w, accumulate=True)
    m.index_put_((rows, hi), w, accumulate=True)
    return m.to(dtype=dtype, device=device)


def legacy_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (..., H, W) float images to (..., size, size) with :func:`legacy_resize_matrix`."""
    mh = legacy_resize_matrix(x.shape[-2], size, x.dtype, x.device)
    mw = legacy_resize_matrix(x.shape[-1], size, x.dtype, x.device)
    return torch.matmul(torch.matmul(mh, x), mw.T)


class FIDInceptionV3(nn.Module):
    """The FID/IS InceptionV3 (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8-range images (N, H, W) grey or (N, 3, H, W) → normalised (N, 3, 299, 299)."""
        x = images.to(self.fc.weight.device, torch.float32)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = legacy_resize(x, INPUT_SIZE)
        x = (x - 128.0) / 128.0
        return x.expand(x.shape[0], 3, *x.shape[-2:])

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 3, 299, 299) → ``pool_3`` features (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
        ):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8-range frames (N, H, W) or (N, 3, H, W) → (``pool_3`` (N, 2048), class
        probabilities without the output bias (N, 1008)), both float32."""
        pool = self.pool3(self.preprocess(images))
        probs = torch.softmax(pool @ self.fc.weight.T, dim=1)
        return pool, probs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``pool_3`` features (N, 2048) of uint8-range frames."""
        return self.pool3(self.preprocess(images))


def _ignored(key: str) -> bool:
    return key.endswith("num_batches_tracked") or key.startswith("AuxLogits.")


def load_inception(
    path: str | os.PathLike, *, allow_pickle: bool = False, device: torch.device | str = "cpu"
) -> FIDInceptionV3:
    """The FID InceptionV3 with weights from ``path`` (safetensors, or pytorch-fid's torch state
    dict with ``allow_pickle``); ``num_batches_tracked`` and ``AuxLogits.*`` keys are ignored.
    A 1000-class torchvision ImageNet state dict is refused (``fc`` has the wrong shape): FID
    needs the TF graph's 1008-class weights."""
    path = Path(path)
    state = tensor_dict(read_weights_file(path, allow_pickle=allow_pickle), path)
    model = FIDInceptionV3()
    assign_weights(model, state, path, ignore=_ignored)
    return model.to(device)
