"""``step``'s argument checks and per-sample timestep forms, on random inputs of odd shapes:
bad input raises a ValueError naming the problem (never a broadcast that silently reshapes, nor
NaN), and every form of a timestep shared by the batch steps as the plain int does."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler as DiffusersDDPM

from echofast.schedulers import REFERENCE_SCHEDULER_CONFIG, DDIMScheduler, DDPMScheduler

SHAPE = (3, 5, 7, 2)  # odd sizes: no accidental broadcasting between them


def _schedulers(steps: int):
    ddpm = DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    ddim = DDIMScheduler(
        **{k: v for k, v in REFERENCE_SCHEDULER_CONFIG.items() if k != "variance_type"}
    )
    for sched in (ddpm, ddim):
        sched.set_timesteps(steps)
    return ddpm, ddim


@pytest.mark.parametrize("seed", range(2))
def test_a_model_output_of_another_shape_is_refused(seed):
    """Same number of elements, other shape (a transposed or flattened output): refused, as
    broadcasting (1, n) against (n, 1) would give a wrong-shaped result without an error."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for sched in _schedulers(rng.choice([4, 9])):
        t = int(rng.choice(sched.timesteps.tolist()[:-1]))
        x = torch.randn(SHAPE, generator=g)
        for bad in (
            torch.randn(SHAPE[::-1], generator=g),
            torch.randn((SHAPE[0], SHAPE[1] * SHAPE[2] * SHAPE[3]), generator=g),
            torch.randn((1, *SHAPE[1:]), generator=g).expand(SHAPE).reshape(1, -1).T,
        ):
            assert bad.numel() == x.numel()
            with pytest.raises(ValueError, match="does not match sample shape"):
                sched.step(bad, t, x, noise=torch.randn(SHAPE, generator=g))
        row = torch.randn(1, 6, generator=g)
        with pytest.raises(ValueError, match="does not match sample shape"):
            sched.step(row, t, row.T.contiguous())


def test_ddim_eta_must_be_a_number_at_least_zero():
    """NaN is no valid η (every comparison with it is false): refused, not a NaN sample."""
    _, ddim = _schedulers(5)
    g = torch.Generator().manual_seed(3)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = int(ddim.timesteps[1])
    for eta in (float("nan"), -1e-9, float("-inf"), True, "0.5", None):
        with pytest.raises(ValueError, match="eta must be a number >= 0"):
            ddim.step(m, t, x, eta=eta)
    assert torch.isfinite(ddim.step(m, t, x, eta=0.0).prev_sample).all()


def test_ddpm_refuses_both_noise_and_generator():
    """diffusers' DDPM step has no ``noise``; given both, echofast would have to drop one."""
    ddpm, _ = _schedulers(5)
    g = torch.Generator().manual_seed(4)
    x, m, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t = int(ddpm.timesteps[0])
    state = g.get_state()
    with pytest.raises(ValueError, match="either noise or generator"):
        ddpm.step(m, t, x, generator=g, noise=z)
    assert torch.equal(g.get_state(), state)  # refused before any draw


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_repeated_timestep_of_any_length_is_one_shared_timestep(kind):
    """A tensor or list that repeats one timestep (any length, e.g. the pipelines' per-frame
    copies) is that timestep for the whole batch; distinct per-sample timesteps must match the
    batch. Compared with diffusers' step at the int timestep."""
    ddpm, ddim = _schedulers(8)
    ours = ddpm if kind == "ddpm" else ddim
    config = {k: v for k, v in ours.config.items()}
    theirs = (DiffusersDDPM if kind == "ddpm" else DiffusersDDIM)(**config)
    theirs.set_timesteps(8)
    g = torch.Generator().manual_seed(5)
    x, m, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t = int(ours.timesteps[2])
    if kind == "ddpm":
        want = theirs.step(m, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    else:
        want = theirs.step(m, t, x).prev_sample
    for repeated in (torch.full((5,), t), [t] * 2, torch.full((1,), t), torch.tensor(t)):
        got = ours.step(m, repeated, x, noise=z).prev_sample
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="got 2 timesteps for a batch of 3"):
        ours.step(m, [t, int(ours.timesteps[3])], x, noise=z)


def test_ddpm_step_needs_noise_exactly_when_step_draws():
    """``step_needs_noise`` says whether ``step`` draws: any t > 0 in a per-sample batch draws
    (one randn for the whole batch), only all-zero timesteps draw nothing."""
    ddpm, ddim = _schedulers(10)
    g = torch.Generator().manual_seed(6)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in ([0, 0, 0], [100, 0, 0], [0, 0, 100], [0, 100, 200], [200, 200, 200], 0, 100):
        gen = torch.Generator().manual_seed(1)
        before = gen.get_state()
        ddpm.step(m, torch.tensor(t), x, generator=gen)
        drew = not torch.equal(gen.get_state(), before)
        assert ddpm.step_needs_noise(torch.tensor(t)) is drew
        assert ddpm.step_needs_noise(t) is drew
        assert drew == (max(t if isinstance(t, list) else [t]) > 0)
        assert ddim.step_needs_noise(t) is False


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_previous_timestep_keeps_the_form_it_was_given(kind):
    """An int gives an int, a list a list, a tensor a long tensor of the same shape (0-d stays
    0-d, as diffusers' DDPM ``previous_timestep`` of a 0-d timestep; diffusers' DDIM has no such
    method: its step goes to t - num_train_timesteps // num_inference_steps)."""
    ddpm, ddim = _schedulers(7)
    ours = ddpm if kind == "ddpm" else ddim
    theirs = (DiffusersDDPM if kind == "ddpm" else DiffusersDDIM)(**dict(ours.config))
    theirs.set_timesteps(7)
    steps = ours.timesteps.tolist()
    t = steps[3]
    if kind == "ddpm":
        want = int(theirs.previous_timestep(torch.tensor(t)))
    else:
        want = t - theirs.config.num_train_timesteps // theirs.num_inference_steps
    got = ours.previous_timestep(torch.tensor(t))
    assert got.shape == () and got.dtype == torch.long and int(got) == want
    assert ours.previous_timestep(t) == want and isinstance(ours.previous_timestep(t), int)
    assert ours.previous_timestep([t, steps[-1]]) == [want, ours.previous_timestep(steps[-1])]
    pair = ours.previous_timestep(torch.tensor([[t], [t]]).reshape(2))
    assert pair.shape == (2,) and pair.tolist() == [want, want]


def test_from_pretrained_reads_the_subfolder(tmp_path):
    """diffusers' ``from_pretrained(pipeline_folder, subfolder="scheduler")``."""
    config = {**REFERENCE_SCHEDULER_CONFIG, "steps_offset": 1, "clip_sample_range": 3.0}
    DiffusersDDPM(**config).save_pretrained(tmp_path / "scheduler")
    DiffusersDDPM().save_pretrained(tmp_path)  # another config at the top: must not be read
    want = DiffusersDDPM.from_pretrained(tmp_path, subfolder="scheduler").config
    got = DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler").config
    assert dict(got) == {k: want[k] for k in got} and got.clip_sample_range == 3.0
    assert DDPMScheduler.from_pretrained(tmp_path / "scheduler").config == got
    assert DDPMScheduler.from_pretrained(tmp_path).config == DDPMScheduler().config


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_set_timesteps_puts_timesteps_on_the_device_and_keeps_the_training_length(kind):
    """``set_timesteps(n, device)`` puts ``timesteps`` on ``device`` (a meta tensor shows it on
    a CPU-only machine), as diffusers does; ``len()`` stays ``num_train_timesteps``."""
    ddpm, ddim = _schedulers(9)
    ours = ddpm if kind == "ddpm" else ddim
    theirs = (DiffusersDDPM if kind == "ddpm" else DiffusersDDIM)(**dict(ours.config))
    ours.set_timesteps(9, device="meta")
    theirs.set_timesteps(9, device="meta")
    assert ours.timesteps.device == theirs.timesteps.device == torch.device("meta")
    assert ours.timesteps.shape == (9,) and ours.timesteps.dtype == torch.long
    assert len(ours) == len(theirs) == 1000


def test_float_empty_or_two_dimensional_timesteps_are_refused():
    """A float timestep (e.g. 930.0, or 930.7 that would be truncated) is no training index, a
    string is no sequence of timesteps, and an empty one names no timestep at all."""
    g = torch.Generator().manual_seed(8)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for sched in _schedulers(64):
        for bad in (torch.tensor(930.0), torch.full((3,), 930.7), torch.tensor([[930], [915]])):
            with pytest.raises(ValueError, match="integer scalar or 1-D tensor"):
                sched.step(m, bad, x, noise=torch.randn(SHAPE, generator=g))
            with pytest.raises(ValueError, match="integer scalar or 1-D tensor"):
                sched.previous_timestep(bad)
        with pytest.raises(ValueError, match="timestep must be an int"):  # not [9, 3, 0]
            sched.step(m, "930", x, noise=torch.randn(SHAPE, generator=g))
        for empty in ([], torch.tensor([], dtype=torch.long)):
            with pytest.raises(ValueError, match="timestep is empty"):
                sched.step(m, empty, x, noise=torch.randn(SHAPE, generator=g))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ddim_low_precision_step_returns_the_sample_dtype(dtype):
    """Both outputs come back in the sample's dtype, from float32 math on the same values."""
    _, ddim = _schedulers(6)
    g = torch.Generator().manual_seed(9)
    x, m, z = (torch.randn(SHAPE, generator=g).to(dtype) for _ in range(3))
    t = int(ddim.timesteps[2])
    for eta in (0.0, 0.7):
        got = ddim.step(m, t, x, eta=eta, variance_noise=z)
        want = ddim.step(m.float(), t, x.float(), eta=eta, variance_noise=z.float())
        for a, b in zip(got, want):
            assert a.dtype == dtype and torch.equal(a, b.to(dtype))


def test_step_noise_of_another_shape_or_given_twice_is_refused():
    """z of shape (1, ...) or transposed would broadcast (or fail deep inside): refused; so is
    DDIM's z given both as ``variance_noise`` and as ``noise`` (one would be dropped)."""
    ddpm, ddim = _schedulers(5)
    g = torch.Generator().manual_seed(10)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = int(ddpm.timesteps[1])
    for bad in (torch.randn((1, *SHAPE[1:]), generator=g), torch.randn(SHAPE[::-1], generator=g)):
        with pytest.raises(ValueError, match="variance_noise shape"):
            ddim.step(m, t, x, eta=0.5, variance_noise=bad)
        with pytest.raises(ValueError, match="variance_noise shape"):
            ddim.step(m, t, x, eta=0.5, noise=bad)
        with pytest.raises(ValueError, match="noise shape"):
            ddpm.step(m, t, x, noise=bad)
    z = torch.randn(SHAPE, generator=g)
    with pytest.raises(ValueError, match="either noise or variance_noise"):
        ddim.step(m, t, x, eta=0.5, variance_noise=z, noise=z)
