"""``echofast bench`` rows on disk: the journal keeps what a stopped run measured, a foreign CSV
fails the run before it measures, ``--report`` rebuilds the table (ratios included) from a CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from echofast import benchmark as bench
from echofast import benchmark_rows as rows_mod
from echofast.errors import EchofastError

pytest.importorskip("diffusers", reason="the baselines are diffusers' modules")

#: the cheapest smoke run that measures echofast, the reference and the UNet calls
ARGV = ["--smoke", "--device", "cpu", "--batch-size", "1", "--no-compile", "--no-progress"]
ARGV += ["--no-profile", "--no-avi", "--repeats", "1", "--warmup", "0"]


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class Stop(BaseException):
    """Stands in for a time limit's signal: not an Exception, so no path handler catches it."""


def test_a_stopped_run_keeps_its_rows_in_the_journal(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.csv"
    journal = rows_mod.journal_path(out)
    assert journal.name == "bench.partial.csv"

    def stop(*args, **kwargs):
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(bench, "run_reference", stop)  # echofast's path runs first, then this
        with pytest.raises(Stop):
            bench.main_bench([*ARGV, "--out", str(out)])
    assert not out.exists()  # only complete runs reach the results file
    kept = _read(journal)
    assert [(r["path"], r["phase"]) for r in kept[:2]] == [
        ("gemm/fp32-512-cpu", "call"),
        ("pipeline/echofast", "total"),
    ]
    assert {r["path"] for r in kept} == {"gemm/fp32-512-cpu", "pipeline/echofast"}
    stopped_run = {r["run"] for r in kept}
    assert len(stopped_run) == 1 and all(float(r["median_s"]) > 0 for r in kept)

    capsys.readouterr()
    assert bench.main_bench(["--report", str(journal)]) == 0
    text = capsys.readouterr().out
    assert f"run {stopped_run.pop()}" in text and "pipeline/echofast" in text

    # a complete run: its rows (ratios included) go to the results file and leave the journal,
    # which still holds the stopped run's rows
    assert bench.main_bench([*ARGV, "--decode-dtype", "bfloat16", "--out", str(out)]) == 0
    done = _read(out)
    assert len({r["run"] for r in done}) == 1
    assert {r["run"] for r in _read(journal)} == {r["run"] for r in kept}
    assert len(_read(journal)) == len(kept)
    by = {(r["path"], r["phase"]): r for r in done}
    ratio = float(by["pipeline/reference", "total"]["median_s"]) / float(
        by["pipeline/echofast", "total"]["median_s"]
    )
    assert float(by["pipeline/echofast", "total"]["speedup_vs_reference"]) == pytest.approx(
        ratio, rel=1e-4
    )
    assert {"unet/echofast", "unet/diffusers"} <= {r["path"] for r in done}
    extra = by["pipeline/echofast+decode-bfloat16", "total"]  # --decode-dtype bfloat16
    assert (
        "decode bfloat16" in extra["note"]
        and "decode float32" in by["pipeline/echofast", "total"]["note"]
    )
    assert float(extra["speedup_vs_reference"]) == pytest.approx(
        float(by["pipeline/reference", "total"]["median_s"]) / float(extra["median_s"]), rel=1e-4
    )

    # --report recomputes the same ratio from the CSV's strings
    capsys.readouterr()
    bench.main_bench(["--report", str(out)])
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if "pipeline/echofast" in x and " total " in x)
    assert f"{ratio:.2f}" in line.split()


def test_the_journal_is_removed_when_no_other_run_is_left(tmp_path):
    out = tmp_path / "r.csv"
    journal = rows_mod.RowJournal(out, "run-a")
    row = {"card": "c", "run": "run-a", "path": "unet/echofast", "phase": "call", "median_s": 1.0}
    journal.add([row])
    assert journal.path.exists() and not out.exists()
    journal.finish([{**row, "median_s": 2.0}])
    assert not journal.path.exists()
    assert [r["median_s"] for r in _read(out)] == ["2"]  # %.6g


def test_a_foreign_csv_fails_the_run_before_it_measures(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n1,2\n")
    monkeypatch.setattr(bench, "build_models", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(EchofastError, match="foreign.csv: existing CSV has other columns"):
        bench.main_bench([*ARGV, "--out", str(foreign)])
    assert foreign.read_text() == "a,b\n1,2\n"
    assert not rows_mod.journal_path(foreign).exists()


def test_report_errors(tmp_path):
    with pytest.raises(EchofastError, match="missing.csv: CSV file does not exist"):
        rows_mod.report(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    rows_mod.append_csv(empty, [])
    assert rows_mod.report(empty) == f"{empty}: no rows"


#: two runs as ``echofast bench`` writes them on a GPU: the GEMM ceiling first (always measured
#: in bf16), then the run's own rows in its precision; the second run stopped after the ceiling
HEADER = (
    "timestamp,run,card,device,torch,triton,cuda,diffusers,echofast,git_sha,config,dtype,frames,"
    "steps,batch,path,phase,repeats,median_s,p20_s,p80_s,s_per_video,frames_per_s,videos_per_s,"
    "gflop,tflops,gemm_tflops,gemm_fraction,peak_mem_mib,kernels,speedup_vs_reference,"
    "speedup_vs_compiled,note"
)
GPU_RUNS = f"""{HEADER}
2026-11-26T09:41:47Z,r1,NVIDIA H100 80GB HBM3,cuda,2.11.0+cu130,3.6.0,13.0,0.42.1,0.1.0,5f536c1,\
full,bf16,192,64,,gemm/bf16-8192,call,10,0.00141338,0.00139953,0.00141894,,,,1099.51,777.933,,,,,\
,,"ceiling: random inputs, CUDA events"
2026-11-26T09:42:18Z,r1,NVIDIA H100 80GB HBM3,cuda,2.11.0+cu130,3.6.0,13.0,0.42.1,0.1.0,5f536c1,\
full,float16,192,64,1,pipeline/echofast,total,3,1.2351,1.23509,1.23532,1.2351,155.453,0.809653,,,\
,,3577.5,,,,random weights (seed 0)
2026-11-26T09:50:00Z,r2,NVIDIA H100 80GB HBM3,cuda,2.11.0+cu130,3.6.0,13.0,0.42.1,0.1.0,5f536c1,\
full,bf16,192,64,,gemm/bf16-8192,call,10,0.00141338,0.00139953,0.00141894,,,,1099.51,777.933,,,,,\
,,"ceiling: random inputs, CUDA events"
"""


def test_report_names_the_runs_own_dtype_not_the_ceilings(tmp_path):
    path = tmp_path / "echofast_bench_gpu.csv"
    path.write_text(GPU_RUNS)
    heads = [line for line in rows_mod.report(path).splitlines() if line.startswith("run ")]
    assert heads == [
        "run r1 | NVIDIA H100 80GB HBM3 | git 5f536c1 | config full: 192 frames x 64 steps, "
        "float16 | 2 rows",
        "run r2 | NVIDIA H100 80GB HBM3 | git 5f536c1 | config full: 192 frames x 64 steps, "
        "dtype not recorded | 1 rows",
    ]


def test_report_computes_the_ratios_a_journal_lacks(tmp_path):
    journal = tmp_path / "bench.partial.csv"
    row = {"run": "r", "card": "c", "config": "smoke", "batch": 1, "phase": "total"}
    rows_mod.append_csv(journal, [
        {**row, "path": "pipeline/echofast", "median_s": 2.0, "s_per_video": 2.0},
        {**row, "path": "pipeline/reference", "median_s": 5.0, "s_per_video": 5.0},
    ])  # fmt: skip
    lines = rows_mod.report(journal).splitlines()
    (ours,) = [line.split() for line in lines if "pipeline/echofast" in line]
    assert ours[-2:] == ["2.50", "-"]  # vs the reference; no compiled reference in this run


def test_the_columns_are_those_of_the_committed_results_which_stay_appendable():
    """A new run appends to the results files kept in the repository (same columns, same order)."""
    results = sorted((Path(__file__).resolve().parents[1] / "bench" / "results").glob(
        "echofast_bench_*.csv"))  # fmt: skip
    assert results
    for path in results:
        with path.open(newline="") as fh:
            assert next(csv.reader(fh)) == rows_mod.CSV_FIELDS, path
        assert rows_mod.check_csv(path) is True
        assert rows_mod.read_csv(path)


def test_a_run_in_several_precisions_names_them_all():
    rows = [
        {"path": "gemm/bf16-8192", "dtype": "bf16"},
        {"path": "pipeline/reference", "dtype": "float32"},
        {"path": "pipeline/echofast", "dtype": "float16"},
        {"path": "unet/echofast", "dtype": "float16"},
    ]
    assert rows_mod.run_dtype(rows) == "float16/float32"
