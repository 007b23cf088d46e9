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
    GenerationConflict,
    ef_bounds,
    generate_dataset,
    requested_ef,
)


@pytest.mark.parametrize("ef_range", [("10", "90"), (10, None), None])
def test_an_ef_range_that_is_not_two_numbers_is_refused_naming_the_option(ef_range):
    with pytest.raises(GenerationArgumentError, match="--ef-range"):
        ef_bounds(ef_range)


@pytest.mark.parametrize(
    ("ef_range", "message"),
    [
        ("19", r"--ef-range needs LO and HI, got '19'"),
        (b"19", r"--ef-range needs LO and HI, got b'19'"),
        ((True, 90), "--ef-range must be two numbers, got True 90"),
        ((10, False), "--ef-range must be two numbers, got 10 False"),
    ],
)
def test_a_text_or_a_boolean_is_not_an_ef_bound(ef_range, message):
    """A two-character string is not a pair of bounds, and a bool is not a number (``True``
    would silently be 1)."""
    with pytest.raises(GenerationArgumentError, match=message):
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


def test_rows_of_an_ef_source_without_an_ef_are_left_out_of_the_pool(weights_root, tmp_path):
    """A row with an empty EF cell gives no EF to draw (not 0 or any other value): every
    requested EF is one of the filled-in ones."""
    src = tmp_path / "FileList.csv"
    src.write_text("FileName,EF,Split\na,,TRAIN\nb,42.5,TRAIN\nc,,TEST\nd,57,TEST\n")
    out = tmp_path / "ds"
    cfg = _cfg(weights_root, out, ef_from=str(src), num_videos=12)
    generate_dataset(cfg, pipe=_RecordingPipe())
    with open(out / "FileList.csv", newline="") as fh:
        written = [row["EF"] for row in csv.DictReader(fh)]
    assert len(written) == 12 and set(written) == {"42.5", "57"}


def test_an_ef_source_is_part_of_the_dataset_by_its_content_not_its_path(weights_root, tmp_path):
    """The EF source is recorded by digest: the same FileList under another path resumes the job,
    one with other EF values is refused naming ef_from."""
    first, moved, edited = (tmp_path / name for name in ("a.csv", "b.csv", "c.csv"))
    first.write_text("FileName,EF,Split\na,40,TRAIN\nb,55.5,TEST\n")
    moved.write_bytes(first.read_bytes())
    edited.write_text("FileName,EF,Split\na,40,TRAIN\nb,55.25,TEST\n")
    out = tmp_path / "ds"
    generate_dataset(_cfg(weights_root, out, ef_from=str(first)), pipe=_RecordingPipe())
    pipe = _RecordingPipe()
    summary = generate_dataset(_cfg(weights_root, out, ef_from=str(moved)), pipe=pipe)
    assert summary["complete"] and summary["generated"] == 0 and pipe.batches == []
    with pytest.raises(GenerationConflict, match="ef_from: folder has '[0-9a-f]{64}'"):
        generate_dataset(_cfg(weights_root, out, ef_from=str(edited)), pipe=pipe)


@pytest.mark.parametrize("ef_range", [(150, 200), (-50, -40), (-1, 50), (50, 100.5)])
def test_an_ef_range_outside_0_100_is_refused(ef_range):
    with pytest.raises(GenerationArgumentError, match="--ef-range must lie within 0 100"):
        ef_bounds(ef_range)


def test_the_whole_percentage_scale_is_a_range():
    assert ef_bounds((0, 100)) == (0, 100)
    assert ef_bounds((-0.0, 0.5)) == (0, 0)


@pytest.mark.parametrize("bad", ["150", "-20", "100.01"])
def test_an_ef_source_with_an_ef_outside_0_100_is_refused_naming_the_row(
    weights_root, tmp_path, bad
):
    src = tmp_path / "FileList.csv"
    src.write_text(f"FileName,EF,Split\na,55,TRAIN\nb,{bad},TEST\n")
    out = tmp_path / "ds"
    with pytest.raises(
        GenerationArgumentError, match=rf"row 2 \(FileName 'b'\): EF '{bad}' is outside"
    ):
        generate_dataset(_cfg(weights_root, out, ef_from=str(src)))
    assert not out.exists()


def test_the_video_pipeline_refuses_a_non_finite_ef_naming_it():
    """Before sampling (a NaN EF used to surface as a non-finite latent, blaming the model)."""
    import torch

    from echofast.models import LVDM
    from echofast.models.tiny import TINY_CONFIGS
    from echofast.pipelines import LVDMPipeline

    pipe = LVDMPipeline(LVDM.from_config(TINY_CONFIGS["lvdm"]))
    cond = torch.zeros(2, TINY_CONFIGS["lvdm"]["in_channels"] // 2, 6, 6)
    with pytest.raises(ValueError, match=r"ef must be finite: EF nan at position 1"):
        pipe(cond, [50.0, float("nan")], num_frames=8, num_inference_steps=1, output_type="latent")
