"""bench/goal_bounds.py: the fraction of the GEMM ceiling issue 9's speed goals demand of the LVDM,
computed from a CSV in echofast bench's format (here a planted one with round numbers)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import goal_bounds  # noqa: E402

from echofast.benchmark_rows import CSV_FIELDS  # noqa: E402


def _row(git, batch, path, phase, s_per_video="", gflop="", tflops="", stamp="2026-01-01"):
    row = dict.fromkeys(CSV_FIELDS, "")
    row.update(
        timestamp=stamp,
        card="Card X",
        git_sha=git,
        batch=str(batch),
        path=path,
        phase=phase,
        median_s="1",
        s_per_video=str(s_per_video),
        gflop=str(gflop),
        tflops=str(tflops),
    )
    return row


def _csv(tmp_path: Path) -> Path:
    rows = [
        _row("old", "", "gemm/bf16-8192", "call", tflops=100, stamp="2025-01-01"),
        _row("new", "", "gemm/bf16-8192", "call", tflops=800),
        _row("new", "", "gemm/bf16-8192", "call", tflops=790),
        _row("new", 1, "pipeline/echofast", "lvdm", s_per_video=2.0, gflop=160_000),
        _row("new", 1, "pipeline/echofast", "lidm", s_per_video=0.05),
        _row("new", 1, "pipeline/echofast", "decode", s_per_video=0.1),
        _row("new", 1, "pipeline/echofast+decode-float16", "decode", s_per_video=0.05),
        _row("new", 8, "pipeline/echofast", "lvdm", s_per_video=1.0, gflop=8 * 160_000),
        _row("new", 8, "pipeline/echofast", "lidm", s_per_video=0.3),
        _row("new", 8, "pipeline/echofast", "decode", s_per_video=0.1),
    ]
    path = tmp_path / "bench.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def test_bounds_of_the_newest_run(tmp_path, capsys):
    rows = goal_bounds.read_csv(_csv(tmp_path))
    b1, b8 = goal_bounds.bounds(rows, {1: 0.5, 8: 1 / 3})
    # batch 1: 0.5 s - (0.05 LIDM + 0.05 fp16 decode) = 0.4 s for 160 TFLOP = 400 TFLOP/s
    assert b1.lvdm_budget_s == pytest.approx(0.4)
    assert b1.needed_tflops == pytest.approx(400.0)
    assert b1.needed_fraction == pytest.approx(0.5)  # of the best GEMM of the run: 800
    assert b1.alone_fraction == pytest.approx(160 / 0.5 / 800)
    assert b1.achieved_fraction == pytest.approx(80 / 800)
    # batch 8: the other phases alone exceed the goal: no rate is enough
    assert b8.lvdm_budget_s < 0 and b8.needed_tflops == float("inf")
    assert goal_bounds.main([str(tmp_path / "bench.csv")]) == 0
    out = capsys.readouterr().out
    assert "Card X: GEMM ceiling 800 TFLOP/s" in out and "50% of the GEMM ceiling" in out


def test_errors_name_the_problem(tmp_path, capsys):
    path = _csv(tmp_path)
    assert goal_bounds.main([str(path), "--git", "nope"]) == 2
    assert "no rows of git revision 'nope'" in capsys.readouterr().err
    assert goal_bounds.main([str(path), "--git", "old"]) == 0  # old run: GEMM only, no pipeline
    assert goal_bounds.main([str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
