"""What ``privacy_report.json`` holds and how it is written: the histogram bins (NumPy's
histogram over fixed-width bins), the closest candidates, the fail-closed fields, the frames
rule, no absolute paths, the AUC computed on TEST when no evaluation is saved, a cached
calibration read back, and a report that cannot be JSON (NaN) refused before any file is
written. Tiny random latents and an untrained model: fast."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from privacy.phantom_latents import write_random_latents

from echofast.data.datasets import DatasetError
from echofast.privacy import setup_filter
from echofast.privacy.data import LatentClips
from echofast.privacy.filter import ClipScores, evaluate_reid
from echofast.privacy.report import (
    REPORT_JSON,
    REPORT_PNG,
    build_report,
    closest,
    hist,
    histogram_edges,
    not_filtered_report,
    write_report,
)

SPLITS = {"TRAIN": 4, "VAL": 2, "TEST": 6}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_random_latents(tmp_path_factory.mktemp("ref"), SPLITS, frames=3, seed=4)


def _scores(values, names=None) -> ClipScores:
    n = len(values)
    names = names or [f"c{i:02d}" for i in range(n)]
    return ClipScores(
        names=list(names),
        max_corr=np.asarray(values, dtype=np.float64),
        nearest_clip=[f"train_{i % 3}" for i in range(n)],
        nearest_frame=np.arange(n) % 2 + 5,
        candidate_frame=np.arange(n) % 3,
        kept=np.asarray(values) < 0.8,
    )


@pytest.mark.parametrize(
    ("values", "lo"),
    [([0.33, 0.9], 0.3), ([0.349999, 0.71], 0.3), ([1.0, 1.0], 0.95), ([-0.41], -0.45)],
)
def test_histogram_bins_run_from_the_lowest_value_rounded_down_to_one(values, lo):
    edges = histogram_edges(np.array(values), np.array([]))
    np.testing.assert_allclose(edges, np.linspace(lo, 1.0, 51), rtol=0, atol=1e-12)
    want, _ = np.histogram(values, bins=np.linspace(lo, 1.0, 51))
    assert hist(np.array(values), edges) == want.tolist() and sum(want) == len(values)


def test_closest_candidates_highest_first_ties_by_name():
    values = [0.5, 0.9, 0.5, 0.1, 0.7, 0.5, 0.2, 0.3, 0.4, 0.45, 0.6, 0.05]
    names = ["z", "m", "b", "q", "k", "a", "y", "x", "w", "v", "u", "t"]
    s = _scores(values, names)
    got = closest(s)
    assert [e["candidate"] for e in got] == ["m", "k", "u", "a", "b", "z", "v", "w", "x", "y"]
    for e in got:
        i = names.index(e["candidate"])
        assert e["max_correlation"] == values[i]
        assert e["nearest_real_clip"] == s.nearest_clip[i]
        assert e["nearest_real_frame"] == int(s.nearest_frame[i])
        assert e["candidate_frame"] == int(s.candidate_frame[i])
        assert e["kept"] is (values[i] < 0.8)


def test_weak_report_and_its_histograms(model_dir, reference):
    """A model under the threshold run with weak privacy allowed: the report says it did not pass
    and is weak, the generated videos' scores get their own histogram over bins that hold every
    value, and ``extra`` entries are added at the top level."""
    weak = setup_filter(model_dir, reference, auc_threshold=0.96, allow_weak_privacy=True)
    assert weak.model_info["passed_threshold"] is False
    assert weak.model_info["allow_weak_privacy"] is True and not weak.filtered
    cands, videos = _scores([0.99, 0.97, 0.98]), np.array([-0.31, 0.96])
    report = build_report(
        weak,
        candidate_scores=cands,
        counts={"candidates": 3},
        seeds={"s": 1},
        video_scores=videos,
        extra={"candidate_frame_step": 3},
    )
    assert report["weak_model"] is True and "WEAK" in report["status"]
    assert report["candidate_frame_step"] == 3 and report["seeds"] == {"s": 1}
    h = report["histograms"]
    assert h["bin_edges"][0] == pytest.approx(-0.35) and len(h["bin_edges"]) == 51
    assert sum(h["train_video"]) == 2 and sum(h["train_synthetic"]) == 3
    assert sum(h["train_test"]) == len(weak.filter.calibration.values)


def test_the_figure_lists_every_count_whole(model_dir, reference, monkeypatch):
    """A generate report's nine counts do not fit one title line: they are wrapped, not cut
    (the last ones were lost mid-word, e.g. 'VIDEOS_REQU')."""
    import echofast.privacy.report as report_mod

    titles = []
    monkeypatch.setattr(
        report_mod, "histogram_png", lambda series, edges, *, tau, title: titles.append(title)
    )
    setup = setup_filter(model_dir, reference)
    keys = ["real_train_clips", "real_test_clips", "candidates", "kept", "dropped_image_level",
            "video_attempts", "dropped_video_level", "videos", "videos_requested"]  # fmt: skip
    counts = {k: 1000 + i for i, k in enumerate(keys)}
    report = build_report(setup, candidate_scores=_scores([0.5]), counts=counts, seeds={})
    report_mod.report_png(report)
    lines = titles[0][3:]
    assert len(lines) > 1 and all(len(line) <= 130 for line in lines)
    assert " ".join(lines).split() == [w for k, v in counts.items() for w in (k.upper(), str(v))]


def test_reference_info_names_the_frames_and_no_absolute_path(model_dir, reference, tmp_path):
    every = setup_filter(model_dir, reference, frame_step=0, normalization="clip")
    assert every.reference_info["frames_rule"] == "frame 0 of every clip"
    assert every.filter.model.normalization == "clip"
    stepped = setup_filter(model_dir, reference, frame_step=2)
    assert stepped.reference_info["frames_rule"] == "frames 0, 2, 2·2, ... of every clip"
    assert stepped.model_info["folder_name"] == model_dir.name
    report = build_report(stepped, candidate_scores=_scores([0.5]), counts={}, seeds={})
    write_report(tmp_path / "r", report)
    text = (tmp_path / "r" / REPORT_JSON).read_text()
    assert str(model_dir.parent) not in text and str(reference) not in text
    assert list(json.loads(text)) == sorted(report)


@pytest.mark.parametrize("threshold", [-0.01, 1.01])
def test_an_auc_threshold_outside_the_unit_interval_is_refused(model_dir, reference, threshold):
    with pytest.raises(ValueError, match=rf"AUC threshold must be in \[0, 1\], got {threshold}"):
        setup_filter(model_dir, reference, auc_threshold=threshold)


def test_zero_auc_threshold_is_accepted(model_dir, reference):
    assert setup_filter(model_dir, reference, auc_threshold=0.0).model_info["auc_threshold"] == 0


def test_without_a_saved_evaluation_the_auc_is_the_test_splits(model_dir, reference, tmp_path):
    """The documented protocol: the reference's TEST split, 4 seeded pairs per clip, seed 0."""
    bare = tmp_path / model_dir.name
    shutil.copytree(model_dir, bare)
    (bare / "evaluation.json").unlink()
    setup = setup_filter(bare, reference, auc_threshold=0.0)
    model = setup.filter.model
    clips = LatentClips(reference, "TEST", normalization=model.normalization)
    want, _, _ = evaluate_reid(model, clips, seed=0, pairs_per_video=4)
    assert setup.model_info["test_auc"] == want.to_dict()
    assert "(6 clips, 4 seeded pairs per clip)" in setup.model_info["auc_source"]


def test_test_videos_without_latents_are_named_before_the_auc_is_measured(
    model_dir, reference, tmp_path
):
    """A reference listing TEST videos without their latent file is refused with that reason
    (a video dataset passed as the reference, or an unfinished encode): the AUC measured on the
    TEST clips came first and said 'split TEST has 1 clip(s) ...; pairs need at least 2'."""
    bare = tmp_path / model_dir.name
    shutil.copytree(model_dir, bare)
    (bare / "evaluation.json").unlink()
    partial = shutil.copytree(reference, tmp_path / "partial")
    for k in range(1, 6):
        (partial / "Latents" / f"test_{k}.safetensors").unlink()
    with pytest.raises(DatasetError, match=r"5 of the 6 TEST videos it lists have no latent"):
        setup_filter(bare, partial, auc_threshold=0.0)


def test_a_report_holding_nan_is_refused_before_any_file(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_report(tmp_path / "r", {"privacy_filtered": False, "x": float("nan")})
    assert not (tmp_path / "r" / REPORT_JSON).exists()
    assert not (tmp_path / "r" / REPORT_PNG).exists()


def test_not_filtered_report_without_seeds_writes_an_empty_mapping(tmp_path):
    report = not_filtered_report("no model")
    assert report["seeds"] == {} and report["privacy_filtered"] is False
    js, png = write_report(tmp_path, report)
    assert json.loads(js.read_text())["reason"] == "no model"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cache_for_the_same_inputs_is_read_not_recalibrated(
    model_dir, reference, tmp_path, monkeypatch
):
    from echofast.privacy import PrivacyFilter

    cache = tmp_path / "reference.safetensors"
    first = setup_filter(model_dir, reference, cache=cache, frame_step=1)

    def no_calibration(*args, **kwargs):
        raise AssertionError("recalibrated although the cache holds the calibration")

    monkeypatch.setattr(PrivacyFilter, "from_reference", no_calibration)
    again = setup_filter(model_dir, reference, cache=cache, frame_step=1)
    assert again.filter.tau == first.filter.tau
    assert again.reference_info == first.reference_info


@pytest.mark.parametrize("change", [{"percentile": 50.0}, {"frame_step": 2}])
def test_a_cache_calibrated_otherwise_is_not_used(model_dir, reference, tmp_path, change):
    """A cache written with another percentile or frame step is recalibrated, not reused."""
    cache = tmp_path / "reference.safetensors"
    first = setup_filter(model_dir, reference, frame_step=1)
    first.filter.save(cache)
    again = setup_filter(model_dir, reference, cache=cache, **{"frame_step": 1, **change})
    fresh = setup_filter(model_dir, reference, **{"frame_step": 1, **change})
    assert again.filter.tau == fresh.filter.tau
    assert again.filter.frame_step == fresh.filter.frame_step
