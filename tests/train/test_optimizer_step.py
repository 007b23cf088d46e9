"""One optimizer step of the training loop is torch's AdamW on the objective's loss, with the
documented gradient-norm clipping, diffusers' ``constant_with_warmup`` schedule and diffusers'
EMAModel, replayed here by hand on the same samples."""

from __future__ import annotations

import pytest
import torch
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel
from train.test_training import make_config

from echofast.train import train
from echofast.train.loop import StreamBatchSampler, build_model, load_checkpoint
from echofast.train.objectives import build_objective

OPTIM = {
    "lr": 0.02,
    "betas": [0.8, 0.95],
    "eps": 1e-6,
    "weight_decay": 0.3,
    "warmup_steps": 2,
    "max_grad_norm": 0.05,
}
EMA = {"enabled": True, "inv_gamma": 1.0, "power": 0.75, "decay": 0.99}


def _clip(params, max_norm: float) -> float:
    """The documented clipping: gradients scaled by max_norm / ‖g‖ when ‖g‖ > max_norm."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def test_steps_are_adamw_with_clipping_warmup_and_ema(tmp_path):
    steps, batch, n = 3, 3, 7
    x = torch.randn(n, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    cfg = make_config(
        tmp_path / "run",
        "lidm",
        steps=steps,
        batch=batch,
        train={"export_at_end": False, "checkpoint_every": steps},
        optim=OPTIM,
        ema=EMA,
    )
    train(cfg, dataset=list(x))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{steps:08d}.pt")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).train()
    objective = build_objective(cfg, model)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=OPTIM["lr"],
        betas=tuple(OPTIM["betas"]),
        eps=OPTIM["eps"],
        weight_decay=OPTIM["weight_decay"],
    )
    schedule = get_constant_schedule_with_warmup(opt, num_warmup_steps=OPTIM["warmup_steps"])
    ema = EMAModel(
        model.parameters(),
        decay=EMA["decay"],
        inv_gamma=EMA["inv_gamma"],
        power=EMA["power"],
        use_ema_warmup=True,
    )
    stream = iter(StreamBatchSampler(n, batch_size=batch, seed=cfg.seed))
    norms, lrs = [], []
    for step in range(steps):
        pairs = next(stream)
        positions = torch.tensor([p for p, _ in pairs])
        items = torch.stack([x[i] for _, i in pairs])
        loss, _ = objective.loss(model, items, positions, step, torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        norms.append(_clip(list(model.parameters()), OPTIM["max_grad_norm"]))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
        ema.step(model.parameters())
    assert min(norms) > OPTIM["max_grad_norm"]  # clipping is active at every step
    assert lrs == pytest.approx([0.0, 0.01, 0.02])
    for name, p in model.named_parameters():
        torch.testing.assert_close(state["model"][name], p.detach(), rtol=1e-5, atol=1e-6)
    names = [name for name, _ in model.named_parameters()]
    for name, shadow in zip(names, ema.shadow_params):
        torch.testing.assert_close(state["ema"]["shadow"][name], shadow, rtol=1e-5, atol=1e-6)


def test_optimizer_settings_reach_both_vae_optimizers(tmp_path):
    """The VAE's discriminator has its own AdamW with ``vae.disc_lr`` and the same betas, eps
    and weight decay as the model's."""
    optim = {"lr": 3e-4, "betas": [0.5, 0.9], "eps": 1e-7, "weight_decay": 0.05}
    cfg = make_config(
        tmp_path / "run",
        "vae",
        steps=1,
        train={"export_at_end": False, "checkpoint_every": 1},
        optim={**optim, "warmup_steps": 0},
        vae={"disc_lr": 7e-5, "disc_start": 0},
    )
    train(cfg)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000001.pt")
    model_group = state["optimizer"]["param_groups"][0]
    disc_group = state["aux_optimizers"]["discriminator"]["param_groups"][0]
    for group, lr in ((model_group, optim["lr"]), (disc_group, 7e-5)):
        assert group["lr"] == pytest.approx(lr)
        assert tuple(group["betas"]) == (0.5, 0.9)
        assert group["eps"] == optim["eps"] and group["weight_decay"] == optim["weight_decay"]
    assert state["aux_optimizers"]["discriminator"]["state"]  # the discriminator was stepped
