"""bench/bench_feed_forward.py on the CPU: its call sites, its summary, and its refusal without a
GPU (the timing runs in the GPU session's ``feed_forward`` step)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_feed_forward as bench  # noqa: E402
import torch  # noqa: E402


def test_sites_are_every_feed_forward_of_a_call():
    from support.configs import LVDM_SMALL_CONFIG

    from echofast.models import LVDM
    from echofast.nn.spatiotemporal import FeedForward

    frames, size, windows = 8, 8, 2
    site_args = {"device": "cpu", "config": LVDM_SMALL_CONFIG, "frames": frames, "size": size}
    sites = bench.lvdm_sites(windows, **site_args)
    model = LVDM.from_config(LVDM_SMALL_CONFIG)
    assert sum(sites.values()) == sum(isinstance(m, FeedForward) for m in model.modules())
    for m, c, inner in sites:
        assert inner == 4 * c and c in LVDM_SMALL_CONFIG["block_out_channels"]
        level = int(math.log(windows * frames * size * size // m, 4))
        assert m == windows * frames * (size >> level) ** 2


def row(windows, provider, ms, count=15, status="ok", c=128):
    return {"windows": windows, "provider": provider, "median_ms": ms, "count": count} | {
        "status": status,
        "m": 4096 * windows,
        "c": c,
    }


def test_summary_totals_per_call_and_ratio():
    rows = [
        row(5, "two_gemms", 0.2),
        row(5, "fused", 0.1),
        row(5, "two_gemms", 0.05, count=3, c=256),
        row(5, "fused", 0.05, count=3, c=256),
        row(5, "fused_s2", 0.01, status="wrong"),
        row(40, "two_gemms", 1.0),
    ]
    lines = bench.summary(rows)
    assert lines[0] == "windows 5   fused           1.650 ms per UNet call  1.91x two_gemms"
    assert lines[1].startswith("windows 5   two_gemms       3.150 ms")
    assert lines[2].startswith("windows 40  two_gemms      15.000 ms") and len(lines) == 3


def test_a_provider_timed_at_some_sites_is_compared_at_those():
    """H100, 2026-11-27: the alternative tiles run at the C = 128 sites only; summed against
    two_gemms over every site they looked 2.2x faster, while they were 1.25x."""
    rows = [
        row(5, "two_gemms", 0.2),
        row(5, "two_gemms", 0.03, c=256),
        row(5, "fused", 0.1),
        row(5, "fused", 0.1, c=256),
        row(5, "fused_m64w4", 0.16),
    ]
    lines = bench.summary(rows)
    assert lines[0] == "windows 5   fused           3.000 ms per UNet call  1.15x two_gemms"
    assert lines[1] == (
        "windows 5   fused_m64w4     2.400 ms per UNet call  1.25x two_gemms (at 1 of 2 sites)"
    )
    assert lines[2].startswith("windows 5   two_gemms       3.450 ms")


def test_a_provider_at_a_site_two_gemms_missed_gets_no_ratio():
    lines = bench.summary([row(5, "two_gemms", 0.2, status="wrong"), row(5, "fused", 0.1)])
    assert lines == ["windows 5   fused           1.500 ms per UNet call"]


def test_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("n", [128, 256])
def test_the_alternative_tiles_only_where_they_fit(n):
    from support.triton_interp import kernels_module

    kernels_module("feed_forward")
    names = set(bench.providers(n))
    assert {"two_gemms", "fused"} <= names
    assert ({"fused_m64w4", "fused_s2"} <= names) == (n <= 128)
