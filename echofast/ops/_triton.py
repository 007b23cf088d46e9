"""What every Triton backend checks before it runs: Triton installed, the interpreter flag, and
whether the kernel module was imported in a form that can run on the tensors' device."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

_TRUE = ("1", "true", "yes", "on", "y")


@functools.cache
def triton_installed() -> bool:
    """Whether Triton can be imported (looked up once: a lookup reads the file system, and every
    dispatch of a Triton-backed op asks)."""
    return importlib.util.find_spec("triton") is not None


def interpret() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it, looked up at call time."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def kernel_reasons(reasons: list[str], module: str, probe: str, on_cuda: bool) -> list[str]:
    """Finish a Triton backend's ``not_supported_reasons``.

    ``reasons``: what the backend's cheap checks found. When there are some, they are returned
    (with "triton is not installed" first if so) without importing Triton. Otherwise
    ``echofast.kernels.<module>`` is imported; on CPU (``on_cuda`` False) its kernels run only if
    it was imported under ``TRITON_INTERPRET=1``, which the ``@triton.jit`` function ``probe``
    tells.
    """
    if reasons:  # cheap checks only: do not import triton for a call that cannot use it
        if not triton_installed():
            reasons.insert(0, "triton is not installed")
        return reasons
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
