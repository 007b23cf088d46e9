"""echofast: a fast, faithful implementation of EchoNet-Synthetic.

Importing this package is cheap: it imports torch, but no Triton, queries no GPU and loads no
compiled extension. Submodules are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("errors", "info", "models", "nn", "ops")
#: functions imported from a submodule on first access (``echofast.patch(unet)``)
_FUNCTIONS = {"patch": "patching", "unpatch": "patching"}

__all__ = ["__version__", *_SUBMODULES, *_FUNCTIONS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
