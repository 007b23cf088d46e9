"""Reading model folders and state-dict files, and loading state dicts strictly.

Shared by :mod:`echofast.models` (diffusers folders), :mod:`echofast.privacy` (the
re-identification model) and :mod:`echofast.eval` (feature networks). Every error is a
:class:`~echofast.errors.WeightsError` (or :class:`~echofast.errors.MissingFileError` /
:class:`~echofast.errors.ConfigError`) naming the file and, where one is at fault, the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, MissingFileError, WeightsError


def clip_keys(keys: list[str], n: int = 8) -> str:
    """``keys`` for an error message: the first ``n`` and how many there are in all."""
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def read_folder_config(
    folder: Path, config_name: str = "config.json", what: str = "model"
) -> dict[str, Any]:
    """The JSON config of a model folder; ``what`` names the folder kind in errors."""
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: {what} folder does not exist")
    config_path = folder / config_name
    if not config_path.is_file():
        raise MissingFileError(f"{config_path}: config file is missing")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_path}: not valid JSON ({err})") from None


def allowed_pickle(safe: str | os.PathLike, pickled: list[Path], allow_pickle: bool) -> Path | None:
    """The first existing file of ``pickled`` (used when the safetensors file ``safe`` is not
    there) if ``allow_pickle``, else a :class:`WeightsError` refusing it; None when none exists."""
    pickled = [p for p in pickled if p.is_file()]
    if pickled and not allow_pickle:
        raise WeightsError(
            f"{pickled[0]}: pickled weights are not loaded by default (a pickle can run code); "
            f"convert them to {Path(safe).name} or pass allow_pickle=True (--allow-pickle), "
            "which reads them with torch.load(weights_only=True)"
        )
    return pickled[0] if pickled else None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from a safetensors file, or a pickle read with
    ``torch.load(weights_only=True)`` (a ``state_dict`` wrapper is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: cannot read safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is reported with the file
        raise WeightsError(
            f"{path}: cannot read pickled weights ({type(err).__name__}: {err})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors")
    return dict(state)


def shard_map(index: Path) -> dict[str, list[str]]:
    """``{shard file name: [tensor names]}`` of a diffusers shard index, checked: a non-empty
    ``"weight_map"`` whose shards are existing files of the index's format inside its folder."""
    try:
        data = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{index}: cannot read shard index ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(shard, str) for shard in weight_map.values())
    ):
        raise WeightsError(
            f'{index}: shard index needs a non-empty "weight_map" of tensor name -> shard file'
        )
    kind = Path(index.name.split(".index")[0]).suffix  # ".safetensors" or ".bin"
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    for shard in shards:
        rel = Path(shard)
        if not shard or rel.is_absolute() or ".." in rel.parts:
            raise WeightsError(f"{index}: shard {shard!r} is not a file inside {index.parent}")
        if rel.suffix != kind:
            raise WeightsError(f"{index}: shard {shard!r} is not a {kind} file")
        if not (index.parent / rel).is_file():
            raise MissingFileError(
                f"{index.parent / rel}: shard file listed in {index.name} is missing"
            )
    return shards


def read_sharded_state_dict(index: Path) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from the shards that a diffusers index file names.

    ``index`` (e.g. ``diffusion_pytorch_model.safetensors.index.json``) maps every tensor name to
    its shard (``"weight_map"``). Each shard must be a file of the index's format inside the
    index's folder (:func:`shard_map`), and hold exactly the tensors the index places there.
    """
    state: dict[str, torch.Tensor] = {}
    for shard, keys in shard_map(index).items():
        path = index.parent / shard
        tensors = read_state_dict(path)
        absent = sorted(set(keys) - set(tensors))
        if absent:
            raise WeightsError(
                f"{path}: does not hold {clip_keys(absent)}, which {index.name} places there"
            )
        unlisted = sorted(set(tensors) - set(keys))
        if unlisted:
            raise WeightsError(
                f"{path}: holds {clip_keys(unlisted)}, which {index.name} does not place there"
            )
        state.update(tensors)
    return state


def check_state_dict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str | os.PathLike,
    *,
    optional: Callable[[str], bool] = lambda key: False,
) -> None:
    """Raise :class:`WeightsError` naming ``source`` (and the key) unless ``state`` fits
    ``module`` strictly: no missing key (except those for which ``optional(key)`` holds), no
    unexpected key, the module's shapes, floating-point values (finite ones) where the module
    holds floating-point ones. Works on meta modules."""
    expected = module.state_dict(keep_vars=True)
    name = type(module).__name__
    missing = sorted(k for k in set(expected) - set(state) if not optional(k))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {clip_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {clip_keys(unexpected)}")
        raise WeightsError(f"{source}: weights do not match {name}: " + "; ".join(parts))
    for key, ref in expected.items():
        tensor = state.get(key)
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightsError(
                f"{source}: key {key!r} has shape {tuple(tensor.shape)}, "
                f"{name} expects {tuple(ref.shape)}"
            )
        if ref.is_floating_point() and not tensor.is_floating_point():
            raise WeightsError(
                f"{source}: key {key!r} holds {str(tensor.dtype).removeprefix('torch.')} "
                f"values, {name} expects floating-point ones"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{source}: key {key!r} holds non-finite values (NaN or inf)")


#: ``max_shard_size`` units: decimal ones as huggingface_hub reads them, and binary ones.
SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def shard_size_bytes(size: int | str) -> int:
    """Bytes of a ``max_shard_size``: a positive int (bytes) or a number with a unit of
    :data:`SIZE_UNITS` (``"10GB"``, ``"500MB"``, ``"2GiB"``, case-insensitive)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be at least 1 byte, got {size}")
        return size
    match = (
        re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]+)\s*", size)
        if isinstance(size, str)
        else None
    )
    unit = SIZE_UNITS.get(match.group(2).upper()) if match else None
    if match is None or unit is None or int(float(match.group(1)) * unit) < 1:
        raise ValueError(
            f"max_shard_size must be a number of bytes or a size such as '10GB' or '2GiB' (units "
            f"{', '.join(k.replace('I', 'i') for k in SIZE_UNITS)}), got {size!r}"
        )
    return int(float(match.group(1)) * unit)


def plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """The tensor names of ``state`` in groups (shards) of at most ``max_bytes`` each, in
    ``state``'s order; a tensor larger than ``max_bytes`` is a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
