"""Random tensors drawn from explicit generators (diffusers' ``randn_tensor`` convention)."""

from __future__ import annotations

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
