"""Config dicts with attribute access, and the check that names unsupported values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import ConfigError


class Config(dict):
    """A read-only-by-convention dict with attribute access (``model.config.scaling_factor``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def require(key: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(
            f"config key {key!r}: value {value!r} is not supported (supported: {allowed})"
        )
