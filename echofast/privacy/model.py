"""The re-identification (patient verification) model of EchoNet-Synthetic's privacy filter.

Architecture (the reference's ``SiameseNetwork``): a ResNet-50 (bottleneck blocks, layers
[3, 4, 6, 3], width 64, stride on the 3×3 conv of each block: torchvision's "v1.5") whose first
conv takes the 4 latent channels (``Conv2d(4, 64, 7, stride 2, pad 3, no bias)``) and whose
classifier is ``Linear(2048, n_features=128)``; the embedding is ``sigmoid(resnet(x))``; the pair
head is ``Linear(128, 1)`` on ``|e1 − e2|`` and gives a logit (same patient = 1).

State-dict keys are the reference's (torchvision's ResNet names under ``model.``, the head as
``fc_end``): ``model.conv1.weight``, ``model.bn1.*``, ``model.layer1.0.conv1.weight``,
``model.layer1.0.downsample.0.weight``, ``model.layer1.0.downsample.1.running_mean``, ...,
``model.fc.weight``, ``fc_end.weight``, ``fc_end.bias``.

Folder layout (the published ``reidentification_<dataset>/``)::

    config.json                           the reference's training config (siamese_architecture,
                                          n_channels, n_features, transform, ...)
    <folder name>_best_network.pth        torch.save(state_dict): pickled, loaded only with
                                          allow_pickle=True (and then weights_only=True)

echofast writes ``<folder name>_best_network.safetensors`` instead (and ``evaluation.json`` with
the test AUC when it trained the model), and reads either. Extra echofast config keys:
``resnet_layers`` / ``resnet_width`` (only with ``siamese_architecture = "ResNet"``, for small
test models) and ``normalization`` (``"clip"``: min-max over the whole clip, the reference's
``"pmone"`` transform; ``"frame"``: each frame on its own; ``"channel"``: each channel of each
frame on its own, which makes the input exactly invariant to a per-channel gain and offset).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__, weights_io
from ..errors import ConfigError, MissingFileError, WeightsError
from ..fsutil import atomic_write, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_SUFFIX = "_best_network"
EVALUATION_NAME = "evaluation.json"
RESNET50_LAYERS = (3, 4, 6, 3)
NORMALIZATIONS = ("clip", "frame", "channel")
TRANSFORMS = {"clip": "pmone", "frame": "pmone-frame", "channel": "pmone-channel"}
"""config.json ``transform`` of each normalisation (``"pmone"``: the reference's)."""
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride) → 1×1 (×4 channels) with batch norms; identity or projection skip."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.relu(h + skip)


class ResNet(nn.Module):
    """Bottleneck ResNet with torchvision's module names (``conv1``, ``bn1``, ``layer1..4``,
    ``fc``); ``layers`` blocks per stage, stage widths ``width·[1, 2, 4, 8]``."""

    def __init__(
        self,
        in_channels: int = 4,
        num_outputs: int = 128,
        layers: tuple[int, ...] = RESNET50_LAYERS,
        width: int = 64,
    ):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1 or width < 1:
            raise ConfigError(
                f"resnet_layers must be 4 positive counts and resnet_width positive, got "
                f"{list(layers)}, {width}"
            )
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        ch = width
        for i, count in enumerate(layers):
            w = width * 2**i
            blocks = []
            for b in range(count):
                blocks.append(Bottleneck(ch, w, stride=2 if (b == 0 and i > 0) else 1))
                ch = w * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_outputs)
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal convs (fan_out), unit/zero batch norms, as torchvision's ResNet."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def normalize_clip(x: torch.Tensor, mode: str = "clip") -> torch.Tensor:
    """Min-max normalisation to [−1, 1] (the reference's ``"pmone"`` transform).

    ``x``: one clip (T, C, h, w) or one image (C, h, w). ``"clip"``: one min and max over the
    whole tensor; ``"frame"``: per frame (dim 0 of a clip); ``"channel"``: per channel of each
    frame (the last two dims). Statistics in fp32; a constant input maps to 0 instead of NaN.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    x = x.float()
    if mode == "channel":
        lo = x.amin(dim=(-2, -1), keepdim=True)
        hi = x.amax(dim=(-2, -1), keepdim=True)
    elif mode == "frame" and x.dim() == 4:
        flat = x.reshape(x.shape[0], -1)
        lo = flat.min(dim=1).values.reshape(-1, 1, 1, 1)
        hi = flat.max(dim=1).values.reshape(-1, 1, 1, 1)
    else:
        lo, hi = x.min(), x.max()
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1) * 2 - 1, 0 * x)


class ReIdentificationModel(nn.Module):
    """Siamese re-identification network: ``embed(x)`` gives (N, n_features) sigmoid embeddings
    of latent frames (N, n_channels, h, w) already normalised with :func:`normalize_clip`;
    ``forward(x1, x2)`` gives the (N, 1) same-patient logits."""

    def __init__(
        self,
        n_channels: int = 4,
        n_features: int = 128,
        layers: tuple[int, ...] = RESNET50_LAYERS,
        width: int = 64,
        normalization: str = "clip",
    ):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"config key 'normalization': value {normalization!r} is not supported "
                f"(supported: {list(NORMALIZATIONS)})"
            )
        if n_channels < 1 or n_features < 1:
            raise ConfigError(
                f"n_channels and n_features must be >= 1, got {n_channels}, {n_features}"
            )
        self.n_channels, self.n_features = int(n_channels), int(n_features)
        self.layers, self.width = tuple(int(v) for v in layers), int(width)
        self.normalization = normalization
        self.model = ResNet(self.n_channels, self.n_features, self.layers, self.width)
        self.fc_end = nn.Linear(self.n_features, 1)

    # ---- compute ----------------------------------------------------------------------------

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_channels, h, w) → (N, n_features) embeddings in (0, 1) (the reference's
        ``forward_once``)."""
        return torch.sigmoid(self.model(x))

    forward_once = embed

    def head(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        """Same-patient logits (N, 1) of two embedding batches."""
        return self.fc_end(torch.abs(e1 - e2))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x1), self.embed(x2))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def embed_frames(
        self,
        frames: torch.Tensor,
        *,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        progress: bool = False,
        desc: str = "embed",
    ) -> torch.Tensor:
        """Eval-mode embeddings of normalised frames (N, C, h, w) → fp32 CPU (N, n_features), in
        batches of exactly ``batch_size`` (the last one zero-padded, so that a frame's embedding
        does not depend on how many frames are embedded with it); ``progress``: a progress bar
        of the batches, labelled ``desc``.

        Raises:
            WeightsError: an embedding is not finite.
        """
        from tqdm.auto import tqdm

        device = torch.device(device) if device is not None else self.device
        was_training = self.training
        self.eval()
        out = []
        try:
            batches = range(0, frames.shape[0], batch_size)
            for s in tqdm(batches, desc=desc, unit="batch", disable=not progress):
                x = frames[s : s + batch_size].to(device=device, dtype=torch.float32)
                k = x.shape[0]
                if k < batch_size:
                    x = torch.cat([x, x.new_zeros((batch_size - k, *x.shape[1:]))])
                out.append(self.embed(x)[:k].float().cpu())
        finally:
            self.train(was_training)
        if not out:
            return torch.zeros(0, self.n_features)
        emb = torch.cat(out)
        if not bool(torch.isfinite(emb).all()):
            raise WeightsError("re-identification embeddings are not finite (NaN/inf weights?)")
        return emb

    # ---- config ------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The folder's ``config.json``: the reference's keys plus echofast's."""
        reference = self.layers == RESNET50_LAYERS and self.width == 64
        cfg: dict[str, Any] = {
            "siamese_architecture": "ResNet-50" if reference else "ResNet",
            "n_channels": self.n_channels,
            "n_features": self.n_features,
            "transform": TRANSFORMS[self.normalization],
            "normalization": self.normalization,
            "_echofast_version": __version__,
        }
        if not reference:
            cfg["resnet_layers"] = list(self.layers)
            cfg["resnet_width"] = self.width
        return cfg

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, source: str = "config"
    ) -> ReIdentificationModel:
        """Build from a (reference or echofast) ``config.json`` dict. The reference's training
        keys (learning_rate, batch_size, ...) are accepted and ignored; the architecture keys
        must be supported."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        if "_class_name" in config:
            raise ConfigError(
                f"{source}: a diffusers {config['_class_name']} folder, not a re-identification "
                "model (a reidentification_* folder, or `echofast train reid`'s export)"
            )
        arch = config.get("siamese_architecture", "ResNet-50")
        if arch not in ("ResNet-50", "ResNet"):
            raise ConfigError(
                f"{source}: config key 'siamese_architecture': value {arch!r} is not supported "
                "(supported: ['ResNet-50', 'ResNet'])"
            )
        custom = {k for k in ("resnet_layers", "resnet_width") if k in config}
        if arch == "ResNet-50" and custom:
            raise ConfigError(
                f"{source}: {sorted(custom)} set with siamese_architecture 'ResNet-50'; use "
                "siamese_architecture 'ResNet' for another depth or width"
            )
        transform = config.get("transform", "pmone")
        normalization = config.get(
            "normalization", {v: k for k, v in TRANSFORMS.items()}.get(transform)
        )
        if normalization is None:
            raise ConfigError(
                f"{source}: config key 'transform': value {transform!r} is not supported "
                "(the published models use 'pmone': min-max to [-1, 1] per clip)"
            )
        try:
            return cls(
                n_channels=int(config.get("n_channels", 4)),
                n_features=int(config.get("n_features", 128)),
                layers=tuple(config.get("resnet_layers", RESNET50_LAYERS)),
                width=int(config.get("resnet_width", 64)),
                normalization=normalization,
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: malformed architecture keys ({err})") from None

    # ---- folders -----------------------------------------------------------------------------

    @staticmethod
    def find_weights(folder: Path, allow_pickle: bool = False) -> Path:
        """``<name>_best_network.safetensors`` (preferred), else the reference's pickled
        ``<name>_best_network.pth`` (only with ``allow_pickle``)."""
        stem = folder.name + WEIGHTS_SUFFIX
        safe = [folder / f"{stem}.safetensors"] + sorted(
            folder.glob(f"*{WEIGHTS_SUFFIX}.safetensors")
        )
        for p in safe:
            if p.is_file():
                return p
        pickled = [folder / f"{stem}{s}" for s in _PICKLE_SUFFIXES] + sorted(
            p for s in _PICKLE_SUFFIXES for p in folder.glob(f"*{WEIGHTS_SUFFIX}{s}")
        )
        found = weights_io.allowed_pickle(safe[0], pickled, allow_pickle)
        if found is not None:
            return found
        raise MissingFileError(
            f"{folder}: no re-identification weights ({stem}.safetensors or {stem}.pth)"
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        allow_pickle: bool = False,
    ) -> ReIdentificationModel:
        """Load a ``reidentification_*`` folder (the published layout or echofast's)."""
        folder = Path(path)
        config = weights_io.read_folder_config(folder, CONFIG_NAME, "re-identification model")
        model = cls.from_config(config, source=str(folder / CONFIG_NAME))
        weights = cls.find_weights(folder, allow_pickle)
        model.load_weights(weights)
        return model.to(device or "cpu").eval()

    def load_weights(self, path: str | os.PathLike) -> None:
        """Strictly load a state dict file: every key present, no extra key, same shapes,
        finite values; errors name the file and the key."""
        path = Path(path)
        state = weights_io.read_state_dict(path)
        weights_io.check_state_dict(self, state, path)
        self.load_state_dict(state, strict=True)

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        extra_config: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> Path:
        """Write ``config.json`` and ``<name>_best_network.safetensors``, each atomically;
        ``name`` defaults to the folder's name (the published folders' layout)."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        weights = folder / f"{name or folder.name}{WEIGHTS_SUFFIX}.safetensors"
        atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        cfg = {**(extra_config or {}), **self.config()}
        atomic_write_text(folder / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return weights


def load_init_weights(model: ReIdentificationModel, path: str | os.PathLike) -> list[str]:
    """Initialise from a user-supplied safetensors file (e.g. ImageNet ResNet-50 weights
    converted to safetensors): keys as in this model, or torchvision ResNet keys without the
    ``model.`` prefix. As in the reference (which replaces them after loading ImageNet
    weights), ``conv1``/``fc``/``fc_end`` entries whose shapes differ are skipped and keep their
    random initialisation; every other key must be present with the right shape. Returns the
    keys left at random initialisation."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: initial weights must be a .safetensors file")
    raw = weights_io.read_state_dict(path)
    state = {
        (k if k.startswith(("model.", "fc_end.")) else f"model.{k}"): v for k, v in raw.items()
    }
    replaceable = {"model.conv1.weight", "model.fc.weight", "model.fc.bias"}
    expected = model.state_dict()
    kept: dict[str, torch.Tensor] = {}
    skipped = []
    for key, ref in expected.items():
        t = state.get(key)
        replace = key in replaceable or key.startswith("fc_end.")
        if t is None or tuple(t.shape) != tuple(ref.shape):
            if replace:
                skipped.append(key)
                continue
            what = "missing" if t is None else f"shape {tuple(t.shape)} ≠ {tuple(ref.shape)}"
            raise WeightsError(f"{path}: key {key!r} {what}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{path}: key {key!r} holds non-finite values (NaN or inf)")
        kept[key] = t
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise WeightsError(f"{path}: unexpected keys {weights_io.clip_keys(unexpected)}")
    model.load_state_dict({**expected, **kept}, strict=True)
    return skipped
