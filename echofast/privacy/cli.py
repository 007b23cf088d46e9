"""``echofast privacy-filter`` and ``echofast privacy-audit``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import EchofastError
from ..fsutil import atomic_write_text
from .data import check_reference_shift_tolerance
from .report import (
    DEFAULT_AUC_THRESHOLD,
    REPORT_JSON,
    FilterSetup,
    build_report,
    setup_filter,
    write_report,
)


class OutputConflict(EchofastError, RuntimeError):
    """The output folder exists and is not empty."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="re-identification model folder (reidentification_*/)"
    )
    p.add_argument(
        "--reference",
        required=True,
        help="real latent dataset (echofast encode): TRAIN is the gallery, TEST calibrates tau",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--percentile", type=float, default=95.0, help="tau percentile (95)")
    p.add_argument(
        "--frame-step",
        type=int,
        default=0,
        help="reference frames per real clip: 0 = frame 0 only (the reference), k = every k-th",
    )
    p.add_argument(
        "--auc-threshold",
        type=float,
        default=DEFAULT_AUC_THRESHOLD,
        help=f"refuse a model whose re-id test AUC is below this ({DEFAULT_AUC_THRESHOLD})",
    )
    p.add_argument(
        "--allow-weak-privacy",
        action="store_true",
        help="run with a model below the AUC threshold (the report says so)",
    )
    p.add_argument(
        "--normalization",
        choices=["frame", "clip", "channel"],
        help="override the model's input normalisation (default: the model's own)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load the reference's pickled *_best_network.pth (torch.load weights_only=True)",
    )
    p.add_argument(
        "--shift-tolerance",
        type=int,
        default=0,
        metavar="R",
        help="also match frames moved by up to R latent pixels (calibration included); 0 = exact "
        "matching, the reference; at most (min(h, w) - 1) // 2 for h x w latent frames (see "
        "README, Privacy)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")


def _check_common(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse (exit 2) the values of :func:`_common`'s options that the filter set-up would
    refuse only after the reference is embedded."""
    if not 0 < a.percentile < 100:
        p.error(f"--percentile must be in (0, 100), got {a.percentile:g}")
    if not 0 <= a.auc_threshold <= 1:
        p.error(f"--auc-threshold must be in [0, 1], got {a.auc_threshold:g}")
    if a.frame_step < 0:
        p.error(f"--frame-step must be >= 0, got {a.frame_step}")


def _strengths(text: str) -> tuple[float, ...]:
    """``--strengths``: comma-separated numbers."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.1,0.25,0.5, got {text!r}"
        ) from None


def _refuse_conflict(out: Path) -> None:
    """Refuse an ``--out`` that exists and is not an empty folder (checked before the work and
    again when the results are staged)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputConflict(f"{out} exists and is not empty; refusing to write into it")


def _staging(out: Path) -> Path:
    _refuse_conflict(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def _csv(rows: list[list], header: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _check_shift_tolerance(a: argparse.Namespace) -> None:
    """Refuse a ``--shift-tolerance`` that the reference's frame size does not allow, before
    any work (naming the option)."""
    check_reference_shift_tolerance(a.shift_tolerance, a.reference, option="--shift-tolerance")


def _setup(a: argparse.Namespace) -> FilterSetup:
    """The calibrated filter from the options added by :func:`_common`."""
    return setup_filter(
        a.model,
        a.reference,
        percentile=a.percentile,
        frame_step=a.frame_step,
        auc_threshold=a.auc_threshold,
        allow_weak_privacy=a.allow_weak_privacy,
        normalization=a.normalization,
        allow_pickle=a.allow_pickle,
        shift_tolerance=a.shift_tolerance,
        device=a.device,
        progress=not a.no_progress,
    )


def main_privacy_filter(argv: Sequence[str] | None = None) -> int:
    """Filter candidate latents against a real latent dataset."""
    from .data import check_same_encoding, load_candidates

    p = argparse.ArgumentParser(
        prog="echofast privacy-filter",
        description="Keep the candidate latents (images or clips) whose max Pearson correlation "
        "with every real TRAIN reference frame, in the re-identification model's embedding, is "
        "below tau (calibrated on real TRAIN vs TEST). Writes the kept latents, per-candidate "
        "scores and privacy_report.json/.png.",
    )
    _common(p)
    p.add_argument(
        "--candidates",
        required=True,
        help="candidate latents: a folder of .safetensors (Latents/ or flat)",
    )
    p.add_argument(
        "--candidate-frame-step",
        type=int,
        default=8,
        help="frames checked per candidate clip: every k-th (8); a single image is its frame 0",
    )
    a = p.parse_args(list(argv) if argv is not None else None)
    _check_common(p, a)
    if a.candidate_frame_step < 1:
        p.error(f"--candidate-frame-step must be >= 1, got {a.candidate_frame_step}")
    out = Path(a.out)
    _refuse_conflict(out)
    _check_shift_tolerance(a)
    check_same_encoding(a.candidates, a.reference)
    names, paths, clips = load_candidates(a.candidates)
    setup = _setup(a)
    setup.filter.check_clips(clips, paths)
    scores = setup.filter.score_clips(clips, names, frame_step=a.candidate_frame_step)
    files = dict(zip(names, paths))
    tmp = _staging(out)
    try:
        (tmp / "Latents").mkdir()
        kept = [n for n, k in zip(scores.names, scores.kept) if k]
        for n in kept:
            shutil.copyfile(files[n], tmp / "Latents" / files[n].name)
        src_list = Path(a.candidates) / "FileList.csv"
        if src_list.is_file():
            with src_list.open(newline="") as fh:
                reader = csv.DictReader(fh)
                cols = list(reader.fieldnames or [])
                keep = set(kept)
                rows = [
                    r for r in reader if Path(r["FileName"]).stem in keep or r["FileName"] in keep
                ]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(tmp / "FileList.csv", buf.getvalue())
        rows = [
            [n, repr(float(v)), c, int(f), int(cf), int(bool(k))]
            for n, v, c, f, cf, k in zip(
                scores.names,
                scores.max_corr,
                scores.nearest_clip,
                scores.nearest_frame,
                scores.candidate_frame,
                scores.kept,
            )
        ]
        atomic_write_text(
            tmp / "privacy_scores.csv",
            _csv(
                rows,
                [
                    "candidate",
                    "max_correlation",
                    "nearest_real_clip",
                    "nearest_real_frame",
                    "candidate_frame",
                    "kept",
                ],
            ),
        )
        counts = {"candidates": len(names), "kept": len(kept), "dropped": len(names) - len(kept)}
        report = build_report(
            setup,
            candidate_scores=scores,
            counts=counts,
            seeds={"note": "the filter draws no random numbers"},
            extra={"candidate_frame_step": a.candidate_frame_step},
        )
        write_report(tmp, report)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"{out}: kept {len(kept)} of {len(names)} candidate(s) (tau {setup.filter.tau:.5f}, "
        f"re-id test AUC {setup.model_info['test_auc']['auc']:.4f}); report in {out / REPORT_JSON}"
    )
    return 0


def main_privacy_audit(argv: Sequence[str] | None = None) -> int:
    """Positive (planted copies) and negative (held-out real frames) controls of the filter."""
    from ..figures import BLUE, GREEN, ORANGE, RED, histogram_png, save_png
    from .audit import DEFAULT_STRENGTHS, GOAL, heldout_records, run_audit
    from .report import histogram_edges

    p = argparse.ArgumentParser(
        prog="echofast privacy-audit",
        description="Measure the filter: the fraction of planted copies of real TRAIN frames it "
        "catches (exact, shifted, brightness, noise, re-noised-then-denoised) and the fraction "
        "of held-out real frames it flags (should be about 100 - percentile %).",
    )
    _common(p)
    p.add_argument("--num-planted", type=int, default=200, help="source frames per kind (200)")
    p.add_argument(
        "--strengths",
        type=_strengths,
        default=DEFAULT_STRENGTHS,
        help="re-noise strengths as fractions of the 1000 training timesteps (0.1,0.25,0.5)",
    )
    p.add_argument("--lidm", help="LIDM folder or weights root: denoise re-noised copies with it")
    p.add_argument("--dataset", default="dynamic", choices=["dynamic", "ped_a4c", "ped_psax"])
    p.add_argument(
        "--heldout-split", default="VAL", help="real split for the negative control (VAL)"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(list(argv) if argv is not None else None)
    _check_common(p, a)
    if a.num_planted < 1 or any(not 0 < s <= 1 for s in a.strengths):
        p.error("--num-planted must be >= 1 and strengths in (0, 1]")
    out = Path(a.out)
    _refuse_conflict(out)
    _check_shift_tolerance(a)
    heldout_records(a.reference, a.heldout_split)
    setup = _setup(a)
    audit, scores = run_audit(
        setup,
        a.reference,
        num_planted=a.num_planted,
        strengths=a.strengths,
        heldout_split=a.heldout_split,
        lidm=a.lidm,
        dataset=a.dataset,
        seed=a.seed,
    )
    tmp = _staging(out)
    try:
        tau = setup.filter.tau
        report = {
            "format": "echofast-privacy-audit",
            "version": 1,
            "reidentification_model": setup.model_info,
            "reference": setup.reference_info,
            "threshold": {
                "tau": tau,
                "percentile": setup.filter.calibration.percentile,
                "normalization": setup.filter.model.normalization,
                "shift_tolerance": setup.filter.shift_tolerance,
            },
            **audit,
        }
        atomic_write_text(
            tmp / "privacy_audit.json", json.dumps(report, indent=2, sort_keys=True) + "\n"
        )
        rows = [[k, repr(float(v))] for k, vs in scores.items() for v in vs]
        atomic_write_text(tmp / "privacy_audit_scores.csv", _csv(rows, ["kind", "max_correlation"]))
        strongest = f"renoise_{max(a.strengths):g}"
        series = [
            ("HELD-OUT REAL", scores["heldout"], BLUE),
            ("EXACT COPIES", scores["exact"], RED),
            ("SHIFTED", scores["shift"], ORANGE),
            (strongest.upper().replace("_", " "), scores[strongest], GREEN),
        ]
        edges = histogram_edges(setup.filter.calibration.values, *[s for _, s, _ in series])
        pos, neg = audit["positive_control"], audit["negative_control"]
        m = neg["matched_gallery"]
        title = [
            "PRIVACY AUDIT: "
            + ", ".join(f"{k} {v['fraction_caught'] * 100:.1f}%" for k, v in pos.items())[:130],
            "LIGHT COPIES "
            + ("MEET" if audit["light_copies_meet_goal"] else "DO NOT MEET")
            + f" THE {GOAL * 100:g}% GOAL",
            f"HELD-OUT FLAGGED {neg['fraction_flagged'] * 100:.1f}% BY THE "
            f"{neg['gallery_frames']}-FRAME GALLERY, {m['fraction_flagged'] * 100:.1f}% BY "
            f"{m['gallery_frames']} FRAMES (EXPECTED {neg['expected_fraction'] * 100:.1f}%)",
        ]
        save_png(tmp / "privacy_audit.png", histogram_png(series, edges, tau=tau, title=title))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pos, neg = audit["positive_control"], audit["negative_control"]
    for k, v in pos.items():
        goal = "" if v["goal"] is None else (" meets" if v["meets_goal"] else " BELOW") + " goal"
        print(
            f"  planted {k:<14} caught {v['caught']}/{v['planted']} "
            f"({v['fraction_caught'] * 100:.2f}%){goal}"
        )
    print(
        f"  held-out {neg['split']:<13} flagged {neg['flagged']}/{neg['frames']} "
        f"({neg['fraction_flagged'] * 100:.1f}%, expected ~{neg['expected_fraction'] * 100:.1f}% "
        f"for a gallery as large as the TEST set: {neg['gallery_frames']} vs "
        f"{neg['calibration_test_frames']})"
    )
    m = neg["matched_gallery"]
    print(
        f"  held-out vs {m['gallery_frames']}-frame gallery flagged {m['flagged']}/{neg['frames']} "
        f"({m['fraction_flagged'] * 100:.1f}%, expected ~{neg['expected_fraction'] * 100:.1f}%)"
    )
    print(f"{out}: audit in {out / 'privacy_audit.json'}")
    return 0 if audit["light_copies_meet_goal"] else 1
