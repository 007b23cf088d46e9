"""Sinusoidal timestep features and the timestep MLP (diffusers' Timesteps/TimestepEmbedding),
and the exact memo of timestep-only work used during sampling (:class:`RunMemo`,
:class:`TimeEmbedding`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._mode import eager_inference
from ._packing import adjacent, concat_view, pack_rows, packed_linear


def batch_timesteps(
    timestep: torch.Tensor | float | int, batch: int, device: torch.device
) -> torch.Tensor:
    """A scalar, 0-d, (1,) or (batch,) timestep as a (batch,) tensor on ``device``.

    Python numbers become int64 (truncated), as diffusers' UNets do.
    """
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], dtype=torch.long, device=device)
    elif timestep.dim() == 0:
        timestep = timestep[None]
    timestep = timestep.to(device)
    if timestep.shape[0] == 1 and batch != 1:
        return timestep.expand(batch)
    if timestep.shape[0] != batch:
        raise ValueError(f"got {timestep.shape[0]} timesteps for a batch of {batch}")
    return timestep


def distinct_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """``timesteps[:1]`` when every sample of the batch has the same timestep, else all of them.

    Embedding one shared timestep once (and broadcasting it) is cheaper, and keeps a sample's
    result independent of its batch: small-batch matrix products take batch-size-dependent
    code paths whose rounding differs. Inside ``torch.compile`` only an expanded scalar is
    recognised: comparing the values would read them on the host (a graph break).
    """
    if timesteps.shape[0] > 1 and timesteps.dim() == 1 and timesteps.stride(0) == 0:
        return timesteps[:1]  # an expanded scalar: shared by construction, no host sync
    if torch.compiler.is_compiling():
        return timesteps
    if timesteps.shape[0] > 1 and bool((timesteps == timesteps[0]).all()):
        return timesteps[:1]
    return timesteps


def timestep_features(
    timesteps: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of ``timesteps`` (N,) -> (N, dim) in fp32.

    Frequencies ``exp(-ln(max_period) * i / (dim/2 - freq_shift))``; ``[sin, cos]``, or
    ``[cos, sin]`` when ``flip_sin_to_cos``; an odd ``dim`` gets one zero column.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent * (-math.log(max_period)) / (half - freq_shift)
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    first, second = (
        (torch.cos(args), torch.sin(args))
        if flip_sin_to_cos
        else (torch.sin(args), torch.cos(args))
    )
    emb = torch.cat([first, second], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(x)))`` — keys ``linear_1``, ``linear_2`` as diffusers."""

    def __init__(self, in_channels: int, embed_dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, out_dim or embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ---- exact memo of timestep-only work -------------------------------------------------------


def weights_signature(modules: Iterable[nn.Module]) -> tuple | None:
    """Identity of the current values of the modules' parameters: per parameter its storage
    address, in-place version counter, dtype and device. Any in-place update (optimizer step,
    ``load_state_dict``, ``copy_``) bumps the version; ``.to()``/``.half()``/``assign`` loading
    replace the storage. None when a parameter has no version counter (inference tensors)."""
    sig = []
    for module in modules:
        for p in module.parameters():
            try:
                version = p._version
            except RuntimeError:  # inference tensors do not track versions
                return None
            sig.append((p.data_ptr(), version, p.dtype, p.device))
    return tuple(sig)


def value_key(x: torch.Tensor | float | int) -> tuple:
    """A hashable key of a number's or a small tensor's type, shape and values (a tensor on a
    device is copied to the host)."""
    if torch.is_tensor(x):
        return (x.dtype, tuple(x.shape), tuple(x.detach().reshape(-1).tolist()))
    return (type(x).__name__, x)


def _autocast_state() -> tuple:
    return tuple(
        (dev, torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else (dev, None)
        for dev in ("cpu", "cuda")
    )


class RunMemo:
    """Values that depend only on some modules' weights and a small key, reused across the UNet
    calls of one sampling run (see ``LVDM.sampling_cache`` / ``LIDM.sampling_cache``).

    An entry is reused only while the weights signature of its modules, the autocast state and
    grad mode (off) are unchanged; a changed weight recomputes it. With ``enabled=False`` nothing
    is kept (one UNet call outside a sampling run, or under autograd).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._entries: dict[tuple, tuple[tuple[nn.Module, ...], tuple, Any]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, modules: tuple[nn.Module, ...], key: Hashable, fn: Callable[[], Any]) -> Any:
        """``fn()``, or the value an earlier call stored for the same modules, key and weights."""
        if not self.enabled or not eager_inference():
            return fn()
        sig = weights_signature(modules)
        if sig is None:
            return fn()
        full = (tuple(id(m) for m in modules), key, _autocast_state())
        hit = self._entries.get(full)
        if hit is not None and all(a is b for a, b in zip(hit[0], modules)) and hit[1] == sig:
            self.hits += 1
            return hit[2]
        self.misses += 1
        value = fn()
        self._entries[full] = (modules, sig, value)
        return value


class TimeProjections:
    """Every resblock's time projection ``linear(silu(emb))`` of a model as ONE GEMM.

    The ``linears`` (all reading the same time embedding) keep their weights and biases as
    adjacent rows of one storage (:mod:`echofast.nn._packing`), so ``silu(emb)`` is computed once
    and one ``F.linear`` with the concatenated (views of the live) parameters gives all
    projections: 2 kernels instead of 2 per resblock (88 for the LVDM). Inference only
    (:func:`eager_inference`); under autograd, ``torch.compile`` or when the parameters are not
    packed (after ``load_state_dict(assign=True)`` until :meth:`pack`), :meth:`compute` returns
    None and every block projects on its own. The values are the per-block ones up to the GEMM's
    summation order.
    """

    def __init__(self, linears: list[nn.Linear], folds: list[nn.Module | None] | None = None):
        self.linears = linears
        #: per linear, the conv whose bias its block folds into the projection (see
        #: :func:`project_time`), or None
        self.folds = dict(zip(linears, folds or [None] * len(linears)))

    def _params(self, name: str) -> list[torch.Tensor] | None:
        ps = [getattr(lin, name) for lin in self.linears]
        return None if any(p is None for p in ps) else ps

    def _fold_biases(self) -> list[torch.Tensor] | None:
        """The folded conv biases in the linears' order when every linear has one."""
        convs = list(self.folds.values())
        if any(c is None or c.bias is None for c in convs):
            return None
        return [c.bias for c in convs]

    def pack(self) -> None:
        """(Re)store the weights and biases adjacently (after construction, ``.to()``, loading)."""
        if len(self.linears) > 1:
            pack_rows(self._params("weight"))
            pack_rows(self._params("bias"))
            pack_rows(self._fold_biases())

    @property
    def sizes(self) -> list[int]:
        """Each linear's ``out_features``, in order: the widths of :meth:`all`'s columns."""
        return [lin.out_features for lin in self.linears]

    def _packed(self, emb: torch.Tensor) -> torch.Tensor | None:
        """(B, sum of sizes): every projection (+ folded bias) from one GEMM and one add, or None
        when the fused path does not apply."""
        if len(self.linears) < 2 or not eager_inference():
            return None
        fused = packed_linear(self._params("weight"), self._params("bias"))
        if fused is None:
            return None
        folded = [c for c in self.folds.values() if c is not None]
        biases = self._fold_biases()
        if folded and (biases is None or not adjacent(biases)):
            return None  # some blocks fold and some do not, or not packed: each projects alone
        out = F.linear(F.silu(emb), *fused)
        if biases is not None:  # in the projections' dtype, as autocast casts a conv's bias
            out.add_(concat_view(biases).to(out.dtype))
        return out

    def compute(self, emb: torch.Tensor) -> dict[nn.Module, torch.Tensor] | None:
        """{linear: its (B, out_features) projection of ``emb``, plus its folded conv bias} as
        views of one GEMM's output (and one add for all folded biases), or None when the fused
        path does not apply."""
        out = self._packed(emb)
        return None if out is None else self.split(out)

    def all(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, sum of sizes): every linear's projection of ``emb`` (+ its folded conv bias),
        concatenated in order: one GEMM when packed, else one per linear. The table
        :meth:`split` takes apart (see ``LVDM.time_features``)."""
        out = self._packed(emb)
        if out is not None:
            return out
        return torch.cat([_project(emb, lin, fold) for lin, fold in self.folds.items()], dim=-1)

    def split(self, table: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
        """{linear: its columns of ``table`` (B, sum of sizes)} as views."""
        return dict(zip(self.linears, table.split(self.sizes, dim=-1)))


def time_projections(model: nn.Module) -> TimeProjections:
    """The :class:`TimeProjections` of every ``time_emb_proj`` linear layer in ``model``, with
    the conv each block folds into its projection (``block.time_fold()``, when it has one)."""
    blocks = [
        m for m in model.modules() if isinstance(getattr(m, "time_emb_proj", None), nn.Linear)
    ]
    folds = [m.time_fold() if callable(getattr(m, "time_fold", None)) else None for m in blocks]
    return TimeProjections([m.time_emb_proj for m in blocks], folds)


class TimeEmbedding:
    """The per-call state a UNet's blocks share: the time embedding ``emb`` (B, E) with the
    per-block projections ``linear(silu(emb))``: all of them from one GEMM when the model's
    :class:`TimeProjections` apply, and within a sampling run (a shared :class:`RunMemo`, the
    ``key`` of this call's timestep and conditioning, and the modules ``deps`` that computed
    ``emb``) computed once per timestep.

    Precomputed inputs (see ``LVDM.time_features``): ``table`` (B, sum of the projections'
    sizes [+ the ``mixers``' width]) holds every projection already, so ``emb`` may be None,
    and the blenders' weights in its last columns (row 0's: every row has the same);
    ``features`` maps a module to a value the caller computed for it beforehand (a
    transformer's frame-position embedding, a cross-attention's single-key output rows), see
    :meth:`feature`.
    """

    def __init__(
        self,
        emb: torch.Tensor | None,
        memo: RunMemo | None = None,
        key: Hashable = (),
        deps: tuple[nn.Module, ...] = (),
        projections: TimeProjections | None = None,
        mixers: Any = None,
        *,
        table: torch.Tensor | None = None,
        features: dict[nn.Module, torch.Tensor] | None = None,
    ):
        if emb is None and (table is None or projections is None):
            raise ValueError("TimeEmbedding needs emb, or a projections table and its projections")
        self.emb = emb
        self.memo = memo if memo is not None else RunMemo(enabled=False)
        self.key = key
        self.deps = deps
        self.mixers = mixers
        self.features = features or {}
        self._mix: dict[torch.dtype, dict | None] = {}
        self._per_call: dict[Hashable, Any] = {}
        self._all = None
        self._folds = {} if projections is None else projections.folds
        if table is not None and projections is not None:
            width = sum(projections.sizes)
            self._all = projections.split(table[:, :width])
            if mixers is not None and table.shape[1] == width + mixers.width:
                self._mix[table.dtype] = mixers.split(table[0, width:])
        elif projections is not None:
            folded = tuple(c for c in projections.folds.values() if c is not None)
            self._all = self.memo.get(
                (*projections.linears, *folded, *deps),
                ("temb-all", key),
                lambda: projections.compute(emb),
            )

    def feature(self, module: nn.Module) -> torch.Tensor | None:
        """The value precomputed for ``module`` (``features``), or None: compute it."""
        return self.features.get(module)

    def per_call(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """``fn()``, computed once per UNet call for ``key`` (values that depend only on the key,
        e.g. the frame-position features shared by transformers of one width). Inference only;
        under autograd or ``torch.compile`` every caller computes its own."""
        if not eager_inference():
            return fn()
        if key not in self._per_call:
            self._per_call[key] = fn()
        return self._per_call[key]

    def temporal_weight(self, blender: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """``blender.temporal_weight(dtype)``, from the model's one computation of every blender's
        weight (``mixers``, a :class:`~echofast.nn.spatiotemporal.MixWeights`) when it applies:
        once per call and dtype."""
        if self.mixers is not None:
            if dtype not in self._mix:
                self._mix[dtype] = self.mixers.compute(dtype)
            table = self._mix[dtype]
            if table is not None and blender in table:
                return table[blender]
        return blender.temporal_weight(dtype)

    def project(self, linear: nn.Module, fold: nn.Module | None = None) -> torch.Tensor:
        """``linear(silu(emb))`` (+ ``fold.bias``): from the one-GEMM projections when they hold
        ``linear`` with the same fold, else memoised per (linear, fold, timestep key, weights,
        deps)."""
        if self._all is not None and linear in self._all and self._folds.get(linear) is fold:
            return self._all[linear]
        modules = (linear, *(() if fold is None else (fold,)), *self.deps)
        return self.memo.get(modules, ("temb", self.key), lambda: _project(self.emb, linear, fold))


def _project(emb: torch.Tensor, linear: nn.Module, fold: nn.Module | None) -> torch.Tensor:
    out = linear(F.silu(emb))
    if fold is None or fold.bias is None:
        return out
    bias = fold.bias.to(out.dtype)  # as autocast casts a conv's bias
    return out.add_(bias) if eager_inference() else out + bias


def project_time(
    temb: torch.Tensor | TimeEmbedding, linear: nn.Module, fold: nn.Module | None = None
) -> torch.Tensor:
    """``linear(silu(temb))`` for a plain embedding tensor or a :class:`TimeEmbedding`, plus
    ``fold.bias`` when ``fold`` is given: the bias of the conv whose output the projection is
    added to, which the block runs without its bias (see :func:`conv_without_bias`), so one add
    of all blocks' folded biases to the packed projections replaces one full-size bias add per
    conv."""
    if isinstance(temb, TimeEmbedding):
        return temb.project(linear, fold)
    return _project(temb, linear, fold)


def conv_without_bias(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` without its bias (the caller adds it elsewhere: :func:`project_time`)."""
    return conv._conv_forward(x, conv.weight, None)


def sampling_cache(model: nn.Module) -> contextlib.AbstractContextManager:
    """``model.sampling_cache()`` for echofast UNets (see ``LVDM.sampling_cache``); a no-op context
    for other models (e.g. a diffusers UNet passed to a pipeline)."""
    enter = getattr(model, "sampling_cache", None)
    return enter() if callable(enter) else contextlib.nullcontext()
