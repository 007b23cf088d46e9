"""echofast's output containers index like diffusers' ``BaseOutput``: by name, by position
(negative too), as a tuple, and by their keys; checked on a real DDIM step of each library."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler as DiffusersDDIM

from echofast.schedulers import DDIMScheduler


def test_a_step_output_indexes_like_diffusers():
    gen = torch.Generator().manual_seed(3)
    sample, eps = torch.randn(2, 3, 5, 7, generator=gen), torch.randn(2, 3, 5, 7, generator=gen)
    outputs = []
    for cls in (DDIMScheduler, DiffusersDDIM):
        scheduler = cls(num_train_timesteps=1000)
        scheduler.set_timesteps(10)
        outputs.append(scheduler.step(eps, scheduler.timesteps[3], sample))
    ours, theirs = outputs
    assert list(ours.keys()) == list(theirs.keys())
    assert not torch.equal(theirs[0], theirs[1])
    for key in (0, 1, -1, -2, "prev_sample", "pred_original_sample"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6)
    assert len(ours.to_tuple()) == len(theirs.to_tuple()) == 2
    for a, b in zip(ours.to_tuple(), theirs.to_tuple()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
