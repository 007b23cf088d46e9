"""Metrics, correlation, τ calibration (vs the reference's brute-force computation), and the
filter's controls on phantom latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from privacy.phantom_latents import write_phantom_latents

import echofast.privacy.filter as flt_mod
from echofast.privacy import (
    PrivacyFilter,
    ReIdentificationModel,
    bootstrap_auc,
    calibrate,
    max_correlation,
    roc_auc,
    unit_rows,
)
from echofast.privacy.audit import run_audit
from echofast.privacy.metrics import weighted_auc, wilson_interval
from echofast.privacy.report import FilterSetup, setup_filter


def _brute_auc(y, s) -> float:
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 301)
    s = np.round(rng.normal(size=301) + y, 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)
    idx = rng.integers(0, 301, (20, 301))
    counts = np.stack([np.bincount(i, minlength=301) for i in idx])
    got = weighted_auc(y, s, counts)
    want = [_brute_auc(y[i], s[i]) for i in idx]
    assert np.allclose(got, want, atol=1e-12)
    r = bootstrap_auc(y, s, n_bootstrap=2000, seed=1)
    assert r.ci_low < r.auc < r.ci_high and r.n_bootstrap_used == 2000
    assert r == bootstrap_auc(y, s, n_bootstrap=2000, seed=1)
    lo, hi = wilson_interval(5, 100)
    assert lo < 0.05 < hi


def test_max_correlation_and_tau_match_the_reference_computation(monkeypatch):
    """The reference: torch.corrcoef of the stacked embeddings, each TRAIN row's max over the
    TEST columns, numpy percentile. Small chunk sizes exercise the chunking and padding."""
    monkeypatch.setattr(flt_mod, "QUERY_CHUNK", 7)
    monkeypatch.setattr(flt_mod, "GALLERY_CHUNK", 11)
    g = torch.Generator().manual_seed(0)
    train = torch.sigmoid(torch.randn(53, 32, generator=g))
    test = torch.sigmoid(torch.randn(29, 32, generator=g) + 0.3 * train[:29])
    corr = np.corrcoef(torch.cat([train, test]).double().numpy())[:53, 53:]
    want_v, want_i = corr.max(axis=1), corr.argmax(axis=1)
    v, i = max_correlation(unit_rows(train), unit_rows(test))
    assert np.allclose(v.numpy(), want_v, atol=2e-6)
    assert (i.numpy() == want_i).all()
    cal = calibrate(unit_rows(train), unit_rows(test), 95)
    assert cal.tau == pytest.approx(np.percentile(want_v, 95), abs=2e-6)
    # a query's result does not depend on the other queries
    v5, _ = max_correlation(unit_rows(train[5:6]), unit_rows(test))
    assert torch.equal(v5, v[5:6])


@pytest.fixture(scope="module")
def trained_filter(trained_reid, phantom_latents):
    summary, folder = trained_reid
    return setup_filter(folder, phantom_latents, frame_step=4, auc_threshold=0.7)


def test_reid_training_is_well_above_chance(trained_reid):
    """60 epochs of the tiny ResNet (width 8) on 48 phantom clips (seed 42, one CPU thread), test
    on 24 unseen clips (96 pairs; chance = 0.5): AUC 0.82 (bootstrap 95% CI 0.73-0.91); seeds 1-4
    gave 0.72-0.88 (torch 2.13.0 CPU). Required: AUC >= 0.7 and a CI lower bound above 0.6."""
    summary, folder = trained_reid
    assert summary["test_auc"] >= 0.7 and summary["ci"][0] > 0.6, summary
    evaluation = (folder / "evaluation.json").read_text()
    assert '"auc"' in evaluation and '"ci_low"' in evaluation


def test_planted_copies(trained_filter, phantom_latents):
    """Every planted exact copy is caught (max correlation 1 to its own source frame); the
    other kinds are measured (values stated in the report)."""
    setup = trained_filter
    audit, scores = run_audit(setup, phantom_latents, num_planted=60, strengths=(0.1, 0.5))
    exact = audit["positive_control"]["exact"]
    assert exact["caught"] == exact["planted"] == 60
    assert exact["nearest_is_source"] == 1.0
    assert (scores["exact"] > 1 - 1e-5).all()
    pc = audit["positive_control"]
    assert set(pc) == {
        "exact",
        "shift",
        "brightness",
        "noise",
        "renoise_0.1",
        "renoise_0.5",
        "other_frame",
    }
    assert all(v["planted"] == 60 and 0 <= v["fraction_caught"] <= 1 for v in pc.values())
    assert "Gaussian-prior" in audit["denoiser"]


def test_heldout_frames_flagged_at_the_calibrated_rate(tmp_path_factory, vae_dir):
    """200 TRAIN, 200 VAL (held out), 100 TEST phantom clips, frame 0 each. Against a gallery as
    large as the TEST calibration set (the audit's matched gallery: 100 random TRAIN frames),
    VAL frames are flagged at 100 - 95 = 5 % within 3 standard errors (binomial error of the
    held-out count and of the calibration quantile); against the whole 2x larger gallery more
    are flagged (larger maxima), as the audit's note says."""
    root = write_phantom_latents(
        tmp_path_factory.mktemp("neg"), vae_dir, (200, 200, 100), frames=2, seed=7
    )
    torch.manual_seed(0)
    model = ReIdentificationModel(
        layers=(1, 1, 1, 1), width=8, n_features=32, normalization="frame"
    )
    flt = PrivacyFilter.from_reference(model, root, percentile=95, frame_step=0)
    audit, _ = run_audit(FilterSetup(flt, {}, {}, True), root, num_planted=10, strengths=(0.5,))
    neg = audit["negative_control"]
    assert neg["frames"] == 200 and neg["gallery_frames"] == 200
    assert neg["calibration_test_frames"] == neg["matched_gallery"]["gallery_frames"] == 100
    p, n = 0.05, 200
    se = (p * (1 - p) * (1 / n + 1 / n)) ** 0.5
    assert abs(neg["matched_gallery"]["fraction_flagged"] - p) <= 3 * se, neg
    assert neg["fraction_flagged"] >= neg["matched_gallery"]["fraction_flagged"]
    assert audit["positive_control"]["exact"]["fraction_caught"] == 1.0


def test_a_score_equal_to_tau_is_dropped(phantom_latents):
    """The rule (spec "Privacy filter", filter.py's docstring): a candidate is kept only if its
    max correlation is below τ, so one that scores exactly τ is dropped. An untrained tiny model
    (any model serves: τ is set to a candidate's own score), 8 VAL clips as candidates."""
    import dataclasses

    from echofast.data.datasets import load_latents, read_latent_records

    torch.manual_seed(0)
    model = ReIdentificationModel(
        layers=(1, 1, 1, 1), width=8, n_features=32, normalization="frame"
    )
    flt = PrivacyFilter.from_reference(model, phantom_latents, frame_step=0)
    records = read_latent_records(phantom_latents, "VAL")[:8]
    clips = [load_latents(r.path)[0] for r in records]
    names = [r.name for r in records]
    scores = flt.score_clips(clips, names).max_corr
    assert len(np.unique(scores)) == len(scores)
    for k in (int(np.argsort(scores)[len(scores) // 2]), int(np.argmin(scores))):
        tau = float(scores[k])  # the float64 of the fp32 score, as score_clips compares it
        flt.calibration = dataclasses.replace(flt.calibration, tau=tau)
        tied = flt.score_clips(clips, names)
        np.testing.assert_array_equal(tied.max_corr, scores)
        assert tied.max_corr[k] == flt.tau and not tied.kept[k]
        assert tied.kept.tolist() == [bool(v < tau) for v in scores]


def test_fail_closed(trained_reid, phantom_latents, tmp_path):
    """A model below the AUC threshold is refused unless weak privacy is allowed, and then the
    report says so; a model folder without evaluation.json is evaluated on the TEST split."""
    import json
    import shutil

    from echofast.privacy import PrivacyError
    from echofast.privacy.report import build_report

    summary, folder = trained_reid
    with pytest.raises(PrivacyError, match=r"test AUC 0\.\d+ is below the threshold 0\.99"):
        setup_filter(folder, phantom_latents, auc_threshold=0.99)
    weak = setup_filter(folder, phantom_latents, auc_threshold=0.99, allow_weak_privacy=True)
    assert not weak.filtered and weak.model_info["allow_weak_privacy"]
    s = weak.filter.score_clips([torch.zeros(4, 6, 6) + torch.arange(36.0).reshape(6, 6)], ["c"])
    report = build_report(weak, candidate_scores=s, counts={"candidates": 1}, seeds={})
    assert report["weak_model"] and "WEAK" in report["status"]
    bare = tmp_path / "reidentification_bare"
    shutil.copytree(folder, bare)
    (bare / "evaluation.json").unlink()
    (bare / "reidentification_phantom_best_network.safetensors").rename(
        bare / "reidentification_bare_best_network.safetensors"
    )
    computed = setup_filter(bare, phantom_latents, auc_threshold=0.5)
    assert "computed on the reference latents' TEST split" in computed.model_info["auc_source"]
    assert 0.5 <= computed.model_info["test_auc"]["auc"] <= 1
    saved = json.loads((folder / "evaluation.json").read_text())["test_auc"]["auc"]
    assert saved == summary["test_auc"]


def test_an_evaluation_of_another_dataset_is_not_trusted(trained_reid, phantom_latents, tmp_path):
    """evaluation.json records the digest of the dataset the model was trained and tested on;
    given another reference, the AUC gate uses the AUC measured on that reference's TEST split."""
    import csv
    import json
    import shutil

    from echofast.privacy.filter import reference_digest

    _, folder = trained_reid
    saved = json.loads((folder / "evaluation.json").read_text())
    assert saved["reference_digest"] == reference_digest(phantom_latents)
    same = setup_filter(folder, phantom_latents, auc_threshold=0.5)
    assert same.model_info["auc_source"] == "evaluation.json saved with the weights"

    other = tmp_path / "other"
    shutil.copytree(phantom_latents, other)
    with open(other / "FileList.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = [r for r in rows if r["Split"] != "TRAIN"] + [r for r in rows if r["Split"] == "TRAIN"][
        1:
    ]
    with open(other / "FileList.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    computed = setup_filter(folder, other, auc_threshold=0.5)
    source = computed.model_info["auc_source"]
    assert source.startswith("computed on the reference latents' TEST split"), source
    assert "evaluation.json was measured on another dataset (reference_digest " in source
    assert saved["reference_digest"][:16] in source and reference_digest(other)[:16] in source
    assert computed.model_info["test_auc"] != saved["test_auc"]


def _candidates(root, phantom_latents, n=12):
    """Candidate folder: 8 fresh phantom clips (as images) + exact copies of 4 TRAIN frame 0s."""
    from safetensors.torch import save_file

    from echofast.data.datasets import load_latents, read_latent_records

    (root / "Latents").mkdir(parents=True)
    train = read_latent_records(phantom_latents, "TRAIN")
    for k, r in enumerate(train[:4]):
        save_file(
            {"latents": load_latents(r.path)[0][0].contiguous()},
            root / "Latents" / f"copy_{k}.safetensors",
        )
    for k, r in enumerate(read_latent_records(phantom_latents, "VAL")[: n - 4]):
        save_file(
            {"latents": load_latents(r.path)[0][3].contiguous()},
            root / "Latents" / f"new_{k}.safetensors",
        )
    return root


def test_privacy_filter_cli_report_is_consistent_and_reproducible(
    trained_reid, phantom_latents, tmp_path
):
    import json

    from echofast.cli import main

    _, folder = trained_reid
    cands = _candidates(tmp_path / "cands", phantom_latents)
    args = [
        "privacy-filter",
        "--model",
        str(folder),
        "--reference",
        str(phantom_latents),
        "--candidates",
        str(cands),
        "--no-progress",
        "--device",
        "cpu",
        "--frame-step",
        "4",
        "--auc-threshold",
        "0.7",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    for name in ("privacy_report.json", "privacy_report.png", "privacy_scores.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert main([*args, "--out", str(tmp_path / "a")]) == 1  # refuses a non-empty folder
    r = json.loads((tmp_path / "a" / "privacy_report.json").read_text())
    c, h, t = r["counts"], r["histograms"], r["threshold"]
    assert r["privacy_filtered"] and r["status"] == "privacy-filtered"
    assert c["candidates"] == 12 == c["kept"] + c["dropped"]
    assert sum(h["train_synthetic"]) == 12
    assert sum(h["train_test"]) == r["reference"]["train_frames"] == 48 * 2
    assert len(h["bin_edges"]) == len(h["train_test"]) + 1
    kept = sorted(p.name for p in (tmp_path / "a" / "Latents").iterdir())
    assert len(kept) == c["kept"] and not any(k.startswith("copy_") for k in kept)
    closest = r["closest_synthetic"]
    assert [e["max_correlation"] for e in closest] == sorted(
        (e["max_correlation"] for e in closest), reverse=True
    )
    assert {e["candidate"] for e in closest[:4]} == {f"copy_{k}" for k in range(4)}
    assert all((e["max_correlation"] >= t["tau"]) != e["kept"] for e in closest)
    m = r["reidentification_model"]
    assert (
        m["passed_threshold"]
        and len(m["weights_sha256"]) == 64
        and m["test_auc"]["ci_low"] <= m["test_auc"]["auc"]
    )
    assert 0 < t["tau"] < 1 and t["percentile"] == 95 and t["normalization"] == "frame"
    assert (tmp_path / "a" / "privacy_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_privacy_audit_cli(trained_reid, phantom_latents, tmp_path):
    import json

    from echofast.cli import main

    _, folder = trained_reid
    rc = main(
        [
            "privacy-audit",
            "--model",
            str(folder),
            "--reference",
            str(phantom_latents),
            "--out",
            str(tmp_path / "audit"),
            "--num-planted",
            "20",
            "--strengths",
            "0.25",
            "--no-progress",
            "--device",
            "cpu",
            "--auc-threshold",
            "0.7",
        ]
    )
    audit = json.loads((tmp_path / "audit" / "privacy_audit.json").read_text())
    assert rc == (0 if audit["light_copies_meet_goal"] else 1)
    assert audit["positive_control"]["exact"]["fraction_caught"] == 1.0
    assert audit["negative_control"]["expected_fraction"] == pytest.approx(0.05)
    assert (tmp_path / "audit" / "privacy_audit.png").is_file()
