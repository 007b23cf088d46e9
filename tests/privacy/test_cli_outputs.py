"""What ``echofast privacy-filter`` and ``echofast privacy-audit`` write, checked against the
library and an independent Pearson computation: every option reaches the filter, the scores CSV,
the kept latents and the filtered FileList.csv agree with τ, and the audit's counts follow its
scores. Tiny random latents and an untrained model: fast."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from privacy.phantom_latents import write_latents

import echofast.privacy.audit as audit_mod
from echofast.cli import main
from echofast.data import write_filelist
from echofast.privacy import PrivacyFilter, setup_filter
from echofast.privacy.audit import run_audit
from echofast.privacy.model import normalize_clip
from echofast.privacy.report import FilterSetup
from echofast.rng import sample_seed

SHAPE = (4, 6, 6)
SPLITS = {"TRAIN": 7, "VAL": 5, "TEST": 4}
FRAMES = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    g = torch.Generator().manual_seed(1)
    rows = []
    for split, n in SPLITS.items():
        for i in range(n):
            name = f"{split.lower()}_{i}"
            clip = torch.randn(FRAMES, *SHAPE, generator=g)
            write_latents(root / "Latents" / f"{name}.safetensors", clip)
            rows.append({"FileName": name, "EF": 50, "FPS": 2, "NumberOfFrames": FRAMES,
                         "Split": split})  # fmt: skip
    write_filelist(root, rows)
    return root


def _common(model_dir: Path, reference: Path, out: Path) -> list[str]:
    return ["--model", str(model_dir), "--reference", str(reference), "--out", str(out),
            "--no-progress", "--device", "cpu"]  # fmt: skip


def _candidates(root: Path, reference: Path) -> Path:
    """Copies of 3 TRAIN clips (with their frames as they are) and 9 fresh random clips, with a
    FileList.csv that names every candidate (with the extension, as EchoNet's does)."""
    g = torch.Generator().manual_seed(2)
    from echofast.data.datasets import load_latents

    names = []
    for k in range(3):
        clip = load_latents(reference / "Latents" / f"train_{k}.safetensors")[0]
        write_latents(root / "Latents" / f"copy_{k}.safetensors", clip)
        names.append(f"copy_{k}")
    for k in range(9):
        clip = torch.randn(FRAMES, *SHAPE, generator=g)
        write_latents(root / "Latents" / f"new_{k}.safetensors", clip)
        names.append(f"new_{k}")
    write_filelist(root, [{"FileName": f"{n}.avi", "EF": i, "Split": "TRAIN"}
                          for i, n in enumerate(names)])  # fmt: skip
    return root


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_filter_cli_outputs_agree_with_tau(model_dir, reference, tmp_path, capsys):
    cands = _candidates(tmp_path / "cands", reference)
    out = tmp_path / "out"
    args = ["privacy-filter", *_common(model_dir, reference, out), "--candidates", str(cands),
            "--percentile", "99", "--frame-step", "2", "--candidate-frame-step", "3"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "privacy_report.json").read_text())
    want = setup_filter(model_dir, reference, percentile=99, frame_step=2).filter
    tau = report["threshold"]["tau"]
    assert tau == want.tau and report["threshold"]["percentile"] == 99
    assert report["reference"]["frame_step"] == 2
    assert report["reference"]["train_frames"] == SPLITS["TRAIN"] * 2  # frames 0 and 2
    assert report["reference"]["test_frames"] == SPLITS["TEST"] * 2

    rows = {r["candidate"]: r for r in _read_csv(out / "privacy_scores.csv")}
    assert len(rows) == 12
    kept = {n for n, r in rows.items() if r["kept"] == "1"}
    for r in rows.values():
        assert r["kept"] in ("0", "1")
        assert (r["kept"] == "1") == (float(r["max_correlation"]) < tau), r
    for k in range(3):  # an exact copy matches its own source frame
        r = rows[f"copy_{k}"]
        assert r["kept"] == "0" and float(r["max_correlation"]) > 1 - 1e-5
        assert r["nearest_real_clip"] == f"train_{k}"
        assert r["nearest_real_frame"] == r["candidate_frame"] == "0"
    assert 0 < len(kept) < 12, "the test needs kept and dropped candidates"
    c = report["counts"]
    assert (c["candidates"], c["kept"], c["dropped"]) == (12, len(kept), 12 - len(kept))
    assert sorted(p.stem for p in (out / "Latents").iterdir()) == sorted(kept)
    listed = [r["FileName"] for r in _read_csv(out / "FileList.csv")]
    assert sorted(listed) == sorted(f"{n}.avi" for n in kept)
    assert f"kept {len(kept)} of 12" in capsys.readouterr().out


def test_filter_cli_refuses_a_zero_candidate_frame_step(model_dir, reference, tmp_path, capsys):
    args = ["privacy-filter", *_common(model_dir, reference, tmp_path / "o"), "--candidates",
            str(reference), "--candidate-frame-step", "0"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "--candidate-frame-step" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _pearson_max(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Each row of q: the max Pearson correlation with any row of g (NumPy corrcoef)."""
    c = np.corrcoef(np.concatenate([q, g]).astype(np.float64))[: len(q), len(q) :]
    return c.max(1)


def test_audit_negative_control_against_independent_correlations(model_dir, reference):
    """Held-out VAL frames (every frame: frame step 1) against the TRAIN gallery and against the
    seeded matched subset as large as the TEST set, by NumPy's corrcoef of the embeddings."""
    import dataclasses

    from echofast.data.datasets import load_latents

    flt = setup_filter(model_dir, reference, percentile=50, frame_step=1).filter
    setup = FilterSetup(flt, {}, {}, True)
    audit, scores = run_audit(setup, reference, num_planted=4, strengths=(0.5,), seed=0)

    def embed(split):
        clips = [load_latents(reference / "Latents" / f"{split}_{i}.safetensors")[0]
                 for i in range(SPLITS[split.upper()])]  # fmt: skip
        frames = torch.cat([normalize_clip(c, "frame") for c in clips])
        return flt.model.embed_frames(frames).double().numpy()

    train, held = embed("train"), embed("val")
    v = _pearson_max(held, train)
    np.testing.assert_allclose(scores["heldout"], v, atol=1e-5)
    tau = flt.tau
    assert not np.any(np.abs(v - tau) < 1e-5)  # no near-ties: the count is unambiguous
    neg = audit["negative_control"]
    n = SPLITS["VAL"] * FRAMES
    assert neg["split"] == "VAL" and neg["frames"] == n and neg["gallery_frames"] == len(train)
    assert neg["flagged"] == int((v >= tau).sum())
    assert neg["fraction_flagged"] == pytest.approx(neg["flagged"] / n)
    assert neg["expected_fraction"] == pytest.approx(0.5)
    # matched gallery: a seeded subset of the TRAIN frames as large as the TEST set
    m = neg["matched_gallery"]
    size = SPLITS["TEST"] * FRAMES
    assert m["gallery_frames"] == size == neg["calibration_test_frames"] < len(train)
    g = torch.Generator().manual_seed(sample_seed(0, 0, "audit-matched-gallery"))
    rows = torch.randperm(len(train), generator=g)[:size].sort().values.numpy()
    vm = _pearson_max(held, train[rows])
    assert not np.any(np.abs(vm - tau) < 1e-5)
    assert m["flagged"] == int((vm >= tau).sum()) < neg["flagged"]  # smaller gallery, fewer
    assert m["fraction_flagged"] == pytest.approx(m["flagged"] / n)
    assert m["wilson95"][0] <= m["fraction_flagged"] <= m["wilson95"][1]
    # a held-out frame scoring exactly tau is flagged (the filter would drop it)
    tie = float(np.sort(scores["heldout"])[n // 2])
    flt.calibration = dataclasses.replace(flt.calibration, tau=tie)
    audit, scores = run_audit(setup, reference, num_planted=4, strengths=(0.5,), seed=0)
    assert audit["negative_control"]["flagged"] == int((scores["heldout"] >= tie).sum())
    assert audit["negative_control"]["flagged"] == n - n // 2


def test_a_model_exactly_at_the_auc_threshold_passes(model_dir, reference):
    """Fail closed below the threshold only: the saved test AUC is 0.95."""
    from echofast.privacy import PrivacyError

    assert setup_filter(model_dir, reference, auc_threshold=0.95).filtered
    with pytest.raises(PrivacyError, match="below the threshold"):
        setup_filter(model_dir, reference, auc_threshold=0.9500001)
    weak = setup_filter(model_dir, reference, auc_threshold=0.96, allow_weak_privacy=True)
    assert not weak.filtered and weak.model_info["allow_weak_privacy"]


def test_audit_positive_control_counts_follow_the_scores(model_dir, reference):
    """caught = planted copies whose max correlation is >= τ (a copy scoring exactly τ is caught,
    as the filter drops it); nearest_is_source: the fraction matched to its own clip."""
    import dataclasses

    flt = setup_filter(model_dir, reference).filter
    setup = FilterSetup(flt, {}, {}, True)
    _, scores = run_audit(setup, reference, num_planted=6, strengths=(0.5,), seed=1)
    for kind in ("noise", "renoise_0.5"):
        tau = float(np.sort(scores[kind])[2])  # a planted score: a tie at tau
        flt.calibration = dataclasses.replace(flt.calibration, tau=tau)
        audit, again = run_audit(setup, reference, num_planted=6, strengths=(0.5,), seed=1)
        for k, pc in audit["positive_control"].items():
            s = again[k]
            assert pc["caught"] == int((s >= tau).sum()), k
            assert pc["fraction_caught"] == pytest.approx(pc["caught"] / pc["planted"])
        assert audit["positive_control"][kind]["caught"] == 4
        light = [audit["positive_control"][k]["meets_goal"] for k in audit_mod.LIGHT_KINDS]
        assert audit["light_copies_meet_goal"] == all(light)
    exact = audit["positive_control"]["exact"]
    assert exact["nearest_is_source"] == 1.0 and exact["planted"] == 6
    assert audit["num_planted"] == 6 and audit["seed"] == 1


def test_other_frames_are_not_reference_frames(model_dir, reference):
    """``other_frame``: a frame of the same TRAIN clip that the gallery does not hold."""
    flt = setup_filter(model_dir, reference, frame_step=2).filter  # gallery: frames 0 and 2
    _, scores = run_audit(FilterSetup(flt, {}, {}, True), reference, num_planted=5, seed=0)
    # frame 1 is never an exact gallery frame: its max correlation stays below an exact copy's
    assert (scores["exact"] > 1 - 1e-5).all()
    assert (scores["other_frame"] < 1 - 1e-3).all() and len(scores["other_frame"]) == 5


def test_audit_cli_passes_its_options_and_fails_below_the_goal(
    model_dir, reference, tmp_path, monkeypatch, capsys
):
    import echofast.figures

    titles = []
    real_png = echofast.figures.histogram_png

    def histogram_png(series, edges, *, tau, title):
        titles.append(list(title))
        return real_png(series, edges, tau=tau, title=title)

    monkeypatch.setattr(echofast.figures, "histogram_png", histogram_png)
    out = tmp_path / "a"
    args = ["privacy-audit", *_common(model_dir, reference, out), "--num-planted", "5",
            "--strengths", "0.5", "--heldout-split", "val", "--seed", "11",
            "--percentile", "90", "--frame-step", "2", "--shift-tolerance", "1",
            "--normalization", "channel"]  # fmt: skip
    rc = main(args)
    text = (out / "privacy_audit.json").read_text()
    audit = json.loads(text)
    assert text == json.dumps(audit, indent=2, sort_keys=True) + "\n"  # keys sorted
    assert rc == (0 if audit["light_copies_meet_goal"] else 1)
    neg = audit["negative_control"]
    assert neg["split"] == "val" and neg["frames"] == SPLITS["VAL"] * 2
    assert neg["expected_fraction"] == pytest.approx(0.1)
    assert audit["seed"] == 11 and audit["num_planted"] == 5
    assert audit["threshold"]["percentile"] == 90 and audit["renoise_strengths"] == [0.5]
    # what decides the scores is recorded, as in privacy_report.json
    assert audit["threshold"]["shift_tolerance"] == 1
    assert audit["threshold"]["normalization"] == "channel"
    csv_rows = _read_csv(out / "privacy_audit_scores.csv")
    assert sum(r["kind"] == "heldout" for r in csv_rows) == neg["frames"]
    # the figure states the verdict and the calibrated (matched-gallery) rate beside the full one
    m = neg["matched_gallery"]
    verdict = "MEET" if audit["light_copies_meet_goal"] else "DO NOT MEET"
    assert titles[-1][1] == f"LIGHT COPIES {verdict} THE 99% GOAL"
    assert titles[-1][2] == (
        f"HELD-OUT FLAGGED {neg['fraction_flagged'] * 100:.1f}% BY THE "
        f"{SPLITS['TRAIN'] * 2}-FRAME GALLERY, {m['fraction_flagged'] * 100:.1f}% BY "
        f"{SPLITS['TEST'] * 2} FRAMES (EXPECTED 10.0%)"
    )
    # a goal nobody meets: the audit fails (exit 1) but writes its results
    monkeypatch.setattr(audit_mod, "GOAL", 1.01)
    out2 = tmp_path / "b"
    assert main([*args[:-6], "--out", str(out2)]) == 1
    audit = json.loads((out2 / "privacy_audit.json").read_text())
    assert audit["light_copies_meet_goal"] is False
    assert "BELOW goal" in capsys.readouterr().out
    assert titles[-1][1] == "LIGHT COPIES DO NOT MEET THE 101% GOAL"


def test_untrained_filter_counts_match_a_direct_score(model_dir, reference):
    """The filter used by the audit scores held-out frames as the library does (frame_step)."""
    flt = setup_filter(model_dir, reference, frame_step=1).filter
    assert isinstance(flt, PrivacyFilter)
    audit, scores = run_audit(FilterSetup(flt, {}, {}, True), reference, num_planted=3)
    assert audit["negative_control"]["frames"] == SPLITS["VAL"] * FRAMES
    assert len(scores["heldout"]) == SPLITS["VAL"] * FRAMES


def test_a_cache_of_another_shift_tolerance_is_recalibrated(model_dir, reference, tmp_path):
    cache = tmp_path / "filter.safetensors"
    exact = setup_filter(model_dir, reference, cache=cache)
    assert cache.is_file() and exact.filter.shift_tolerance == 0
    moved = setup_filter(model_dir, reference, cache=cache, shift_tolerance=1)
    assert moved.filter.shift_tolerance == 1
    want = setup_filter(model_dir, reference, shift_tolerance=1).filter
    assert moved.filter.tau == want.tau != exact.filter.tau
