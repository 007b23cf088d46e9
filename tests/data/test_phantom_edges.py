"""Phantom clips and ``echofast phantom`` at their edges: tracing orientation, speckle level,
default pixel size and heart rate, the documented seed rule, argument checks, folder
conflicts, resuming and undoing a failed run."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from echofast.data.phantom import (
    N_CHORDS,
    PIXEL_CM,
    PhantomArgumentError,
    PhantomConflict,
    PhantomDatasetConfig,
    _speckle,
    main_phantom,
    make_phantom,
    phantom_clip,
)
from echofast.rng import sample_seed

TINY = ["--num-videos", "2", "--frames", "24", "--fps", "16", "--size", "16", "--no-progress"]


def _filelist(folder) -> list[dict]:
    with open(folder / "FileList.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_tracings_run_base_to_apex_with_free_wall_first(seed):
    """Long axis: base midpoint, then apex (up the image). Chords: centred on N equal segments
    of the long axis from base to apex, (x1, y1) on the free-wall side (image right)."""
    clip = make_phantom(seed, frames=40, fps=30)
    for key in ("ed", "es"):
        bx, by, ax, ay = clip.long_axis[key]
        assert ay < by  # the apex is nearer the top of the image
        chords = clip.chords[key]
        assert (chords[:, 0] > chords[:, 2]).all()  # tilt within ±12°: free wall is right
        centres = (chords[:, :2] + chords[:, 2:]) / 2
        f = (np.arange(N_CHORDS) + 0.5) / N_CHORDS
        expected = np.stack([bx + f * (ax - bx), by + f * (ay - by)], 1)
        np.testing.assert_allclose(centres, expected, atol=1e-9)


def test_tracing_rows_keep_a_given_avi_suffix():
    clip = make_phantom(4, frames=24, fps=20)
    rows = clip.tracing_rows("clip_7.avi")
    assert {r["FileName"] for r in rows} == {"clip_7.avi"}
    assert [r["Frame"] for r in rows] == [clip.es_frame] * 21 + [clip.ed_frame] * 21


def test_speckle_amplitude_has_mean_one_in_every_frame():
    """The AR(1) field keeps unit variance over time, so every frame's amplitude mean ≈ 1."""
    amp = _speckle(np.random.default_rng(0), 12, 64, 64, 0.8)
    assert amp.shape == (12, 64, 64) and amp.dtype == np.float32
    np.testing.assert_allclose(amp.mean((1, 2)), 1.0, rtol=0.06)


def test_default_pixel_size_scales_with_the_frame_size():
    clip = make_phantom(2, frames=24, fps=20, size=56)
    assert clip.pixel_cm == pytest.approx(PIXEL_CM * 2)
    assert clip.edv == pytest.approx(clip.volumes.max(), rel=1e-9)
    assert make_phantom(2, frames=24, fps=20, size=56, pixel_cm=0.5).pixel_cm == 0.5


def test_drawn_ef_is_rounded_to_a_hundredth():
    efs = [make_phantom(s, frames=24, fps=20).ef for s in range(4)]
    assert all(ef == round(ef, 2) for ef in efs) and len(set(efs)) == 4


def test_default_heart_rate_is_fast_enough_for_a_whole_cycle():
    """20 frames at 50 fps hold a whole cycle only from 60·50/18 ≈ 167 bpm: the drawn heart
    rate's lower end is raised to that, and every clip can be made."""
    for seed in range(8):
        clip = make_phantom(seed, frames=20, fps=50, hr_range=(40.0, 200.0))
        assert 60 * 50 / 18 <= clip.heart_rate <= 200.0


def test_short_clip_has_a_diastasis_frame_at_edv_or_is_refused():
    """4 frames at 1 fps: each clip either holds a frame in exact diastasis (its volume is the
    EDV, at the ED frame) or is refused with a ValueError that says why."""
    refused = 0
    for seed in range(60):
        try:
            clip = make_phantom(seed, frames=4, fps=1, hr_range=(30.0, 110.0), size=16)
        except ValueError as err:
            assert "diastasis" in str(err), err
            refused += 1
            continue
        assert clip.volumes[clip.ed_frame] == clip.volumes.max(), seed
        assert clip.volumes.max() == pytest.approx(clip.edv, rel=1e-12), seed
    assert 0 < refused < 30


@pytest.mark.parametrize("ef", [0.0, 100.0, -5.0])
def test_ef_outside_the_open_interval_is_refused(ef):
    with pytest.raises(ValueError, match="EF must be in"):
        make_phantom(0, ef=ef, frames=24, fps=20)


def test_dataset_clip_follows_the_documented_seed_rule():
    """Clip i draws from default_rng(sample_seed(seed, i, 'phantom')): frames, then fps, then
    make_phantom's draws with the dataset's EF and heart-rate ranges."""
    cfg = PhantomDatasetConfig(
        out="unused",
        num_videos=3,
        seed=9,
        frames=(24, 40),
        fps=(20, 30),
        ef_range=(40.0, 41.0),
        hr_range=(95.0, 96.0),
        size=32,
    )
    for i in range(3):
        rng = np.random.default_rng(sample_seed(9, i, "phantom"))
        frames = int(rng.integers(24, 41))
        fps = int(rng.integers(20, 31))
        ref = make_phantom(
            rng=rng, frames=frames, fps=fps, size=32, ef_range=(40.0, 41.0), hr_range=(95.0, 96.0)
        )
        clip = phantom_clip(cfg, i)
        assert clip.fps == fps and clip.num_frames == frames
        assert np.array_equal(clip.frames, ref.frames)
        assert 40.0 <= clip.ef <= 41.0 and 95.0 <= clip.heart_rate <= 96.0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--num-videos", "0"], "--num-videos must be >= 1"),
        (["--size", "17"], "even size"),
        (["--frames", "3"], "frames >= 4"),
        (["--fps", "10:60", "--frames", "20"], "cannot hold a whole cardiac cycle"),
        (["--name-prefix", "../up_"], r"--name-prefix '\.\./up_' holds \['/'\]"),
        (["--name-prefix", "a\\b"], "no path separators"),
        (["--name-prefix", "a\nb"], "control characters"),
    ],
)
def test_cli_refuses_arguments_before_touching_the_folder(tmp_path, bad, message):
    out = tmp_path / "p"
    with pytest.raises(PhantomArgumentError, match=message):
        main_phantom(["--out", str(out), *TINY, *bad])
    assert not out.exists()


def test_cli_rejects_a_three_part_range(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main_phantom(["--out", str(tmp_path / "p"), *TINY, "--frames", "24:30:40"])
    assert "argument --frames" in capsys.readouterr().err


@pytest.mark.parametrize("splits", ["3,x,1", "3,1", "--splits=3,-1,1"])
def test_cli_names_the_splits_form(tmp_path, capsys, splits):
    out = tmp_path / "p"
    args = [splits] if splits.startswith("--") else ["--splits", splits]
    with pytest.raises(SystemExit):
        main_phantom(["--out", str(out), *TINY, *args])
    err = capsys.readouterr().err
    assert "argument --splits: expected TRAIN,VAL,TEST: three non-negative integers" in err
    assert not out.exists()


def test_cli_writes_the_pixel_size_and_ranges_it_was_given(tmp_path):
    out = tmp_path / "p"
    main_phantom(["--out", str(out), *TINY, "--ef-range", "30", "31", "--seed", "3"])
    manifest = json.loads((out / "phantom.json").read_text())
    assert manifest["pixel_cm"] == pytest.approx(PIXEL_CM * 112 / 16)
    cfg = PhantomDatasetConfig(
        out=str(out), num_videos=2, seed=3, frames=(24, 24), fps=(16, 16), size=16
    )
    cfg.ef_range = (30.0, 31.0)
    for i, row in enumerate(_filelist(out)):
        clip = phantom_clip(cfg, i)
        assert 30.0 <= float(row["EF"]) <= 31.0
        assert float(row["EDV"]) == pytest.approx(clip.edv, abs=0.006)
        assert clip.pixel_cm == pytest.approx(manifest["pixel_cm"])


def test_cli_resume_removes_stale_temporary_files_quietly(tmp_path, capsys):
    out = tmp_path / "p"
    main_phantom(["--out", str(out), *TINY])
    assert capsys.readouterr().err == ""  # --no-progress: no progress bar
    stale = out / "Videos" / ".phantom_000001.avi.abc123.tmp"
    stale.write_bytes(b"partial")
    main_phantom(["--out", str(out), *TINY])
    assert not stale.exists()


def test_cli_summary_counts_written_and_skipped(tmp_path, capsys):
    out, args = tmp_path / "p", [*TINY, "--num-videos", "3"]
    main_phantom(["--out", str(out), *args])
    (out / "Videos" / "phantom_000001.avi").unlink()
    capsys.readouterr()
    main_phantom(["--out", str(out), *args])
    text = " ".join(capsys.readouterr().out.split())
    assert "3 phantom videos" in text
    assert "wrote 1 in" in text and "2 were already there" in text


def test_cli_overwrite_flag_is_not_part_of_the_dataset_identity(tmp_path):
    out = tmp_path / "p"
    main_phantom(["--out", str(out), *TINY, "--overwrite"])
    assert main_phantom(["--out", str(out), *TINY]) == 0


def test_cli_refuses_a_file_and_a_manifest_without_arguments(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep")
    with pytest.raises(PhantomConflict, match="not a folder"):
        main_phantom(["--out", str(target), *TINY])
    assert target.read_text() == "keep"
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "phantom.json").write_text('{"kind": "something else"}')
    with pytest.raises(PhantomConflict, match="unreadable manifest"):
        main_phantom(["--out", str(folder), *TINY])


def test_failed_overwrite_of_a_dataset_keeps_the_folder(tmp_path):
    """A clip that cannot be made, in a folder that held a dataset: nothing is removed beyond
    what --overwrite replaced (the old CSVs), and the error does not claim a clean-up."""
    out = tmp_path / "p"
    main_phantom(["--out", str(out), *TINY])
    args = ["--num-videos", "10", "--frames", "4", "--fps", "1", "--size", "16"]
    args += ["--hr-range", "30", "110", "--overwrite", "--no-progress"]
    with pytest.raises(PhantomArgumentError, match="clip 9") as err:
        main_phantom(["--out", str(out), *args])
    assert "removed" not in str(err.value)
    assert (out / "phantom.json").is_file() and len(list((out / "Videos").glob("*.avi"))) == 9
    assert not (out / "FileList.csv").exists() and not (out / "VolumeTracings.csv").exists()
    assert math.isfinite(json.loads((out / "phantom.json").read_text())["pixel_cm"])
