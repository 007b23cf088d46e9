"""Test-suite defaults: deterministic, single-threaded-friendly CPU runs."""

import os

import pytest
import torch
from support.markers import unmarked_gpu_tests

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# The Triton interpreter tests need TRITON_INTERPRET=1 from process start;
# tests/test_triton_suite.py runs them in such a process.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton"]


def pytest_collection_modifyitems(config, items):
    """Every test skipped for want of a GPU must carry the ``gpu`` marker: the GPU session
    (bench/gpu_session.sh) runs ``pytest -m gpu`` and would silently miss an unmarked one."""
    unmarked = unmarked_gpu_tests(items)
    if unmarked:
        raise pytest.UsageError(
            "tests skipped without a GPU but not marked @pytest.mark.gpu (the GPU session selects "
            "-m gpu): " + ", ".join(unmarked[:10]) + (" ..." if len(unmarked) > 10 else "")
        )
