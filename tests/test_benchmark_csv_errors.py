"""``echofast bench`` CSV inputs that are not what they should be: every one raises an
``EchofastError`` naming the file (and the line), before anything is measured or appended."""

from __future__ import annotations

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
