"""bench/benchutil.py: CSV rows appended without losing or misaligning earlier rows, and the
code's version for rows written from a copy of the tree without .git."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import benchutil  # noqa: E402


def test_append_csv_merges_new_columns(tmp_path):
    path = tmp_path / "sub" / "rows.csv"
    benchutil.append_csv(path, [{"a": 1, "b": 2}])
    benchutil.append_csv(path, [{"a": 3, "c": 4}, {"c": 5, "b": 6}])
    benchutil.append_csv(path, [{"b": 7, "a": 8}])
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["a", "b", "c"]
    assert [tuple(r.values()) for r in rows] == [
        ("1", "2", ""),
        ("3", "", "4"),
        ("", "6", "5"),
        ("8", "7", ""),
    ]
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_git_sha_from_the_environment(monkeypatch):
    monkeypatch.setenv("ECHOFAST_GIT_SHA", "abc1234")
    assert benchutil.git_sha() == "abc1234"
    monkeypatch.delenv("ECHOFAST_GIT_SHA")
    assert benchutil.git_sha()  # git describe here, or "unknown"


def test_choice_list_parses_a_subset_and_names_the_unknown():
    import argparse

    import pytest

    parse = benchutil.choice_list(("eager", "triton", "compile"))
    assert parse("triton, eager") == ["triton", "eager"]
    with pytest.raises(argparse.ArgumentTypeError, match="'cuda'.*eager,triton,compile"):
        parse("eager,cuda")
    with pytest.raises(argparse.ArgumentTypeError, match="empty"):
        parse(" , ")
