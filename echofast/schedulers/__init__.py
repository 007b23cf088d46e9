"""Noise schedulers: DDPM (the reference sampler) and DDIM (deterministic unless ``eta`` > 0).

Both are our own implementations of diffusers' ``DDPMScheduler`` / ``DDIMScheduler``: built
from the same config (``from_config`` / ``from_pretrained`` read a diffusers
``scheduler_config.json``, also another scheduler class's, whose other keys are dropped with a
warning, as diffusers drops them; ``save_config`` writes one diffusers loads), with the same
timesteps and float32 step arithmetic, so trajectories match diffusers' to float32 rounding.
"""

from __future__ import annotations

from .common import CONFIG_NAME, Config, SchedulerBase, SchedulerOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler

#: EchoNet-Synthetic's LIDM/LVDM sampler (spec, "Scheduler"); ``set_timesteps(64)`` gives
#: 945, 930, ..., 15, 0.
REFERENCE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 4.0,
    "prediction_type": "v_prediction",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}

#: Number of sampling steps the reference uses.
REFERENCE_NUM_INFERENCE_STEPS = 64

__all__ = [
    "CONFIG_NAME",
    "REFERENCE_NUM_INFERENCE_STEPS",
    "REFERENCE_SCHEDULER_CONFIG",
    "Config",
    "DDIMScheduler",
    "DDPMScheduler",
    "SchedulerBase",
    "SchedulerOutput",
]
