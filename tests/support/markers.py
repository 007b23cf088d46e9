"""The ``gpu`` marker's rule: a test that is skipped for want of CUDA/a GPU is a GPU test."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable

import pytest
import torch

_NEEDS_GPU = re.compile(r"\b(CUDA|GPU)\b", re.IGNORECASE)


def unmarked_gpu_tests(items: Iterable[pytest.Item]) -> list[str]:
    """Node ids of the tests with a ``skipif`` whose reason names CUDA or a GPU but no ``gpu``
    marker (the GPU session runs ``pytest -m gpu`` and would miss them)."""
    return [
        item.nodeid
        for item in items
        if item.get_closest_marker("gpu") is None
        and any(
            _NEEDS_GPU.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif")
        )
    ]


#: marks of a module that tests compiled Triton kernels on a GPU: ``gpu``, skipped without CUDA or
#: Triton, and skipped under ``TRITON_INTERPRET`` (the kernels would be interpreted, not compiled)
COMPILED_TRITON_ON_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="needs CUDA and triton",
    ),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y"),
        reason="TRITON_INTERPRET is set: these tests are for the compiled kernels",
    ),
]
