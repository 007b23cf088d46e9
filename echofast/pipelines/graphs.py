"""CUDA-graph capture and replay of one UNet call, for sampling loops.

A sampling loop calls the same UNet with the same shapes at every step; only the values of the
inputs and the timestep change. At one video per call the eager LVDM launches thousands of small
kernels and the GPU waits on the CPU. :class:`CUDAGraphUNet` captures one call per input
signature (shapes, dtypes, devices, strides of every tensor argument, the other arguments'
values, the autocast state) into a CUDA graph with static input and output buffers and replays
it: each call copies its inputs into the static buffers and launches the whole UNet at once.
With ``borrow_inputs=True`` the capturing call's own tensors are the static inputs: a sampling
loop that keeps its UNet input in one tensor (the pipelines do) replays with no copy at all.

The timestep is an input like the others: it is copied into a static device tensor (a Python int
becomes an int64 0-d tensor), so one graph serves every step of a run.

Contract of the graph path (``not_supported_reasons`` says when it cannot run):

* inference only (no autograd, ``module.eval()``), every tensor argument and every parameter on
  one CUDA device (the timestep may be on the CPU: it is copied to the device);
* the returned outputs are the graph's static buffers: the next replay of the same signature
  overwrites them (clone what must outlive the next call);
* a parameter or buffer moved to new storage (``.to()``, ``.data = ...``) is detected at the next
  call (a check of the storage addresses, well under a millisecond for the LVDM) and every graph
  is re-captured; in-place weight updates are seen by the graph as they are by eager calls;
  parameter objects replaced by new ones (``load_state_dict(assign=True)``) need :meth:`reset`;
* echofast's sampling memo (``LVDM.sampling_cache``) reads timestep values on the host, which a
  capture cannot do, so it is switched off for the warm-up and the capture; the captured graph
  computes the time embedding on the device at every replay (same values);
* warm-up (``warmup`` eager calls: Triton compilation, cuDNN autotuning, allocator growth) runs on
  a side stream, as PyTorch requires before a capture; autocast is re-entered with its weight-cast
  cache off (cached casts made outside the capture would be freed under the graph).

Everything else (CPU tensors, no CUDA, ``ECHOFAST_CUDA_GRAPHS=0``, autograd on, a module that
synchronises with the host inside its forward so that the capture fails) falls back to the
plain call quietly, or raises :class:`~echofast.errors.BackendUnavailable` listing every reason when
graphs were forced (``enabled=True``). The fallback returns exactly what ``module(...)`` returns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BackendUnavailable

ENV_VAR = "ECHOFAST_CUDA_GRAPHS"
"""``ECHOFAST_CUDA_GRAPHS=0`` disables graph capture everywhere (every call runs eagerly)."""

_TIMESTEP = "timestep"


def _disabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off")


def _arguments(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """(name, value) of every argument after the sample: positional as ``arg<i>``."""
    named = [(f"arg{i}", v) for i, v in enumerate(args)]
    return named + sorted(kwargs.items())


def not_supported_reasons(
    module: nn.Module, sample: Any, timestep: Any, *args: Any, **kwargs: Any
) -> list[str]:
    """Why ``module(sample, timestep, *args, **kwargs)`` cannot be captured (empty: it can).

    Checked: ``ECHOFAST_CUDA_GRAPHS``, CUDA availability, autograd, training mode, that every
    tensor argument, parameter and buffer is on one CUDA device, that the timestep is an int or a
    tensor of at most one element per sample, and that other arguments are tensors or hashable
    values.
    """
    return _reasons(module, _devices(_module_tensors(module)), sample, timestep, args, kwargs)


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of ``module``: what a captured graph reads besides its inputs."""
    return [*module.parameters(), *module.buffers()]


def _devices(tensors: list[torch.Tensor]) -> set[torch.device]:
    return {t.device for t in tensors}


def _reasons(
    module: nn.Module,
    module_devices: set[torch.device],
    sample: Any,
    timestep: Any,
    args: tuple,
    kwargs: dict,
) -> list[str]:
    """:func:`not_supported_reasons` given the devices of the module's parameters and buffers."""
    reasons = []
    if _disabled_by_env():
        reasons.append(f"disabled by {ENV_VAR}={os.environ[ENV_VAR]!r}")
    if not torch.cuda.is_available():
        reasons.append("CUDA is not available (torch.cuda.is_available() is False)")
    if torch.is_grad_enabled():
        reasons.append("autograd is enabled: graphs are for inference (use torch.no_grad())")
    if module.training:
        reasons.append("the module is in training mode (call .eval())")
    devices = set()
    if not torch.is_tensor(sample):
        reasons.append(f"sample is a {type(sample).__name__}, not a tensor")
    else:
        devices.add(sample.device)
    if isinstance(timestep, bool) or not (torch.is_tensor(timestep) or isinstance(timestep, int)):
        reasons.append(
            f"timestep is a {type(timestep).__name__}; pass an int or a tensor (a Python float "
            "is interpreted differently by different UNets)"
        )
    elif torch.is_tensor(timestep) and timestep.dim() > 1:
        reasons.append(f"timestep has shape {tuple(timestep.shape)}; expected 0-d or 1-d")
    for name, value in _arguments(args, kwargs):
        if torch.is_tensor(value):
            devices.add(value.device)
        elif isinstance(value, (list, tuple, dict)) and _holds_tensor(value):
            reasons.append(f"argument {name} is a {type(value).__name__} holding tensors")
        else:
            try:
                hash(value)
            except TypeError:
                reasons.append(f"argument {name} ({type(value).__name__}) is not hashable")
    devices |= module_devices
    not_cuda = sorted(str(d) for d in devices if d.type != "cuda")
    if not_cuda:
        reasons.append(f"tensors or parameters on {not_cuda}, not on a CUDA device")
    elif len(devices) > 1:
        reasons.append(f"tensors on several devices {sorted(str(d) for d in devices)}")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        reasons.append("the current stream is already capturing a graph")
    return reasons


def _holds_tensor(value: Any) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(
        torch.is_tensor(v) or (isinstance(v, (list, tuple, dict)) and _holds_tensor(v))
        for v in items
    )


def _tensor_key(t: torch.Tensor) -> tuple:
    return ("tensor", tuple(t.shape), t.dtype, str(t.device), t.stride())


def _autocast_key() -> tuple:
    if torch.is_autocast_enabled("cuda"):
        return ("cuda", torch.get_autocast_dtype("cuda"))
    return ("cuda", None)


def signature(sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> tuple:
    """The key one graph serves: every tensor's shape/dtype/device/strides, the timestep's kind
    (an int, or a tensor's shape and dtype; never its value), the other arguments' values and the
    CUDA autocast state."""
    if torch.is_tensor(timestep):
        t_key = ("tensor", tuple(timestep.shape), timestep.dtype)
    else:
        t_key = ("int",)
    rest = tuple(
        (name, _tensor_key(v) if torch.is_tensor(v) else ("value", type(v).__name__, v))
        for name, v in _arguments(args, kwargs)
    )
    return (_tensor_key(sample), t_key, rest, _autocast_key())


def _weights_key(tensors: list[torch.Tensor]) -> tuple:
    """Storage addresses of the module's parameters and buffers: what a captured graph reads."""
    return tuple(t.data_ptr() for t in tensors)


@contextlib.contextmanager
def sampling_memo_off(module: nn.Module) -> Iterator[None]:
    """Switch off echofast's per-run sampling memo (``sampling_cache``) inside ``module`` for the
    block: its keys read timestep values on the host, which a stream capture forbids."""
    saved = [
        (m, m._run_memo) for m in module.modules() if getattr(m, "_run_memo", None) is not None
    ]
    for m, _ in saved:
        m._run_memo = None
    try:
        yield
    finally:
        for m, memo in saved:
            m._run_memo = memo


def _capture_autocast() -> contextlib.AbstractContextManager:
    """The caller's CUDA autocast state, with the weight-cast cache off (required in a capture)."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return contextlib.nullcontext()


def cuda_graph_capture(
    fn: Callable[[], Any], device: torch.device, warmup: int
) -> tuple[Callable[[], None], Any]:
    """Run ``fn`` ``warmup`` times on a side stream, then capture one call into a CUDA graph.

    Returns ``(replay, output)``: ``replay()`` launches the graph on the current stream and
    refreshes ``output`` (the captured call's return value, whose tensors live in the graph's
    memory pool).
    """
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            output = fn()
    except BaseException:
        # a failed capture can leave the capture's side stream current: restore the caller's
        torch.cuda.set_stream(current)
        raise
    return graph.replay, output


@dataclass
class _Entry:
    """One captured signature: static inputs, the replay function and the static output."""

    sample: torch.Tensor
    timestep: torch.Tensor
    args: list[Any]
    kwargs: dict[str, Any]
    replay: Callable[[], None]
    output: Any = None

    def load(self, sample: torch.Tensor, timestep: Any, args: tuple, kwargs: dict) -> None:
        _copy_into(self.sample, sample)
        if torch.is_tensor(timestep):
            _copy_into(self.timestep, timestep)
        else:
            self.timestep.fill_(timestep)
        for static, value in zip(self.args, args):
            if torch.is_tensor(static):
                _copy_into(static, value)
        for name, static in self.kwargs.items():
            if torch.is_tensor(static):
                _copy_into(static, kwargs[name])


def _copy_into(static: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into the static buffer (nothing to do when it is that buffer)."""
    if (
        value.data_ptr() != static.data_ptr()
        or value.stride() != static.stride()
        or value.shape != static.shape
    ):
        static.copy_(value, non_blocking=True)


class _StaticInputs:
    """Makes the static input buffers of one capture: copies of the capturing call's tensors, or
    with ``borrow`` the tensors themselves, except a tensor sharing storage with one already
    borrowed, which is copied (two static inputs on one storage would overwrite each other when
    a later call loads two different tensors into them)."""

    def __init__(self, borrow: bool):
        self.borrow = borrow
        self.storages: set[int] = set()

    def __call__(self, value: Any) -> Any:
        if not torch.is_tensor(value):
            return value
        storage = value.untyped_storage().data_ptr()
        if self.borrow and storage not in self.storages:
            self.storages.add(storage)
            return value.detach()
        return value.detach().clone()


class CUDAGraphUNet:
    """Replays CUDA graphs of ``module(sample, timestep, *args, **kwargs)``, one per signature.

    Args:
        module: the UNet (echofast's LIDM/LVDM, or any module with that call convention).
        enabled: ``None`` (default): graphs when :func:`not_supported_reasons` is empty, else the
            plain call; ``True``: graphs or :class:`~echofast.errors.BackendUnavailable` with
            every reason; ``False``: always the plain call.
        warmup: eager calls on a side stream before each capture.
        max_graphs: captured signatures kept (the oldest is dropped beyond it); each holds its
            own memory pool, about one eager call's peak activation memory.
        borrow_inputs: ``False`` (default): a capture copies the call's tensor arguments into
            static buffers of its own and every call copies its inputs into them. ``True``: the
            capturing call's tensors themselves become the static inputs (the wrapper keeps a
            reference); a caller that writes each step's inputs into those same tensors and
            passes them again replays with no copy at all. A later call with other tensors of
            the signature is copied into the borrowed ones (overwriting them). An argument that
            shares storage with one borrowed before it (the same tensor passed twice) gets a
            static buffer of its own.

    Attributes: ``last_reasons`` (why the last call ran eagerly, empty when it replayed),
    ``captures`` and ``replays`` (counts). A signature whose capture raised runs eagerly from
    then on (its reason in ``last_reasons``), or raises when graphs are forced.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        enabled: bool | None = None,
        warmup: int = 2,
        max_graphs: int = 4,
        borrow_inputs: bool = False,
    ):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (kernels compile before capture), got {warmup}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.module = module
        self.enabled = enabled
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.borrow_inputs = borrow_inputs
        self.last_reasons: list[str] = []
        self.captures = 0
        self.replays = 0
        self._graphs: dict[tuple, _Entry] = {}
        self._failed: dict[tuple, str] = {}
        self._tensors: list[torch.Tensor] | None = None
        self._weights: tuple | None = None
        self._devices: set[torch.device] | None = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph and its memory pool (and forget failed captures). Call it
        after replacing parameter objects of the module (e.g. ``load_state_dict(assign=True)``)."""
        self._graphs.clear()
        self._failed.clear()
        self._tensors = None
        self._weights = None
        self._devices = None

    def reasons(self, sample: Any, timestep: Any, *args: Any, **kwargs: Any) -> list[str]:
        """Why this call would run eagerly (empty: it replays a graph)."""
        if self.enabled is False:
            return ["CUDA graphs are disabled for this wrapper (enabled=False)"]
        self._watch_weights()
        return _reasons(self.module, self._devices, sample, timestep, args, kwargs)

    def _watch_weights(self) -> None:
        """Drop every graph when a parameter or buffer has moved to new storage since the last
        call, and note the devices they are on (read again only then: it is per call)."""
        if self._tensors is None:
            self._tensors = _module_tensors(self.module)
        weights = _weights_key(self._tensors)
        if weights != self._weights:
            self.reset()
            # read again: a move (.to()) replaces buffer objects, where parameters keep theirs
            self._tensors = _module_tensors(self.module)
            self._weights = _weights_key(self._tensors)
            self._devices = _devices(self._tensors)

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        reasons = self.reasons(sample, timestep, *args, **kwargs)
        if reasons:
            if self.enabled is True:
                raise BackendUnavailable("unet_call", "cuda_graph", reasons)
            self.last_reasons = reasons
            return self.module(sample, timestep, *args, **kwargs)
        self.last_reasons = []
        key = signature(sample, timestep, *args, **kwargs)
        if key in self._failed:
            self.last_reasons = [self._failed[key]]
            return self.module(sample, timestep, *args, **kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key, sample, timestep, args, kwargs)
            except RuntimeError as err:
                reason = f"capture failed ({type(err).__name__}: {str(err).strip()[:300]})"
                if self.enabled is True:
                    raise BackendUnavailable("unet_call", "cuda_graph", [reason]) from err
                self._failed[key] = reason
                self.last_reasons = [reason]
                torch.cuda.synchronize(sample.device)
                return self.module(sample, timestep, *args, **kwargs)
        else:
            entry.load(sample, timestep, args, kwargs)
            entry.replay()
        self.replays += 1
        return entry.output

    def _capture(
        self, key: tuple, sample: torch.Tensor, timestep: Any, args: tuple, kwargs: dict
    ) -> _Entry:
        device = sample.device
        if torch.is_tensor(timestep):
            t_static = timestep.detach().to(device, copy=True)
        else:
            t_static = torch.full((), timestep, dtype=torch.int64, device=device)
        static = _StaticInputs(self.borrow_inputs)
        entry = _Entry(
            sample=static(sample),
            timestep=t_static,
            args=[static(v) for v in args],
            kwargs={k: static(v) for k, v in kwargs.items()},
            replay=lambda: None,
        )

        def call() -> Any:
            with sampling_memo_off(self.module), _capture_autocast():
                return self.module(entry.sample, entry.timestep, *entry.args, **entry.kwargs)

        if len(self._graphs) >= self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        entry.replay, entry.output = cuda_graph_capture(call, device, self.warmup)
        entry.replay()  # the capture only recorded the work: run it for this call's inputs
        self._graphs[key] = entry
        self.captures += 1
        return entry
