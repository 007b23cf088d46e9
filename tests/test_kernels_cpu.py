"""bench/kernels_cpu.py: the CPU estimate of kernels per LVDM call (run in a subprocess: it switches
Triton's interpreter on for its whole process). echofast launches far fewer than diffusers, and the
fusions show: one Triton launch per GEGLU, one or two per GroupNorm (the rows kernels where
activations are channels-last); under autocast echofast's
``autocast_copy`` launches no weight casts, where diffusers (fp32 weights) casts every weight."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from support.triton_interp import require_triton

require_triton()
pytest.importorskip("diffusers", reason="the baseline is diffusers' UNet")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernels_cpu.py"


def test_echofast_launches_far_fewer_kernels_than_diffusers(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--config",
            "small",
            "--top",
            "40",
            "--lidm",
            "--csv",
            str(tmp_path / "k.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {(r["impl"], r["precision"]): r for r in csv.DictReader((tmp_path / "k.csv").open())}
    kernels = {k: int(r["kernels"]) for k, r in rows.items()}
    amp = "autocast bfloat16"
    for precision in ("fp32", amp):
        ours, theirs = kernels["echofast", precision], kernels["diffusers", precision]
        assert ours < 0.7 * theirs, (precision, ours, theirs)
        # as the pipeline calls it, the time, frame-position and single-key cross-attention
        # work is precomputed once per run: at least 2 GEMMs fewer per transformer
        assert kernels["echofast step", precision] < ours - 2 * 7, precision
    assert int(rows["diffusers", "fp32"]["triton_launches"]) == 0
    # diffusers casts its ~600 GEMM weights and biases at every call; echofast's copy none
    assert kernels["diffusers", amp] - kernels["diffusers", "fp32"] > 500
    assert kernels["echofast", amp] - kernels["echofast", "fp32"] < 60
    text = out.stdout.split("echofast, fp32:")[1].split("echofast step,")[0]
    counts = {
        line.split()[1]: int(line.split()[0]) for line in text.splitlines()[1:] if line.strip()
    }
    # GroupNorm: one launch per unsplit norm, two (stats, apply) per split one; the channels-last
    # rows kernels (as on a GPU: the estimate plans for one) for the channels-last activations
    gn = {
        k[len("triton._gn_fwd_") : -len("_kernel")]: v for k, v in counts.items() if "_gn_fwd" in k
    }
    assert gn.get("stats", 0) == gn.get("apply", 0)
    assert gn.get("rows_stats", 0) == gn.get("rows_apply", 0) > 0
    assert gn.get("rows", 0) > 0
    assert gn.get("rows", 0) + gn.get("fused", 0) + gn["rows_stats"] + gn.get("stats", 0) >= 50
    # GEGLUs as on CUDA: the projection's GEMM with the GEGLU in its epilogue, nothing else
    assert counts["triton._geglu_linear_kernel"] > 0 and "aten.gelu" not in counts
    assert "triton._geglu_fwd_kernel" not in counts
    # in half precision the small config's feed-forwards (C <= 128) are one kernel each, as on
    # CUDA (FUSED_FF_MAX_DIM); fp32 stays on the two GEMMs there
    half = out.stdout.split("echofast, autocast bfloat16:")[1].split("echofast step,")[0]
    assert "triton._ff_fwd_kernel" not in counts
    assert f" {counts['triton._geglu_linear_kernel']} triton._ff_fwd_kernel" in half
    assert "triton._geglu_linear_kernel" not in half
    assert counts.get("aten.sigmoid", 0) == 1  # the packed AlphaBlender weights
    # transformer residual adds fused into the LayerNorm after them (add_layer_norm)
    assert counts["triton._layer_norm_fwd_kernel"] > 0
    # resnets' conv1 biases folded into the time projections: fewer separate bias adds
    theirs = out.stdout.split("diffusers, fp32:")[1].split("echofast,")[0]
    bias_adds = int(theirs.split(" cuda.conv_bias_add")[0].split()[-1])
    assert counts["cuda.conv_bias_add"] < bias_adds
    # the LIDM as its pipeline calls it: resblock epilogues fused, time embedding precomputed
    for precision in ("fp32", amp):
        ours, theirs = (
            kernels["lidm echofast step", precision],
            kernels["lidm diffusers", precision],
        )
        assert ours < 0.6 * theirs, (precision, ours, theirs)
    lidm = out.stdout.split("lidm echofast step, fp32:")[1].split("diffusers, autocast")[0]
    assert "triton._bias_residual_kernel" in lidm and "aten.sin" not in lidm


def _step_kernels(*flags):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "small", "--autocast", "none", "--top", "60"]
        + list(flags),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    head, _, body = out.stdout.partition("echofast step")
    total = int(body.split("≈")[1].split()[0])
    counts = {line.split()[1]: int(line.split()[0]) for line in body.splitlines()[1:] if line}
    return body.split(",")[0], total, counts


def test_temporal_gemms_cost_two_kernels_more_per_temporal_convolution():
    """``--temporal-gemms`` counts the temporal convolutions as ``temporal_conv_gemms`` (an addmm
    or mm and two baddbmm) where the Conv2d form is one convolution (its bias folded away or
    added by the block's epilogue): two launches more for each of them up to
    ``TEMPORAL_GEMMS_MAX_DIM`` channels (every map of the small config)."""
    from support.configs import LVDM_SMALL_CONFIG

    from echofast.models import LVDM
    from echofast.nn import spatiotemporal as st

    model = LVDM.from_config(LVDM_SMALL_CONFIG)
    blocks = [m for m in model.modules() if isinstance(m, st.TemporalResnetBlock)]
    assert all(m.conv1.in_channels <= st.TEMPORAL_GEMMS_MAX_DIM for m in blocks)
    convs = 2 * len(blocks)
    plain_name, plain, plain_counts = _step_kernels()
    name, gemms, counts = _step_kernels("--temporal-gemms")
    assert (plain_name, name) == ("", " +temporal-gemms")
    assert gemms - plain == 2 * convs
    assert counts["aten.baddbmm_"] == 2 * convs and "aten.baddbmm_" not in plain_counts
