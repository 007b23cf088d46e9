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
