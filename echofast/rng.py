"""Random tensors drawn from explicit generators (diffusers' ``randn_tensor`` convention)."""

from __future__ import annotations

import hashlib
import operator

import torch


def randn_tensor(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal tensor of ``shape``.

    Drawn on the generator's device (a CPU generator gives the same numbers whatever ``device``
    is) and moved to ``device``. With a list of generators, item ``i`` of the batch comes from
    ``generator[i]``, so a sample does not depend on its batch neighbours.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {shape[0]} (shape {tuple(shape)})"
            )
        parts = [
            randn_tensor((1, *shape[1:]), generator=g, device=device, dtype=dtype)
            for g in generator
        ]
        return torch.cat(parts, dim=0)
    rand_device = generator.device if generator is not None else device
    out = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype)
    return out.to(device)


def _integer(value: object, what: str) -> int:
    """``value`` as a plain int (Python or NumPy integers; not bool, float or str), since the
    seed rule hashes its decimal text: ``1.0`` would name another sample than ``1``."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")


def sample_seed(base_seed: int, index: int, stream: str) -> int:
    """The seed of sample ``index`` of a job seeded with ``base_seed``, for one random ``stream``.

    Rule: the first 8 bytes (big-endian) of ``sha256(f"echofast:{stream}:{base_seed}:{index}")``,
    masked to 63 bits. Streams in use: ``"lidm"`` (heart image), ``"lvdm"`` (video noise),
    ``"ef"`` (requested ejection fraction). A sample's numbers therefore depend only on
    (base_seed, index), never on batch size, batch position or sharding.
    """
    base_seed, index = _integer(base_seed, "seed"), _integer(index, "sample index")
    digest = hashlib.sha256(f"echofast:{stream}:{base_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def sample_generators(base_seed: int, indices: list[int], stream: str) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded by :func:`sample_seed`."""
    return [torch.Generator().manual_seed(sample_seed(base_seed, i, stream)) for i in indices]
