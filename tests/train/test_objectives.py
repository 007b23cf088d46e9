"""The per-model losses, checked against their definitions on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.weights import TINY_LIDM, TINY_LVDM, TINY_VAE

from echofast.errors import ConfigError
from echofast.models import LIDM, LVDM, VAE
from echofast.rng import sample_seed
from echofast.schedulers import REFERENCE_SCHEDULER_CONFIG, DDPMScheduler
from echofast.train.config import config_from_dict
from echofast.train.objectives import PatchDiscriminator, build_objective, load_lpips


def _cfg(kind, arch, **sections):
    return config_from_dict(
        {"model": {"type": kind, "config": arch}, "data": {"source": "random"}, **sections}
    )


class Spy(torch.nn.Module):
    """Records the calls made to a model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.model(*args, **kwargs)


def _draws(seed, position, shape, offset=0.0):
    g = torch.Generator().manual_seed(sample_seed(seed, position, "train"))
    t = torch.randint(0, 1000, (1,), generator=g)
    noise = torch.randn(shape, generator=g)
    if offset:
        noise = noise + offset * torch.randn(shape[-3], generator=g).reshape(-1, 1, 1)
    return t, noise


def test_lidm_loss_definition():
    torch.manual_seed(0)
    model = LIDM.from_config(TINY_LIDM)
    obj = build_objective(_cfg("lidm", TINY_LIDM, seed=5), model)
    x0 = torch.randn(3, 4, 6, 6)
    positions = torch.tensor([10, 3, 99])
    spy = Spy(model)
    loss, _ = obj.loss(spy, x0, positions, 0, torch.device("cpu"))

    sched = DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    draws = [_draws(5, int(p), (4, 6, 6)) for p in positions]
    t = torch.cat([d[0] for d in draws])
    noise = torch.stack([d[1] for d in draws])
    noisy = sched.add_noise(x0, noise, t)
    (model_in, t_in), _ = spy.calls[0]
    assert model_in.shape == (3, 4, 8, 8)  # 6 → 8 for a 3-level UNet (14 → 16 at 4 levels)
    torch.testing.assert_close(model_in, F.pad(noisy, (1, 1, 1, 1), mode="replicate"))
    assert torch.equal(t_in, t)
    with torch.no_grad():
        pred = model(model_in, t).sample[..., 1:-1, 1:-1]
    expected = F.mse_loss(pred, sched.get_velocity(x0, noise, t))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)


def test_draws_depend_only_on_position():
    model = LIDM.from_config(TINY_LIDM)
    obj = build_objective(_cfg("lidm", TINY_LIDM), model)
    t_a, n_a = obj.draw(torch.zeros(3, 4, 6, 6), torch.tensor([7, 8, 9]))
    t_b, n_b = obj.draw(torch.zeros(1, 4, 6, 6), torch.tensor([8]))
    assert t_a[1] == t_b[0] and torch.equal(n_a[1], n_b[0])
    assert not torch.equal(n_a[0], n_a[1])
    assert ((t_a >= 0) & (t_a < 1000)).all()


def test_lvdm_loss_definition():
    torch.manual_seed(0)
    model = LVDM.from_config(TINY_LVDM)
    cfg = _cfg("lvdm", TINY_LVDM, seed=2)
    assert cfg.diffusion.noise_offset == 0.1
    obj = build_objective(cfg, model)
    b, frames = 2, 8
    batch = {
        "latents": torch.randn(b, frames, 4, 6, 6),
        "ef": torch.tensor([0.55, 0.3], dtype=torch.float64),
        "cond": torch.randn(b, 4, 6, 6),
        "valid": torch.tensor([8, 5]),
        "name": ["a", "b"],
    }
    positions = torch.tensor([4, 1])
    spy = Spy(model)
    loss, _ = obj.loss(spy, batch, positions, 0, torch.device("cpu"))

    draws = [_draws(2, int(p), (frames, 4, 6, 6), offset=0.1) for p in positions]
    t = torch.cat([d[0] for d in draws])
    noise = torch.stack([d[1] for d in draws])
    sched = DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    noisy = sched.add_noise(batch["latents"], noise, t)
    (model_in, t_in), kw = spy.calls[0]
    assert model_in.shape == (b, frames, 8, 8, 8)
    cond = batch["cond"][:, None].expand(-1, frames, -1, -1, -1)
    expected_in = F.pad(
        torch.cat([noisy, cond], dim=2).flatten(0, 1), (1, 1, 1, 1), mode="replicate"
    ).reshape(model_in.shape)
    torch.testing.assert_close(model_in, expected_in)
    torch.testing.assert_close(
        kw["encoder_hidden_states"], torch.tensor([0.55, 0.3]).reshape(2, 1, 1)
    )
    assert torch.equal(kw["added_time_ids"], torch.zeros(2, 1))
    with torch.no_grad():
        pred = model(
            model_in,
            t,
            encoder_hidden_states=kw["encoder_hidden_states"],
            added_time_ids=kw["added_time_ids"],
        ).sample[..., 1:-1, 1:-1]
    err = (pred - sched.get_velocity(batch["latents"], noise, t)).pow(2)
    err[1, 5:] = 0  # frames past `valid` do not count; the mean is over all elements
    torch.testing.assert_close(loss.detach(), err.mean(), rtol=1e-6, atol=1e-7)


def test_noise_offset_is_per_sample_and_channel():
    model = LVDM.from_config(TINY_LVDM)
    x0 = torch.zeros(2, 8, 4, 6, 6)
    positions = torch.tensor([0, 1])
    with_offset = build_objective(_cfg("lvdm", TINY_LVDM), model).draw(x0, positions)[1]
    without = build_objective(_cfg("lvdm", TINY_LVDM, diffusion={"noise_offset": 0.0}), model).draw(
        x0, positions
    )[1]
    delta = with_offset - without
    per_channel = delta[:, :1, :, :1, :1]
    torch.testing.assert_close(delta, per_channel.expand_as(delta))  # constant over T, H, W
    assert per_channel.flatten(1).std(dim=1).min() > 0  # differs per channel
    assert not torch.equal(per_channel[0], per_channel[1])  # and per sample


def test_vae_loss_definition_and_discriminator(tmp_path):
    torch.manual_seed(0)
    vae = VAE.from_config(TINY_VAE)
    cfg = _cfg(
        "vae",
        TINY_VAE,
        vae={"disc_start": 3, "disc_layers": 1, "disc_channels": 8, "reconstruction": "l2"},
    )
    obj = build_objective(cfg, vae)
    x = torch.rand(2, 3, 12, 12) * 2 - 1
    positions = torch.tensor([0, 1])
    loss, logs = obj.loss(obj.module, x, positions, 2, torch.device("cpu"))  # before disc_start
    gens = [torch.Generator().manual_seed(sample_seed(cfg.seed, p, "train")) for p in (0, 1)]
    eps = torch.stack([torch.randn(4, 6, 6, generator=g) for g in gens])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.mean + dist.std * eps).sample
        nll = (x - rec).pow(2).sum() / 2
        kl = dist.kl().sum() / 2
    torch.testing.assert_close(loss.detach(), nll + 1e-6 * kl, rtol=1e-5, atol=1e-5)
    assert logs["d"] == 0.0 and logs["d_weight"] == 0.0
    assert obj.disc_active(3) and not obj.disc_active(2)

    loss, logs = obj.loss(obj.module, x, positions, 3, torch.device("cpu"))
    assert logs["d_weight"] > 0 and logs["d"] > 0
    loss.backward()
    disc_grads = [p.grad.clone() for p in obj.disc.parameters()]
    obj.disc.zero_grad()
    vae.zero_grad()
    # the discriminator's gradients are those of the hinge loss alone
    with torch.no_grad():
        rec = obj.module(x, eps)[0]
    real, fake = obj.disc(x), obj.disc(rec)
    (0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())).backward()
    for a, p in zip(disc_grads, obj.disc.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_vae_kl_term_and_adaptive_weight():
    """The logged KL is the posterior's KL to N(0, I) (its weight 1e-6 hides it in the loss),
    and d_weight is LDM's ``disc_weight · ‖∇rec‖ / (‖∇g‖ + 1e-4)`` at the decoder's last conv."""
    torch.manual_seed(0)
    vae = VAE.from_config(TINY_VAE)
    cfg = _cfg("vae", TINY_VAE, vae={"disc_start": 0, "disc_layers": 1, "disc_channels": 8})
    obj = build_objective(cfg, vae)
    x = torch.rand(2, 3, 12, 12) * 2 - 1
    _, logs = obj.loss(obj.module, x, torch.tensor([0, 1]), 0, torch.device("cpu"))
    gens = [torch.Generator().manual_seed(sample_seed(cfg.seed, p, "train")) for p in (0, 1)]
    eps = torch.stack([torch.randn(4, 6, 6, generator=g) for g in gens])
    dist = vae.encode(x).latent_dist
    mean, logvar = dist.mean.double(), dist.logvar.double()
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / 2
    assert logs["kl"] == pytest.approx(float(kl.detach()), rel=1e-5)
    rec = vae.decode(dist.mean + dist.std * eps).sample
    last = vae.decoder.conv_out.weight
    (g_rec,) = torch.autograd.grad((x - rec).abs().sum() / 2, last, retain_graph=True)
    (g_g,) = torch.autograd.grad(-obj.disc(rec).mean(), last)
    expected = 0.5 * float(g_rec.norm() / (g_g.norm() + 1e-4))
    assert 0 < expected < 1e4
    assert logs["d_weight"] == pytest.approx(expected, rel=1e-4)


def test_lpips_switch(tmp_path):
    class FakeLPIPS(torch.nn.Module):
        def forward(self, x, y):
            return (x - y).abs().mean(dim=(1, 2, 3))

    path = tmp_path / "lpips.pt2"
    example = (torch.zeros(2, 3, 12, 12), torch.zeros(2, 3, 12, 12))
    batch = torch.export.Dim("batch")
    program = torch.export.export(FakeLPIPS(), example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(path))
    torch.manual_seed(0)
    vae = VAE.from_config(TINY_VAE)
    x = torch.rand(2, 3, 12, 12) * 2 - 1
    base = build_objective(_cfg("vae", TINY_VAE, vae={"sample_posterior": False}), vae)
    perc = build_objective(
        _cfg(
            "vae",
            TINY_VAE,
            vae={"sample_posterior": False, "perceptual_weight": 0.5, "lpips_model": str(path)},
        ),
        vae,
    )
    pos = torch.tensor([0, 1])
    l0, logs0 = base.loss(base.module, x, pos, 0, torch.device("cpu"))
    l1, logs1 = perc.loss(perc.module, x, pos, 0, torch.device("cpu"))
    # LDM adds the weighted per-sample LPIPS to every pixel's error: + 0.5·C·H·W·mean|x - x̂|
    torch.testing.assert_close(
        logs1["rec"], logs0["rec"] * (1 + 0.5 * 3 * 12 * 12 / (3 * 12 * 12)), rtol=1e-5, atol=0
    )  # (the logs are Python floats: fp64 tolerances by default, for two fp32 sums)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="vae.lpips_model"):
        build_objective(
            _cfg("vae", TINY_VAE, vae={"perceptual_weight": 1.0, "lpips_model": str(bad)}), vae
        )


def test_patch_discriminator_shapes():
    d = PatchDiscriminator(3, 64, 3)
    assert d(torch.zeros(1, 3, 112, 112)).shape == (1, 1, 12, 12)
    # LDM's layer sizes: 64 → 128 → 256 → 512 channels
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]


def test_loaded_lpips_is_frozen(tmp_path):
    """The perceptual network is a fixed metric: none of its parameters takes gradients."""

    class ScaledL1(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x, y):
            return self.scale * (x - y).abs().mean(dim=(1, 2, 3))

    path = tmp_path / "lpips.pt"
    torch.jit.save(torch.jit.script(ScaledL1()), str(path))
    module = load_lpips(str(path))
    params = list(module.parameters())
    assert params and not any(p.requires_grad for p in params)


@pytest.mark.parametrize("size, padded", [(12, 12), (10, 12), (4, 4)])
def test_lidm_input_is_padded_to_a_multiple_of_the_downsampling(size, padded):
    """A 3-level UNet halves twice: inputs are padded (replicate) to a multiple of 4 only."""
    model = LIDM.from_config(TINY_LIDM)
    obj = build_objective(_cfg("lidm", TINY_LIDM), model)
    spy = Spy(model)
    x0 = torch.randn(1, 4, size, size)
    obj.loss(spy, x0, torch.tensor([0]), 0, torch.device("cpu"))
    assert spy.calls[0][0][0].shape == (1, 4, padded, padded)
    with pytest.raises(ValueError, match="different paddings"):
        obj.loss(spy, torch.randn(1, 4, 6, 8), torch.tensor([0]), 0, torch.device("cpu"))


def test_vae_gradients_exclude_the_discriminator_loss():
    """The VAE gets rec + kl_weight·kl + d_weight·g; the hinge loss trains the discriminator
    only (its inputs are detached)."""
    torch.manual_seed(0)
    vae = VAE.from_config(TINY_VAE)
    cfg = _cfg("vae", TINY_VAE, vae={"disc_start": 0, "disc_layers": 1, "disc_channels": 8})
    obj = build_objective(cfg, vae)
    x = torch.rand(2, 3, 12, 12) * 2 - 1
    positions = torch.tensor([0, 1])
    loss, logs = obj.loss(obj.module, x, positions, 0, torch.device("cpu"))
    loss.backward()
    got = {k: p.grad.clone() for k, p in vae.named_parameters()}
    vae.zero_grad()

    gens = [torch.Generator().manual_seed(sample_seed(cfg.seed, p, "train")) for p in (0, 1)]
    eps = torch.stack([torch.randn(4, 6, 6, generator=g) for g in gens])
    dist = vae.encode(x).latent_dist
    rec = vae.decode(dist.mean + dist.std * eps).sample
    obj.disc.requires_grad_(False)
    g = -obj.disc(rec).mean()
    expected = (x - rec).abs().sum() / 2 + 1e-6 * dist.kl().sum() / 2 + logs["d_weight"] * g
    expected.backward()
    assert logs["d_weight"] > 0 and logs["g"] == pytest.approx(float(g.detach()), rel=1e-5)
    for k, p in vae.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_malformed_batches_are_typed_errors():
    cpu, pos = torch.device("cpu"), torch.tensor([0, 1])
    lidm = build_objective(_cfg("lidm", TINY_LIDM), LIDM.from_config(TINY_LIDM))
    with pytest.raises(TypeError, match="LIDM batch: expected a batch of tensors, got list"):
        lidm.loss(lidm.module, [torch.zeros(4, 6, 6)] * 2, pos, 0, cpu)
    with pytest.raises(ValueError, match=r"LIDM batch must be \(B, C, h, w\)"):
        lidm.loss(lidm.module, torch.zeros(2, 8, 4, 6, 6), pos, 0, cpu)
    lvdm = build_objective(_cfg("lvdm", TINY_LVDM), LVDM.from_config(TINY_LVDM))
    batch = {
        "latents": torch.zeros(2, 8, 4, 6, 6),
        "ef": [0.5, 0.5],
        "cond": torch.zeros(2, 4, 6, 6),
    }
    with pytest.raises(TypeError, match="'latents', 'ef', 'cond'"):
        lvdm.loss(lvdm.module, {k: v for k, v in batch.items() if k != "cond"}, pos, 0, cpu)
    with pytest.raises(ValueError, match=r"latents must be \(B, T, C, h, w\)"):
        lvdm.loss(lvdm.module, {**batch, "latents": torch.zeros(2, 4, 6, 6)}, pos, 0, cpu)


def test_lvdm_time_ids_must_fill_the_projection():
    arch = {**TINY_LVDM, "addition_time_embed_dim": 2, "projection_class_embeddings_input_dim": 3}
    with pytest.raises(ConfigError, match="projection_class_embeddings_input_dim 3 is not a"):
        build_objective(_cfg("lvdm", arch), LVDM.from_config(arch))
