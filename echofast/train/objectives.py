"""Per-model training losses.

Every random number of a training sample (its timestep, noise, noise offset, VAE posterior
noise) comes from a CPU generator seeded with ``echofast.rng.sample_seed(seed, position,
"train")``, where ``position`` is the sample's place in the run's global data stream. The
numbers therefore depend neither on the batch size per rank, the number of ranks, gradient
accumulation nor resuming, and a CPU and a GPU run draw the same ones.

LIDM (reference ``echosyn/lidm/train.py``), per sample in this order: ``t ~ U{0..N-1}``
(``randint``), ``noise ~ N(0, I)`` of the latent's shape, then (if ``noise_offset > 0``)
``noise += noise_offset · randn(C)`` broadcast over H, W. Input replicate-padded to a multiple
of ``2^(levels-1)`` (14 → 16), prediction unpadded; target ``scheduler.get_velocity(x0, noise,
t)`` for v-prediction (``noise`` for epsilon, ``x0`` for sample); loss ``MSE`` over everything.

LVDM (reference ``echosyn/lvdm/train.py``): the same draws with noise of shape (T, C, h, w) and
the offset ``noise_offset · randn(C)`` shared by all frames and pixels of a sample (the
reference's ``randn(B, C, 1, 1, 1)`` in its (B, C, T, H, W) layout = (B, 1, C, 1, 1) in ours).
Model input ``cat(noisy, cond repeated over T)`` on channels → (B, T, 2C, h, w), padded;
``encoder_hidden_states`` = EF (B, 1, 1); ``added_time_ids`` zeros. The loss is the squared
error on frames ``< valid`` only, summed and divided by the number of all elements (the
reference's ``(loss * mask).mean()``; the reference's mask also keeps the first padded frame,
``frame <= valid``, which we do not). The reference computes but never applies a conditioning
drop-out (``drop_conditionning``): there is none here either.

VAE (LDM's ``LPIPSWithDiscriminator`` as used by the reference, logvar fixed at 0): per sample
``rec = |x - x̂|`` (or squared, ``l2``) ``+ perceptual_weight · LPIPS(x, x̂)`` summed over pixels
and averaged over the batch; ``kl`` of the posterior to N(0, I) summed over latent elements and
averaged; ``loss = rec + kl_weight · kl``. From optimizer step ``disc_start`` on a PatchGAN
discriminator (LDM's ``NLayerDiscriminator``, BatchNorm) adds ``d_weight · g`` with
``g = -mean(D(x̂))`` and LDM's adaptive weight ``d_weight = disc_weight · ‖∇rec‖ / (‖∇g‖ +
1e-4)`` (gradients w.r.t. the decoder's last conv, clamped to [0, 1e4]); the discriminator is
trained with the hinge loss ``0.5 · (mean(relu(1 - D(x))) + mean(relu(1 + D(x̂))))`` on the same
reconstructions (LDM re-runs the autoencoder after its update; we reuse the first pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..pipelines.common import latent_padding, pad_replicate, unpad
from ..rng import sample_generators
from .config import TrainConfig

STREAM = "train"


def _generators(seed: int, positions: torch.Tensor) -> list[torch.Generator]:
    return sample_generators(seed, [int(p) for p in positions.tolist()], STREAM)


def _padding(model_config, h: int, w: int) -> int:
    multiple = 2 ** (len(model_config["block_out_channels"]) - 1)
    pad_h, pad_w = latent_padding(h, multiple), latent_padding(w, multiple)
    if pad_h != pad_w:
        raise ValueError(f"latents of {h}×{w} need different paddings per side ({pad_h}, {pad_w})")
    return pad_h


def _tensor(item, what: str) -> torch.Tensor:
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"{what}: expected a batch of tensors, got {type(item).__name__}")
    return item


class Objective:
    """Computes one micro-batch's loss. ``module`` is what the loop wraps in DDP."""

    #: extra CSV columns, filled from the ``logs`` dict that :meth:`loss` returns
    columns: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        self.cfg = cfg
        self.model = model
        self.module: nn.Module = model

    def aux_modules(self) -> dict[str, nn.Module]:
        """Trained modules besides the model (own optimizer, checkpointed, not released)."""
        return {}

    def loss(
        self, net: nn.Module, batch, positions: torch.Tensor, step: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


# ---- diffusion (LIDM, LVDM) ------------------------------------------------------------------


class DiffusionObjective(Objective):
    def __init__(self, cfg: TrainConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.scheduler = cfg.noise_scheduler()
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction = self.scheduler.config.prediction_type
        self.noise_offset = cfg.diffusion.noise_offset
        self.video = cfg.model.type == "lvdm"
        mc = model.config
        if self.video:
            add, proj = mc["addition_time_embed_dim"], mc["projection_class_embeddings_input_dim"]
            if proj % add:
                raise ConfigError(
                    f"model config: projection_class_embeddings_input_dim {proj} is not a "
                    f"multiple of addition_time_embed_dim {add}"
                )
            self.num_time_ids = proj // add

    def draw(self, x0: torch.Tensor, positions: torch.Tensor):
        """Per-sample timesteps (B,) and noise like ``x0`` (CPU float32 draws, moved)."""
        ts, noises = [], []
        shape = tuple(x0.shape[1:])
        channels = shape[-3]
        for g in _generators(self.cfg.seed, positions):
            ts.append(torch.randint(0, self.num_timesteps, (1,), generator=g))
            noise = torch.randn(shape, generator=g)
            if self.noise_offset > 0:
                offset = torch.randn(channels, generator=g).reshape(channels, 1, 1)
                noise = noise + self.noise_offset * offset  # broadcasts over (T,) C, H, W
            noises.append(noise)
        t = torch.cat(ts).to(x0.device)
        return t, torch.stack(noises).to(device=x0.device, dtype=x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        if self.prediction == "epsilon":
            return noise
        return x0

    def loss(self, net, batch, positions, step, device):
        if self.video:
            return self._video_loss(net, batch, positions, device)
        x0 = _tensor(batch, "LIDM batch").to(device=device, dtype=torch.float32)
        if x0.dim() != 4:
            raise ValueError(f"LIDM batch must be (B, C, h, w) latents, got {tuple(x0.shape)}")
        t, noise = self.draw(x0, positions)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pad = _padding(self.model.config, *x0.shape[-2:])
        pred = unpad(net(pad_replicate(noisy, pad), t).sample, pad)
        loss = F.mse_loss(pred.float(), self.target(x0, noise, t).float())
        return loss, {}

    def _video_loss(self, net, batch, positions, device):
        if not isinstance(batch, dict) or not {"latents", "ef", "cond"} <= set(batch):
            raise TypeError("LVDM batch must be a dict with 'latents', 'ef', 'cond' (and 'valid')")
        x0 = _tensor(batch["latents"], "latents").to(device=device, dtype=torch.float32)
        if x0.dim() != 5:
            raise ValueError(f"latents must be (B, T, C, h, w), got {tuple(x0.shape)}")
        b, frames = x0.shape[:2]
        cond = _tensor(batch["cond"], "cond").to(device=device, dtype=torch.float32)
        ef = torch.as_tensor(batch["ef"]).to(device=device, dtype=torch.float32).reshape(b, 1, 1)
        t, noise = self.draw(x0, positions)
        noisy = self.scheduler.add_noise(x0, noise, t)
        model_in = torch.cat([noisy, cond[:, None].expand(-1, frames, -1, -1, -1)], dim=2)
        pad = _padding(self.model.config, *x0.shape[-2:])
        time_ids = torch.zeros(b, self.num_time_ids, device=device)
        pred = net(
            pad_replicate(model_in, pad), t, encoder_hidden_states=ef, added_time_ids=time_ids
        ).sample
        err = (unpad(pred, pad).float() - self.target(x0, noise, t).float()).pow(2)
        if "valid" in batch:
            valid = torch.as_tensor(batch["valid"]).to(device).reshape(b, 1)
            mask = torch.arange(frames, device=device)[None] < valid
            err = err * mask[:, :, None, None, None]
        return err.mean(), {}


# ---- VAE -------------------------------------------------------------------------------------


class VAEForward(nn.Module):
    """Encode → (sampled) latent → decode in one forward, so DDP sees the whole VAE pass."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None):
        dist = self.vae.encode(x).latent_dist
        z = dist.mean if eps is None else dist.mean + dist.std * eps.to(dist.mean.dtype)
        return self.vae.decode(z).sample, dist.mean, dist.logvar


class PatchDiscriminator(nn.Module):
    """LDM/taming's ``NLayerDiscriminator`` (pix2pix PatchGAN) with BatchNorm and its init."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(
                    channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False
                ),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class VAEObjective(Objective):
    columns = ("rec", "kl", "g", "d", "d_weight")

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.settings = cfg.vae
        self.module = VAEForward(model)
        self.disc = PatchDiscriminator(
            model.config["out_channels"], cfg.vae.disc_channels, cfg.vae.disc_layers
        )
        self.lpips = None
        if cfg.vae.perceptual_weight > 0:
            self.lpips = load_lpips(cfg.vae.lpips_model)

    def aux_modules(self) -> dict[str, nn.Module]:
        return {"discriminator": self.disc}

    def disc_active(self, step: int) -> bool:
        return self.settings.disc_weight > 0 and step >= self.settings.disc_start

    def loss(self, net, batch, positions, step, device):
        s = self.settings
        x = _tensor(batch, "VAE batch").to(device=device, dtype=torch.float32)
        if x.dim() != 4:
            raise ValueError(f"VAE batch must be (B, C, H, W) frames, got {tuple(x.shape)}")
        b = x.shape[0]
        eps = None
        if s.sample_posterior:
            factor = 2 ** (len(self.model.config["block_out_channels"]) - 1)
            shape = (
                self.model.config["latent_channels"],
                x.shape[-2] // factor,
                x.shape[-1] // factor,
            )
            gens = _generators(self.cfg.seed, positions)
            eps = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        rec, mean, logvar = net(x, eps)
        diff = x - rec.float()
        err = diff.abs() if s.reconstruction == "l1" else diff.pow(2)
        if self.lpips is not None:
            self.lpips.to(device)
            p = self.lpips(x.contiguous(), rec.float().contiguous()).reshape(b, 1, 1, 1)
            err = err + s.perceptual_weight * p
        nll = err.sum() / b
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / b
        loss = nll + s.kl_weight * kl
        logs = {
            "rec": float(nll.detach()),
            "kl": float(kl.detach()),
            "g": 0.0,
            "d": 0.0,
            "d_weight": 0.0,
        }
        if not self.disc_active(step):
            return loss, logs
        self.disc.to(device).train()
        self.disc.requires_grad_(False)  # the generator term trains the VAE only
        g = -self.disc(rec).float().mean()
        self.disc.requires_grad_(True)
        last = self.model.decoder.conv_out.weight
        if torch.is_grad_enabled():
            g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
            g_g = torch.autograd.grad(g, last, retain_graph=True)[0]
            d_weight = (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        else:
            d_weight = torch.zeros((), device=device)
        d_weight = d_weight * s.disc_weight
        real = self.disc(x.detach()).float()
        fake = self.disc(rec.detach()).float()
        d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        logs.update(g=float(g.detach()), d=float(d_loss.detach()), d_weight=float(d_weight))
        # d_loss reaches only the discriminator (its inputs are detached), g only the VAE
        return loss + d_weight * g + d_loss, logs


def load_lpips(path: str) -> nn.Module:
    """A user-supplied LPIPS: ``module(x, y)`` → per-sample distances, for images in [-1, 1].

    ``.pt2``: a ``torch.export`` program (``torch.export.save``); anything else: TorchScript
    (``torch.jit.save``, deprecated by torch). Export it for the training device.
    """
    try:
        if str(path).endswith(".pt2"):
            module = torch.export.load(path).module()
        else:
            module = torch.jit.load(path, map_location="cpu")
            module.eval()
    except Exception as err:  # noqa: BLE001 - report any load failure with the file
        raise ConfigError(
            f"config key 'vae.lpips_model': cannot load {path} as a torch.export program "
            f"(.pt2) or TorchScript ({type(err).__name__}: {err})"
        ) from None
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def build_objective(cfg: TrainConfig, model: nn.Module) -> Objective:
    if cfg.model.type == "vae":
        return VAEObjective(cfg, model)
    return DiffusionObjective(cfg, model)
