"""The whole EchoNet-Synthetic chain from a weights root: LIDM image → LVDM video → VAE frames."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MissingFileError
from ..models import LIDM, LVDM, VAE
from ..models.provenance import check_latents_vae
from ..outputs import ModelOutput
from ..schedulers import SchedulerBase
from .common import check_precision, model_scheduler
from .lidm import LIDMPipeline
from .lvdm import LVDMPipeline

DATASETS = {"dynamic": "lidm_dynamic", "ped_a4c": "lidm_ped_a4c", "ped_psax": "lidm_ped_psax"}
"""Dataset name → the reference's LIDM folder name under the weights root."""


@dataclass
class EchoSyntheticOutput(ModelOutput):
    """``videos`` uint8 (B, T, H, W); ``image_latents`` (B, C, h, w) × scaling_factor."""

    videos: torch.Tensor
    image_latents: torch.Tensor


class EchoSyntheticPipeline:
    """LIDM → LVDM → VAE with the reference's folder layout and sampler.

    ``from_pretrained(root, dataset="dynamic")`` reads ``root/vae``, ``root/lidm_<dataset>`` and
    ``root/lvdm`` (diffusers folders). Randomness is per sample and global index, so a video
    depends only on (seed, index): batch size and sharding do not change it.

    ``scheduler``: both pipelines' (default: the reference DDPM); or ``lidm_scheduler`` /
    ``lvdm_scheduler``, one pipeline's each (an unset one is the reference DDPM).
    """

    def __init__(
        self,
        lidm: LIDM,
        lvdm: LVDM,
        vae: VAE,
        scheduler: SchedulerBase | None = None,
        *,
        lidm_scheduler: SchedulerBase | None = None,
        lvdm_scheduler: SchedulerBase | None = None,
    ):
        if scheduler is not None and (lidm_scheduler, lvdm_scheduler) != (None, None):
            raise ValueError(
                "pass either scheduler= (both pipelines') or lidm_scheduler= / lvdm_scheduler=, "
                "not both"
            )
        if scheduler is not None:
            lidm_scheduler = lvdm_scheduler = scheduler
        self.lidm_pipe = LIDMPipeline(lidm, vae, lidm_scheduler)
        self.lvdm_pipe = LVDMPipeline(lvdm, vae, lvdm_scheduler)

    @property
    def lidm(self) -> LIDM:
        return self.lidm_pipe.lidm

    @property
    def lvdm(self) -> LVDM:
        return self.lvdm_pipe.lvdm

    @property
    def vae(self) -> VAE:
        return self.lvdm_pipe.vae

    def release_graphs(self) -> None:
        """Free both sub-pipelines' CUDA graphs, kept UNet inputs and reduced-precision UNet
        copies (:meth:`~echofast.pipelines.common.SamplingPipeline.release_graphs`); the next
        call captures again."""
        self.lidm_pipe.release_graphs()
        self.lvdm_pipe.release_graphs()

    @staticmethod
    def folders(root: str | os.PathLike, dataset: str) -> dict[str, Path]:
        """The model folders the pipeline reads for ``dataset`` (checked to exist)."""
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
        root = Path(root)
        folders = {"vae": root / "vae", "lidm": root / DATASETS[dataset], "lvdm": root / "lvdm"}
        missing = [str(p) for p in folders.values() if not p.is_dir()]
        if missing:
            raise MissingFileError(f"{root}: weights root lacks model folder(s) {missing}")
        return folders

    @classmethod
    def from_pretrained(
        cls,
        root: str | os.PathLike,
        *,
        dataset: str = "dynamic",
        device: torch.device | str | None = None,
        scheduler: SchedulerBase | None = None,
        allow_pickle: bool = False,
        check_vae: bool = True,
    ) -> EchoSyntheticPipeline:
        """The pipeline of the models in ``root`` (see :meth:`folders`). The LIDM and the LVDM
        each sample with the scheduler their folder records (:func:`~.common.model_scheduler`:
        the noise schedule the model was trained with, which ``echofast train export``
        records; the reference DDPM where none is recorded, as in the published folders);
        ``scheduler`` replaces both. ``allow_pickle``: a folder may hold pickled weights
        (see :meth:`~echofast.models.base.ModelBase.from_pretrained`). ``check_vae``: refuse
        (:class:`~echofast.models.provenance.VAEMismatchError`) a LIDM or LVDM whose export
        records training latents of another VAE than ``root``'s ``vae/``."""
        f = cls.folders(root, dataset)
        if check_vae:
            check_latents_vae({"lidm": f["lidm"], "lvdm": f["lvdm"]}, f["vae"])
        if scheduler is None:
            schedulers = {
                "lidm_scheduler": model_scheduler(f["lidm"]),
                "lvdm_scheduler": model_scheduler(f["lvdm"]),
            }
        else:
            schedulers = {"scheduler": scheduler}
        return cls(
            LIDM.from_pretrained(f["lidm"], device=device, allow_pickle=allow_pickle),
            LVDM.from_pretrained(f["lvdm"], device=device, allow_pickle=allow_pickle),
            VAE.from_pretrained(f["vae"], device=device, allow_pickle=allow_pickle),
            **schedulers,
        )

    @torch.no_grad()
    def __call__(
        self,
        ef: Sequence[float] | torch.Tensor,
        *,
        seed: int,
        sample_indices: Sequence[int] | None = None,
        num_frames: int = 192,
        num_inference_steps: int = 64,
        batch_size: int = 8,
        decode_chunk_size: int = 64,
        dtype: torch.dtype | str = torch.float32,
        decode_dtype: torch.dtype | str = torch.float32,
        cuda_graphs: bool | None = None,
        progress: bool = False,
    ) -> EchoSyntheticOutput:
        """One video per EF value (percent); sample i uses global index ``sample_indices[i]``.

        ``decode_dtype`` (VAE decode precision) and ``cuda_graphs`` (None: auto, True: forced,
        False: eager) are passed to the pipelines (see :class:`LVDMPipeline`).
        """
        ef = torch.as_tensor(ef, dtype=torch.float32).reshape(-1)
        if ef.numel() == 0:
            raise ValueError("ef is empty: pass one EF value (percent) per video")
        indices = list(range(ef.numel())) if sample_indices is None else list(sample_indices)
        if len(indices) != ef.numel():
            raise ValueError(
                f"got {ef.numel()} EF values and {len(indices)} sample indices: one per video"
            )
        if seed is None:
            raise ValueError("seed is required (an int): it fixes every sample's noise")
        check_precision(dtype, self.lidm.device)
        images = self.lidm_pipe(
            len(indices),
            seed=seed,
            sample_indices=indices,
            num_inference_steps=num_inference_steps,
            batch_size=batch_size,
            dtype=dtype,
            cuda_graphs=cuda_graphs,
            progress=progress,
        ).latents
        videos = self.lvdm_pipe(
            images,
            ef,
            num_frames=num_frames,
            seed=seed,
            sample_indices=indices,
            num_inference_steps=num_inference_steps,
            batch_size=batch_size,
            decode_chunk_size=decode_chunk_size,
            dtype=dtype,
            decode_dtype=decode_dtype,
            cuda_graphs=cuda_graphs,
            progress=progress,
        ).videos
        return EchoSyntheticOutput(videos=videos, image_latents=images)
