"""The LVDM's ``conv_in`` split (issue 7): the conditioning latent's half of ``conv_in`` computed
once per batch (``LVDM.conditioning_features``) and added at every step, while the UNet input
holds only the noisy latent channels.

Tolerances (fp32, CPU; relative = max abs error / max abs reference): the split forward is
compared with the full-input forward in fp64; it must be within 1e-5 (the repo's fp32 parity
tolerance) and within 4x the fp32 full-input forward's own error (measured, TINY_LVDM with random
norms: split 2.1e-6 / 1.2e-6 vs full 5.8e-6 / 1.6e-6 at 8x8 / 7x7). In fp64 the two agree to
1e-12, gradients included. The split pipeline equals the unsplit pipeline (same weights, full
2c-channel input) within 1e-5 after 4 steps (measured 6.1e-7 with one window, 1.4e-6 with two,
1.1e-6 with two videos of three windows in one batch).
"""

from __future__ import annotations

import pytest
import torch
from support.models import randomize_norms, rel_err
from support.threads import one_torch_thread
from support.weights import TINY_LVDM

from echofast.models import LVDM
from echofast.pipelines import LVDMPipeline

PIPE_TOL = 1e-5


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _model(config=TINY_LVDM, seed=0) -> LVDM:
    torch.manual_seed(seed)
    return randomize_norms(LVDM.from_config(config).eval())


def _inputs(b=3, t=5, hw=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(b, t, 4, hw, hw, generator=g)
    cond = torch.randn(b, 4, hw, hw, generator=g)
    ef = torch.rand(b, 1, 1, generator=g)
    return noisy, cond, ef, torch.zeros(b, 1)


def _full(noisy, cond):
    return torch.cat([noisy, cond[:, None].expand(*noisy.shape)], dim=2)


@pytest.mark.parametrize("hw", [8, 7])
@torch.no_grad()
def test_split_forward_matches_full_input(hw):
    model = _model()
    noisy, cond, ef, ids = _inputs(hw=hw)
    feats = model.conditioning_features(cond)
    assert feats.shape == (3, 32, hw, hw)
    split = model(noisy, 500, ef, ids, conditioning=feats).sample
    full = model(_full(noisy, cond), 500, ef, ids).sample
    ref = model.double()(_full(noisy, cond).double(), 500, ef.double(), ids.double()).sample
    floor = rel_err(full, ref)
    assert rel_err(split, ref) <= min(1e-5, 4 * max(floor, 1e-7)), (rel_err(split, ref), floor)
    # the features carry the conditioning: another conditioning latent is another output
    model.float()
    other = model.conditioning_features(cond.flip(0))
    assert rel_err(model(noisy, 500, ef, ids, conditioning=other).sample, full) > 1e-3


def test_split_is_exact_algebra_and_differentiable():
    """In fp64 the split and the full input agree to rounding, gradients included (the features
    are added in place to conv_in's output: autograd must still see every input)."""
    model = _model().double()
    noisy, cond, ef, ids = (t.double() for t in _inputs(b=2, t=3))
    a, ca = noisy.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    out_a = model(a, 40, ef, ids, conditioning=model.conditioning_features(ca)).sample
    b, cb = noisy.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    out_b = model(_full(b, cb), 40, ef, ids).sample
    assert rel_err(out_a, out_b) <= 1e-12
    (out_a.square().sum()).backward()
    (out_b.square().sum()).backward()
    assert rel_err(a.grad, b.grad) <= 1e-12 and rel_err(ca.grad, cb.grad) <= 1e-12
    assert model.conv_in.weight.grad is not None


def test_split_input_errors():
    model = _model()
    noisy, cond, ef, ids = _inputs()
    feats = model.conditioning_features(cond)
    with pytest.raises(ValueError, match=r"sample must be \(B, T, 4, H, W\) with conditioning"):
        model(_full(noisy, cond), 1, ef, ids, conditioning=feats)
    with pytest.raises(ValueError, match="conditioning must be"):
        model(noisy, 1, ef, ids, conditioning=feats[:2])
    with pytest.raises(ValueError, match="cond must be"):
        model.conditioning_features(_full(noisy, cond)[:, 0])
    odd = LVDM.from_config({**TINY_LVDM, "in_channels": 5})
    with pytest.raises(ValueError, match="even in_channels"):
        odd.conditioning_features(cond)


class _Unsplit(torch.nn.Module):
    """The same LVDM without ``conditioning_features``: the pipeline gives it the full input."""

    def __init__(self, model: LVDM):
        super().__init__()
        self.model = model
        self.config = model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _record_calls(model: LVDM):
    """Per UNet call: (sample channels, conditioning given); conv_in module calls; feature calls."""
    calls, conv_in_calls, feature_calls = [], [], []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(
            (args[0].shape[2], kwargs.get("conditioning") is not None)
        ),
        with_kwargs=True,
    )
    model.conv_in.register_forward_pre_hook(lambda m, args: conv_in_calls.append(args[0].shape))
    features = model.conditioning_features

    def spy(cond):
        feature_calls.append(tuple(cond.shape))
        return features(cond)

    model.conditioning_features = spy
    return calls, conv_in_calls, feature_calls


@pytest.mark.parametrize(("num_frames", "batch_size"), [(8, 1), (12, 1), (16, 2)])
def test_pipeline_split_equals_unsplit_and_is_taken(num_frames, batch_size):
    """8 frames: one window; 12: two windows per video; two batches of one video, 4 steps.
    16 frames, one batch of both videos: 3 windows each, so the unsplit input must lay out its
    conditioning channels sample-major (video 0's windows, then video 1's), as the noisy windows
    and the EF are laid out; the two videos have different conditioning latents."""
    steps = 4
    model = _model(seed=2)
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    kw = dict(
        num_frames=num_frames,
        seed=4,
        num_inference_steps=steps,
        batch_size=batch_size,
        output_type="latent",
        progress=False,
    )
    unsplit = LVDMPipeline(_Unsplit(model))(cond, [30.0, 65.0], **kw)
    calls, conv_in_calls, feature_calls = _record_calls(model)
    split = LVDMPipeline(model)(cond, [30.0, 65.0], **kw)
    # the split path ran: c = 4 noisy channels + features at every call, features once per
    # batch (on the padded 8x8 conditioning latents), the full conv_in module never
    batches = 2 // batch_size
    assert calls == [(4, True)] * (batches * steps)
    assert feature_calls == [(batch_size, 4, 8, 8)] * batches
    assert conv_in_calls == []
    assert rel_err(split.latents, unsplit.latents) <= PIPE_TOL
    assert split.latents.shape == (2, num_frames, 4, 6, 6)


def test_pipeline_unsplit_for_modules_without_features():
    """A module without ``conditioning_features`` (e.g. diffusers' UNet) gets 2c channels."""
    model = _model(seed=5)
    calls, conv_in_calls, feature_calls = _record_calls(model)
    del model.conditioning_features  # the spy; the wrapper hides the method anyway
    cond = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    LVDMPipeline(_Unsplit(model))(
        cond,
        [50.0],
        num_frames=8,
        seed=0,
        num_inference_steps=2,
        output_type="latent",
        progress=False,
    )
    assert calls == [(8, False)] * 2 and len(conv_in_calls) == 2 and feature_calls == []
