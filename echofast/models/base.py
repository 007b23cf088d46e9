"""Config recording and diffusers-format folders (``config.json`` + safetensors weights).

A model's config is exactly its ``__init__`` keyword arguments, recorded at construction. Folders
written by :meth:`ModelBase.save_pretrained` load in diffusers, and folders written by diffusers'
``save_pretrained`` load here. Weights load through safetensors; a pickled ``.bin``/``.pt`` loads
only with ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.utils.checkpoint
from torch import nn

from .. import __version__
from ..config import Config, require  # noqa: F401 - require is re-exported for the models
from ..errors import ConfigError, EchofastError, MissingFileError, WeightsError
from ..fsutil import atomic_write, atomic_write_text
from ..weights_io import (
    allowed_pickle,
    check_state_dict,
    clip_keys,
    plan_shards,
    read_folder_config,
    read_sharded_state_dict,
    read_state_dict,
    shard_map,
    shard_size_bytes,
)

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
DIFFUSERS_FORMAT_VERSION = "0.27.0"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: The dtypes ``from_pretrained(dtype=...)`` loads weights in, by torch name.
LOAD_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def check_input(name: str, x: Any, layout: str, **sizes: int) -> None:
    """Refuse a model input that is not a non-empty floating-point tensor of ``layout`` (e.g.
    ``"N, C, H, W"``) whose dims named in ``sizes`` have those sizes: a ValueError naming the
    input, the layout wanted and what was given."""
    dims = [d.strip() for d in layout.split(",")]
    want = "(" + ", ".join(str(sizes.get(d, d)) for d in dims) + ")"
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor {want}, got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.dim() != len(dims) or any(shape[i] != sizes[d] for i, d in enumerate(dims) if d in sizes):
        raise ValueError(f"{name} must be {want}, got {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} holds no sample: a batch of 0, shape {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def checkpoint_stage(stage: Callable[..., Any], *args: Any) -> Any:
    """``stage(*args)`` with its activations recomputed in the backward pass instead of stored
    (``torch.utils.checkpoint``, non-reentrant: tensors reached through non-tensor arguments get
    their gradients too; the RNG state is replayed, so dropout masks agree)."""
    return torch.utils.checkpoint.checkpoint(stage, *args, use_reentrant=False)


def run_stage(owner: nn.Module, stage: Callable[..., Any], *args: Any) -> Any:
    """``stage(*args)``, checkpointed when ``owner`` has gradient checkpointing on
    (:meth:`ModelBase.enable_gradient_checkpointing`) and autograd records the call."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(stage, *args)
    return stage(*args)


def set_gradient_checkpointing(model: nn.Module, enabled: bool, func: Callable[..., Any]) -> None:
    """Turn gradient checkpointing on or off in every module of ``model`` that runs stages
    (those with a ``gradient_checkpointing`` attribute), checkpointing with ``func``."""
    if not callable(func):
        raise TypeError(f"gradient_checkpointing_func must be callable, got {func!r}")
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = enabled
            module._gradient_checkpointing_func = func


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _matches(value: Any, hint: Any) -> bool:
    """Whether the JSON ``value`` fits the ``__init__`` annotation ``hint``; annotations other
    than unions, ``None``, ``bool``/``int``/``float``/``str`` and ``Sequence[...]`` pass."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin in (Sequence, list):
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint: Any) -> str:
    """``hint`` in JSON terms, for error messages: ``int or list of int or null``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin in (Sequence, list):
        args = typing.get_args(hint)
        return f"list of {_describe(args[0])}" if args else "list"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _load_dtype(dtype: torch.dtype | str | None, name: str = "dtype") -> torch.dtype:
    """The weights dtype ``from_pretrained`` was asked for (float32 by default), given as the
    argument ``name``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype in LOAD_DTYPES:
        return LOAD_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in LOAD_DTYPES.values():
        return dtype
    raise ValueError(
        f"{name} must be one of {', '.join(LOAD_DTYPES)} (a torch.dtype or its name), got {dtype!r}"
    )


class ModelBase(nn.Module):
    """Shared loading/saving for echofast's models.

    Subclasses set ``diffusers_class`` and call ``self.register_config(locals())`` first thing in
    ``__init__``; ``__init__``'s keyword arguments are the config keys.
    """

    diffusers_class: ClassVar[str]
    #: Layout of the activations inside ``forward`` (inputs and outputs keep the caller's).
    #: channels_last makes CPU (oneDNN) and tensor-core convolutions faster and turns feature
    #: maps into token-major views for attention; results differ from NCHW by rounding only.
    memory_format: torch.memory_format = torch.channels_last

    @classmethod
    def config_defaults(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return {
            name: p.default
            for name, p in sig.parameters.items()
            if name != "self" and p.kind in kinds
        }

    def register_config(self, init_locals: dict[str, Any]) -> None:
        nn.Module.__init__(self)
        keys = self.config_defaults()
        self.config = Config({k: init_locals[k] for k in keys})
        self.register_load_state_dict_post_hook(lambda module, _keys: module._relayout())

    def _relayout(self) -> None:
        """Conv kernels in :attr:`memory_format` and the packed parameter groups
        (``_packed_groups``: the one-GEMM time projections, the mix weights), after construction,
        loading and conversions."""
        self.relayout_convs()
        for group in getattr(self, "_packed_groups", ()):
            group.pack()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for group in getattr(self, "_packed_groups", ()):
            group.pack()  # conversions give every parameter its own storage
        return out

    def relayout_convs(self) -> None:
        """Store conv kernels in :attr:`memory_format` (loading replaces them with NCHW ones)."""
        cl = self.memory_format == torch.channels_last
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                    fmt = (
                        (torch.channels_last if m.weight.dim() == 4 else torch.channels_last_3d)
                        if cl
                        else torch.contiguous_format
                    )
                    if not m.weight.is_contiguous(memory_format=fmt):
                        m.weight.data = m.weight.data.contiguous(memory_format=fmt)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, source: str = "config") -> ModelBase:
        """Build from a config dict; ``_``-prefixed metadata is ignored, unknown keys raise."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        name = config.get("_class_name")
        if name is not None and name not in (cls.diffusers_class, cls.__name__):
            raise ConfigError(
                f"{source}: describes a {name!r}, but {cls.__name__} loads {cls.diffusers_class!r}"
            )
        params = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(params) - set(cls.config_defaults()))
        if unknown:
            raise ConfigError(
                f"{source}: config key(s) {unknown} not supported by {cls.__name__} "
                f"(known keys: {sorted(cls.config_defaults())})"
            )
        hints = typing.get_type_hints(cls.__init__)
        for key, value in params.items():
            if key in hints and not _matches(value, hints[key]):
                raise ConfigError(
                    f"{source}: config key {key!r}: value {value!r} ({type(value).__name__}) "
                    f"is not a valid {_describe(hints[key])}"
                )
        try:
            model = cls(**params)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except EchofastError:
            raise
        except (TypeError, ValueError, LookupError, ArithmeticError, RuntimeError) as err:
            # A value of the right type that the layers reject (e.g. channels not divisible
            # by norm_num_groups): the layer's own message is the most precise one there is.
            raise ConfigError(
                f"{source}: config values do not build a {cls.__name__} "
                f"({type(err).__name__}: {err})"
            ) from err
        model.relayout_convs()
        return model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _call_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of a call's activations on ``device``: autocast's when it is on there, else
        the input convolution's weights' (``conv_in``, an ``autocast_copy``'s reduced ones)."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        conv_in = getattr(self, "conv_in", None)
        return conv_in.weight.dtype if conv_in is not None else self.dtype

    def use_channels_last(self, enabled: bool = True) -> ModelBase:
        """Run ``forward`` in channels_last (the default) or, with ``enabled=False``, in NCHW."""
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        self.relayout_convs()
        return self

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters (as diffusers counts them): all, or only those that require
        grad, and without ``nn.Embedding`` weights with ``exclude_embeddings``."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel()
            for p in self.parameters()
            if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    # ---- gradient checkpointing (diffusers' API) ---------------------------------------------

    #: diffusers' flag: :meth:`enable_gradient_checkpointing` is available.
    _supports_gradient_checkpointing: ClassVar[bool] = True
    #: On in every module that runs stages (the UNets, the VAE's encoder and decoder).
    gradient_checkpointing: bool = False

    def enable_gradient_checkpointing(
        self, gradient_checkpointing_func: Callable[..., Any] | None = None
    ) -> None:
        """Store only each stage's inputs (a UNet's down, mid and up blocks; the VAE encoder's
        and decoder's) and recompute the stage in the backward pass: less memory for about one
        more forward pass of time; gradients as without it. Only calls under autograd change.

        ``gradient_checkpointing_func(stage, *args)`` replaces :func:`checkpoint_stage`
        (``torch.utils.checkpoint.checkpoint(stage, *args, use_reentrant=False)``), as in
        diffusers' method of this name.
        """
        set_gradient_checkpointing(self, True, gradient_checkpointing_func or checkpoint_stage)

    def disable_gradient_checkpointing(self) -> None:
        """Store every activation again (the default)."""
        set_gradient_checkpointing(self, False, checkpoint_stage)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def autocast_copy(self, dtype: torch.dtype) -> ModelBase:
        """This model for inference under ``torch.autocast(dtype=dtype)``, with autocast's weight
        casts made once instead of at every call.

        Autocast runs Linear and Conv layers in ``dtype`` and casts their fp32 weights and biases
        on every call: in a CUDA-graph replay of the LVDM that is hundreds of cast kernels per
        UNet call. The copy stores those weights and biases in ``dtype`` (the values autocast
        would make, so under autocast it returns exactly what this model returns); every other
        parameter and buffer (norms, embeddings' non-GEMM tensors) is shared with this model, not
        copied. The copy is for inference (its cast weights do not require grad) and does not see
        later changes to this model's Linear/Conv weights: make a new one after training steps.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"autocast_copy needs a floating-point dtype, got {dtype}")
        memo: dict[int, Any] = {}
        with torch.no_grad():
            for module in self.modules():
                gemm = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                for p in module.parameters(recurse=False):
                    if gemm and p.is_floating_point():
                        memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    else:
                        memo[id(p)] = p
                for b in module.buffers(recurse=False):
                    memo[id(b)] = b
        out = copy.deepcopy(self, memo)
        out._relayout()
        for module in out.modules():
            if callable(getattr(module, "pack_qkv", None)):
                module.pack_qkv()
        return out.eval()

    # ---- folders ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        variant: str | None = None,
        allow_pickle: bool = False,
        torch_dtype: torch.dtype | str | None = None,
    ) -> ModelBase:
        """Load a diffusers ``save_pretrained`` folder, single-file or sharded.

        Args:
            path: the folder (or its parent, with ``subfolder``).
            device: where the weights go (default CPU).
            dtype: dtype of the floating-point weights: float32 (the default, as diffusers),
                float16, bfloat16 or float64, as a ``torch.dtype`` or by name.
            variant: load ``diffusion_pytorch_model.<variant>.safetensors`` (or the sharded
                variant's ``diffusion_pytorch_model.safetensors.index.<variant>.json``).
            allow_pickle: also accept a pickled ``.bin`` (read with ``weights_only=True``).
            torch_dtype: diffusers' name for ``dtype`` (give one of them).

        Raises:
            ValueError: ``dtype`` is not one of the above, or ``dtype`` and ``torch_dtype``
                are both given.
            ConfigError: ``config.json`` is malformed or holds a value the model cannot take.
            WeightsError: the weights are missing, unreadable or do not fit the model.
        """
        if torch_dtype is not None:
            if dtype is not None:
                raise ValueError(
                    f"give dtype or torch_dtype (its diffusers name), not both: got {dtype!r} "
                    f"and {torch_dtype!r}"
                )
        load_dtype = (
            _load_dtype(torch_dtype, "torch_dtype")
            if torch_dtype is not None
            else _load_dtype(dtype)
        )
        folder = Path(path) / subfolder if subfolder else Path(path)
        config = read_folder_config(folder, CONFIG_NAME)
        with torch.device("meta"):
            model = cls.from_config(config, source=str(folder / CONFIG_NAME))
        weights_path = cls._find_weights(folder, variant, allow_pickle)
        if weights_path.name.endswith(".json"):
            state = read_sharded_state_dict(weights_path)
        else:
            state = read_state_dict(weights_path)
        model._assign_state_dict(state, weights_path, load_dtype)
        model.to(device or "cpu")
        leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if leftover:
            raise WeightsError(f"{weights_path}: no values for {clip_keys(leftover)}")
        return model.eval()

    @classmethod
    def weights_files(
        cls, folder: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False
    ) -> list[Path]:
        """The files :meth:`from_pretrained` reads the weights from (the same arguments): the
        single weights file, or a shard index followed by its shards in the index's order.
        Raises as :meth:`from_pretrained` does for missing, refused or malformed ones."""
        found = cls._find_weights(Path(folder), variant, allow_pickle)
        if not found.name.endswith(".json"):
            return [found]
        return [found, *(found.parent / shard for shard in shard_map(found))]

    @staticmethod
    def _find_weights(folder: Path, variant: str | None, allow_pickle: bool) -> Path:
        """The weights file of ``folder``, or the index of its shards (``*.index*.json``), in
        diffusers' order: safetensors index (a folder that has one is sharded, whatever else it
        holds), safetensors file, then pickles if allowed."""
        stem = f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM
        safe = folder / f"{stem}.safetensors"
        safe_index = folder / _index_name(".safetensors", variant)
        for candidate in (safe_index, safe):
            if candidate.is_file():
                return candidate
        pickled = [folder / f"{stem}{s}" for s in PICKLE_SUFFIXES]
        pickled.append(folder / _index_name(".bin", variant))
        found = allowed_pickle(safe, pickled, allow_pickle)
        if found is None:
            raise MissingFileError(
                f"{safe}: weights file is missing (nor is there a sharded {safe_index.name})"
            )
        return found

    def _assign_state_dict(
        self, state: dict[str, torch.Tensor], source: Path, dtype: torch.dtype
    ) -> None:
        check_state_dict(self, state, source)
        for key, tensor in state.items():
            if tensor.is_floating_point():
                state[key] = tensor.to(dtype)
        self.load_state_dict(state, strict=True, assign=True)

    def save_pretrained(
        self,
        path: str | os.PathLike,
        is_main_process: bool = True,
        *,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
    ) -> None:
        """Write ``config.json`` and the weights into ``path`` (made if missing) as diffusers'
        ``save_pretrained`` does, each file atomically.

        Args:
            is_main_process: False writes nothing (each rank of a distributed run may call
                this; the main one writes).
            safe_serialization: safetensors (the default); False writes a pickled
                ``diffusion_pytorch_model.bin``, which loads only with ``allow_pickle=True``.
            variant: ``diffusion_pytorch_model.<variant>.safetensors``.
            max_shard_size: bytes, or a size such as ``"10GB"`` or ``"500MB"``. Larger weights
                are written as diffusers writes them: numbered shards
                (``diffusion_pytorch_model-00001-of-00003.safetensors``, a tensor larger than
                the limit alone in its shard) and their index
                (``diffusion_pytorch_model.safetensors.index.json``).

        Then every other file :meth:`from_pretrained` could read this variant's weights from (the
        single file, a shard index or shards of an earlier save, in either format) is removed:
        an earlier save's index would shadow the new single file (diffusers removes old shards
        but leaves the index, and its loader then fails on the missing shards).
        """
        max_bytes = shard_size_bytes(max_shard_size)
        if not is_main_process:
            return
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "_class_name": self.diffusers_class,
            "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
            "_echofast_version": __version__,
            **{k: _jsonable(v) for k, v in self.config.items()},
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        kind = ".safetensors" if safe_serialization else ".bin"
        stem = f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM
        shards = plan_shards(state, max_bytes)
        if len(shards) == 1:
            names = {f"{stem}{kind}": shards[0]}
        else:
            n = len(shards)
            names = {f"{stem}-{i:05d}-of-{n:05d}{kind}": keys for i, keys in enumerate(shards, 1)}
        for name, keys in names.items():
            atomic_write(folder / name, partial(_write_weights, {k: state[k] for k in keys}, kind))
        written = set(names)
        if len(shards) > 1:
            index = _index_name(kind, variant)
            weight_map = {k: name for name, keys in names.items() for k in keys}
            total = sum(t.numel() * t.element_size() for t in state.values())
            text = json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map},
                indent=2,
                sort_keys=True,
            )
            atomic_write_text(folder / index, text + "\n")
            written.add(index)
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        for stale in _weights_candidates(folder, variant):
            if stale.name not in written:
                stale.unlink()


def _index_name(kind: str, variant: str | None) -> str:
    """diffusers' shard index name: ``diffusion_pytorch_model<kind>.index[.<variant>].json``."""
    return (
        f"{WEIGHTS_STEM}{kind}.index.{variant}.json"
        if variant
        else f"{WEIGHTS_STEM}{kind}.index.json"
    )


def _weights_candidates(folder: Path, variant: str | None) -> list[Path]:
    """The files of ``folder`` that :meth:`ModelBase.from_pretrained` could read ``variant``'s
    weights from: single files of every format, shard indexes and numbered shards."""
    stem = f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM
    singles = {f"{stem}{suffix}" for suffix in (".safetensors", *PICKLE_SUFFIXES)}
    indexes = {_index_name(kind, variant) for kind in (".safetensors", ".bin")}
    shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.(safetensors|bin)")
    return [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.name in singles or p.name in indexes or shard.fullmatch(p.name))
    ]


def _write_weights(state: dict[str, torch.Tensor], kind: str, path: str) -> None:
    """Write ``state`` to ``path`` as ``kind``: ``.safetensors`` with diffusers' header, or a
    pickle (``.bin``)."""
    if kind == ".bin":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, path, metadata={"format": "pt"})
