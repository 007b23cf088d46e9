"""``echofast bench`` CSV inputs that are not what they should be: every one raises an
``EchofastError`` naming the file (and the line), before anything is measured or appended."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from echofast import benchmark as bench
from echofast import benchmark_rows as rows_mod
from echofast.errors import EchofastError

HEADER = ",".join(rows_mod.CSV_FIELDS).encode() + b"\n"
ROW = {"card": "c", "run": "r", "config": "smoke", "path": "unet/echofast", "phase": "call"}


def _results(tmp_path, median="1.5"):
    path = tmp_path / "bench.csv"
    rows_mod.append_csv(path, [{**ROW, "median_s": median}])
    return path


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "in.csv: empty file"),
        (b"\xff\xfe\x00garbage\n", "in.csv: not a readable CSV"),
        (HEADER + b'"' + b"x" * 200_000 + b'"\n', "in.csv: not a readable CSV"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "in.csv"
    path.write_bytes(content)
    with pytest.raises(EchofastError, match=match):
        rows_mod.report(path)


def test_a_directory_is_not_called_missing(tmp_path):
    with pytest.raises(EchofastError, match="is a directory"):
        rows_mod.read_csv(tmp_path)


def test_short_rows_and_bad_medians_name_the_line(tmp_path):
    path = _results(tmp_path)
    with path.open("a", newline="") as fh:
        fh.write("x,r,c\r\n")
    with pytest.raises(EchofastError, match=r"bench.csv, line 3: malformed row"):
        rows_mod.report(path)
    (tmp_path / "sub").mkdir()
    bad = _results(tmp_path / "sub", "fast")
    with pytest.raises(EchofastError, match=r"line 2: median_s 'fast' is not a number"):
        rows_mod.read_csv(bad)


def test_no_append_after_an_incomplete_last_line(tmp_path):
    path = _results(tmp_path)
    text = path.read_text()[:-4]  # a writer killed mid-row
    path.write_text(text)
    with pytest.raises(EchofastError, match="bench.csv: last line is incomplete"):
        rows_mod.append_csv(path, [{**ROW, "median_s": 2.0}])
    assert path.read_text() == text
    with pytest.raises(EchofastError, match="last line is incomplete"):
        rows_mod.RowJournal(path, "run")  # the run fails before it measures


def test_binary_out_file_fails_before_measuring(tmp_path):
    out = tmp_path / "out.csv"
    out.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(EchofastError, match="out.csv: existing file is not a readable CSV"):
        rows_mod.check_csv(out)
    assert out.read_bytes() == b"\xff\xfe\x00"


@pytest.mark.parametrize("threshold", ["nan", "inf", "-5"])
def test_threshold_must_be_a_finite_non_negative_percentage(threshold, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main_bench(["--no-csv", "--device", "cpu", "--threshold", threshold])
    assert info.value.code == 2
    assert "--threshold must be a finite percentage >= 0" in capsys.readouterr().err


def test_compare_with_no_matching_row_says_so(tmp_path, monkeypatch, capsys):
    old = _results(tmp_path)
    monkeypatch.setattr(
        bench, "build_models", lambda *a, **k: SimpleNamespace(diffusers_missing="")
    )
    monkeypatch.setattr(bench, "_measure", lambda setup: None)
    argv = ["--device", "cpu", "--no-csv", "--no-progress", "--compare", str(old)]
    assert bench.main_bench(argv) == 0
    assert "nothing was compared" in capsys.readouterr().out


def test_an_out_directory_is_refused_as_a_csv(tmp_path):
    with pytest.raises(EchofastError, match="is a directory, not a CSV file"):
        rows_mod.check_csv(tmp_path)


def test_an_empty_directory_of_size_zero_is_still_refused(tmp_path, monkeypatch):
    """Some file systems (btrfs) give an empty directory st_size 0: still not a new CSV file."""
    real = Path.stat

    def stat(self, *args, **kwargs):
        st = real(self, *args, **kwargs)
        if self != tmp_path:
            return st
        return os.stat_result((*st[:6], 0, *st[7:10]))

    monkeypatch.setattr(Path, "stat", stat)
    assert tmp_path.stat().st_size == 0 and tmp_path.is_dir()
    with pytest.raises(EchofastError, match="is a directory, not a CSV file"):
        rows_mod.check_csv(tmp_path)


def test_report_prints_a_dash_for_a_call_row_without_a_median(tmp_path):
    """``read_csv`` accepts a row with no median; ``--report`` prints "-" for it."""
    path = tmp_path / "bench.csv"
    row = {"run": "r", "card": "c", "config": "smoke", "batch": 1, "phase": "call"}
    rows_mod.append_csv(path, [{**row, "path": "unet/echofast", "median_s": ""}])
    assert rows_mod.read_csv(path)[0]["median_s"] == ""
    (line,) = [x for x in rows_mod.report(path).splitlines() if "unet/echofast" in x]
    assert line.split()[:3] == ["1", "unet/echofast", "-"]


def test_no_append_under_a_header_in_another_order(tmp_path):
    path = tmp_path / "bench.csv"
    swapped = [*rows_mod.CSV_FIELDS[1::-1], *rows_mod.CSV_FIELDS[2:]]  # run,timestamp,...
    path.write_text(",".join(swapped) + "\n")
    with pytest.raises(EchofastError, match="bench.csv: existing CSV has other columns"):
        rows_mod.append_csv(path, [{**ROW, "median_s": 1.0}])
    assert path.read_text() == ",".join(swapped) + "\n"


def test_an_empty_out_file_gets_the_header(tmp_path):
    path = tmp_path / "bench.csv"
    path.touch()
    rows_mod.append_csv(path, [{**ROW, "median_s": 1.0}])
    assert path.read_bytes().startswith(HEADER[:-1] + b"\r\n")
    assert [r["median_s"] for r in rows_mod.read_csv(path)] == ["1"]


def test_long_rows_and_missing_medians(tmp_path):
    path = _results(tmp_path, median="")  # a row without a timing is read
    assert rows_mod.read_csv(path)[0]["median_s"] == ""
    with path.open("a", newline="") as fh:
        fh.write(",".join(["x"] * (len(rows_mod.CSV_FIELDS) + 1)) + "\r\n")
    with pytest.raises(EchofastError, match=r"bench.csv, line 3: malformed row"):
        rows_mod.read_csv(path)
    no_median = tmp_path / "no_median.csv"
    no_median.write_text("card,config,dtype,frames,steps,batch,path,phase\nc,k,f,1,1,1,p,call\n")
    with pytest.raises(EchofastError, match=r"no_median.csv: not an echofast bench CSV.*median_s"):
        rows_mod.read_csv(no_median)


def test_a_foreign_journal_fails_the_run_before_it_measures(tmp_path):
    out = tmp_path / "bench.csv"
    journal = rows_mod.journal_path(out)
    journal.write_text("a,b\n1,2\n")
    with pytest.raises(EchofastError, match="bench.partial.csv: existing CSV has other columns"):
        rows_mod.RowJournal(out, "run")
    assert journal.read_text() == "a,b\n1,2\n" and not out.exists()


def test_finishing_keeps_the_other_runs_rows_in_the_journal(tmp_path):
    out = tmp_path / "bench.csv"
    stopped = rows_mod.RowJournal(out, "stopped")
    stopped.add([{**ROW, "run": "stopped", "median_s": 1.0}])
    stale = stopped.path.with_name(stopped.path.name + ".tmp")  # left by a crash while finishing
    rows_mod.append_csv(stale, [{**ROW, "run": "stale", "median_s": 9.0}])
    done = rows_mod.RowJournal(out, "done")
    done.add([{**ROW, "run": "done", "median_s": 2.0}])
    done.finish([{**ROW, "run": "done", "median_s": 2.0}])
    assert [(r["run"], r["median_s"]) for r in rows_mod.read_csv(done.path)] == [("stopped", "1")]
    assert [(r["run"], r["median_s"]) for r in rows_mod.read_csv(out)] == [("done", "2")]
    assert not stale.exists()


def test_a_run_that_measured_nothing_writes_no_results_file(tmp_path):
    out = tmp_path / "bench.csv"
    journal = rows_mod.RowJournal(out, "run")
    journal.add([])
    assert not journal.path.exists()
    journal.finish([])
    assert not out.exists() and not journal.path.exists()
