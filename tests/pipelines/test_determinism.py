"""The per-sample RNG contract: a sample does not depend on batch size or batch position.

"Identical" means within 1e-6 of the largest magnitude (fp32 CPU): small-batch convolutions take
batch-size-dependent code paths, so bit equality across batch sizes is not promised.
"""

from __future__ import annotations

import pytest
import torch
from support.models import rel_err

from echofast.pipelines import EchoSyntheticPipeline, LIDMPipeline, window_plan
from echofast.rng import sample_seed

STEPS = 4


@pytest.fixture(scope="module")
def pipe(weights_root):
    return EchoSyntheticPipeline.from_pretrained(weights_root)


def test_seed_rule_is_documented_and_stable():
    assert sample_seed(0, 0, "lidm") == sample_seed(0, 0, "lidm")
    assert (
        len({sample_seed(s, i, k) for s in (0, 1) for i in (0, 1) for k in ("lidm", "lvdm")}) == 8
    )
    assert sample_seed(7, 3, "lvdm") < 2**63


def test_lidm_sample_independent_of_batch(pipe):
    lidm = pipe.lidm_pipe
    all5 = lidm(5, seed=3, num_inference_steps=STEPS, batch_size=5, progress=False).latents
    split = lidm(5, seed=3, num_inference_steps=STEPS, batch_size=2, progress=False).latents
    alone = lidm(1, seed=3, sample_indices=[4], num_inference_steps=STEPS, progress=False).latents
    reordered = lidm(
        2, seed=3, sample_indices=[4, 0], num_inference_steps=STEPS, batch_size=2, progress=False
    ).latents
    assert rel_err(split, all5) <= 1e-6
    assert rel_err(alone[0], all5[4]) <= 1e-6
    assert rel_err(reordered, all5[[4, 0]]) <= 1e-6


def test_videos_independent_of_batch(pipe):
    ef = [20.0, 50.0, 80.0]
    kw = dict(seed=9, num_frames=12, num_inference_steps=STEPS)
    full = pipe(ef, batch_size=3, **kw)
    single = pipe(ef[2:], sample_indices=[2], batch_size=1, **kw)
    assert full.videos.shape == (3, 12, 12, 12) and full.videos.dtype == torch.uint8
    assert rel_err(single.image_latents[0], full.image_latents[2]) <= 1e-6
    assert (single.videos[0].int() - full.videos[2].int()).abs().max() <= 1


def test_explicit_generators_and_errors(pipe):
    lidm: LIDMPipeline = pipe.lidm_pipe
    g = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    a = lidm(2, generator=g, num_inference_steps=2, progress=False).latents
    g = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    b = lidm(2, generator=g, num_inference_steps=2, batch_size=1, progress=False).latents
    assert rel_err(b, a) <= 1e-6
    with pytest.raises(ValueError, match="one generator for 2 samples"):
        lidm(2, generator=torch.Generator(), num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="got 1 generators for 2 samples"):
        lidm(2, generator=[torch.Generator()], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        lidm(1, seed=0, dtype="float16", progress=False)


@pytest.mark.parametrize(
    ("frames", "window", "expected"),
    [
        (192, 64, (192, [0, 32, 64, 96, 128])),
        (128, 64, (128, [0, 32, 64])),
        (100, 64, (128, [0, 32, 64])),
        (64, 64, (64, [0])),
        (40, 64, (64, [0])),
        (20, 64, (32, [0])),
        (12, 8, (12, [0, 4])),
        (25, 25, (25, [0])),
        (24, 25, (24, [0])),
        (26, 25, (37, [0, 12])),
        (7, 7, (7, [0])),
        (8, 7, (10, [0, 3])),
        (4, 3, (4, [0, 1])),
    ],
)
def test_window_plan(frames, window, expected):
    assert window_plan(frames, window) == expected


def test_window_plan_covers_every_frame_and_keeps_the_reference_rule():
    from echofast.ops import window_tables

    for window in range(2, 14):
        stride = window // 2
        for frames in range(1, 60):
            total, starts = window_plan(frames, window)
            assert total >= frames and starts[-1] + min(window, total) == total
            window_tables(total, starts, min(window, total), window - stride)  # raises on gaps
            if window % 2 == 0:  # the reference: rounded up to the stride, half overlaps
                ref_total = -(-frames // stride) * stride
                ref_starts = list(range(0, ref_total - window + 1, stride)) or [0]
                assert (total, starts) == (ref_total, ref_starts)


def test_output_types(pipe):
    lidm = pipe.lidm_pipe
    out = lidm(2, seed=0, num_inference_steps=2, output_type="pt", progress=False)
    assert out.images.shape == (2, 1, 12, 12) and 0 <= out.images.min() <= out.images.max() <= 1
    out = lidm(2, seed=0, num_inference_steps=2, output_type="np", progress=False)
    assert out.images.shape == (2, 12, 12, 1)
    with pytest.raises(ValueError, match="output_type must be one of"):
        lidm(1, seed=0, output_type="gif", progress=False)


def test_previews_are_the_vae_decode_of_the_latents(pipe):
    """The previews decode the returned latents (÷ scaling_factor): "pt" is the channel mean
    mapped by (x + 1) / 2 and clamped to [0, 1], "np" the same values channels-last, "pil" the
    uint8 frames of ``frames_to_uint8`` (truncated (x + 1) * 128). Same decode call, so exact."""
    import numpy as np

    lidm = pipe.lidm_pipe
    kw = dict(seed=0, num_inference_steps=2, progress=False)
    pt = lidm(2, output_type="pt", **kw)
    with torch.no_grad():
        x = lidm.vae.decode(pt.latents / lidm.vae.config.scaling_factor).sample
    assert x.shape == (2, 3, 12, 12)
    mean = x.float().mean(dim=1, keepdim=True)
    expected = ((mean + 1) / 2).clamp(0, 1)
    assert 0 < expected.min() and expected.max() < 1  # the clamp does not hide the scale
    assert torch.equal(pt.images, expected)
    np_out = lidm(2, output_type="np", **kw)
    assert torch.equal(np_out.latents, pt.latents)
    assert isinstance(np_out.images, np.ndarray) and np_out.images.shape == (2, 12, 12, 1)
    assert np.array_equal(np_out.images, expected.permute(0, 2, 3, 1).numpy())
    pil = lidm(2, output_type="pil", **kw).images
    assert len(pil) == 2 and all(im.mode == "L" and im.size == (12, 12) for im in pil)
    as_uint8 = ((mean[:, 0] + 1) * 128).clamp(0, 255).to(torch.uint8).numpy()
    for im, ref in zip(pil, as_uint8):
        assert np.array_equal(np.asarray(im), ref)


def test_previews_clamp_decodes_outside_the_pixel_range(pipe, monkeypatch):
    """A decode beyond [-1, 1] gives "pt" previews clamped to [0, 1] (as the uint8 frames are)."""
    lidm = pipe.lidm_pipe
    real = lidm.vae.decode

    def loud(z, *args, **kwargs):
        out = real(z, *args, **kwargs)
        out.sample.mul_(8)
        return out

    monkeypatch.setattr(lidm.vae, "decode", loud)
    got = lidm(2, output_type="pt", seed=0, num_inference_steps=2, progress=False)
    with torch.no_grad():
        x = real(got.latents / lidm.vae.config.scaling_factor).sample * 8
    gray = (x.mean(dim=1, keepdim=True) + 1) / 2
    assert gray.min() < 0 and gray.max() > 1
    assert torch.equal(got.images, gray.clamp(0, 1))


def test_previews_follow_the_vae_dtype_in_chunks(pipe):
    """A bfloat16 VAE decodes the fp32 latents after converting them to its dtype (a bf16 VAE
    given fp32 latents raised), ``batch_size`` images per decode call; the previews are fp32 and
    within bf16's rounding of the fp32 VAE's."""
    import copy

    from echofast.pipelines import LIDMPipeline

    lidm = pipe.lidm_pipe
    kw = dict(seed=0, num_inference_steps=2, progress=False, output_type="pt", batch_size=2)
    want = lidm(3, **kw)
    vae = copy.deepcopy(lidm.vae).to(torch.bfloat16)
    calls = []
    real = vae.decode

    def counted(z, *a, **k):
        calls.append((z.shape[0], z.dtype))
        return real(z, *a, **k)

    vae.decode = counted
    got = LIDMPipeline(lidm.lidm, vae, lidm.scheduler)(3, **kw)
    assert calls == [(2, torch.bfloat16), (1, torch.bfloat16)]
    assert torch.equal(got.latents, want.latents)
    assert got.images.dtype == torch.float32 and got.images.shape == want.images.shape
    assert (got.images - want.images).abs().max() < 0.05


def test_non_finite_is_named(pipe, monkeypatch):
    from echofast.errors import NonFiniteError

    lidm = pipe.lidm_pipe
    real = lidm.lidm.forward

    def poisoned(sample, t, *a, **k):
        out = real(sample, t, *a, **k)
        out.sample[1].fill_(float("nan"))
        return out

    monkeypatch.setattr(lidm.lidm, "forward", poisoned)
    with pytest.raises(NonFiniteError, match="sample 8 is not finite at step 0"):
        lidm(2, seed=0, sample_indices=[7, 8], num_inference_steps=2, progress=False)


def test_seeds_and_indices_must_be_integers():
    """The seed rule hashes the decimal text, so 1.0 would silently name another sample."""
    import numpy as np

    assert sample_seed(np.int64(3), torch.tensor(2), "lvdm") == sample_seed(3, 2, "lvdm")
    for bad in (1.0, 1.5, True, "1", torch.tensor(1.0)):
        with pytest.raises(TypeError, match="seed must be an integer"):
            sample_seed(bad, 0, "lidm")
    with pytest.raises(TypeError, match="sample index must be an integer"):
        sample_seed(0, 2.0, "lidm")


def test_bad_arguments_are_refused_before_any_sampling(pipe, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the arguments")

    monkeypatch.setattr(pipe.lidm_pipe, "_sample", no_sampling)
    with pytest.raises(ValueError, match="2 EF values and 1 sample indices"):
        pipe([30.0, 40.0], seed=0, sample_indices=[5], num_frames=3)
    with pytest.raises(ValueError, match="seed is required"):
        pipe([30.0], seed=None, num_frames=3)
    with pytest.raises(ValueError, match="ef is empty"):
        pipe([], seed=0, num_frames=3)
    with pytest.raises(TypeError, match="seed must be an integer"):
        pipe([30.0], seed=1.5, num_frames=3)


def test_lvdm_pipeline_rejects_empty_batches_and_flat_latents(pipe):
    lvdm = pipe.lvdm_pipe
    with pytest.raises(ValueError, match="a batch of 0"):
        lvdm(torch.randn(0, 4, 6, 6), [], seed=0, num_frames=3, progress=False)
    with pytest.raises(ValueError, match=r"\(B, T, C, h, w\).*\(3, 4, 6, 6\)"):
        lvdm.decode(torch.randn(3, 4, 6, 6))


def test_lidm_latent_size_comes_from_the_config():
    from echofast.models import LIDM
    from echofast.models.tiny import TINY_LIDM

    def sample(size):
        model = LIDM(**dict(TINY_LIDM, sample_size=size)).eval()
        return LIDMPipeline(model)(1, seed=0, num_inference_steps=1, progress=False).latents

    assert sample([6, 10]).shape == (1, 4, 6, 10)
    with pytest.raises(ValueError, match="no sample_size"):
        sample(None)
    with pytest.raises(ValueError, match="6×8 need 1 rows and 0 columns"):
        sample([6, 8])
