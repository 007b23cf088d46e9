"""What the pipelines are given beyond the seed: stale values in their kept UNet input tensors,
conditioning latents of another dtype, and the decode precision, each checked against a plain
call (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from support.threads import one_torch_thread

from echofast.pipelines import EchoSyntheticPipeline

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

KW = dict(seed=4, sample_indices=[6, 1], num_inference_steps=2, progress=False)


@pytest.fixture(scope="module")
def pipe(weights_root):
    return EchoSyntheticPipeline.from_pretrained(weights_root)


def _poison_kept_inputs(pipe):
    """Fill every tensor a pipeline keeps between calls with NaN (what a reused allocation may
    hold): a call must write every value it reads."""
    kept = [*pipe.lidm_pipe._inputs._tensors.values(), *pipe.lvdm_pipe._inputs._tensors.values()]
    assert kept
    for t in kept:
        t.fill_(float("nan"))


def test_results_do_not_depend_on_stale_kept_inputs(pipe):
    images = pipe.lidm_pipe(2, **KW).latents
    videos = pipe.lvdm_pipe(images, [30.0, 70.0], num_frames=6, output_type="latent", **KW)
    _poison_kept_inputs(pipe)
    again = pipe.lidm_pipe(2, **KW).latents
    assert torch.equal(again, images)
    _poison_kept_inputs(pipe)
    got = pipe.lvdm_pipe(images, [30.0, 70.0], num_frames=6, output_type="latent", **KW)
    assert torch.isfinite(got.latents).all()
    assert torch.equal(got.latents, videos.latents)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_conditioning_latents_of_any_float_dtype_are_sampled_in_fp32(pipe, dtype):
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3)).to(dtype)
    kw = dict(num_frames=5, output_type="latent", **KW)
    got = pipe.lvdm_pipe(cond, [40.0, 55.0], **kw).latents
    want = pipe.lvdm_pipe(cond.float(), [40.0, 55.0], **kw).latents
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_decode_dtype_reaches_the_vae_decode(pipe, monkeypatch):
    """``decode_dtype`` of the whole pipeline and of ``LVDMPipeline.decode``: the VAE decodes
    under autocast of that dtype (none for float32)."""
    seen = []
    real = pipe.vae.decode

    def spy(z, *args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if on else torch.float32)
        return real(z, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", spy)
    latents = torch.randn(1, 3, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.bfloat16, "float16", torch.float32):
        seen.clear()
        pipe.lvdm_pipe.decode(latents, chunk_size=2, dtype=dtype)
        want = dtype if isinstance(dtype, torch.dtype) else torch.float16
        assert seen == [want, want]
    seen.clear()
    kw = dict(KW, num_inference_steps=1)
    pipe([30.0, 60.0], num_frames=4, decode_dtype=torch.bfloat16, decode_chunk_size=8, **kw)
    assert seen == [torch.bfloat16]


def test_added_time_ids_are_zero_whatever_the_kept_tensor_held():
    """The reference's added time ids are zeros. The tiny weights root's LVDM embeds one id in one
    dimension (its embedding ignores the value), so this LVDM embeds two ids in four dimensions
    each, where a stale id would change every frame."""
    from echofast.models import LVDM
    from echofast.models.tiny import TINY_CONFIGS
    from echofast.pipelines import LVDMPipeline

    torch.manual_seed(0)
    config = dict(
        TINY_CONFIGS["lvdm"], addition_time_embed_dim=4, projection_class_embeddings_input_dim=8
    )
    pipe = LVDMPipeline(LVDM(**config).eval())
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(8))
    kw = dict(num_frames=4, output_type="latent", **KW)
    want = pipe(cond, [35.0, 45.0], **kw).latents
    for t in pipe._inputs._tensors.values():
        t.fill_(0.5)
    assert torch.equal(pipe(cond, [35.0, 45.0], **kw).latents, want)
