"""What every Triton backend checks before it runs: Triton installed and recent enough, the
interpreter flag, and whether the kernel module was imported in a form that can run on the
tensors' device."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re

_TRUE = ("1", "true", "yes", "on", "y")

MIN_TRITON = (3, 6)
"""The oldest Triton release the kernels are checked with: 3.6.0 ran every GPU check on an H100
(torch 2.11), and the current kernels pass its interpreter and compile for sm_90 with it; 3.8
and 3.9 (torch 2.14 and 2.13) too. Older releases (those torch <= 2.10 pins) are refused, so that
dispatch falls back to the torch backends: none ran the kernels on a GPU, and 3.0's interpreter
rejects them ("arange's arguments must be of type tl.constexpr")."""


@functools.cache
def triton_installed() -> bool:
    """Whether Triton can be imported (looked up once: a lookup reads the file system, and every
    dispatch of a Triton-backed op asks)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_too_old() -> str | None:
    """Why the installed Triton is too old for the kernels, or None (read from the package
    metadata once, without importing Triton)."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None  # a source build without metadata: let the import decide
    found = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if found >= MIN_TRITON:
        return None
    oldest = ".".join(map(str, MIN_TRITON))
    return (
        f"triton {version} is older than {oldest}, the oldest release these kernels are "
        "checked with"
    )


def interpret() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it, looked up at call time."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


def kernel_reasons(reasons: list[str], module: str, probe: str, on_cuda: bool) -> list[str]:
    """Finish a Triton backend's ``not_supported_reasons``.

    ``reasons``: what the backend's cheap checks found. When there are some, they are returned
    (with "triton is not installed" first if so) without importing Triton. A Triton older than
    :data:`MIN_TRITON` is the only reason then. Otherwise ``echofast.kernels.<module>`` is
    imported; on CPU (``on_cuda`` False) its kernels run only if it was imported under
    ``TRITON_INTERPRET=1``, which the ``@triton.jit`` function ``probe`` tells.
    """
    if reasons:  # cheap checks only: do not import triton for a call that cannot use it
        if not triton_installed():
            reasons.insert(0, "triton is not installed")
        return reasons
    too_old = triton_too_old()
    if too_old:
        return [too_old]
    try:
        kernels = importlib.import_module(f"echofast.kernels.{module}")
    except Exception as e:  # noqa: BLE001 - any import failure means the backend cannot run
        return [f"triton not importable ({type(e).__name__}: {e})"]
    interpreted = type(getattr(kernels, probe)).__name__ == "InterpretedFunction"
    if not on_cuda and not interpreted:
        reasons.append(
            f"echofast.kernels.{module} was imported without TRITON_INTERPRET=1, so its kernels "
            "cannot run on CPU"
        )
    return reasons
