"""Output containers that behave like diffusers' ``BaseOutput``."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


class ModelOutput:
    """Dataclass base: ``out.sample``, ``out["sample"]``, ``out[0]`` and ``out.to_tuple()``."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]  # type: ignore[arg-type]
