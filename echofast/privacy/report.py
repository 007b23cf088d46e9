"""Setting up the filter (with the fail-closed rule) and the privacy report written with every
dataset: ``privacy_report.json`` and ``privacy_report.png``.

Fail closed: the filter labels its output privacy-filtered only when the re-identification
model's test ROC AUC is at least ``auc_threshold`` (default 0.9). The AUC is the one saved with
the weights (``evaluation.json``, written by ``echofast train reid``); a model folder without it
(e.g. the published weights) is evaluated on the reference latents' TEST split with the same
pair protocol. A weaker model is refused unless ``allow_weak_privacy`` is set, and the report
records that. The report holds no time stamps or absolute paths: the same inputs and seeds give
the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..figures import BLUE, GREEN, ORANGE, histogram_png, save_png, text_png
from ..fsutil import atomic_write_text
from .data import check_all_encoded, check_reference_shift_tolerance
from .filter import (
    ClipScores,
    PrivacyError,
    PrivacyFilter,
    StaleCacheError,
    evaluate_reid,
    model_digest,
    read_evaluation,
    reference_digest,
)
from .model import ReIdentificationModel

REPORT_JSON = "privacy_report.json"
REPORT_PNG = "privacy_report.png"
REPORT_FORMAT = "echofast-privacy-report"
DEFAULT_AUC_THRESHOLD = 0.9
AUC_EVAL_PAIRS_PER_VIDEO = 4
AUC_EVAL_SEED = 0
CORRELATION_RULE = (
    "Pearson correlation of re-identification embeddings = dot product of centred unit-norm "
    "embeddings, one chunked fp32 matmul (TF32 off)"
)


@dataclass
class FilterSetup:
    """A loaded model, its filter over the reference, and what the report says about them."""

    filter: PrivacyFilter
    model_info: dict[str, Any]
    reference_info: dict[str, Any]
    filtered: bool
    """True when the model passed the AUC threshold (else weak privacy was explicitly allowed)."""


def load_model(
    model_dir: str | os.PathLike,
    *,
    normalization: str | None = None,
    allow_pickle: bool = False,
    device: torch.device | str | None = None,
) -> ReIdentificationModel:
    model = ReIdentificationModel.from_pretrained(
        model_dir, allow_pickle=allow_pickle, device=device
    )
    if normalization is not None:
        model.normalization = normalization
    return model


def model_strength(
    model: ReIdentificationModel,
    model_dir: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The test AUC (+ CI) saved with the weights, or computed on ``reference``'s TEST split:
    when the folder has no ``evaluation.json``, or when that records a training dataset
    (``reference_digest``, :func:`reference_digest`) other than ``reference`` (the saved AUC
    says how well the model tells apart the patients of another dataset)."""
    saved = read_evaluation(model_dir)
    why = "the model folder has no evaluation.json"
    if saved is not None:
        trained_on = saved.get("reference_digest")
        if trained_on is None or trained_on == reference_digest(reference):
            return {
                "test_auc": saved["test_auc"],
                "auc_source": "evaluation.json saved with the weights",
            }
        why = (
            "the model's evaluation.json was measured on another dataset (reference_digest "
            f"{trained_on[:16]}…, this reference {reference_digest(reference)[:16]}…)"
        )
    from .data import LatentClips

    clips = LatentClips(reference, "TEST", normalization=model.normalization)
    if clips.frame_shape is not None and clips.frame_shape[0] != model.n_channels:
        raise PrivacyError(
            f"{reference}: TEST latent frames of shape {clips.frame_shape} (C, h, w), but the "
            f"re-identification model takes {model.n_channels}-channel frames"
        )
    result, _, _ = evaluate_reid(
        model,
        clips,
        seed=AUC_EVAL_SEED,
        pairs_per_video=AUC_EVAL_PAIRS_PER_VIDEO,
        device=device,
    )
    return {
        "test_auc": result.to_dict(),
        "auc_source": f"computed on the reference latents' TEST split ({len(clips)} clips, "
        f"{AUC_EVAL_PAIRS_PER_VIDEO} seeded pairs per clip): {why}",
    }


def setup_filter(
    model_dir: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    percentile: float = 95.0,
    frame_step: int = 0,
    auc_threshold: float = DEFAULT_AUC_THRESHOLD,
    allow_weak_privacy: bool = False,
    normalization: str | None = None,
    allow_pickle: bool = False,
    device: torch.device | str | None = None,
    progress: bool = False,
    cache: str | os.PathLike | None = None,
    shift_tolerance: int = 0,
) -> FilterSetup:
    """Load the model, apply the fail-closed rule, calibrate τ on ``reference`` (or read the
    calibration from ``cache``, a file :meth:`PrivacyFilter.save` wrote for the same reference and
    model: the caller's job identity guarantees those; a cache calibrated with another
    ``percentile``, ``frame_step`` or ``shift_tolerance`` is not used, calibration runs again).
    ``shift_tolerance`` is checked against the reference's frame size first, and every TRAIN
    and TEST video the reference lists must have its latent file (:func:`check_all_encoded`)
    before the model's AUC may be measured on the TEST clips."""
    if not 0 <= auc_threshold <= 1:
        raise ValueError(f"the AUC threshold must be in [0, 1], got {auc_threshold}")
    for split in ("TRAIN", "TEST"):
        check_all_encoded(reference, split)
    shift_tolerance = check_reference_shift_tolerance(shift_tolerance, reference)
    model = load_model(
        model_dir, normalization=normalization, allow_pickle=allow_pickle, device=device
    )
    strength = model_strength(model, model_dir, reference, device=device)
    auc = float(strength["test_auc"]["auc"])
    passed = auc >= auc_threshold
    if not passed and not allow_weak_privacy:
        raise PrivacyError(
            f"{model_dir}: re-identification test AUC {auc:.4f} is below the threshold "
            f"{auc_threshold} ({strength['auc_source']}); the filter would not protect patients. "
            "Train a stronger model, or pass --allow-weak-privacy (recorded in the report)"
        )
    flt = None
    if cache is not None and Path(cache).is_file():
        try:
            flt = PrivacyFilter.load(cache, model, device=device)
        except StaleCacheError:
            flt = None
        if flt is not None and (
            flt.shift_tolerance != shift_tolerance
            or flt.frame_step != frame_step
            or flt.calibration.percentile != float(percentile)
        ):
            flt = None
    if flt is None:
        flt = PrivacyFilter.from_reference(
            model,
            reference,
            percentile=percentile,
            frame_step=frame_step,
            device=device,
            progress=progress,
            shift_tolerance=shift_tolerance,
        )
        if cache is not None:
            flt.save(cache)
    info = {
        "folder_name": Path(model_dir).resolve().name,
        **model_digest(model_dir, allow_pickle),
        "config": model.config(),
        **strength,
        "auc_threshold": auc_threshold,
        "passed_threshold": passed,
        "allow_weak_privacy": bool(allow_weak_privacy),
    }
    ref = {
        "digest": reference_digest(reference),
        "train_clips": flt.num_train_clips,
        "test_clips": flt.num_test_clips,
        "train_frames": int(flt.gallery_unit.shape[0]),
        "test_frames": flt.num_test_frames,
        "frame_step": flt.frame_step,
        "frames_rule": "frame 0 of every clip"
        if flt.frame_step == 0
        else f"frames 0, {flt.frame_step}, 2·{flt.frame_step}, ... of every clip",
    }
    return FilterSetup(flt, info, ref, filtered=passed)


def status_line(setup: FilterSetup) -> str:
    if setup.filtered:
        return "privacy-filtered"
    return (
        "filtered with a WEAK re-identification model (test AUC below the threshold; "
        "--allow-weak-privacy): NOT a privacy guarantee"
    )


def histogram_edges(*arrays: np.ndarray, bins: int = 50) -> np.ndarray:
    """Fixed-width bins from the lowest value (rounded down to 0.05) to 1."""
    values = [np.asarray(a, dtype=np.float64) for a in arrays if len(a)]
    lo = min([float(v.min()) for v in values] + [0.95])
    lo = float(np.floor(lo * 20) / 20)
    return np.linspace(lo, 1.0, bins + 1)


def hist(values: np.ndarray, edges: np.ndarray) -> list[int]:
    return [int(c) for c in np.histogram(np.asarray(values, dtype=np.float64), bins=edges)[0]]


def closest(scores: ClipScores, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` candidates closest to a real frame (names only), highest correlation first
    (ties by name)."""
    order = sorted(range(len(scores.names)), key=lambda i: (-scores.max_corr[i], scores.names[i]))
    return [
        {
            "candidate": scores.names[i],
            "max_correlation": float(scores.max_corr[i]),
            "nearest_real_clip": scores.nearest_clip[i],
            "nearest_real_frame": int(scores.nearest_frame[i]),
            "candidate_frame": int(scores.candidate_frame[i]),
            "kept": bool(scores.kept[i]),
        }
        for i in order[:n]
    ]


def build_report(
    setup: FilterSetup,
    *,
    candidate_scores: ClipScores,
    counts: dict[str, Any],
    seeds: dict[str, Any],
    video_scores: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report dict (see the module docstring); ``video_scores``: max correlation of each
    checked generated video."""
    cal = setup.filter.calibration
    arrays = [cal.values, candidate_scores.max_corr] + (
        [video_scores] if video_scores is not None else []
    )
    edges = histogram_edges(*arrays)
    histograms = {
        "bin_edges": [float(e) for e in edges],
        "train_test": hist(cal.values, edges),
        "train_synthetic": hist(candidate_scores.max_corr, edges),
    }
    if video_scores is not None:
        histograms["train_video"] = hist(video_scores, edges)
    report = {
        "format": REPORT_FORMAT,
        "version": 1,
        "echofast_version": __version__,
        "privacy_filtered": True,
        "weak_model": not setup.filtered,
        "status": status_line(setup),
        "reidentification_model": setup.model_info,
        "reference": setup.reference_info,
        "threshold": {
            "tau": cal.tau,
            "percentile": cal.percentile,
            "rule": "tau = percentile of each real TRAIN frame's max correlation with any real "
            "TEST frame; a candidate is kept iff its max correlation with every TRAIN frame < tau",
            "correlation": CORRELATION_RULE,
            "normalization": setup.filter.model.normalization,
            "shift_tolerance": setup.filter.shift_tolerance,
            "shift_rule": "a checked frame (and a TRAIN frame during calibration) scores the max "
            "over its views moved by up to shift_tolerance latent pixels (0: exact matching, the "
            "reference)",
        },
        "counts": counts,
        "histograms": histograms,
        "closest_synthetic": closest(candidate_scores),
        "seeds": seeds,
    }
    if extra:
        report.update(extra)
    return report


def not_filtered_report(reason: str, seeds: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": REPORT_FORMAT,
        "version": 1,
        "echofast_version": __version__,
        "privacy_filtered": False,
        "status": "NOT privacy-filtered",
        "reason": reason,
        "seeds": seeds or {},
    }


def write_report(folder: str | os.PathLike, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``privacy_report.json`` and ``privacy_report.png`` into ``folder`` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"
    js = atomic_write_text(folder / REPORT_JSON, text)
    return js, save_png(folder / REPORT_PNG, report_png(report))


def report_png(report: dict[str, Any]) -> bytes:
    if not report.get("privacy_filtered"):
        return text_png(["NOT PRIVACY-FILTERED", report.get("reason", "")[:140]])
    h = report["histograms"]
    edges = np.asarray(h["bin_edges"])
    mids = (edges[:-1] + edges[1:]) / 2

    def expand(counts: list[int]) -> np.ndarray:
        return np.repeat(mids, counts)

    series = [
        ("REAL TRAIN VS TEST", expand(h["train_test"]), BLUE),
        ("SYNTHETIC VS TRAIN", expand(h["train_synthetic"]), ORANGE),
    ]
    if "train_video" in h:
        series.append(("GENERATED VIDEOS VS TRAIN", expand(h["train_video"]), GREEN))
    m = report["reidentification_model"]
    auc = m["test_auc"]
    c = report["counts"]
    title = [
        report["status"].upper()[:140],
        f"RE-ID TEST AUC {auc['auc']:.4f} (95% CI {auc['ci_low']:.4f}-{auc['ci_high']:.4f}), "
        f"THRESHOLD {m['auc_threshold']}",
        f"TAU {report['threshold']['tau']:.5f} = P{report['threshold']['percentile']:g} "
        "OF TRAIN-TEST MAX CORRELATION",
        *_wrap([f"{k.upper()} {v}" for k, v in c.items() if isinstance(v, int)]),
    ]
    return histogram_png(series, edges, tau=report["threshold"]["tau"], title=title)


def _wrap(items: list[str], width: int = 130) -> list[str]:
    """``items`` joined by spaces into lines of at most ``width`` characters (an item longer
    than that has a line of its own), never cutting one."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 1 + len(item) <= width:
            lines[-1] += " " + item
        else:
            lines.append(item)
    return lines
