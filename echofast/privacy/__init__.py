"""The privacy filter: a re-identification model, τ calibration, candidate and video checks,
the report written with every dataset, and its controls (``echofast privacy-filter``,
``echofast privacy-audit``, ``echofast generate --privacy``, ``echofast train reid``)."""

from .filter import (
    Calibration,
    ClipScores,
    PrivacyError,
    PrivacyFilter,
    calibrate,
    embed,
    evaluate_reid,
    max_correlation,
    unit_rows,
)
from .metrics import bootstrap_auc, roc_auc, wilson_interval
from .model import ReIdentificationModel, normalize_clip
from .report import FilterSetup, setup_filter, write_report

__all__ = [
    "Calibration",
    "ClipScores",
    "FilterSetup",
    "PrivacyError",
    "PrivacyFilter",
    "ReIdentificationModel",
    "bootstrap_auc",
    "calibrate",
    "embed",
    "evaluate_reid",
    "max_correlation",
    "normalize_clip",
    "roc_auc",
    "setup_filter",
    "unit_rows",
    "wilson_interval",
    "write_report",
]
