"""Phantom clips: determinism, exact ground truth, ``measure_ef`` accuracy, ``echofast phantom``."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from echofast.data.measure import (
    _local_quadratic,
    _otsu,
    _trimmed_mean,
    gaussian_blur,
    measure_ef,
    measure_volumes,
)
from echofast.data.phantom import (
    N_CHORDS,
    PhantomArgumentError,
    PhantomConflict,
    area_length_volume,
    main_phantom,
    make_phantom,
)
from echofast.io import read_video


def _drawn_ef(clip) -> float:
    """Area-length EF of the drawn (anti-aliased) cavity: coverage sum and long-axis length."""
    areas = clip.cavity.reshape(clip.num_frames, -1).sum(1).astype(np.float64)
    vol = area_length_volume(areas, clip.lengths)
    return (vol[clip.ed_frame] - vol[clip.es_frame]) / vol[clip.ed_frame] * 100


def test_deterministic_from_seed():
    a = make_phantom(7, frames=24, fps=20)
    b = make_phantom(7, frames=24, fps=20)
    c = make_phantom(8, frames=24, fps=20)
    assert a.frames.shape == (24, 112, 112) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)
    for key in ("ef", "edv", "esv", "ed_frame", "es_frame", "heart_rate"):
        assert getattr(a, key) == getattr(b, key)
    assert not np.array_equal(a.frames, c.frames)
    rng = np.random.default_rng(7)
    assert np.array_equal(make_phantom(rng=rng, frames=24, fps=20).frames, a.frames)


def test_fan_and_speckle():
    clip = make_phantom(3, frames=12, fps=8)
    frames = clip.frames.astype(np.float64)
    assert frames[:, 105:, :8].max() == 0 and frames[:, :4, :20].max() == 0  # black corners
    assert frames[:, 50:60, 20:90].mean() > 40
    assert frames[0].std() > 20 and not np.array_equal(clip.frames[0], clip.frames[1])


@pytest.mark.parametrize("ef", [10.0, 37.5, 63.2, 90.0])
def test_ground_truth_is_exact(ef):
    clip = make_phantom(int(ef * 10), ef=ef, frames=48, fps=32)
    assert clip.ef == ef
    assert (clip.edv - clip.esv) / clip.edv * 100 == pytest.approx(ef, abs=1e-9)
    vol = area_length_volume(clip.areas, clip.lengths) * clip.pixel_cm**3
    np.testing.assert_allclose(vol, clip.volumes, rtol=1e-9)
    assert int(np.argmin(vol)) == clip.es_frame and vol.min() == pytest.approx(clip.esv, rel=1e-9)
    assert vol[clip.ed_frame] == pytest.approx(clip.edv, rel=1e-9)
    assert vol.max() == pytest.approx(clip.edv, rel=1e-9)
    # the drawn cavity: its coverage sums to the analytic area and its area-length EF is the EF
    cover = clip.cavity.reshape(clip.num_frames, -1).sum(1)
    np.testing.assert_allclose(cover, clip.areas, rtol=4e-3)
    assert _drawn_ef(clip) == pytest.approx(ef, abs=0.3)


def test_end_diastole_is_the_last_relaxed_frame_before_end_systole():
    """ED is the frame where the contraction starts: every later frame up to ES is smaller."""
    for seed in range(6):
        clip = make_phantom(seed, frames=48, fps=32)
        v = clip.volumes
        assert v[clip.ed_frame] == pytest.approx(clip.edv, rel=1e-12)
        if clip.ed_frame < clip.es_frame:
            assert (v[clip.ed_frame + 1 : clip.es_frame + 1] < clip.edv).all(), seed


def test_tracings_geometry():
    clip = make_phantom(11, ef=55, frames=40, fps=30)
    for key, frame in (("ed", clip.ed_frame), ("es", clip.es_frame)):
        x1, y1, x2, y2 = clip.long_axis[key]
        length = math.hypot(x2 - x1, y2 - y1)
        assert length == pytest.approx(clip.lengths[frame], rel=1e-9)
        axis = np.array([x2 - x1, y2 - y1]) / length
        chords = clip.chords[key]
        assert chords.shape == (N_CHORDS, 4)
        d = chords[:, 2:] - chords[:, :2]
        assert np.abs(d @ axis).max() < 1e-9  # perpendicular to the long axis
        # method of disks from the chords ≈ the area-length volume (exact for the shape)
        disks = (math.pi * (np.hypot(d[:, 0], d[:, 1]) / 2) ** 2 * length / N_CHORDS).sum()
        al = area_length_volume(clip.areas[frame], length)
        assert disks == pytest.approx(al, rel=0.01)
        # chord endpoints lie on the drawn cavity's boundary (coverage ≈ 0.5 there)
        ends = np.concatenate([chords[:, :2], chords[:, 2:]])
        cov = clip.cavity[frame][np.rint(ends[:, 1]).astype(int), np.rint(ends[:, 0]).astype(int)]
        assert 0.1 < cov.mean() < 0.9


def test_too_short_clip_is_refused():
    with pytest.raises(ValueError, match="cycle"):
        make_phantom(0, frames=10, fps=50, hr_range=(50, 60))


# ------------------------------------------------------------------------------------------
# measure_ef
# ------------------------------------------------------------------------------------------

EFS = np.linspace(10, 90, 32)


@pytest.fixture(scope="module")
def clips():
    return [make_phantom(1000 + i, ef=float(ef), frames=36, fps=30) for i, ef in enumerate(EFS)]


def test_measure_ef_recovers_ground_truth(clips):
    """32 phantoms, EF 10-90: MAE ≤ 3 EF points. Measured when written: MAE 0.77, max 1.7."""
    errors = np.array([measure_ef(c.frames, c.fps) - c.ef for c in clips])
    mae, worst = np.abs(errors).mean(), np.abs(errors).max()
    assert mae <= 3.0, f"MAE {mae:.2f}, errors {np.round(errors, 2)}"
    assert worst <= 6.0, f"max error {worst:.2f}, errors {np.round(errors, 2)}"


def test_measure_ef_robust_to_blur_and_noise(clips):
    """Blur σ 1.5 px plus Gaussian noise σ 10 (8 clips): MAE ≤ 3. When written: MAE 2.1, max 3.1
    (on all 32 clips: MAE 1.5, max 2.8)."""
    errors = []
    for i, clip in enumerate(clips[::4]):
        rng = np.random.default_rng(i)
        x = gaussian_blur(clip.frames.astype(np.float32), 1.5)
        x = np.clip(np.rint(x + rng.normal(0, 10, x.shape)), 0, 255).astype(np.uint8)
        errors.append(measure_ef(x, clip.fps) - clip.ef)
    errors = np.array(errors)
    assert np.abs(errors).mean() <= 3.0, np.round(errors, 2)
    assert np.abs(errors).max() <= 6.0, np.round(errors, 2)


def test_measure_ef_blur_and_noise_accuracy_as_documented(clips):
    """Blur σ 1.5 px plus noise σ 10 on 8 further clips: every error within the documented
    worst case over all 32 clips (2.8 EF points; 3.0 allowed). When written: MAE 1.3, max 2.4."""
    errors = []
    for i in range(2, 32, 4):
        clip = clips[i]
        x = gaussian_blur(clip.frames.astype(np.float32), 1.5)
        x = x + np.random.default_rng(i).normal(0, 10, x.shape)
        errors.append(measure_ef(np.clip(np.rint(x), 0, 255).astype(np.uint8)) - clip.ef)
    assert np.abs(errors).max() <= 3.0, np.round(errors, 2)


def test_measure_volumes_details(clips):
    clip = clips[20]
    m = measure_volumes(clip.frames, clip.fps, pixel_cm=clip.pixel_cm, return_masks=True)
    assert m.valid.all() and m.masks.shape == clip.frames.shape
    assert m.edv == pytest.approx(clip.edv, rel=0.1)
    assert m.esv == pytest.approx(clip.esv, rel=0.1)
    assert m.ef == pytest.approx((m.edv - m.esv) / m.edv * 100)
    truth = clip.cavity > 0.5
    iou = (m.masks & truth).sum() / (m.masks | truth).sum()
    assert iou > 0.9
    np.testing.assert_allclose(m.areas, clip.areas, rtol=0.06)


def test_otsu_threshold_is_the_upper_edge_of_the_dark_class():
    """Every value of the dark mode, even one in the upper half of its histogram bin, lies
    below the threshold; the bright mode does not."""
    values = np.array([10.7] * 50 + [12.9] * 30 + [200.2] * 60, dtype=np.float32)
    assert 12.9 < _otsu(values) <= 200.2


def test_blood_level_is_a_ten_percent_trimmed_mean():
    values = np.concatenate([np.arange(1.0, 19.0), [1000.0, -1000.0]])
    assert _trimmed_mean(values) == pytest.approx(np.sort(values)[2:-2].mean())


def test_volume_smoothing_is_savitzky_golay():
    """A quadratic fit over ±2 frames is the 5-point Savitzky-Golay filter (-3, 12, 17, 12,
    -3)/35; a frame with fewer than 4 valid neighbours keeps its raw value."""
    y = np.random.default_rng(0).normal(100.0, 10.0, 12)
    out = _local_quadratic(y, np.ones(12, dtype=bool))
    sg = np.convolve(y, np.array([-3.0, 12.0, 17.0, 12.0, -3.0]) / 35.0, mode="valid")
    np.testing.assert_allclose(out[2:-2], sg, rtol=1e-9)
    assert out[0] == y[0] and out[-1] == y[-1]


def test_frame_inconsistent_with_its_neighbours_is_dropped(clips):
    """A frame whose cavity is half filled (area −57 % from its neighbours', still above 0.2×
    the clip's median) departs by more than 50 % from the running median of 3: dropped."""
    clip = clips[20]
    frames = clip.frames.copy()
    cavity = clip.cavity[5] > 0.5
    rows = np.flatnonzero(cavity.any(1))
    cavity[: rows.min() + int(0.45 * (rows.max() - rows.min()))] = False
    frames[5][cavity] = 150
    m = measure_volumes(frames, clip.fps)
    assert not m.valid[5] and m.valid.sum() == clip.num_frames - 1
    assert np.isnan([m.areas[5], m.lengths[5], m.volumes[5]]).all()
    assert np.isfinite(np.delete(m.areas, 5)).all() and np.isfinite(np.delete(m.volumes, 5)).all()
    assert m.ef == pytest.approx(clip.ef, abs=3)


def _fill_cavity_but_its_bottom(frame, coverage, keep: float) -> None:
    """Paint the cavity (``coverage`` > 0.5) of ``frame`` in place with tissue grey, except
    the bottom ``keep`` of its height."""
    cavity = coverage > 0.5
    rows = np.flatnonzero(cavity.any(1))
    cavity[rows.max() - int(keep * (rows.max() - rows.min())) :] = False
    frame[cavity] = 150


def test_frames_far_below_the_median_area_are_dropped(clips):
    """Two consecutive frames whose cavity is filled but for its bottom eighth agree with each
    other (running median) but are below 0.2× the clip's median area: both dropped."""
    clip = clips[20]
    frames = clip.frames.copy()
    for k in (5, 6):
        _fill_cavity_but_its_bottom(frames[k], clip.cavity[k], 0.12)
    m = measure_volumes(frames, clip.fps)
    assert not m.valid[5] and not m.valid[6] and m.valid.sum() == clip.num_frames - 2
    assert m.ef == pytest.approx(clip.ef, abs=3)


def test_clip_with_a_single_consistent_frame_is_refused(clips):
    """Two frames, the second's cavity filled but for its bottom tenth: its area is below 0.2×
    the clip's median, so only one frame is consistent and no EF can be measured."""
    clip = clips[20]
    frames = clip.frames[[clip.ed_frame, clip.ed_frame]].copy()
    _fill_cavity_but_its_bottom(frames[1], clip.cavity[clip.ed_frame], 0.1)
    with pytest.raises(ValueError, match="fewer than two consistent frames"):
        measure_volumes(frames)


def test_frames_far_above_the_median_area_are_dropped(clips):
    """Two consecutive frames with a dark disk of radius 30 px over the cavity (≈ 4× the
    clip's median area) agree with each other but exceed 3× the median: both dropped."""
    clip = clips[20]
    frames = clip.frames.copy()
    yy, xx = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    for k in (5, 6):
        cy, cx = np.argwhere(clip.cavity[k] > 0.5).mean(0)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 30**2
        frames[k][disk & (frames[k] > 0)] = 5
    m = measure_volumes(frames, clip.fps)
    assert not m.valid[5] and not m.valid[6] and m.valid.sum() == clip.num_frames - 2
    assert m.ef == pytest.approx(clip.ef, abs=3)


def test_measure_rejects_non_echo():
    with pytest.raises(ValueError):
        measure_ef(np.zeros((10, 112, 112), np.uint8))
    with pytest.raises(ValueError):
        measure_ef(np.full((10, 112, 112), 128, np.uint8))


# ------------------------------------------------------------------------------------------
# echofast phantom
# ------------------------------------------------------------------------------------------

ARGS = ["--num-videos", "5", "--frames", "30:40", "--fps", "25:40", "--splits", "3,1,1"]


def echonet_style_load(root: Path) -> tuple[list, dict, dict]:
    """What echonet.datasets.Echo does with a folder: FileList via pandas, FileName + '.avi',
    VolumeTracings parsed line by line; videos with fewer than two traced frames dropped."""
    pd = pytest.importorskip("pandas")
    data = pd.read_csv(root / "FileList.csv")
    data["Split"] = data["Split"].map(lambda x: x.upper())
    fnames = [fn + ".avi" for fn in data["FileName"].tolist() if os.path.splitext(fn)[1] == ""]
    missing = set(fnames) - set(os.listdir(root / "Videos"))
    assert not missing, f"{len(missing)} videos could not be found"
    frames, trace = defaultdict(list), defaultdict(lambda: defaultdict(list))
    with open(root / "VolumeTracings.csv") as f:
        assert f.readline().strip().split(",") == ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]
        for line in f:
            filename, x1, y1, x2, y2, frame = line.strip().split(",")
            frame = int(frame)
            if frame not in trace[filename]:
                frames[filename].append(frame)
            trace[filename][frame].append((float(x1), float(y1), float(x2), float(y2)))
    keep = [len(frames[f]) >= 2 for f in fnames]
    assert all(keep)
    return data.values.tolist(), frames, trace


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ds"
    assert main_phantom(["--out", str(out), "--seed", "5", "--no-progress", *ARGS]) == 0
    return out


def test_cli_layout_loads_like_echonet(dataset):
    rows, frames, trace = echonet_style_load(dataset)
    assert len(rows) == 5
    with open(dataset / "FileList.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["Split"] for r in table] == ["TRAIN"] * 3 + ["VAL", "TEST"]
    for r in table:
        video, fps = read_video(dataset / "Videos" / f"{r['FileName']}.avi")
        assert video.shape == (int(r["NumberOfFrames"]), 112, 112)
        assert int(r["FrameHeight"]) == int(r["FrameWidth"]) == 112
        assert fps == float(r["FPS"]) and 25 <= fps <= 40 and 30 <= len(video) <= 40
        ef, esv, edv = float(r["EF"]), float(r["ESV"]), float(r["EDV"])
        assert 10 <= ef <= 90 and (edv - esv) / edv * 100 == pytest.approx(ef, abs=0.02)
        name = r["FileName"] + ".avi"
        small, large = frames[name][0], frames[name][-1]  # echonet: last listed = diastolic
        assert small != large
        for f in (small, large):
            assert len(trace[name][f]) == 1 + 20
        # echonet's volume from the tracings (method of disks) ≈ the area-length volume
        vols = {}
        for f in (small, large):
            t = np.array(trace[name][f])
            length = math.hypot(t[0, 2] - t[0, 0], t[0, 3] - t[0, 1])
            d = np.hypot(t[1:, 2] - t[1:, 0], t[1:, 3] - t[1:, 1])
            vols[f] = (math.pi * (d / 2) ** 2 * length / 20).sum()
        assert (vols[large] - vols[small]) / vols[large] * 100 == pytest.approx(ef, abs=1.0)
        # the AVI round trip keeps the clip measurable
        assert measure_ef(video, fps) == pytest.approx(ef, abs=5)


def test_cli_resume_and_refusals(dataset, tmp_path):
    manifest = json.loads((dataset / "phantom.json").read_text())
    assert manifest["arguments"]["seed"] == 5 and manifest["arguments"]["splits"] == [3, 1, 1]
    before = {p.name: p.stat().st_mtime_ns for p in (dataset / "Videos").iterdir()}
    victim = dataset / "Videos" / "phantom_000002.avi"
    data = victim.read_bytes()
    victim.unlink()
    assert main_phantom(["--out", str(dataset), "--seed", "5", "--no-progress", *ARGS]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (dataset / "Videos").iterdir()}
    assert victim.read_bytes() == data  # deterministic regeneration
    assert {k: v for k, v in after.items() if k != victim.name} == {
        k: v for k, v in before.items() if k != victim.name
    }
    with pytest.raises(PhantomConflict, match="other arguments"):
        main_phantom(["--out", str(dataset), "--seed", "6", "--no-progress", *ARGS])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PhantomConflict, match="not a phantom dataset"):
        main_phantom(["--out", str(foreign), "--no-progress", *ARGS])
    assert (foreign / "notes.txt").read_text() == "mine"
    small = tmp_path / "small"
    assert main_phantom(["--out", str(small), "--no-progress", *ARGS]) == 0
    small_args = ["--num-videos", "2", "--frames", "30", "--fps", "30", "--splits", "1,1,0"]
    assert main_phantom(["--out", str(small), "--overwrite", "--no-progress", *small_args]) == 0
    assert sorted(p.name for p in (small / "Videos").iterdir()) == [
        "phantom_000000.avi",
        "phantom_000001.avi",
    ]


def test_cli_rejects_impossible_clip_length(tmp_path):
    with pytest.raises(ValueError, match="cardiac cycle"):
        main_phantom(["--out", str(tmp_path / "x"), "--num-videos", "1", "--frames", "8"])


TINY = ["--num-videos", "2", "--frames", "24", "--fps", "16", "--size", "16", "--no-progress"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--hr-range", "100", "60"], "--hr-range LO 100 is above HI 60"),
        (["--hr-range", "-50", "100"], "--hr-range must be positive"),
        (["--hr-range", "0", "100"], "--hr-range must be positive"),
        (["--ef-range", "90", "10"], "--ef-range LO 90 is above HI 10"),
        (["--ef-range", "0", "50"], r"--ef-range must lie in \(0, 100\)"),
        (["--ef-range", "50", "99.999"], r"--ef-range must lie in \(0, 100\)"),
    ],
)
def test_cli_bad_ranges_leave_nothing_behind(tmp_path, bad, message):
    out = tmp_path / "pC"
    with pytest.raises(PhantomArgumentError, match=message):
        main_phantom(["--out", str(out), *TINY, *bad])
    assert not out.exists()
    assert main_phantom(["--out", str(out), *TINY]) == 0  # the corrected retry
    assert len(list((out / "Videos").glob("*.avi"))) == 2


@pytest.mark.parametrize("existed", [False, True])
def test_cli_clip_that_cannot_be_made_is_undone(tmp_path, existed):
    """4 frames at 1 fps and 30-110 bpm pass the argument checks, but clip 9 (seed 0) draws
    timing with no diastasis frame: the run removes the 9 videos and the manifest it wrote."""
    out = tmp_path / "pD"
    if existed:
        out.mkdir()
    args = ["--num-videos", "10", "--frames", "4", "--fps", "1", "--size", "16"]
    with pytest.raises(PhantomArgumentError, match=f"{out}: clip 9: .*removed what this run"):
        main_phantom(["--out", str(out), *args, "--hr-range", "30", "110", "--no-progress"])
    assert (out.exists() and not any(out.iterdir())) if existed else not out.exists()
    args[1] = "9"
    assert main_phantom(["--out", str(out), *args, "--hr-range", "30", "110", "--no-progress"]) == 0
    assert len(list((out / "Videos").glob("*.avi"))) == 9


@pytest.mark.parametrize("option", ["--fps", "--frames"])
@pytest.mark.parametrize("value", ["29.97", "40:30", "x"])
def test_cli_non_integer_rates_name_the_option(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exc:
        main_phantom(["--out", str(tmp_path / "p"), "--num-videos", "1", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected an integer or LO:HI integers" in err and value in err
    assert not (tmp_path / "p").exists()


def test_cli_help_says_integer(capsys):
    with pytest.raises(SystemExit):
        main_phantom(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "frame rate: an integer F" in help_text and "frames per video: an integer T" in help_text
