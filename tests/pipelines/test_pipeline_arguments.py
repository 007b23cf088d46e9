"""Bad arguments to the sampling pipelines are refused with a ValueError naming the argument,
before any sampling (not a bare ``range()``/``torch.cat`` error, and never a silently shorter or
longer batch); a non-finite VAE decode is refused naming the video."""

from __future__ import annotations

import pytest
import torch
from support.threads import one_torch_thread

from echofast.pipelines import EchoSyntheticPipeline

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def pipe(weights_root):
    return EchoSyntheticPipeline.from_pretrained(weights_root)


@pytest.fixture
def no_sampling(pipe, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampled before checking the arguments")

    monkeypatch.setattr(pipe.lidm_pipe, "_sample", refuse)
    monkeypatch.setattr(pipe.lvdm_pipe, "_sample", refuse)
    return pipe


@pytest.mark.parametrize("batch_size", [0, -1])
def test_lidm_batch_size_and_count_must_be_positive(no_sampling, batch_size):
    lidm = no_sampling.lidm_pipe
    with pytest.raises(ValueError, match="num_images and batch_size must be >= 1"):
        lidm(3, seed=0, batch_size=batch_size, progress=False)
    with pytest.raises(ValueError, match="num_images and batch_size must be >= 1"):
        lidm(batch_size, seed=0, progress=False)


def test_lvdm_ef_count_channels_and_sizes_are_checked(no_sampling):
    lvdm = no_sampling.lvdm_pipe
    cond = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    kw = dict(seed=0, num_frames=5, output_type="latent", progress=False)
    for ef in ([30.0, 40.0], [30.0, 40.0, 50.0, 60.0], torch.full((2, 3), 50.0)):
        with pytest.raises(ValueError, match=r"EF values for 3 conditioning latents"):
            lvdm(cond, ef, **kw)
    with pytest.raises(ValueError, match="cond_latents have 3 channels; this LVDM takes 8"):
        lvdm(cond[:, :3], [30.0] * 3, **kw)
    for bad in ({"batch_size": 0}, {"decode_chunk_size": 0}, {"batch_size": -2}):
        with pytest.raises(ValueError, match="batch_size and decode_chunk_size must be >= 1"):
            lvdm(cond, [30.0] * 3, **{**kw, **bad})
    with pytest.raises(ValueError, match="output_type"):
        lvdm(cond, [30.0] * 3, **{**kw, "output_type": "pil"})


def test_one_scheduler_or_two_not_both(pipe):
    from echofast.schedulers import DDIMScheduler

    with pytest.raises(ValueError, match="either scheduler="):
        EchoSyntheticPipeline(
            pipe.lidm, pipe.lvdm, pipe.vae, DDIMScheduler(), lvdm_scheduler=DDIMScheduler()
        )
    lidm_s, lvdm_s = DDIMScheduler(), DDIMScheduler(prediction_type="sample")
    two = EchoSyntheticPipeline(
        pipe.lidm, pipe.lvdm, pipe.vae, lidm_scheduler=lidm_s, lvdm_scheduler=lvdm_s
    )
    assert two.lidm_pipe.scheduler is lidm_s and two.lvdm_pipe.scheduler is lvdm_s


def test_a_non_finite_decode_is_named(pipe, monkeypatch):
    """A VAE decode that goes non-finite raises, naming the video's global index, instead of
    turning NaN into uint8 frames."""
    from echofast.errors import NonFiniteError

    lvdm = pipe.lvdm_pipe
    real = lvdm.vae.decode

    def poisoned(z, *args, **kwargs):
        out = real(z, *args, **kwargs)
        out.sample[-1, 0, 3, 5] = float("nan")  # the last frame of the chunk: video 1
        return out

    latents = torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    assert lvdm.decode(latents, chunk_size=6).shape == (2, 3, 12, 12)
    monkeypatch.setattr(lvdm.vae, "decode", poisoned)
    with pytest.raises(NonFiniteError, match="decoded video of sample 17 is not finite"):
        lvdm.decode(latents, chunk_size=6, indices=[4, 17])
    with pytest.raises(NonFiniteError, match="decoded video of sample 1 is not finite"):
        lvdm.decode(latents, chunk_size=6)


def test_a_non_finite_decode_in_a_later_batch_names_its_video(pipe, monkeypatch):
    """Videos decoded batch by batch: the second batch's video is named by its own index."""
    from echofast.errors import NonFiniteError

    lvdm = pipe.lvdm_pipe
    real, calls = lvdm.vae.decode, []

    def poisoned(z, *args, **kwargs):
        out = real(z, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out.sample[0, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(lvdm.vae, "decode", poisoned)
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    kw = dict(seed=0, num_frames=3, num_inference_steps=1, batch_size=1, progress=False)
    with pytest.raises(NonFiniteError, match="decoded video of sample 9 is not finite"):
        lvdm(cond, [30.0, 60.0], sample_indices=[4, 9], **kw)


def test_outputs_that_need_a_vae_are_refused_without_one(pipe, monkeypatch):
    from echofast.pipelines import LIDMPipeline, LVDMPipeline

    lidm, lvdm = LIDMPipeline(pipe.lidm), LVDMPipeline(pipe.lvdm)
    for sub in (lidm, lvdm):
        monkeypatch.setattr(sub, "_sample", lambda *a, **k: pytest.fail("sampled"))
    for output_type in ("pt", "np", "pil"):
        with pytest.raises(ValueError, match=f"output_type='{output_type}' needs a VAE"):
            lidm(1, seed=0, output_type=output_type, progress=False)
    cond = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="decoding videos needs a VAE"):
        lvdm(cond, [50.0], seed=0, num_frames=3, progress=False)


def test_lvdm_conditioning_latents_must_be_images(no_sampling):
    cond = torch.randn(4, 6, 6)
    with pytest.raises(ValueError, match=r"cond_latents must be \(B, C, h, w\), got \(4, 6, 6\)"):
        no_sampling.lvdm_pipe(cond, [50.0], seed=0, num_frames=3, progress=False)


def test_decode_refuses_empty_videos_and_empty_chunks(pipe):
    decode = pipe.lvdm_pipe.decode
    for shape in ((1, 0, 4, 6, 6), (0, 3, 4, 6, 6)):
        with pytest.raises(ValueError, match=r"B, T >= 1, got \(" + ", ".join(map(str, shape))):
            decode(torch.zeros(shape))
    for chunk in (0, -3):
        with pytest.raises(ValueError, match=f"chunk_size must be >= 1, got {chunk}"):
            decode(torch.zeros(1, 2, 4, 6, 6), chunk_size=chunk)


@pytest.mark.parametrize(("frames", "window"), [(0, 64), (-4, 64), (10, 1), (10, 0)])
def test_window_plan_refuses_empty_videos_and_windows_without_a_stride(frames, window):
    from echofast.pipelines import window_plan

    with pytest.raises(ValueError, match="need num_frames >= 1 and window >= 2"):
        window_plan(frames, window)


def test_lidm_sample_size_must_be_one_or_two_sizes():
    from echofast.models import LIDM
    from echofast.models.tiny import TINY_LIDM
    from echofast.pipelines import LIDMPipeline

    model = LIDM(**TINY_LIDM).eval()
    model.config.sample_size = [6, 6, 6]
    with pytest.raises(
        ValueError, match=r"'sample_size' must be an int or \(h, w\), got \[6, 6, 6\]"
    ):
        LIDMPipeline(model)(1, seed=0, num_inference_steps=1, progress=False)


def test_return_dict_false_gives_the_output_fields_in_order(pipe):
    kw = dict(seed=2, num_inference_steps=1, progress=False)
    out = pipe.lidm_pipe(2, output_type="pt", **kw)
    plain = pipe.lidm_pipe(2, output_type="pt", return_dict=False, **kw)
    assert type(plain) is tuple and len(plain) == 2
    latents, images = plain
    assert torch.equal(latents, out.latents) and torch.equal(images, out.images)
    kw = dict(kw, num_frames=3)
    out = pipe.lvdm_pipe(latents, [40.0, 60.0], **kw)
    plain = pipe.lvdm_pipe(latents, [40.0, 60.0], return_dict=False, **kw)
    assert type(plain) is tuple and len(plain) == 2
    videos, frames = plain
    assert torch.equal(videos, out.videos) and torch.equal(frames, out.latents)


def test_defaults_are_the_reference_sampling_run():
    """192-frame videos sampled in 64 steps, as the reference generates its datasets."""
    import inspect

    from echofast.pipelines import LIDMPipeline, LVDMPipeline

    for call in (EchoSyntheticPipeline.__call__, LVDMPipeline.__call__, LIDMPipeline.__call__):
        params = inspect.signature(call).parameters
        assert params["num_inference_steps"].default == 64
        if "num_frames" in params:
            assert params["num_frames"].default == 192


@pytest.mark.parametrize("dtype", ["float8", torch.float64, torch.int8])
def test_lvdm_decode_dtype_must_be_a_supported_precision(no_sampling, dtype):
    with pytest.raises(ValueError, match="decode_dtype must be one of"):
        no_sampling.lvdm_pipe.decode(torch.zeros(1, 2, 4, 8, 8), dtype=dtype)
