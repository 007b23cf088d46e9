"""Runs tests/triton in subprocesses with TRITON_INTERPRET=1 set from the start.

Triton reads TRITON_INTERPRET both when kernels are decorated and when they are called, and
other test modules import triton (through diffusers) without it; the Triton tests therefore get
processes of their own (started outside the source tree, so the installed package is tested).
The interpreter runs on one CPU, so the tests are shared out to one process per usable CPU
(``ECHOFAST_TEST_SHARD``, at most 4), which run at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.triton_interp import require_triton

TESTS = Path(__file__).resolve().parent
SHARDS = max(1, min(4, len(os.sched_getaffinity(0))))


def _pytest(args: list[str], **env: str) -> subprocess.Popen:
    """``python -m pytest -q ARGS`` from tests/, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
        cwd=TESTS,
    )


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreting")
def test_triton_kernels_under_the_interpreter():
    require_triton()
    runs = [
        _pytest([str(TESTS / "triton")], TRITON_INTERPRET="1", ECHOFAST_TEST_SHARD=f"{i}/{SHARDS}")
        for i in range(SHARDS)
    ]
    try:
        outputs = [run.communicate(timeout=900)[0] for run in runs]
    finally:
        for run in runs:
            run.kill()
    for i, (run, text) in enumerate(zip(runs, outputs)):
        assert run.returncode == 0, f"shard {i}/{SHARDS}:\n" + text[-6000:]
        print(f"shard {i}/{SHARDS}: " + text.strip().splitlines()[-1])


def _collected(*args: str, **env: str) -> tuple[int, str, list[str]]:
    """Exit status, output and node ids of ``pytest --collect-only ARGS``."""
    run = _pytest(["--collect-only", *args], **env)
    out = run.communicate(timeout=300)[0]
    return run.returncode, out, [line for line in out.splitlines() if "::" in line]


def test_shards_run_every_test_once():
    """``ECHOFAST_TEST_SHARD=i/n`` (tests/conftest.py) keeps every n-th test from the i-th;
    a malformed value stops the run (exit status 4, pytest's usage error)."""
    _, _, every = _collected("test_packaging.py")
    assert len(every) >= 4
    code, text, shard = _collected("test_packaging.py", ECHOFAST_TEST_SHARD="1/3")
    assert code == 0 and shard == every[1::3], text
    assert f"{len(every) - len(shard)} deselected" in text
    for bad in ("3/3", "1/"):
        code, text, _ = _collected("test_packaging.py", ECHOFAST_TEST_SHARD=bad)
        assert code == 4, text
        assert f"ECHOFAST_TEST_SHARD must be i/n with 0 <= i < n (e.g. 0/2), got {bad!r}" in text
