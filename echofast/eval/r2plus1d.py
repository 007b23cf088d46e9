"""R(2+1)D-18 video regressor (Tran et al. 2018), echofast's own implementation.

The module tree — and therefore the state-dict keys — is torchvision's ``r2plus1d_18``
(``stem.0.weight``, ``layer2.0.conv1.0.3.weight``, ``layer4.1.conv2.1.running_var``,
``layer3.0.downsample.0.weight``, ``fc.bias``, ...), so a torchvision state dict (e.g. its
Kinetics-400 weights) loads into the full-size model; the ``fc`` of another output size is
skipped by :func:`load_backbone`. ``width`` and ``layers`` scale the network down for tests.

Layout: stem = (1,7,7) spatial conv (3 → ``stem_mid``, stride (1,2,2)) → BN → ReLU → (3,1,1)
temporal conv → BN → ReLU; four stages of ``layers[i]`` basic blocks with ``(w, 2w, 4w, 8w)``
channels (stride 2 from stage 2 on, in space *and* time); each block = two (2+1)D convolutions
(spatial (1,3,3) to ``mid`` channels → BN → ReLU → temporal (3,1,1)), each followed by BN, with
``mid = in·out·27 // (9·in + 3·out)`` computed once per block from its input and output widths
(as torchvision); a 1×1×1 conv + BN shortcut where the shape changes; global average pool; fc.
Initialisation as torchvision (Kaiming-normal fan-out convolutions, unit BN, N(0, 0.01) fc).
"""

from __future__ import annotations

import os

import torch
from torch import nn

REFERENCE_WIDTH = 64
REFERENCE_LAYERS = (2, 2, 2, 2)
REFERENCE_STEM_MID = 45
ECHONET_EF_BIAS = 55.6
"""EchoNet-Dynamic initialises the EF regressor's output bias to the mean EF of its data."""


def midplanes(inplanes: int, planes: int) -> int:
    """Width of the (2+1)D factorisation that matches a full 3×3×3 conv's parameter count."""
    return (inplanes * planes * 27) // (inplanes * 9 + 3 * planes)


class Conv2Plus1D(nn.Sequential):
    """(1,3,3) conv → BN → ReLU → (3,1,1) conv; ``stride`` applies to space, then time."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(cin, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, cout, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
        )


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        mid = midplanes(inplanes, planes)
        self.conv1 = nn.Sequential(
            Conv2Plus1D(inplanes, planes, mid, stride), nn.BatchNorm3d(planes), nn.ReLU(True)
        )
        self.conv2 = nn.Sequential(Conv2Plus1D(planes, planes, mid), nn.BatchNorm3d(planes))
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm3d(planes)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + shortcut)


class R2Plus1D(nn.Module):
    """R(2+1)D: ``forward`` (N, 3, T, H, W) float → (N, num_outputs)."""

    def __init__(
        self,
        num_outputs: int = 1,
        *,
        width: int = REFERENCE_WIDTH,
        layers: tuple[int, ...] = REFERENCE_LAYERS,
        stem_mid: int | None = None,
        output_bias: float = 0.0,
    ):
        super().__init__()
        if width < 1 or len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"need width >= 1 and 4 stages of >= 1 block, got {width}, {layers}")
        self.config = {
            "num_outputs": int(num_outputs),
            "width": int(width),
            "layers": [int(n) for n in layers],
            "stem_mid": int(stem_mid or max(1, round(REFERENCE_STEM_MID * width / 64))),
        }
        mid = self.config["stem_mid"]
        self.stem = nn.Sequential(
            nn.Conv3d(3, mid, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, width, (3, 1, 1), 1, (1, 0, 0), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = [BasicBlock(inplanes, planes, 1 if i == 0 else 2)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(inplanes, num_outputs)
        self._init_weights(output_bias)

    def _init_weights(self, output_bias: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.constant_(self.fc.bias, output_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def load_backbone(
    model: R2Plus1D, path: str | os.PathLike, *, allow_pickle: bool = False
) -> list[str]:
    """Initialise ``model`` from a torchvision-layout state dict (safetensors, or a torch file
    with ``allow_pickle``). Every backbone key must match; ``fc.*`` is taken only when its shape
    fits (a 400-class Kinetics head does not). Returns the skipped keys."""
    from pathlib import Path

    from .weights import assign_weights, read_weights_file, tensor_dict

    path = Path(path)
    state = tensor_dict(read_weights_file(path, allow_pickle=allow_pickle), path)
    own = model.state_dict()
    skipped = [
        k for k in state if k.startswith("fc.") and k in own and state[k].shape != own[k].shape
    ]
    assign_weights(
        model,
        state,
        path,
        ignore=lambda k: k in skipped,
        optional=lambda k: k.startswith("fc."),
    )
    return skipped
