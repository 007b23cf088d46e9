"""Import echofast's Triton kernels under the Triton interpreter (CPU) for tests.

Triton decides at decoration time whether a ``@triton.jit`` function is interpreted, so
``TRITON_INTERPRET=1`` must be set when a kernel module is first imported. It is set only for
that import, then restored: other test modules keep the CPU default, where automatic dispatch
picks ``torch`` unless ``TRITON_INTERPRET`` is set at call time.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest

from echofast.ops._triton import triton_too_old


@contextlib.contextmanager
def without_interpreter() -> Iterator[None]:
    """``TRITON_INTERPRET`` unset for the block (restored after): backend availability as in a
    plain CPU run, e.g. for a parametrization computed at collection under
    ``TRITON_INTERPRET=1 pytest`` (tests/conftest.py hides the variable from the tests outside
    tests/triton while they run)."""
    had = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if had is not None:
            os.environ["TRITON_INTERPRET"] = had


def require_triton() -> None:
    """Skip (also at module level) unless Triton is importable and not older than the oldest
    release echofast's kernels are checked with (``echofast.ops._triton.MIN_TRITON``; looked up
    afresh, not from the cache a test may have faked). With ``ECHOFAST_TESTS_NEED_TRITON=1``
    (CI's main environment) the test fails instead of skipping."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        too_old = f"triton is not importable ({e})"
    else:
        too_old = triton_too_old.__wrapped__()
    if not too_old:
        return
    if os.environ.get("ECHOFAST_TESTS_NEED_TRITON") == "1":
        pytest.fail(f"{too_old}, and ECHOFAST_TESTS_NEED_TRITON=1 says the kernels' tests must run")
    pytest.skip(f"{too_old}: its Triton backends are refused", allow_module_level=True)


def kernels_module(name: str) -> ModuleType:
    """``echofast.kernels.<name>`` as it is imported (for its launch plans and tables, not to run
    kernels on CPU); skips the calling module when Triton is missing or too old, or when the
    installed package is missing (e.g. pytest run with the source tree first on sys.path:
    kernels/ becomes echofast.kernels only at install time)."""
    require_triton()
    try:
        return importlib.import_module(f"echofast.kernels.{name}")
    except ModuleNotFoundError as e:
        pytest.skip(
            f"echofast.kernels is not importable ({e}): it exists only in the installed "
            "package (kernels/ is mapped to echofast.kernels at install time); pip install "
            "the repo",
            allow_module_level=True,
        )


def interpreted_kernels(name: str, probe: str) -> ModuleType:
    """``echofast.kernels.<name>``, imported interpreted; skips the calling module otherwise.

    ``probe`` names a ``@triton.jit`` function of the module used to check interpretation.
    """
    had = "TRITON_INTERPRET" in os.environ
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        module = kernels_module(name)
    finally:
        if not had:
            os.environ.pop("TRITON_INTERPRET", None)
    if type(getattr(module, probe)).__name__ != "InterpretedFunction":
        pytest.skip(
            f"echofast.kernels.{name} was imported before TRITON_INTERPRET=1 was set",
            allow_module_level=True,
        )
    return module
