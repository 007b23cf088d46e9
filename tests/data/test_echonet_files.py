"""The EchoNet-Dynamic CSV files (spec "Output dataset") against pandas and the csv module: the
FileList.csv and VolumeTracings.csv headers, cell texts, number texts, the split plan's checks
and read_filelist's errors."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from echofast.data.echonet import (
    number_text,
    read_filelist,
    split_counts,
    split_of,
    write_empty_tracings,
    write_filelist,
)

SPEC_FILELIST_HEADER = "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split"
SPEC_TRACINGS_HEADER = "FileName,X1,Y1,X2,Y2,Frame"


def test_filelist_is_what_pandas_writes_for_the_spec_columns(tmp_path):
    rows = [
        {"FileName": "a", "EF": 0, "ESV": 12.5, "EDV": 40, "FrameHeight": 112, "FrameWidth": 112,
         "FPS": 32, "NumberOfFrames": 0, "Split": "TRAIN"},
        {"FileName": "b, c", "EF": "53", "FPS": 29.97, "Split": "TEST", "Extra": "dropped"},
        {"FileName": "d", "EF": 61.5, "ESV": None, "NumberOfFrames": 64, "Split": "VAL"},
    ]  # fmt: skip
    path = write_filelist(tmp_path, rows)
    assert path == tmp_path / "FileList.csv"
    text = path.read_bytes().decode()
    assert text.splitlines()[0] == SPEC_FILELIST_HEADER
    columns = SPEC_FILELIST_HEADER.split(",")
    ref = pd.DataFrame(
        [{k: r.get(k) for k in columns} for r in rows], columns=columns, dtype=object
    )
    assert text == ref.to_csv(index=False)
    back = read_filelist(path)
    assert [r["EF"] for r in back] == ["0", "53", "61.5"]
    assert back[0]["NumberOfFrames"] == "0" and back[2]["ESV"] == "" and back[1]["ESV"] == ""
    assert back[1]["FileName"] == "b, c" and "Extra" not in back[1]


def test_tracings_file_is_the_header_echonet_requires(tmp_path):
    path = write_empty_tracings(tmp_path)
    assert path == tmp_path / "VolumeTracings.csv"
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [SPEC_TRACINGS_HEADER.split(",")]


def test_number_text_is_the_shortest_text_of_the_same_float():
    examples = {53.0: "53", 68.2120227: "68.2120227", 30000 / 1001: "29.97002997002997"}
    examples.update({10.05: "10.05", 100.0: "100", -0.5: "-0.5", 1e-7: "1e-07", 7: "7"})
    assert {v: number_text(v) for v in examples} == examples
    values = np.random.default_rng(0).uniform(-200, 200, 300).tolist()
    for value in [round(v, i % 9) for i, v in enumerate(values)]:
        text = number_text(value)
        assert float(text) == value and text == repr(value).removesuffix(".0"), value
        assert not text.endswith(".0")


@pytest.mark.parametrize(
    "splits",
    [(3, 3), (2, 2, 1, 1), (7, 0, -1), (2, 2, 3), (1.5, 2.5, 2)],
)
def test_given_splits_are_three_non_negative_counts_summing_to_the_total(splits):
    with pytest.raises(ValueError, match="3 non-negative counts summing to 6"):
        split_counts(6, splits, "dynamic")


def test_given_splits_may_leave_a_split_empty():
    assert split_counts(6, [6, 0, 0], "dynamic") == (6, 0, 0)
    assert split_counts(6, (2.0, 0, 4), "ped_a4c") == (2, 0, 4)
    assert split_of(5, (6, 0, 0)) == "TRAIN" and split_of(2, (2, 0, 4)) == "TEST"
    with pytest.raises(IndexError, match="sample 6 is beyond the 6 videos"):
        split_of(6, (2, 0, 4))


@pytest.mark.parametrize("num_videos", [1, 2, 3, 5, 9, 13])
def test_small_split_plans_cover_every_video(num_videos):
    for dataset in ("dynamic", "ped_a4c", "ped_psax"):
        counts = split_counts(num_videos, None, dataset)
        assert sum(counts) == num_videos and min(counts) >= 0, (dataset, counts)


def test_read_filelist_names_the_missing_columns(tmp_path):
    path = tmp_path / "FileList.csv"
    path.write_text("FileName,ESV\nv0,20\n")
    with pytest.raises(ValueError) as excinfo:
        read_filelist(path)
    assert str(excinfo.value) == f"{path}: FileList lacks column(s) ['EF']"
    path.write_text("")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['EF', 'FileName'\]"):
        read_filelist(path)
    path.write_text('FileName,EF\n"two\nlines",50\n')
    assert read_filelist(path) == [{"FileName": "two\nlines", "EF": "50"}]
