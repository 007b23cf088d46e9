"""Lazy access to the compiled extension ``echofast._C``.

Importing this module does not load the extension: :func:`load` imports it on first use and
caches the outcome. The extension is absent from pure-Python installs (``ECHOFAST_SKIP_EXT=1``)
and may lack CUDA support (see ``build_info()["cuda"]``). Setting ``ECHOFAST_SKIP_EXT=1`` at run
time (before the first :func:`load`) also treats an installed extension as unavailable, so that
the pure-Python fallbacks can be used and tested with the same installation.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType
from typing import Any

__all__ = ["EXTENSION", "ExtensionUnavailable", "available", "build_info", "load"]

EXTENSION = "echofast._C"


class ExtensionUnavailable(ImportError):
    """``echofast._C`` cannot be imported; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{EXTENSION} is unavailable: {reason}", name=EXTENSION)
        self.reason = reason


_lock = threading.Lock()
_module: ModuleType | None = None
_failure: BaseException | None = None


SKIP_ENV = "ECHOFAST_SKIP_EXT"


class _SkippedByEnvironment(ImportError):
    pass


def _skip_requested() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _SkippedByEnvironment):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name == EXTENSION:
        return (
            "echofast is installed without its compiled extension (built with "
            "ECHOFAST_SKIP_EXT=1?); reinstall without ECHOFAST_SKIP_EXT to build it"
        )
    return f"{type(exc).__name__}: {exc}"


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` with the tracebacks of it and of its causes and contexts dropped. The cached
    failure lives as long as the process: a traceback would keep the first caller's frames, and
    every object their locals hold, alive with it (a torch.distributed process group among
    them once kept its TCPStore thread running after ``destroy_process_group``)."""
    pending, seen = [exc], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        pending += [e.__cause__, e.__context__]
    return exc


def load() -> ModuleType:
    """Return the extension module, importing it on first call.

    Raises :class:`ExtensionUnavailable` (an :class:`ImportError`) with the original import error
    as its cause when the extension cannot be imported.
    """
    global _module, _failure
    if _module is None and _failure is None:
        with _lock:
            if _module is None and _failure is None:
                try:
                    if _skip_requested():
                        raise _SkippedByEnvironment(
                            f"{SKIP_ENV}=1 is set: the extension is not loaded (unset it to use "
                            "echofast._C)",
                            name=EXTENSION,
                        )
                    _module = importlib.import_module(EXTENSION)
                except ImportError as exc:
                    _failure = _without_frames(exc)
    if _module is not None:
        return _module
    assert _failure is not None
    raise ExtensionUnavailable(_reason(_failure)) from _failure


def available() -> bool:
    """Whether the extension can be imported (it is imported, once, to find out)."""
    try:
        load()
    except ExtensionUnavailable:
        return False
    return True


def build_info() -> dict[str, Any]:
    """The extension's build configuration plus ``built: True``, or ``built: False`` and
    ``reason`` when it cannot be imported."""
    try:
        module = load()
    except ExtensionUnavailable as exc:
        return {"built": False, "reason": exc.reason}
    return {"built": True, **module.build_info()}
