"""The requested EF: an `ef_range` of values that are not numbers is refused as the other
arguments are (a GenerationArgumentError naming --ef-range, before anything is written), and the
FileList records the very EF each video was conditioned on."""

from __future__ import annotations

import csv

import pytest
from pipelines.test_generate_robustness import _cfg
from pipelines.test_generate_sharding import _RecordingPipe

from echofast.pipelines.dataset import (
    GenerationArgumentError,
    ef_bounds,
    generate_dataset,
    requested_ef,
)


@pytest.mark.parametrize("ef_range", [("10", "90"), (10, None), None])
def test_an_ef_range_that_is_not_two_numbers_is_refused_naming_the_option(ef_range):
    with pytest.raises(GenerationArgumentError, match="--ef-range"):
        ef_bounds(ef_range)


def test_generate_refuses_a_text_ef_range_before_writing(weights_root, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(GenerationArgumentError, match="--ef-range"):
        generate_dataset(_cfg(weights_root, out, ef_range=("10", "90")))
    assert not out.exists()


def test_filelist_records_the_ef_that_was_requested_from_an_ef_source(weights_root, tmp_path):
    """An EchoNet-Dynamic FileList holds EFs such as 68.2120227: the video is conditioned on that
    value, so the generated FileList must record it, not a 6-digit rounding (68.212)."""
    src = tmp_path / "FileList.csv"
    src.write_text("FileName,EF,Split\na,68.2120227,TRAIN\nb,31.98765432,TEST\n")
    out = tmp_path / "ds"
    cfg = _cfg(weights_root, out, ef_from=str(src))
    generate_dataset(cfg, pipe=_RecordingPipe())
    with open(out / "FileList.csv", newline="") as fh:
        written = [float(row["EF"]) for row in csv.DictReader(fh)]
    pool = [68.2120227, 31.98765432]
    assert written == [requested_ef(cfg, i, pool) for i in range(cfg.num_videos)]
