"""The audit's planted kinds do what its docstring says (shift, brightness, noise, the
Gaussian-prior re-noise), checked statistically on random latents; the re-noise timestep; and
``embed_frames`` leaves the model in the mode it found it in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echofast.pipelines.common import reference_scheduler
from echofast.privacy import ReIdentificationModel
from echofast.privacy.audit import _gen, _timestep, brightness, noise, renoise_gaussian, shift
from echofast.schedulers import DDIMScheduler


def test_brightness_is_a_small_per_channel_gain_and_offset():
    x = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    for i in range(20):
        y = brightness(x, _gen(0, i, "t"))
        for c in range(4):
            a, b = np.polyfit(x[c].flatten().double().numpy(), y[c].flatten().double().numpy(), 1)
            assert 0.9 <= a <= 1.1
            assert abs(b) <= 0.1 * float(x.std()) + 1e-5


def _moved(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(C, h, w) ``x`` rolled by one pixel (dy, dx), the vacated row or column keeping the edge
    it had (edge replication)."""
    y = torch.roll(x, (dy, dx), (1, 2))
    edge = 0 if dy + dx > 0 else -1
    if dy:
        y[:, edge] = x[:, edge]
    else:
        y[:, :, edge] = x[:, :, edge]
    return y


def test_shift_moves_by_one_pixel_in_each_of_the_four_directions():
    """Each copy is the latent moved by one pixel up, down, left or right with its edge
    replicated; over 40 seeds every direction occurs."""
    x = torch.randn(4, 7, 9, generator=torch.Generator().manual_seed(3))
    directions = [(0, 1), (0, -1), (1, 0), (-1, 0)]
    seen = set()
    for i in range(40):
        y = shift(x, _gen(0, i, "t"))
        moves = [d for d in directions if torch.equal(y, _moved(x, *d))]
        assert len(moves) == 1, i
        seen.add(moves[0])
    assert seen == set(directions)


def test_renoise_timestep_is_the_first_sampler_step_at_or_below_the_strength():
    """64 reference sampler steps (945, 930, ..., 15, 0): 0.3 lands exactly on 300; a strength
    below the last timestep of a sampler that ends at 1 uses that last timestep."""
    sched = reference_scheduler()
    t0, rest = _timestep(sched, 0.3)
    assert (t0, rest) == (300, list(range(300, -1, -15)))
    assert _timestep(sched, 0.31) == (300, rest)
    ddim = DDIMScheduler(steps_offset=1, timestep_spacing="leading")
    ddim.set_timesteps(64)
    assert int(ddim.timesteps[-1]) == 1
    assert _timestep(ddim, 0.0005) == (1, [1])


def test_noise_has_five_percent_of_the_latent_std():
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1)) * 2.5
    d = noise(x, _gen(0, 0, "t")) - x
    assert float(d.std()) == pytest.approx(0.05 * float(x.std()), rel=0.05)
    assert abs(float(d.mean())) < 0.005 * float(x.std())


@pytest.mark.parametrize("strength", [0.1, 0.3, 0.5])
def test_gaussian_renoise_is_the_posterior_mean_of_a_noised_copy(strength):
    """x_t = √ᾱ·x + √(1−ᾱ)·ε at the first 64-step sampler timestep ≤ strength·1000, then
    x̂ = μ + g·(x_t − √ᾱ·μ) with g = √ᾱ·σ²/(ᾱ·σ² + 1 − ᾱ): the residual
    (x̂ − μ − g·√ᾱ·(x − μ)) / (g·√(1−ᾱ)) is standard normal."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(48, 4, 8, 8, generator=gen) * 1.5 + 0.3
    mean = torch.randn(4, 8, 8, generator=gen) * 0.2
    var = torch.rand(4, 8, 8, generator=gen) + 0.5
    sched = reference_scheduler()
    sched.set_timesteps(64)
    t0 = max(int(t) for t in sched.timesteps if int(t) <= strength * 1000)
    a = float(sched.alphas_cumprod[t0])
    g = a**0.5 * var / (a * var + 1 - a)
    out = renoise_gaussian(x, strength, mean, var, seed=0)
    z = (out - mean - g * a**0.5 * (x - mean)) / (g * (1 - a) ** 0.5)
    assert abs(float(z.mean())) < 0.05 and float(z.std()) == pytest.approx(1.0, abs=0.05)
    assert torch.equal(out, renoise_gaussian(x, strength, mean, var, seed=0))


def test_embed_frames_restores_the_mode():
    torch.manual_seed(0)
    model = ReIdentificationModel(layers=(1, 1, 1, 1), width=8, n_features=16)
    frames = torch.rand(3, 4, 8, 8) * 2 - 1
    model.eval()
    first = model.embed_frames(frames)
    assert not model.training
    torch.testing.assert_close(model.embed_frames(frames), first, rtol=0, atol=0)
    model.train()
    model.embed_frames(frames)
    assert model.training
