"""pytest-benchmark of the phantom data tools on CPU: one phantom clip, and the EF measured from it.

    pytest bench/test_data_cpu.py --benchmark-only

``make_phantom``: a 64-frame 112×112 clip at 32 fps (one LVDM window). ``measure_ef``: the 40-frame
clip whose speed the :mod:`echofast.data.measure` docstring states ("well under a second").
``extra_info["frames_per_s"]`` is the median throughput. There is no other implementation to
compare with: these are absolute times, for regressions between versions.
"""

from __future__ import annotations

import pytest

from echofast.data.measure import measure_ef
from echofast.data.phantom import make_phantom


def test_make_phantom(benchmark):
    benchmark.extra_info["shape"] = (64, 112, 112)
    benchmark.pedantic(make_phantom, args=(1,), kwargs={"frames": 64, "fps": 32}, rounds=5)
    benchmark.extra_info["frames_per_s"] = 64 / benchmark.stats.stats.median


@pytest.fixture(scope="module")
def clip():
    return make_phantom(2, frames=40, fps=30, ef=55.0)


def test_measure_ef(benchmark, clip):
    benchmark.extra_info["shape"] = tuple(clip.frames.shape)
    ef = benchmark.pedantic(measure_ef, args=(clip.frames,), rounds=5)
    assert abs(ef - clip.ef) < 3
    benchmark.extra_info["frames_per_s"] = len(clip.frames) / benchmark.stats.stats.median
