"""Where an exported model folder came from: ``echofast_export.json``, written by
``echofast train export`` (:func:`echofast.train.export_checkpoint`) beside the weights.

Keys: ``checkpoint`` (resolved path), ``step``, ``weights_requested`` and ``weights`` (``"ema"``
or ``"model"``: what was written), and ``latents_vae``: for a UNet trained on latent datasets
(``echofast encode``), the digest and scaling factor of the VAE that encoded them
(``{"vae_sha256": ..., "scaling_factor": ...}``), else None. The sampling pipelines compare it
with the VAE that decodes (:func:`check_latents_vae`): latents of one VAE decoded by another are
noise, however long the job ran.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import WeightsError

EXPORT_INFO_NAME = "echofast_export.json"


class VAEMismatchError(WeightsError):
    """A UNet's training latents came from another VAE than the one that would decode."""


def read_export_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record in ``folder`` (see the module's docstring); None for a folder without one
    (another model folder, an export from before the record)."""
    path = Path(folder) / EXPORT_INFO_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("weights") not in ("ema", "model"):
        raise WeightsError(f"{path}: not an export record (no 'weights': 'ema' or 'model')")
    return info


def check_latents_vae(unets: dict[str, Path], vae_dir: Path) -> None:
    """Raise :class:`VAEMismatchError` when a folder of ``unets`` (name -> folder) records
    training latents of another VAE (digest of its weights and config, or scaling factor) than
    ``vae_dir``'s. Folders that record none are not checked."""
    from ..data.encode import _vae_digest

    ours: tuple[str, Any] | None = None
    for name, folder in unets.items():
        info = read_export_info(folder) or {}
        trained = info.get("latents_vae")
        if not trained:
            continue
        if ours is None:
            config = json.loads((vae_dir / "config.json").read_text())
            ours = (_vae_digest(vae_dir), config.get("scaling_factor"))
        theirs = (trained.get("vae_sha256"), trained.get("scaling_factor"))
        if theirs != ours:
            raise VAEMismatchError(
                f"{folder} ({name}) was trained on latents of another VAE than {vae_dir}: "
                f"{EXPORT_INFO_NAME} records vae_sha256 {theirs[0]}, scaling_factor {theirs[1]}; "
                f"{vae_dir} has {ours[0]}, {ours[1]}. Decode with the VAE that encoded the "
                "training data, or skip this check (check_vae=False; generate --no-vae-check) "
                "if it holds the same weights saved otherwise"
            )
