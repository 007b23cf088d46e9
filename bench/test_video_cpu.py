"""pytest-benchmark view of bench/bench_video.py (CPU): echofast vs PyAV per case, frames/s.

    pytest bench/test_video_cpu.py --benchmark-only [--benchmark-group-by=group]

Same clips and baselines as the script (112x112 MJPEG, 32 frames here); each group holds the
baseline and echofast, ``extra_info["frames_per_s"]`` the median throughput. For the
alternating A/B median ratio and the CSV (bench/results/video_cpu.csv) use the script.
"""

from __future__ import annotations

import pytest
from bench_video import make_cpu_cases

FRAMES = 32


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from echofast.io import video_backend

    if video_backend()["backend"] != "native":
        pytest.skip(f"echofast._C unavailable: {video_backend()['reason']}")
    return {c.name: c for c in make_cpu_cases(tmp_path_factory.mktemp("clips"), FRAMES)}


CASES = [
    "convert_gray_u8",
    "convert_f32",
    "convert_rgb_u8",
    "convert_resize_f16",
    "read_video_u8",
    "read_video_f32",
    "write_video_f32",
]


@pytest.mark.parametrize("impl", ["pyav", "echofast"])
@pytest.mark.parametrize("name", CASES)
def test_video_cpu(benchmark, cases, name, impl):
    case = cases[name]
    fn = case.baseline if impl == "pyav" else case.candidate
    benchmark.group = name
    benchmark.extra_info["shape"] = case.shape
    benchmark.extra_info["baseline"] = case.baseline_name
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
    benchmark.extra_info["frames_per_s"] = case.frames / benchmark.stats.stats.median
