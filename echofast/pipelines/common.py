"""Pieces shared by the sampling pipelines: generators, padding, precision, checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import NonFiniteError
from ..rng import sample_generators

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """Autocast for the UNets in reduced precision (fp32 weights, as the reference)."""
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


def frames_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] (N, C, H, W) → grayscale uint8 (N, H, W).

    Channel mean, then the reference's ``uint8(clamp((x + 1) * 128, 0, 255))`` (truncation).
    """
    gray = x.float().mean(dim=1)
    return ((gray + 1) * 128).clamp_(0, 255).to(torch.uint8)


def reference_scheduler():
    """The reference's sampler: DDPM, v-prediction, leading spacing, clip ±4, fixed_small."""
    from ..schedulers import REFERENCE_SCHEDULER_CONFIG, DDPMScheduler

    return DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
