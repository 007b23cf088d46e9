"""Test-suite defaults: deterministic, single-threaded-friendly CPU runs."""

import contextlib
import os
from pathlib import Path

import pytest
import torch
from support.markers import unmarked_gpu_tests
from support.shard import parse_shard
from support.triton_interp import without_interpreter

from echofast.ops import _triton

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# The Triton interpreter tests need TRITON_INTERPRET=1 from process start;
# tests/test_triton_suite.py runs them in such a process.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton"]
TRITON_TESTS = Path(__file__).resolve().parent / "triton"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A ``TRITON_INTERPRET`` set for the whole run (``TRITON_INTERPRET=1 pytest``) is hidden
    while a test outside tests/triton runs, fixtures of any scope it sets up included: automatic
    dispatch, which picks Triton on CPU when the variable is set at call time, then chooses as
    in a plain run, which those tests expect (and no fixture samples a model through the
    interpreter). Tests that want the interpreter set it themselves (``support.triton_interp``)."""
    in_triton_tests = TRITON_TESTS in item.path.resolve().parents
    with contextlib.nullcontext() if in_triton_tests else without_interpreter():
        yield


@pytest.fixture(autouse=True)
def _no_faked_triton_lookup_left_cached():
    """Fails the test (at teardown, after monkeypatch has undone its fakes) that leaves one of
    echofast's cached Triton lookups answering otherwise than a fresh lookup: a faked "triton
    3.1.0" once stayed cached and every later test of the kernels skipped as "too old"."""
    yield
    for lookup in (_triton.triton_too_old, _triton.triton_installed):
        if lookup.cache_info().currsize and lookup() != lookup.__wrapped__():
            lookup.cache_clear()
            pytest.fail(
                f"this test left echofast.ops._triton.{lookup.__name__}() cached with a faked "
                "answer: clear its cache before the test ends"
            )


def pytest_collection_modifyitems(config, items):
    """Every test skipped for want of a GPU must carry the ``gpu`` marker: the GPU session
    (bench/gpu_session.sh) runs ``pytest -m gpu`` and would silently miss an unmarked one.

    ``ECHOFAST_TEST_SHARD=i/n`` keeps every n-th test from the i-th (0-based) and deselects the
    rest: n processes with i = 0..n-1 run each test once (tests/test_triton_suite.py runs the
    interpreter's tests so, one process per CPU)."""
    unmarked = unmarked_gpu_tests(items)
    if unmarked:
        raise pytest.UsageError(
            "tests skipped without a GPU but not marked @pytest.mark.gpu (the GPU session selects "
            "-m gpu): " + ", ".join(unmarked[:10]) + (" ..." if len(unmarked) > 10 else "")
        )
    shard = os.environ.pop("ECHOFAST_TEST_SHARD", None)  # not for pytest runs the tests start
    if shard:
        index, count = parse_shard(shard)
        config.hook.pytest_deselected(
            items=[item for i, item in enumerate(items) if i % count != index]
        )
        items[:] = items[index::count]
