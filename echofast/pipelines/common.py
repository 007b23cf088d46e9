"""Pieces shared by the sampling pipelines: generators, padding, precision, checks."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError, NonFiniteError
from ..rng import randn_tensor, sample_generators

if TYPE_CHECKING:
    from ..models.base import ModelBase
    from ..schedulers import SchedulerBase

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PipelineT = TypeVar("PipelineT", bound="SamplingPipeline")


def resolve_generators(
    count: int,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    seed: int | None,
    sample_indices: Sequence[int] | None,
    stream: str,
) -> list[torch.Generator]:
    """One generator per sample: an explicit list, a single generator for a single sample, or
    generators derived from ``seed`` and the samples' global indices (``rng.sample_seed``)."""
    if generator is not None and seed is not None:
        raise ValueError("pass either generator= or seed=, not both")
    if isinstance(generator, torch.Generator):
        if count != 1:
            raise ValueError(
                f"one generator for {count} samples would make each sample depend on the batch; "
                "pass a list of generators (one per sample) or seed="
            )
        return [generator]
    if generator is not None:
        gens = list(generator)
        if len(gens) != count:
            raise ValueError(f"got {len(gens)} generators for {count} samples")
        return gens
    indices = list(range(count)) if sample_indices is None else list(sample_indices)
    if len(indices) != count:
        raise ValueError(f"got {len(indices)} sample indices for {count} samples")
    return sample_generators(0 if seed is None else seed, indices, stream)


def latent_padding(size: int, multiple: int) -> int:
    """Replicate padding per side that makes ``size`` a multiple of ``multiple``.

    For the reference's 14×14 latents and a 4-level UNet (multiple 8) this is
    ``(8 - 14 % 8) // 2 = 1``: 14 → 16. Sizes already divisible get no padding.
    """
    total = (-size) % multiple
    if total % 2:
        raise ValueError(
            f"latent size {size} cannot be padded symmetrically to a multiple of {multiple}"
        )
    return total // 2


def square_padding(h: int, w: int, multiple: int) -> int:
    """The one replicate padding per side (:func:`latent_padding`) that both ``h`` and ``w``
    need; the fused step pads both axes equally, so latents needing two paddings are refused."""
    ph, pw = latent_padding(h, multiple), latent_padding(w, multiple)
    if ph != pw:
        raise ValueError(
            f"latents of {h}×{w} need {ph} rows and {pw} columns of padding per side to reach a "
            f"multiple of {multiple}; echofast pads both axes equally, so the two paddings "
            "must agree"
        )
    return ph


def pad_replicate(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Replicate-pad the last two dims of (..., C, H, W) by ``pad`` on every side."""
    if pad == 0:
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    out = F.pad(flat, (pad, pad, pad, pad), mode="replicate")
    return out.reshape(*lead, *out.shape[-3:])


def unpad(x: torch.Tensor, pad: int) -> torch.Tensor:
    return x if pad == 0 else x[..., pad:-pad, pad:-pad]


def check_precision(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """float32 anywhere; float16/bfloat16 (autocast) only on CUDA."""
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise ValueError(f"dtype must be one of {list(PRECISIONS)}, got {dtype!r}")
        dtype = PRECISIONS[dtype]
    if dtype not in PRECISIONS.values():
        raise ValueError(f"dtype must be one of {list(PRECISIONS)}, got {dtype}")
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"{dtype} sampling needs a CUDA device; on {device.type} use float32")
    return dtype


@contextlib.contextmanager
def unet_precision(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast for the UNets (and the VAE decode) in reduced precision (fp32 weights, as the
    reference); nothing for float32."""
    if dtype == torch.float32:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def check_finite(x: torch.Tensor, what: str, indices: Sequence[int], step: int | str) -> None:
    """Raise :class:`NonFiniteError` naming the first sample of ``x`` (dim 0) that is not finite."""
    ok = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        raise NonFiniteError(f"{what} of sample {indices[bad]} is not finite at step {step}")


DEFERRED_CHECK_DEVICES = frozenset({"cuda"})
"""Device types on which :class:`FiniteWatch` records non-finite steps on the device and reports
them at :meth:`FiniteWatch.check` instead of synchronising with the host at every step."""


class FiniteWatch:
    """The per-step finiteness check of a sampling loop, without a per-step host sync on CUDA.

    ``update(x, step)`` after every step, ``check()`` once the loop is done. On devices in
    :data:`DEFERRED_CHECK_DEVICES` each update only records, on the device, whether each sample
    of ``x`` (dim 0) is finite at that step (two small kernels, no sync, capturable: a row of a
    (steps, batch) table when ``steps`` is given), and ``check`` reads the record once (one sync)
    and raises the same error as an immediate check would have: the sample that went non-finite
    at the earliest step (the first such in the batch), and that step. Elsewhere ``update``
    checks at once (:func:`check_finite`). A non-finite sample is therefore reported after the
    loop at the latest, before any output.
    """

    def __init__(
        self, what: str, indices: Sequence[int], device: torch.device, steps: int | None = None
    ):
        self.what = what
        self.indices = list(indices)
        self.deferred = torch.device(device).type in DEFERRED_CHECK_DEVICES
        self.steps = steps
        self._ok: torch.Tensor | None = None
        self._first: torch.Tensor | None = None

    def update(self, x: torch.Tensor, step: int) -> None:
        if not self.deferred:
            check_finite(x, self.what, self.indices, step)
            return
        finite = torch.isfinite(x.reshape(x.shape[0], -1))
        if self.steps is not None and 0 <= step < self.steps:
            if self._ok is None:
                self._ok = torch.ones(self.steps, x.shape[0], dtype=torch.bool, device=x.device)
            torch.all(finite, dim=1, out=self._ok[step])
            return
        ok = finite.all(dim=1)
        if self._first is None:
            self._first = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
        self._first.masked_fill_(~ok & (self._first < 0), step)

    def check(self) -> None:
        """Raise :class:`NonFiniteError` for what the deferred updates recorded (one sync)."""
        bad = []
        if self._ok is not None:
            steps, samples = (~self._ok).nonzero(as_tuple=True)
            bad += list(zip(steps.tolist(), samples.tolist()))
        if self._first is not None:
            bad += [(s, i) for i, s in enumerate(self._first.tolist()) if s >= 0]
        if bad:
            step, i = min(bad)
            raise NonFiniteError(
                f"{self.what} of sample {self.indices[i]} is not finite at step {step}"
            )


class NoiseSource:
    """Each step's noise, float32, drawn from the per-sample CPU generators (the seed contract:
    one ``randn`` of the per-sample shape per generator, in batch order) and delivered on
    ``device``.

    On CUDA the draws go into pinned host buffers (a ring of ``depth``) that are copied
    asynchronously, so the host neither waits for the device nor makes it wait: before a buffer
    is refilled, the copy made from it ``depth`` draws earlier is waited for (its event), so the
    host may run up to ``depth`` steps ahead of the device. Elsewhere it is
    :func:`~echofast.rng.randn_tensor`.
    """

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        shape: tuple[int, ...],
        device: torch.device,
        depth: int = 2,
    ):
        if len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
        self.generators = list(generators)
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.staged = self.device.type == "cuda" and all(
            g.device.type == "cpu" for g in self.generators
        )
        self._slot = 0
        self._host: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        if self.staged:
            self._host = [torch.empty(self.shape, pin_memory=True) for _ in range(depth)]
            self._events = [None] * depth

    def __call__(self) -> torch.Tensor:
        if not self.staged:
            return randn_tensor(
                self.shape, generator=self.generators, device=self.device, dtype=torch.float32
            )
        slot = self._slot
        self._slot = (slot + 1) % len(self._host)
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        buf = draw_noise(self.generators, self._host[slot])
        out = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._events[slot] = event
        return out


def draw_noise(generators: Sequence[torch.Generator], out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (B, ...) float32 with ``randn`` from ``generators[i]`` for item i: the same
    numbers as :func:`~echofast.rng.randn_tensor` with that list of generators."""
    for i, g in enumerate(generators):
        torch.randn(out.shape[1:], generator=g, dtype=torch.float32, out=out[i])
    return out


class StaticInputs:
    """Tensors a pipeline keeps between UNet calls (and between batches and calls of the same
    shape), so that a graph that borrowed them (``CUDAGraphUNet(borrow_inputs=True)``) replays
    without copying its inputs. ``get(name, shape, ...)`` returns the same tensor for the same
    name, shape, dtype, device and strides (contiguous unless ``stride`` is given); the ``keep``
    most recently used are held. Their values are whatever the caller last wrote."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._tensors: dict[tuple, torch.Tensor] = {}

    def get(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        stride: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        shape = tuple(shape)
        key = (name, shape, dtype, torch.device(device), None if stride is None else tuple(stride))
        t = self._tensors.pop(key, None)
        if t is None and stride is None:
            t = torch.empty(shape, dtype=dtype, device=device)
        elif t is None:
            t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        self._tensors[key] = t
        while len(self._tensors) > self.keep:
            self._tensors.pop(next(iter(self._tensors)))
        return t

    def clear(self) -> None:
        self._tensors.clear()


class SamplingPipeline:
    """What the LIDM and LVDM pipelines share: an echofast scheduler (the fused step reads its
    ``step_coefficients``), the CUDA graphs they keep between calls, and the persistent UNet
    inputs those graphs read in place. ``_model`` is the UNet attribute's name."""

    _model = ""
    #: the UNet's echofast class (``from_pretrained`` loads it)
    _model_class: ClassVar[type[ModelBase]]

    def __init__(self, unet: torch.nn.Module, vae, scheduler) -> None:
        from .graphs import CUDAGraphUNet

        setattr(self, self._model, unet)
        self.vae = vae
        self.scheduler = scheduler if scheduler is not None else reference_scheduler()
        if not hasattr(self.scheduler, "step_coefficients"):
            raise TypeError(
                f"{type(self).__name__} needs an echofast scheduler (echofast.schedulers."
                "DDPMScheduler or DDIMScheduler: the fused step uses step_coefficients), got "
                f"{type(self.scheduler).__name__}"
            )
        self.graphs = CUDAGraphUNet(unet, borrow_inputs=True)
        self._inputs = StaticInputs()
        self._autocast_model: tuple[tuple, torch.nn.Module] | None = None

    @classmethod
    def from_pretrained(
        cls: type[PipelineT],
        path: str | os.PathLike,
        *,
        vae: str | os.PathLike | None = None,
        scheduler: SchedulerBase | None = None,
        device: torch.device | str | None = None,
    ) -> PipelineT:
        """The pipeline of the UNet in the model folder ``path`` (a diffusers folder, e.g. what
        ``echofast train export`` writes), sampling with the scheduler the folder records (see
        :func:`model_scheduler`: the noise schedule the model was trained with; the reference
        DDPM where it records none, as in the published folders). ``scheduler`` replaces the
        recorded one. ``vae``: a VAE model folder, to decode (none: latents only)."""
        from ..models import VAE

        if scheduler is None:
            scheduler = model_scheduler(path)
        unet = cls._model_class.from_pretrained(path, device=device)
        decoder = None if vae is None else VAE.from_pretrained(vae, device=device)
        return cls(unet, decoder, scheduler)

    def release_graphs(self) -> None:
        """Free the captured CUDA graphs (memory pools), the kept UNet input tensors and the
        reduced-precision copy of the UNet."""
        self.graphs.reset()
        self._inputs.clear()
        self._autocast_model = None

    def _unet_input(
        self, model: torch.nn.Module | None, shape: tuple[int, ...], device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The persistent UNet input (..., C, H, W). For an echofast UNet (``model``) in the
        layout and dtype its first convolution reads (frames in its ``memory_format``, the call's
        dtype under the run's autocast state: window_step writes it so, and a call neither
        copies nor casts it); fp32 and contiguous for other UNets (``model`` None: the
        reference's way)."""
        if model is None:
            return self._inputs.get("x", shape, torch.float32, device)
        with unet_precision(torch.device(device), dtype):
            call_dtype = model._call_dtype(torch.device(device))
        stride = None
        if model.memory_format == torch.channels_last:
            stride = frames_last_strides(shape)
        return self._inputs.get("x", shape, call_dtype, device, stride)

    def _sampling_model(self, dtype: torch.dtype) -> torch.nn.Module:
        """The UNet a run calls: the model itself in float32; in float16/bfloat16 (autocast) its
        ``autocast_copy`` (Linear/Conv weights cast once, not at every call; same outputs), kept
        between runs and made again when the model's parameters were moved, replaced or changed
        in place. Other modules (diffusers', ``torch.compile``'d ones) are called as they are."""
        from ..models.base import ModelBase

        model = getattr(self, self._model)
        if dtype == torch.float32 or not isinstance(model, ModelBase):
            return model
        key = (id(model), dtype, tuple((p.data_ptr(), p._version) for p in model.parameters()))
        if self._autocast_model is None or self._autocast_model[0] != key:
            self._autocast_model = None  # free the stale copy before making the new one
            self._autocast_model = (key, model.autocast_copy(dtype))
        return self._autocast_model[1]

    def _step_plan(
        self,
        timesteps: torch.Tensor,
        batch: int,
        generators: Sequence[torch.Generator],
        shape: tuple[int, ...],
        device: torch.device,
        what: str,
        indices: Sequence[int],
    ) -> tuple[torch.Tensor, list[bool], torch.Tensor, NoiseSource, FiniteWatch]:
        """A run's per-step state, moved to the device once (no per-step transfers): every
        step's coefficients (S, batch, k), which steps draw noise, the timesteps on the device,
        the noise source of ``shape`` and the finiteness watch."""
        coeffs = torch.stack([self.scheduler.step_coefficients(t, batch) for t in timesteps])
        needs_noise = [self.scheduler.step_needs_noise(t) for t in timesteps]
        return (
            coeffs.to(device),
            needs_noise,
            timesteps.to(device),
            NoiseSource(generators, shape, device),
            FiniteWatch(what, indices, device, len(timesteps)),
        )

    def _unet(self, cuda_graphs: bool | None, unet: torch.nn.Module):
        """What to call for ``unet`` (see :meth:`_sampling_model`): the module itself
        (``cuda_graphs=False``) or the graph wrapper (re-made when the module changed)."""
        from .graphs import CUDAGraphUNet

        if cuda_graphs is False:
            return unet
        if self.graphs.module is not unet:
            self.graphs = CUDAGraphUNet(unet, borrow_inputs=True)
        self.graphs.enabled = cuda_graphs
        return self.graphs


def echofast_model(model: torch.nn.Module, cls: type) -> Any:
    """The echofast model of class ``cls`` that ``model`` calls: itself, or the module a
    ``torch.compile`` wrapper compiled (its calls then take the same precomputed inputs and
    layouts); None for other UNets (diffusers')."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, cls) else None


def frames_last_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Strides of a (..., C, H, W) tensor whose (C, H, W) frames are channels-last in memory
    and follow each other in order (flattening the leading dims gives a channels_last tensor)."""
    *lead, c, h, w = shape
    strides = [h * w * c] if lead else []
    for n in reversed(lead[1:]):
        strides.insert(0, strides[0] * n)
    return (*strides, 1, w * c, c)


def check_cuda_graphs(value: bool | None) -> bool | None:
    """``cuda_graphs`` argument of the pipelines: None (auto), True (forced) or False."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"cuda_graphs must be None (auto), True or False, got {value!r}")
    return value


def check_decode_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """VAE decode precision: float32, float16 or bfloat16 (autocast; any device)."""
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise ValueError(f"decode_dtype must be one of {list(PRECISIONS)}, got {dtype!r}")
        dtype = PRECISIONS[dtype]
    if dtype not in PRECISIONS.values():
        raise ValueError(f"decode_dtype must be one of {list(PRECISIONS)}, got {dtype}")
    return dtype


def frames_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] (N, C, H, W) → grayscale uint8 (N, H, W).

    Channel mean, then the reference's ``uint8(clamp((x + 1) * 128, 0, 255))`` (truncation).
    """
    gray = x.float().mean(dim=1)
    return ((gray + 1) * 128).clamp_(0, 255).to(torch.uint8)


def reference_scheduler() -> SchedulerBase:
    """The reference's sampler: DDPM, v-prediction, leading spacing, clip ±4, fixed_small."""
    from ..schedulers import REFERENCE_SCHEDULER_CONFIG, DDPMScheduler

    return DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)


def model_scheduler(folder: str | os.PathLike) -> SchedulerBase:
    """The scheduler to sample the UNet of the model folder ``folder`` with: the one its
    ``scheduler_config.json`` records (``echofast train export`` writes the training noise
    schedule there; diffusers' model loading ignores the file), else the reference sampler
    (:func:`reference_scheduler`: the published folders record none).

    The file must name ``DDPMScheduler`` or ``DDIMScheduler`` and hold a config whose step the
    pipelines' fused step can run (no ``thresholding``, no learned variances); otherwise
    :class:`ConfigError` names the file and the key."""
    from ..schedulers import CONFIG_NAME, DDIMScheduler, DDPMScheduler

    path = Path(folder) / CONFIG_NAME
    if not path.exists():
        return reference_scheduler()
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the model's recorded scheduler ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    name = config.get("_class_name")
    classes = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}
    if name not in classes:
        raise ConfigError(
            f"{path}: config key '_class_name': value {name!r}: the model's recorded scheduler "
            f"must be one of {list(classes)}, whose step echofast's pipelines run; "
            "pass scheduler= to sample this model with another"
        )
    scheduler = classes[name].from_config(config, source=str(path))
    try:
        scheduler._check_affine()
    except ConfigError as err:
        raise ConfigError(
            f"{path}: {err} (the model's recorded scheduler: pass scheduler= to sample this model "
            "with another)"
        ) from None
    return scheduler
