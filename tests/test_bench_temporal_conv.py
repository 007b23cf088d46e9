"""bench/bench_temporal_conv.py on the CPU: its call sites, every provider against F.conv3d, the
acceptance bound, the summary, and its refusal without a GPU (the timing runs in the GPU
session's ``temporal_conv`` step)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_temporal_conv as bench  # noqa: E402
import torch  # noqa: E402


def test_sites_are_every_temporal_convolution_of_a_call():
    from support.configs import LVDM_SMALL_CONFIG

    from echofast.models import LVDM
    from echofast.nn.spatiotemporal import TemporalResnetBlock

    frames, size, windows = 6, 8, 3
    site_args = {"device": "cpu", "config": LVDM_SMALL_CONFIG, "frames": frames, "size": size}
    sites = bench.lvdm_sites(windows, **site_args)
    blocks = sum(
        isinstance(m, TemporalResnetBlock) for m in LVDM.from_config(LVDM_SMALL_CONFIG).modules()
    )
    assert blocks > 0 and sum(sites.values()) == 2 * blocks
    sides = {size >> level for level in range(len(LVDM_SMALL_CONFIG["block_out_channels"]))}
    for b, c, t, h, w in sites:
        assert (b, t) == (windows, frames) and h == w and h in sides
        assert c in LVDM_SMALL_CONFIG["block_out_channels"]
    # the wrapper is gone afterwards
    assert (
        TemporalResnetBlock.__dict__["_conv"].__func__.__qualname__ == "TemporalResnetBlock._conv"
    )


@pytest.mark.parametrize("shape", [(2, 12, 5, 3, 5), (1, 8, 1, 4, 4), (3, 5, 2, 1, 7)])
def test_every_provider_is_a_temporal_convolution(shape):
    ops = bench.operands(shape, torch.float32, "cpu", seed=sum(shape))
    assert ops["x"].is_contiguous(memory_format=torch.channels_last_3d)
    errors = bench.check(bench.providers(), ops)
    assert set(errors) == {"conv2d", "conv3d", "conv3d_ncdhw", "three_gemms"}
    assert max(errors.values()) < 1e-5, errors
    assert all(bench.accepted(errors).values())
    y = bench.providers()["three_gemms"](*bench.inputs_for("three_gemms", ops))
    assert y.shape == shape and y.is_contiguous(memory_format=torch.channels_last_3d)


def test_a_provider_with_its_taps_swapped_is_refused():
    ops = bench.operands((2, 6, 4, 3, 3), torch.float32, "cpu", seed=1)
    found = bench.providers()
    found["swapped"] = lambda x, weight, bias: found["conv3d"](x, weight.flip(2), bias)
    errors = bench.check(found, ops)
    ok = bench.accepted(errors)
    assert errors["swapped"] > 0.05 and not ok["swapped"] and ok["three_gemms"]
    assert bench.accepted({"conv2d": 1e-3, "a": 2.1e-3, "b": 2.2e-3}) == {
        "conv2d": True,
        "a": True,
        "b": False,
    }


def row(windows, provider, ms, count=10, status="ok", c=128):
    site = {"b": 5 * windows, "c": c, "t": 64, "h": 16, "w": 16}
    return (
        {"windows": windows, "provider": provider, "median_ms": ms, "count": count}
        | site
        | {"status": status}
    )


def test_summary_totals_per_call_and_ratio():
    rows = [
        row(5, "conv2d", 0.066),
        row(5, "conv2d", 0.03, c=256),
        row(5, "three_gemms", 0.033),
        row(5, "three_gemms", 0.06, c=256),
        row(5, "conv3d", 0.01, status="wrong"),
        row(40, "conv2d", 0.5),
    ]
    lines = bench.summary(rows)
    assert lines[0] == "windows 5   conv2d           0.960 ms per UNet call"
    assert lines[1] == "windows 5   three_gemms      0.930 ms per UNet call  1.03x conv2d"
    assert lines[2].startswith("windows 40  conv2d           5.000 ms")
    # per width: the GEMMs were not timed at 40 windows, so no width is decided
    assert lines[3].startswith("C = 128  three_gemms 2.00x at 5 windows (")
    assert lines[4].startswith("C = 256  three_gemms 0.50x at 5 windows (")
    assert lines[5].startswith("-> TEMPORAL_GEMMS_DEVICES stays empty") and len(lines) == 6


def _timed_widths(ratios):
    """conv2d and three_gemms rows at 5 and 40 windows, per {C: (ratio at 5, ratio at 40)},
    with 10 convolutions per call at each width but 256 (12, two sites of 6)."""
    rows = []
    for c, per_windows in ratios.items():
        for windows, ratio in zip((5, 40), per_windows):
            for h in (16, 8) if c == 256 else (16,):
                count = 6 if c == 256 else 10
                rows += [row(windows, "conv2d", 0.1, count=count, c=c) | {"h": h, "w": h}]
                rows += [row(windows, "three_gemms", 0.1 / ratio, count=count, c=c) | {"h": h}]
    return rows


@pytest.mark.parametrize(
    "ratios, decision",
    [
        ({128: (1.6, 1.2), 256: (0.9, 1.1)}, "TEMPORAL_GEMMS_MAX_DIM = 128 (10 convolutions"),
        ({128: (1.6, 1.2), 256: (1.1, 1.3), 512: (0.8, 0.9)}, "= 256 (22 convolutions per"),
        ({128: (1.6, 1.2), 256: (1.1, 1.3)}, "= 256 (22 convolutions per UNet call, 44 kernels"),
        ({128: (1.6, 0.9), 256: (1.5, 1.3)}, "TEMPORAL_GEMMS_DEVICES stays empty"),
        ({64: (0.5, 0.5), 128: (1.6, 1.2)}, "TEMPORAL_GEMMS_DEVICES stays empty"),
    ],
)
def test_the_width_limit_is_the_widest_map_won_at_every_windows_count(ratios, decision):
    lines = bench.width_decision(_timed_widths(ratios))
    assert len(lines) == len(ratios) + 1 and decision in lines[-1]
    c, (at5, at40) = next(iter(ratios.items()))
    assert lines[0].startswith(f"C = {c:<4} three_gemms {at5:.2f}x at 5 windows, {at40:.2f}x at 40")


def test_no_width_line_without_both_forms_timed():
    assert bench.width_decision([row(5, "conv2d", 0.1), row(5, "conv3d", 0.05)]) == []
    wrong = row(5, "three_gemms", 0.05, status="wrong")
    assert bench.width_decision([row(5, "conv2d", 0.1), wrong]) == []


def test_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
