"""Runs tests/triton in a subprocess with TRITON_INTERPRET=1 set from the start.

Triton reads TRITON_INTERPRET both when kernels are decorated and when they are called, and
other test modules import triton (through diffusers) without it; the Triton tests therefore get
a process of their own (started outside the source tree, so the installed package is tested).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.triton_interp import require_triton

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreting")
def test_triton_kernels_under_the_interpreter():
    require_triton()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "triton")],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTS,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    print(out.stdout.strip().splitlines()[-1])
