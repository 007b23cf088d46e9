"""``echofast privacy-filter`` and ``privacy-audit`` options: the documented defaults and every
option reach the filter set-up, the scoring and the audit; bad values are refused (exit 2)
before any work; an ``--out`` that is a file is refused; a failure while the results are
written leaves neither ``--out`` nor a staging folder; the filtered FileList keeps rows named
without an extension; the scores CSV holds the exact scores."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from privacy.phantom_latents import write_latents, write_random_latents

import echofast.figures
import echofast.privacy.audit as audit_mod
import echofast.privacy.cli as privacy_cli
from echofast.cli import main
from echofast.data import write_filelist

SPLITS = {"TRAIN": 4, "VAL": 2, "TEST": 3}


class Stop(Exception):
    """Raised by the stand-ins once they have recorded their arguments."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return write_random_latents(tmp_path_factory.mktemp("ref"), SPLITS, frames=2, seed=6)


def _required(model_dir: Path, reference: Path, out: Path) -> list[str]:
    return ["--model", str(model_dir), "--reference", str(reference), "--out", str(out)]


def _record(monkeypatch) -> dict:
    """Stand-ins for the filter set-up, its scoring and the audit that record their arguments;
    the scoring and the audit stop the command."""
    seen: dict = {}

    def score_clips(clips, names, **kwargs):
        seen["score"] = kwargs
        raise Stop

    def setup_filter(model, reference, **kwargs):
        seen["setup"] = kwargs
        flt = SimpleNamespace(check_clips=lambda clips, paths: None, score_clips=score_clips)
        return SimpleNamespace(filter=flt)

    def run_audit(setup, reference, **kwargs):
        seen["audit"] = kwargs
        raise Stop

    monkeypatch.setattr(privacy_cli, "setup_filter", setup_filter)
    monkeypatch.setattr(audit_mod, "run_audit", run_audit)
    return seen


SETUP_DEFAULTS = dict(
    percentile=95.0,
    frame_step=0,
    auc_threshold=0.9,
    allow_weak_privacy=False,
    normalization=None,
    allow_pickle=False,
    shift_tolerance=0,
    progress=True,
)
SETUP_GIVEN = ["--percentile", "80", "--frame-step", "3", "--auc-threshold", "0.7",
               "--allow-weak-privacy", "--normalization", "clip", "--allow-pickle",
               "--shift-tolerance", "1", "--no-progress", "--device", "cpu"]  # fmt: skip
SETUP_FROM_GIVEN = dict(
    percentile=80.0,
    frame_step=3,
    auc_threshold=0.7,
    allow_weak_privacy=True,
    normalization="clip",
    allow_pickle=True,
    shift_tolerance=1,
    progress=False,
    device="cpu",
)


def test_filter_defaults_and_options_reach_the_set_up_and_scoring(
    model_dir, reference, tmp_path, monkeypatch
):
    seen = _record(monkeypatch)
    args = ["privacy-filter", *_required(model_dir, reference, tmp_path / "o")]
    with pytest.raises(Stop):
        main([*args, "--candidates", str(reference)])
    assert {k: seen["setup"][k] for k in SETUP_DEFAULTS} == SETUP_DEFAULTS
    assert seen["score"] == {"frame_step": 8}
    with pytest.raises(Stop):
        main([*args, "--candidates", str(reference), *SETUP_GIVEN, "--candidate-frame-step", "2"])
    assert {k: seen["setup"][k] for k in SETUP_FROM_GIVEN} == SETUP_FROM_GIVEN
    assert seen["score"] == {"frame_step": 2}
    assert not (tmp_path / "o").exists()


def test_audit_defaults_and_options_reach_the_set_up_and_the_audit(
    model_dir, reference, tmp_path, monkeypatch
):
    seen = _record(monkeypatch)
    args = ["privacy-audit", *_required(model_dir, reference, tmp_path / "o")]
    with pytest.raises(Stop):
        main(args)
    assert {k: seen["setup"][k] for k in SETUP_DEFAULTS} == SETUP_DEFAULTS
    assert seen["audit"] == dict(num_planted=200, strengths=(0.1, 0.25, 0.5), heldout_split="VAL",
                                 lidm=None, dataset="dynamic", seed=0)  # fmt: skip
    given = ["--num-planted", "7", "--strengths", "0.2,1", "--lidm", "weights",
             "--dataset", "ped_a4c", "--heldout-split", "val", "--seed", "9"]  # fmt: skip
    with pytest.raises(Stop):
        main([*args, *SETUP_GIVEN, *given])
    assert {k: seen["setup"][k] for k in SETUP_FROM_GIVEN} == SETUP_FROM_GIVEN
    assert seen["audit"] == dict(num_planted=7, strengths=(0.2, 1.0), heldout_split="val",
                                 lidm="weights", dataset="ped_a4c", seed=9)  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("command", "bad", "message"),
    [
        ("privacy-filter", ["--frame-step", "-1"], "--frame-step must be >= 0"),
        ("privacy-filter", ["--candidate-frame-step", "-1"], "--candidate-frame-step must be >= 1"),
        ("privacy-audit", ["--num-planted", "0"], "--num-planted must be >= 1"),
        ("privacy-audit", ["--strengths", "0.5,0"], r"strengths in \(0, 1\]"),
        ("privacy-audit", ["--strengths", "1.01"], r"strengths in \(0, 1\]"),
        ("privacy-audit", ["--strengths", "0.1,x"], r"--strengths: expected comma-separated"),
        ("privacy-filter", ["--percentile", "100"], r"--percentile must be in \(0, 100\), got 100"),
        ("privacy-audit", ["--percentile", "0"], r"--percentile must be in \(0, 100\), got 0"),
        ("privacy-audit", ["--percentile", "nan"], r"--percentile must be in \(0, 100\)"),
        ("privacy-filter", ["--auc-threshold", "1.5"], r"--auc-threshold must be in \[0, 1\]"),
        ("privacy-audit", ["--frame-step", "-2"], "--frame-step must be >= 0, got -2"),
    ],
)
def test_bad_values_are_refused_before_any_work(
    model_dir, reference, tmp_path, monkeypatch, capsys, command, bad, message
):
    seen = _record(monkeypatch)
    extra = ["--candidates", str(reference)] if command == "privacy-filter" else []
    with pytest.raises(SystemExit) as exc:
        main([command, *_required(model_dir, reference, tmp_path / "o"), *extra, *bad])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert seen == {} and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ("TRAIN", "held-out split 'TRAIN' is not held out"),
        ("test", "held-out split 'test' is not held out"),
        ("ALL", "held-out split 'ALL' is not held out"),
        ("EXTRA", "no clips in the held-out split 'EXTRA'"),
    ],
)
def test_a_heldout_split_the_filter_has_seen_or_without_clips_is_refused_before_any_work(
    model_dir, reference, tmp_path, monkeypatch, capsys, split, message
):
    """The negative control scores frames the filter has not seen: TRAIN is its gallery (every
    frame matches itself) and TEST calibrates tau, so neither is a held-out split."""
    seen = _record(monkeypatch)
    args = ["privacy-audit", *_required(model_dir, reference, tmp_path / "o")]
    assert main([*args, "--heldout-split", split]) == 1
    assert message in capsys.readouterr().err
    assert seen == {} and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["privacy-filter", "privacy-audit"])
def test_an_out_that_is_a_file_is_refused(model_dir, reference, tmp_path, monkeypatch, command):
    seen = _record(monkeypatch)
    out = tmp_path / "results"
    out.write_text("mine")
    extra = ["--candidates", str(reference)] if command == "privacy-filter" else []
    with pytest.raises(privacy_cli.OutputConflict, match="results exists and is not empty"):
        getattr(privacy_cli, f"main_{command.replace('-', '_')}")(
            [*_required(model_dir, reference, out), *extra]
        )
    assert out.read_text() == "mine" and seen == {}


def _fail(*args, **kwargs):
    raise OSError("disk full")


@pytest.mark.parametrize(
    ("command", "target"),
    [
        ("privacy-filter", (privacy_cli, "write_report")),
        ("privacy-audit", (echofast.figures, "save_png")),
    ],
)
def test_a_failure_while_writing_leaves_no_folder(
    model_dir, reference, tmp_path, monkeypatch, command, target
):
    monkeypatch.setattr(*target, _fail)
    work = tmp_path / "work"
    work.mkdir()
    args = [
        command,
        *_required(model_dir, reference, work / "out"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    if command == "privacy-filter":
        args += ["--candidates", str(reference)]
    else:
        args += ["--num-planted", "2", "--strengths", "0.5"]
    assert main(args) == 1
    assert list(work.iterdir()) == []


def test_filelist_rows_named_without_extension_are_kept_and_scores_are_exact(
    model_dir, reference, tmp_path
):
    """Candidates: an exact copy of a TRAIN clip (dropped) and fresh random clips (kept), listed
    in FileList.csv by bare name (with a dot in it); the scores CSV holds each score exactly (as
    the report's closest candidates do); the report records the candidate frame step."""
    from echofast.data.datasets import load_latents

    cands = tmp_path / "cands"
    clip = load_latents(reference / "Latents" / "train_1.safetensors")[0]
    write_latents(cands / "Latents" / "copy.safetensors", clip)
    g = torch.Generator().manual_seed(8)
    names = ["copy"] + [f"new.{k}" for k in range(5)]  # a dot: the name is no stem
    for n in names[1:]:
        write_latents(cands / "Latents" / f"{n}.safetensors", torch.randn(2, 4, 6, 6, generator=g))
    write_filelist(cands, [{"FileName": n, "EF": i, "Split": "TRAIN"} for i, n in enumerate(names)])
    out = tmp_path / "out"
    args = ["privacy-filter", *_required(model_dir, reference, out), "--candidates", str(cands),
            "--device", "cpu", "--no-progress", "--candidate-frame-step", "1"]  # fmt: skip
    assert main(args) == 0
    with open(out / "privacy_scores.csv", newline="") as fh:
        rows = {r["candidate"]: r for r in csv.DictReader(fh)}
    with open(out / "FileList.csv", newline="") as fh:
        listed = [r["FileName"] for r in csv.DictReader(fh)]
    kept = sorted(n for n, r in rows.items() if r["kept"] == "1")
    assert "copy" not in kept and kept and sorted(listed) == kept
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["candidate_frame_step"] == 1
    for e in report["closest_synthetic"]:
        assert float(rows[e["candidate"]]["max_correlation"]) == e["max_correlation"]
