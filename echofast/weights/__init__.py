"""Weights shipped inside the package: the small demo models trained on phantom echoes.

``echofast generate`` uses them when no ``--weights`` is given. They are a demonstration of the
whole job (LIDM image → LVDM video → VAE decode → AVI) that runs on a CPU in minutes, not a
substitute for the published EchoNet-Synthetic weights: they were trained by ``echofast train`` on
``echofast phantom`` clips. ``demo/MODEL_CARD.md`` states the data, configs, steps and measured
quality; ``demo/demo.json`` holds the generation defaults that suit them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import MissingFileError

DEMO_ROOT = Path(__file__).resolve().parent / "demo"
"""Weights root of the demo models (``vae/``, ``lidm_dynamic/``, ``lvdm/``)."""

DEMO_DATASET = "dynamic"


def demo_root() -> Path:
    """The demo weights root, checked to hold all three model folders."""
    needed = [DEMO_ROOT / name for name in ("vae", "lidm_dynamic", "lvdm")]
    missing = [str(p) for p in needed if not (p / "config.json").is_file()]
    if missing:
        raise MissingFileError(
            f"{DEMO_ROOT}: the demo weights are not installed (missing {missing}); "
            "reinstall echofast or pass --weights"
        )
    return DEMO_ROOT


def demo_defaults() -> dict[str, Any]:
    """Generation defaults recorded with the demo weights (frames, fps, steps, videos, ...)."""
    path = demo_root() / "demo.json"
    try:
        return dict(json.loads(path.read_text())["generate"])
    except (OSError, ValueError, KeyError, TypeError) as err:  # TypeError: JSON of another shape
        raise MissingFileError(f"{path}: unreadable demo defaults ({err})") from err
