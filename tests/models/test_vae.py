"""VAE parity with diffusers' AutoencoderKL, both directions, plus the full config."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from support.configs import VAE_FULL_CONFIG, VAE_SMALL_CONFIG
from support.models import build_diffusers, rel_err, save_diffusers

from echofast.models import VAE
from echofast.models.outputs import DiagonalGaussian
from echofast.models.tiny import TINY_VAE

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    ref = save_diffusers(AutoencoderKL, VAE_SMALL_CONFIG, folder)
    return ref, VAE.from_pretrained(folder)


@pytest.mark.parametrize("shape", [(2, 3, 24, 24), (1, 3, 40, 32)])
def test_encode_matches_diffusers(pair, shape):
    ref, ours = pair
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        a = ref.encode(x).latent_dist
        b = ours.encode(x).latent_dist
    assert rel_err(b.mean, a.mean) <= TOL
    assert rel_err(b.std, a.std) <= TOL
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert rel_err(b.sample(gb), a.sample(ga)) <= TOL


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (3, 4, 7, 5)])
def test_decode_matches_diffusers(pair, shape):
    ref, ours = pair
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ref.decode(z).sample
        b = ours.decode(z).sample
        t = ours.decode(z, return_dict=False)
    assert b.shape == a.shape
    assert rel_err(b, a) <= TOL
    assert isinstance(t, tuple) and torch.equal(t[0], b)


def test_forward_samples_the_posterior_like_diffusers(pair):
    ref, ours = pair
    x = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        a = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample
        b = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample
        mode = ours(x).sample
    assert rel_err(b, a) <= TOL
    assert rel_err(b, mode) > 1e-3  # the sample is not the mean


def test_posterior_statistics_match_diffusers():
    """DiagonalGaussian's std, KL (to N(0, 1) and to another posterior) and NLL against
    diffusers' DiagonalGaussianDistribution, with log-variances beyond both clamp bounds."""
    g = torch.Generator().manual_seed(11)
    moments = [torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    moments[0][:, 3:, 0, 0] = -45.0  # below the -30 clamp (exp(-45) is not 0 in fp64)
    moments[0][:, 3:, 1, 1] = 25.0  # above the 20 clamp
    ours = [DiagonalGaussian(m) for m in moments]
    ref = [DiagonalGaussianDistribution(m) for m in moments]
    sample = torch.randn(2, 3, 3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours[0].std, ref[0].std, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours[0].kl(), ref[0].kl(), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours[0].kl(ours[1]), ref[0].kl(ref[1]), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours[1].kl(ours[0]), ref[1].kl(ref[0]), rtol=1e-12, atol=0)
    for i in range(2):
        torch.testing.assert_close(ours[i].nll(sample), ref[i].nll(sample), rtol=1e-12, atol=0)
    det = DiagonalGaussian(moments[1], deterministic=True)
    det_ref = DiagonalGaussianDistribution(moments[1], deterministic=True)
    assert torch.equal(det.std, det_ref.std) and torch.equal(det.var, det_ref.var)
    assert torch.equal(det.sample(torch.Generator().manual_seed(0)), det.mean)


def test_float64_posterior_samples_and_deterministic_statistics_match_diffusers():
    """A float64 posterior draws float64 noise (diffusers' draw); a deterministic one has no KL
    and no NLL."""
    moments = torch.randn(2, 6, 3, 5, generator=torch.Generator().manual_seed(12)).double()
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    a = ours.sample(torch.Generator().manual_seed(13))
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, ref.sample(torch.Generator().manual_seed(13)), rtol=1e-12, atol=0)
    det = DiagonalGaussian(moments, deterministic=True)
    det_ref = DiagonalGaussianDistribution(moments, deterministic=True)
    sample = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    for got, want in ((det.kl(), det_ref.kl()), (det.nll(sample), det_ref.nll(sample))):
        assert got.shape == (2,) and torch.equal(got, want.to(got).expand(2))


def test_autograd_path_matches_diffusers(pair):
    """With autograd on (training) the blocks take their out-of-place paths."""
    ref, ours = pair
    z = torch.randn(1, 4, 3, 2, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = ref.decode(z).sample
    z.requires_grad_(True)
    out = ours.decode(z).sample
    assert out.requires_grad and rel_err(out.detach(), expected) <= TOL


def test_nchw_mode(pair):
    ref, ours = pair
    z = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(8))
    x = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    assert ours.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ours.use_channels_last(False)
    try:
        assert ours.decoder.conv_in.weight.is_contiguous()
        with torch.no_grad():
            out = ours.decode(z).sample
            assert out.is_contiguous()
            assert rel_err(out, ref.decode(z).sample) <= TOL
            assert rel_err(ours.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean) <= TOL
    finally:
        ours.use_channels_last(True)


def test_save_pretrained_loads_in_diffusers(pair, tmp_path):
    ref, ours = pair
    ours.save_pretrained(tmp_path)
    back = AutoencoderKL.from_pretrained(tmp_path).eval()
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(back.decode(z).sample, ours.decode(z).sample) <= TOL
    assert set(back.state_dict()) == set(ref.state_dict())
    assert back.config.scaling_factor == ours.config.scaling_factor


def test_options_off(tmp_path):
    cfg = {
        **VAE_SMALL_CONFIG,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": False,
        "scaling_factor": 0.5,
    }
    ref = save_diffusers(AutoencoderKL, cfg, tmp_path)
    ours = VAE.from_pretrained(tmp_path)
    assert ours.quant_conv is None and ours.config.scaling_factor == 0.5
    x = torch.rand(1, 3, 24, 24) * 2 - 1
    with torch.no_grad():
        assert rel_err(ours(x).sample, ref(x).sample) <= TOL


def test_full_config_parameter_count_and_parity():
    """Full-size random decoders amplify float rounding: diffusers' own decoder run in
    channels_last differs from its NCHW run by ~1.6e-5. echofast (channels_last) must stay
    within 1e-5 or twice that layout noise floor, whichever is larger."""
    ref = build_diffusers(AutoencoderKL, VAE_FULL_CONFIG)
    ours = VAE.from_config(VAE_FULL_CONFIG)
    assert ours.num_parameters() == 62_412_007
    assert round(sum(p.numel() for p in ours.encoder.parameters()) / 1e6, 2) == 25.31
    assert round(sum(p.numel() for p in ours.decoder.parameters()) / 1e6, 2) == 37.10
    ours.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        za, zb = ref.encode(x).latent_dist.mean, ours.encode(x).latent_dist.mean
        assert za.shape == (1, 4, 14, 14)
        assert rel_err(zb, za) <= TOL
        expected = ref.decode(za).sample
        ref.to(memory_format=torch.channels_last)
        floor = rel_err(
            ref.decode(za.contiguous(memory_format=torch.channels_last)).sample, expected
        )
        assert rel_err(ours.decode(za).sample, expected) <= max(TOL, 2 * floor)


@pytest.mark.parametrize("act_fn", ["silu", "swish"])
def test_float64_round_trip_matches_diffusers_to_rounding(act_fn):
    """In float64 layout noise vanishes: encoder and decoder agree with diffusers to ~1e-12
    (a wrong norm eps alone moves them by ~1e-6). diffusers takes "swish" for SiLU too."""
    cfg = {**TINY_VAE, "act_fn": act_fn}
    ref = build_diffusers(AutoencoderKL, cfg, seed=2).double()
    ours = VAE.from_config(cfg).double().eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        a, b = ref.encode(x).latent_dist, ours.encode(x).latent_dist
        torch.testing.assert_close(b.mean, a.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.logvar, a.logvar, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours(x).sample, ref(x).sample, rtol=1e-10, atol=1e-12)


def test_return_dict_false_gives_tuples_like_diffusers(pair):
    ref, ours = pair
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(10)) * 2 - 1
    with torch.no_grad():
        enc, ref_enc = ours.encode(x, return_dict=False), ref.encode(x, return_dict=False)
        out, ref_out = ours(x, return_dict=False), ref(x, return_dict=False)
    assert type(enc) is type(ref_enc) is tuple and len(enc) == len(ref_enc) == 1
    assert isinstance(enc[0], DiagonalGaussian) and rel_err(enc[0].mean, ref_enc[0].mean) <= TOL
    assert type(out) is type(ref_out) is tuple and len(out) == len(ref_out) == 1
    assert rel_err(out[0], ref_out[0]) <= TOL


def test_outputs_keep_the_callers_layout(pair):
    """Activations run channels_last inside; what encode and decode return is contiguous NCHW,
    as diffusers returns it."""
    ref, ours = pair
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(11)) * 2 - 1
    with torch.no_grad():
        dist = ours.encode(x).latent_dist
        image = ours.decode(dist.mean).sample
        assert ref.decode(dist.mean).sample.is_contiguous()
    assert dist.mean.is_contiguous() and dist.std.is_contiguous()
    assert image.is_contiguous()
