"""``run_audit`` on tiny random latents and an untrained model: the planted copies are the
documented edits of every TRAIN reference frame (the re-noise prior fitted with NumPy), which
kinds carry the ≥ 99 % goal and where the goal is met, clips with no other frame, refusals of
missing or misshapen splits, and the matched gallery when the TEST set outnumbers the gallery."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from privacy.phantom_latents import write_latents, write_random_latents

import echofast.privacy.audit as audit_mod
from echofast.data.datasets import load_latents
from echofast.privacy import PrivacyError, setup_filter
from echofast.privacy.audit import _gen, brightness, noise, renoise_gaussian, run_audit, shift
from echofast.privacy.data import FrameShapeError
from echofast.privacy.report import FilterSetup

SPLITS = {"TRAIN": 5, "VAL": 3, "TEST": 4}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_random_latents(tmp_path_factory.mktemp("ref"), SPLITS, frames=4, seed=3)


def test_every_reference_frame_is_planted_once_with_the_documented_edits(model_dir, reference):
    """More copies asked for than there are reference frames: each TRAIN reference frame
    (frames 0 and 2 of every clip, in FileList order) is planted once per kind, edited with its
    own seeded generator; the re-noise prior is the per-element mean and population variance
    of the reference frames (NumPy)."""
    flt = setup_filter(model_dir, reference, frame_step=2).filter
    audit, scores = run_audit(
        FilterSetup(flt, {}, {}, True), reference, num_planted=1000, strengths=(0.25,), seed=5
    )
    clips = [load_latents(reference / "Latents" / f"train_{k}.safetensors")[0] for k in range(5)]
    base = torch.stack([c[f] for c in clips for f in (0, 2)])
    n = len(base)
    assert audit["num_planted"] == n == 10
    frames = base.double().numpy()
    mean = torch.from_numpy(frames.mean(0)).float()
    var = torch.from_numpy(frames.var(0)).float()
    want = {
        "exact": base,
        "shift": torch.stack([shift(x, _gen(5, i, "audit-shift")) for i, x in enumerate(base)]),
        "brightness": torch.stack(
            [brightness(x, _gen(5, i, "audit-brightness")) for i, x in enumerate(base)]
        ),
        "noise": torch.stack([noise(x, _gen(5, i, "audit-noise")) for i, x in enumerate(base)]),
        "renoise_0.25": renoise_gaussian(base, 0.25, mean, var, seed=5),
    }
    for kind, x in want.items():
        assert audit["positive_control"][kind]["planted"] == n, kind
        expect = flt.score_clips(list(x), [f"c{i}" for i in range(n)], frame_step=0).max_corr
        np.testing.assert_allclose(scores[kind], expect, rtol=0, atol=2e-6, err_msg=kind)
    assert len(scores["other_frame"]) == n


def test_goal_applies_to_the_light_kinds_and_is_met_at_exactly_the_goal(
    model_dir, reference, monkeypatch
):
    flt = setup_filter(model_dir, reference).filter
    setup = FilterSetup(flt, {}, {}, True)
    _, scores = run_audit(setup, reference, num_planted=4, strengths=(0.1, 0.5), seed=2)
    noisy = np.sort(scores["noise"])
    assert len(np.unique(noisy)) == 4 and noisy[-1] < 1 - 1e-6
    # half of the noisy copies score >= tau: a goal of one half is met, exactly
    monkeypatch.setattr(audit_mod, "GOAL", 0.5)
    flt.calibration = dataclasses.replace(flt.calibration, tau=float(noisy[2]))
    audit, _ = run_audit(setup, reference, num_planted=4, strengths=(0.1, 0.5), seed=2)
    pos = audit["positive_control"]
    assert pos["noise"]["caught"] == 2 and pos["noise"]["meets_goal"] is True
    for kind in ("renoise_0.1", "renoise_0.5", "other_frame"):
        assert pos[kind]["goal"] is None and pos[kind]["meets_goal"] is None, kind
    assert pos["exact"]["goal"] == 0.5
    # exact copies all caught, noisy ones not all: the light copies do not meet a goal of 1
    monkeypatch.setattr(audit_mod, "GOAL", 1.0)
    audit, _ = run_audit(setup, reference, num_planted=4, strengths=(0.1, 0.5), seed=2)
    pos = audit["positive_control"]
    assert pos["exact"]["meets_goal"] is True and pos["noise"]["meets_goal"] is False
    assert audit["light_copies_meet_goal"] is False


def test_clips_without_a_non_reference_frame_plant_no_other_frame(model_dir, tmp_path):
    """One-frame TRAIN clips have no other frame; in a mix, only the longer clips give one (and
    which clips are planted is a seeded draw, not the first ones)."""
    single = write_random_latents(tmp_path / "a", SPLITS, frames=1)
    flt = setup_filter(model_dir, single).filter
    audit, scores = run_audit(FilterSetup(flt, {}, {}, True), single, num_planted=5)
    assert "other_frame" not in audit["positive_control"] and "other_frame" not in scores
    assert audit["positive_control"]["exact"]["planted"] == 5
    g = torch.Generator().manual_seed(1)
    for k in (1, 3):
        write_latents(
            single / "Latents" / f"train_{k}.safetensors", torch.randn(3, 4, 6, 6, generator=g)
        )
    audit, scores = run_audit(FilterSetup(flt, {}, {}, True), single, num_planted=5)
    assert audit["positive_control"]["other_frame"]["planted"] == len(scores["other_frame"]) == 2
    # 2 of the 5 clips planted, drawn per seed: how many have another frame varies with the seed
    counts = set()
    for seed in range(8):
        _, scores = run_audit(
            FilterSetup(flt, {}, {}, True), single, num_planted=2, strengths=(0.5,), seed=seed
        )
        counts.add(len(scores.get("other_frame", [])))
    assert len(counts) > 1, counts


def test_an_empty_heldout_split_is_refused_naming_it(model_dir, reference):
    flt = setup_filter(model_dir, reference).filter
    with pytest.raises(PrivacyError, match=r"ref\d*.*no clips in the held-out split 'EXTRA'"):
        run_audit(FilterSetup(flt, {}, {}, True), reference, heldout_split="EXTRA")


def test_training_frames_of_another_shape_are_refused(model_dir, reference, tmp_path):
    flt = setup_filter(model_dir, reference).filter
    other = write_random_latents(tmp_path / "other", SPLITS, frames=2, shape=(4, 7, 7))
    with pytest.raises(FrameShapeError, match=r"train_0\.safetensors.*\(4, 7, 7\).*\(4, 6, 6\)"):
        run_audit(FilterSetup(flt, {}, {}, True), other, num_planted=2)


def test_matched_gallery_is_the_whole_gallery_when_test_outnumbers_it(model_dir, tmp_path):
    """3 TRAIN and 6 TEST clips: the matched gallery can hold no more than the 3 TRAIN frames,
    so it flags what the whole gallery flags."""
    ref = write_random_latents(tmp_path / "r", {"TRAIN": 3, "VAL": 6, "TEST": 6}, frames=2)
    flt = setup_filter(model_dir, ref).filter
    flt.calibration = dataclasses.replace(flt.calibration, tau=-1.0)  # every frame flagged
    audit, scores = run_audit(FilterSetup(flt, {}, {}, True), ref, num_planted=2)
    neg = audit["negative_control"]
    assert neg["gallery_frames"] == 3 and neg["calibration_test_frames"] == 6
    m = neg["matched_gallery"]
    assert m["gallery_frames"] == 3 and m["flagged"] == neg["flagged"] == 6
    assert m["fraction_flagged"] == neg["fraction_flagged"] == 1.0
