"""Sampling pipelines with a diffusers-style call API and per-sample seeding."""

from .echo_synthetic import DATASETS, EchoSyntheticOutput, EchoSyntheticPipeline
from .lidm import LIDMPipeline, LIDMPipelineOutput
from .lvdm import LVDMPipeline, LVDMPipelineOutput, window_plan

__all__ = [
    "DATASETS",
    "EchoSyntheticOutput",
    "EchoSyntheticPipeline",
    "LIDMPipeline",
    "LIDMPipelineOutput",
    "LVDMPipeline",
    "LVDMPipelineOutput",
    "window_plan",
]
