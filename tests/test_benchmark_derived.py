"""The derived columns of ``echofast bench`` rows (throughput, TFLOP/s, fraction of the GEMM
ceiling, end-to-end time), the printed per-video table, the CSV's number format and
``--compare``'s choice of the old row, from planted timings (nothing is measured: fast)."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="echofast.benchmark imports the baselines' modules")

from echofast import benchmark as bench  # noqa: E402
from echofast import benchmark_rows as bench_rows  # noqa: E402
from echofast.benchmark_measure import Timing  # noqa: E402


def _setup(gemm_tflops=None, frames=12):
    plan = bench.Plan("smoke", frames=frames, steps=2, batch_sizes=(3,), repeats=5, warmup=0,
                      unet_repeats=4)  # fmt: skip
    return SimpleNamespace(
        plan=plan,
        env={"card": "card-x", "run": "r1"},
        dtype=torch.float32,
        gemm_tflops=gemm_tflops,
        device=torch.device("cpu"),
        profile=False,
        failures=[],
    )


def test_pipeline_rows_derive_throughput_flops_and_end_to_end():
    rng = np.random.default_rng(0)
    batch, frames, flop = 3, 12, 7.5e12
    phases = {p: rng.uniform(0.5, 2.0, 5) for p in ("lidm", "lvdm", "decode", "avi")}
    timings = {p: Timing(list(v)) for p, v in phases.items()}
    setup = _setup(gemm_tflops=4.0, frames=frames)
    rows = bench._pipeline_rows(setup, batch, "pipeline/echofast", timings, 123.4,
                                ("lidm", "lvdm", "decode"), flop, "n")  # fmt: skip
    by = {r["phase"]: r for r in rows}
    assert set(by) == {"total", "end_to_end", "lidm", "lvdm", "decode", "avi"}
    total = phases["lidm"] + phases["lvdm"] + phases["decode"]  # per timed run
    for phase, samples in (("total", total), ("end_to_end", total + phases["avi"])):
        r = by[phase]
        med = np.quantile(samples, 0.5)
        assert r["median_s"] == pytest.approx(med, rel=1e-12)
        assert (r["p20_s"], r["p80_s"]) == pytest.approx(np.quantile(samples, [0.2, 0.8]))
        assert r["s_per_video"] == pytest.approx(med / batch)
        assert r["frames_per_s"] == pytest.approx(batch * frames / med)
        assert r["videos_per_s"] == pytest.approx(batch / med)
        assert r["repeats"] == 5 and r["batch"] == batch and r["card"] == "card-x"
    assert by["total"]["peak_mem_mib"] == 123.4
    for phase, samples in phases.items():
        med = np.quantile(samples, 0.5)
        assert by[phase]["median_s"] == pytest.approx(med)
        assert by[phase]["s_per_video"] == pytest.approx(med / batch)
    lvdm = by["lvdm"]
    tflops = flop / np.quantile(phases["lvdm"], 0.5) / 1e12
    assert lvdm["gflop"] == pytest.approx(7500.0)
    assert lvdm["tflops"] == pytest.approx(tflops)
    assert lvdm["gemm_fraction"] == pytest.approx(tflops / 4.0)
    assert all(by[p]["gflop"] == "" for p in ("lidm", "decode", "total"))


def test_unet_call_rows_tflops_and_fraction_of_the_gemm_ceiling(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "_unet_inputs", lambda setup, batch: [(None, 1, None, None)])

    def fake_time_call(fn, device, warmup, repeats):
        seen.append(repeats)
        fn(0)
        return Timing([0.25, 0.5, 2.0, 0.75])

    monkeypatch.setattr(bench, "time_call", fake_time_call)
    unets = {"unet/echofast": lambda x, t, **kw: None, "unet/diffusers": lambda x, t, **kw: None}
    rows = list(bench.run_unet_calls(_setup(gemm_tflops=5.0), 2, 3e12, unets))
    assert [r["path"] for r in rows] == list(unets) and seen == [4, 4]
    for r in rows:
        assert r["median_s"] == pytest.approx(0.625) and r["phase"] == "call"
        assert r["gflop"] == pytest.approx(3000.0)
        assert r["tflops"] == pytest.approx(3e12 / 0.625 / 1e12)
        assert r["gemm_fraction"] == pytest.approx(4.8 / 5.0)


def _row(**kw):
    row = {k: "" for k in bench_rows.CSV_FIELDS}
    row.update(kw)
    return row


def test_the_table_prints_p20_and_p80_per_video():
    row = _row(batch=4, path="pipeline/echofast", phase="total", median_s=8.0, p20_s=6.0,
               p80_s=10.0, s_per_video=2.0)  # fmt: skip
    lines = bench_rows.summary_table([row]).splitlines()
    cells = lines[1].split()
    assert cells[:6] == ["4", "pipeline/echofast", "total", "2", "1.5", "2.5"]


def test_csv_keeps_six_significant_digits(tmp_path):
    out = tmp_path / "b.csv"
    bench_rows.append_csv(out, [_row(median_s=1.23456789, tflops=0.000123456789, batch=2)])
    bench_rows.append_csv(out, [_row(median_s=2.0, batch=8)])
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["median_s"] for r in rows] == ["1.23457", "2"]
    assert rows[0]["tflops"] == "0.000123457" and rows[1]["batch"] == "8"
    assert out.read_text().count("timestamp,run,") == 1  # one header


def test_compare_uses_the_latest_old_row_of_the_card():
    key = dict(config="full", dtype="float16", frames=192, steps=64, batch=1,
               path="pipeline/echofast", phase="total")  # fmt: skip
    old = [
        {**key, "card": "A", "median_s": "0.5", "git_sha": "first"},
        {**key, "card": "A", "median_s": "1.0", "git_sha": "latest"},
        {**key, "card": "B", "median_s": "9.0", "git_sha": "other-card"},
    ]
    lines, regressions = bench_rows.compare([{**key, "card": "A", "median_s": 1.05}], old, 10)
    assert len(lines) == 1 and regressions == []
    assert "latest" in lines[0] and "+5.0%" in lines[0]
    lines, regressions = bench_rows.compare([{**key, "card": "B", "median_s": 1.0}], old, 10)
    assert regressions == [] and "-88.9%" in lines[0] and lines[0].startswith("ok")
    # exactly at the threshold is not a regression; just above is
    assert bench_rows.compare([{**key, "card": "A", "median_s": 1.5}], old, 50)[1] == []
    assert len(bench_rows.compare([{**key, "card": "A", "median_s": 1.51}], old, 50)[1]) == 1


@pytest.mark.parametrize(
    "path,new_median,threshold,status",
    [
        ("unet/echofast", 2.0, "50", 1),
        ("unet/echofast", 2.0, "150", 0),
        ("unet/echofast", 0.5, "0", 0),
        ("unet/diffusers", 9.0, "10", 0),  # a slower baseline is never a regression
    ],
)
def test_compare_exit_status(tmp_path, monkeypatch, capsys, path, new_median, threshold, status):
    from echofast.benchmark_measure import card_name

    key = dict(config="k", dtype="float32", frames=3, steps=2, batch=1, path=path, phase="call")
    old = tmp_path / "old.csv"
    bench_rows.append_csv(old, [_row(**key, card=card_name(torch.device("cpu")), median_s=1.0)])
    monkeypatch.setattr(
        bench, "build_models", lambda *a, **k: SimpleNamespace(diffusers_missing="")
    )

    def fake_measure(setup):
        row = bench._row(setup, 1, path, "call", Timing([new_median]))
        setup.record([{**row, **key}])

    monkeypatch.setattr(bench, "_measure", fake_measure)
    argv = ["--device", "cpu", "--no-csv", "--no-progress", "--compare", str(old)]
    assert bench.main_bench([*argv, "--threshold", threshold]) == status
    text = capsys.readouterr().out
    assert "1 matching rows" in text and ("1 regression(s)" in text) == bool(status)
