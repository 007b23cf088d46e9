"""``echofast bench`` rows on disk: the journal keeps what a stopped run measured, a foreign CSV
fails the run before it measures, ``--report`` rebuilds the table (ratios included) from a CSV."""

from __future__ import annotations

import csv

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
