"""What ``echofast bench`` feeds the paths it times: the EFs it requests, the LVDM UNet input
shape it reports (against the shape the reference's loop actually passes to the UNet), the
arguments the reference's path and the UNet-call rows get, and which paths a plan runs, in which
order, with which FLOP counts (stand-ins measure nothing: these run in milliseconds)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers", reason="the reference's loop steps diffusers' scheduler")

from echofast import benchmark as bench  # noqa: E402
from echofast import benchmark_reference as reference  # noqa: E402


def test_requested_efs_are_integers_10_to_90_drawn_from_the_seed():
    """The spec: the reference draws EF uniformly from the integers 10..90 (both included)."""
    efs = bench._efs(4000, 3)
    assert efs.dtype == torch.float32 and torch.equal(efs, efs.round())
    assert (efs.min().item(), efs.max().item()) == (10.0, 90.0)
    assert torch.equal(bench._efs(16, 5), bench._efs(16, 5))
    assert not torch.equal(bench._efs(16, 5), bench._efs(16, 6))


def _shape_setup(frames, window, size, levels, seed=0):
    """A run's setup as far as the LVDM's shapes go: its config and the LIDM's latent size."""
    lvdm_cfg = SimpleNamespace(num_frames=window, block_out_channels=[32] * levels, in_channels=8)
    return SimpleNamespace(
        plan=SimpleNamespace(frames=frames),
        models=SimpleNamespace(
            lvdm=SimpleNamespace(config=lvdm_cfg),
            lidm=SimpleNamespace(config=SimpleNamespace(sample_size=[size, size])),
        ),
        device=torch.device("cpu"),
        seed=seed,
    )


class _ShapeUNet:
    """A stand-in LVDM UNet that records the input shape of each call (zeros out)."""

    def __init__(self, config):
        self.config, self.device, self.shapes = config, torch.device("cpu"), []

    def __call__(self, x, t, *, encoder_hidden_states, added_time_ids):
        self.shapes.append(tuple(x.shape))
        return SimpleNamespace(
            sample=x.new_zeros(x.shape[0], x.shape[1], x.shape[2] // 2, *x.shape[3:])
        )


@pytest.mark.parametrize(
    ("frames", "window", "size", "levels", "batch"),
    [(12, 8, 6, 3, 2), (3, 8, 6, 3, 1), (13, 8, 14, 4, 3), (192, 64, 14, 4, 1), (7, 6, 7, 2, 2)],
)
def test_reported_unet_shape_is_what_the_reference_loop_passes(frames, window, size, levels, batch):
    setup = _shape_setup(frames, window, size, levels)
    unet = _ShapeUNet(setup.models.lvdm.config)
    with torch.no_grad():
        reference.reference_lvdm(
            unet,
            reference.diffusers_scheduler(),
            torch.zeros(batch, 4, size, size),
            torch.full((batch,), 50.0),
            frames,
            1,
            generator=torch.Generator().manual_seed(0),
            autocast_dtype=None,
        )
    (shape,) = unet.shapes
    n_win, length, reported = bench._lvdm_shapes(setup, batch)
    assert reported == shape
    assert n_win * batch == shape[0] and length == shape[1]


def test_unet_call_inputs_are_two_sets_at_the_pipeline_shape_and_two_timesteps():
    setup = _shape_setup(13, 8, 14, 4, seed=2)
    _, _, shape = bench._lvdm_shapes(setup, 3)
    sets = bench._unet_inputs(setup, 3)
    assert len(sets) == 2 and not torch.equal(sets[0][0], sets[1][0])
    for (x, t, ehs, ids), step in zip(sets, (900, 500)):
        assert x.shape == shape and x.dtype == torch.float32
        assert t.dtype == torch.int64 and t.device.type == "cpu" and t.item() == step
        assert ehs.shape == (shape[0], 1, 1) and 0 <= ehs.min() and ehs.max() < 1
        assert torch.equal(ids, torch.zeros(shape[0], 1))
    again = bench._unet_inputs(setup, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(sets, again))


def _smoke_step_inputs(seed):
    """The smoke LVDM (random weights of ``seed``) and the benchmark's two input sets of one
    window, each with one conditioning latent on every frame, as in a pipeline."""
    models = reference.build_models(
        bench.SMOKE_CONFIGS, torch.device("cpu"), seed=seed, with_diffusers=False
    )
    setup = SimpleNamespace(
        plan=SimpleNamespace(frames=8), models=models, device=torch.device("cpu"), seed=4
    )
    sets = bench._unet_inputs(setup, 1)
    c = models.lvdm.config.in_channels // 2
    for x, *_ in sets:
        x[:, :, c:] = x[:, :1, c:]
    return models.lvdm, sets


def _assert_step_call_is_the_unet(lvdm, calls):
    """``PipelineStepCall`` answers each of ``calls`` (input sets, in order) as the UNet does,
    and exactly as the UNet's own split call (noisy half, ``conditioning_features`` of frame 0,
    ``time_features`` of the step): the tiny model's output depends on the timestep by ~1e-6
    only."""
    step = bench.PipelineStepCall(lvdm, graphs=False)
    c = lvdm.config.in_channels // 2
    with torch.no_grad():
        for x, t, ehs, ids in calls:
            kw = {"encoder_hidden_states": ehs, "added_time_ids": ids}
            got = step(x, t, **kw).sample
            torch.testing.assert_close(got, lvdm(x, t, **kw).sample, rtol=1e-5, atol=1e-5)
            split = lvdm(x[:, :, :c].contiguous(), t, **kw,
                         conditioning=lvdm.conditioning_features(x[:, 0, c:]),
                         time_features=lvdm.time_features(t, ids)).sample  # fmt: skip
            torch.testing.assert_close(got, split, rtol=0, atol=1e-7)


def test_the_step_call_computes_what_the_unet_computes_at_each_step():
    """The ``unet/echofast+step`` row times a call that gives the UNet's output for the step it
    is called with: as in a pipeline, the steps share the conditioning latent and the EFs, and
    differ in the noisy latents and the timestep."""
    lvdm, ((x0, t0, ehs, ids), (x1, t1, _, _)) = _smoke_step_inputs(1)
    c = lvdm.config.in_channels // 2
    x1[:, :, c:] = x0[:, :, c:]
    _assert_step_call_is_the_unet(
        lvdm, [(x0, t0, ehs, ids), (x1, t1, ehs, ids), (x0, t0, ehs, ids)]
    )


def test_reference_padding_reaches_the_unets_multiple_and_no_further():
    """The spec's 14 → 16 for a 4-level UNet; a size already divisible is not padded (as
    echofast's pipelines do)."""
    from echofast.pipelines.common import latent_padding

    assert reference.reference_pad(14, 4) == 1
    for levels in (1, 2, 3, 4):
        m = 2 ** (levels - 1)
        for size in range(2, 33, 2):
            assert reference.reference_pad(size, levels) == latent_padding(size, m), (size, m)


def test_the_input_sets_are_steps_of_one_run():
    """``_unet_inputs``' sets share the conditioning latent (one per window, on every frame) and
    the EFs, as a pipeline's steps do, so the step call answers each of them as the UNet does;
    a set from another run (another conditioning latent, other EFs) is refused, not answered
    with the first run's features."""
    lvdm, sets = _smoke_step_inputs(2)
    c = lvdm.config.in_channels // 2
    (x0, _, ehs0, ids0), (x1, _, ehs1, ids1) = sets
    assert torch.equal(x0[:, :, c:], x1[:, :, c:]) and not torch.equal(x0[:, :, :c], x1[:, :, :c])
    assert torch.equal(x0[:, :, c:], x0[:, :1, c:].expand_as(x0[:, :, c:]))
    assert ehs0 is ehs1 and ids0 is ids1
    _assert_step_call_is_the_unet(lvdm, sets)
    step = bench.PipelineStepCall(lvdm, graphs=False)
    x, t, ehs, ids = sets[0]
    with torch.no_grad():
        step(x, t, encoder_hidden_states=ehs, added_time_ids=ids)
        other = x.clone()
        other[:, :, c:] += 1
        with pytest.raises(ValueError, match="another conditioning latent$"):
            step(other, t, encoder_hidden_states=ehs, added_time_ids=ids)
        with pytest.raises(ValueError, match="another encoder_hidden_states, added_time_ids$"):
            step(x.clone(), t, encoder_hidden_states=ehs + 1, added_time_ids=ids + 1)
