"""echofast: a fast, faithful implementation of EchoNet-Synthetic.

Importing this package is cheap: it imports torch, but no Triton, queries no GPU and loads no
compiled extension. Submodules are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("errors", "info", "models", "nn", "ops")

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
