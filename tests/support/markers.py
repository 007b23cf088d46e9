"""The ``gpu`` marker's rule: a test that is skipped for want of CUDA/a GPU is a GPU test."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pytest

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
