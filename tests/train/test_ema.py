"""EMA: the decay schedule and the update match diffusers' EMAModel."""

from __future__ import annotations

import pytest
import torch

from echofast.train.ema import EMA, ema_decay

EMAModel = pytest.importorskip("diffusers.training_utils").EMAModel

SETTINGS = [
    dict(decay=0.9999, use_warmup=True, inv_gamma=1.0, power=2 / 3),
    dict(decay=0.999, use_warmup=True, inv_gamma=10.0, power=0.75, min_decay=0.1),
    dict(decay=0.9999, use_warmup=False, update_after_step=5),
]


def _diffusers_kwargs(settings: dict) -> dict:
    out = dict(settings)
    out["use_ema_warmup"] = out.pop("use_warmup")
    return out


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("settings", SETTINGS)
def test_decay_matches_diffusers(settings):
    ref = EMAModel(_net().parameters(), **_diffusers_kwargs(settings))
    for step in [1, 2, 3, 4, 6, 7, 10, 100, 1000, 31_622, 100_000, 10**6, 10**7]:
        assert ema_decay(step, **settings) == ref.get_decay(step), step


def test_reference_schedule_formula():
    assert ema_decay(1) == 0.0  # the first update copies the weights
    for step in (2, 50, 5000, 500_000):
        t = step - 1
        assert ema_decay(step) == pytest.approx(min(0.9999, 1 - (1 + t) ** (-2 / 3)), rel=1e-15)
    assert ema_decay(5 * 10**6) == 0.9999


@pytest.mark.parametrize("settings", SETTINGS[:2])
def test_updates_match_diffusers(settings):
    net = _net()
    ours = EMA(net, **settings)
    theirs = EMAModel(net.parameters(), foreach=True, **_diffusers_kwargs(settings))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        loss = net(torch.randn(5, 3, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.step(net.parameters())
        theirs.step(net.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value
    for a, b in zip(ours.shadow, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_and_copy_to():
    net = _net()
    ema = EMA(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.step(net.parameters())
    ema.step(net.parameters())
    state = ema.state_dict()
    other = EMA(_net(1))
    other.load_state_dict(state)
    assert other.optimization_step == 2
    target = _net(2)
    other.copy_to(target)
    for (name, p), s in zip(target.named_parameters(), ema.shadow):
        torch.testing.assert_close(p, s, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict({**state, "shadow": {"x": torch.zeros(1)}})


def test_frozen_parameters_are_copied_not_averaged():
    net = _net()
    net[2].bias.requires_grad_(False)
    ours = EMA(net, decay=0.9, use_warmup=False)
    theirs = EMAModel(net.parameters(), decay=0.9, use_ema_warmup=False, foreach=True)
    start = [p.detach().clone() for p in net.parameters()]
    for k in range(1, 4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(float(k))
        ours.step(net.parameters())
        theirs.step(net.parameters())
    for a, b in zip(ours.shadow, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the frozen bias follows the model; a trained weight lags behind it (decay 0.25 at step 3)
    torch.testing.assert_close(ours.shadow[3], start[3] + 6, rtol=0, atol=0)
    assert (ours.shadow[2] - net[2].weight).abs().min() > 0.1


def _train_steps(net: torch.nn.Module, ema: EMA, steps: range) -> list[float]:
    """SGD steps on a fixed random regression, each followed by an EMA update."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    decays = []
    for k in steps:
        g = torch.Generator().manual_seed(k)
        loss = net(torch.randn(4, 3, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decays.append(ema.step(net.parameters()))
    return decays


def test_step_returns_the_decay_it_used():
    net = _net()
    settings = dict(decay=0.99, use_warmup=False, update_after_step=1)
    ema = EMA(net, **settings)
    theirs = EMAModel(net.parameters(), **_diffusers_kwargs(settings))
    decays = _train_steps(net, ema, range(6))
    assert decays == [theirs.get_decay(n) for n in range(1, 7)]
    assert decays[-1] == ema.cur_decay_value and ema.optimization_step == 6


def test_a_restored_ema_continues_as_if_never_stopped():
    straight, stopped = _net(), _net()
    ema_straight = EMA(straight, decay=0.9, use_warmup=False)
    ema_stopped = EMA(stopped, decay=0.9, use_warmup=False)
    _train_steps(straight, ema_straight, range(6))
    _train_steps(stopped, ema_stopped, range(3))
    resumed = EMA(_net(9), decay=0.9, use_warmup=False)
    resumed.load_state_dict(ema_stopped.state_dict())
    assert resumed.optimization_step == 3
    _train_steps(stopped, resumed, range(3, 6))
    for a, b in zip(resumed.shadow, ema_straight.shadow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_saved_state_is_a_snapshot():
    net = _net()
    ema = EMA(net)
    _train_steps(net, ema, range(2))
    state = ema.state_dict()
    before = {k: v.clone() for k, v in state["shadow"].items()}
    _train_steps(net, ema, range(2, 4))
    for name, tensor in state["shadow"].items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    assert state["optimization_step"] == 2


def test_defaults_are_the_reference_schedule():
    """EMA() and ema_decay() default to the reference recipe: decay 0.9999, warm-up power 2/3
    (diffusers' EMAModel defaults, with use_ema_warmup=True)."""
    ours = EMA(_net())
    theirs = EMAModel(_net().parameters(), use_ema_warmup=True)
    for step in (1, 2, 10, 1000, 31_622, 10**6, 10**7):
        assert ours.get_decay(step) == ema_decay(step) == theirs.get_decay(step), step


def test_min_decay_wins_over_decay_as_in_diffusers():
    settings = dict(decay=0.5, min_decay=0.9, use_warmup=False)
    ref = EMAModel(_net().parameters(), **_diffusers_kwargs(settings))
    assert ema_decay(1, **settings) == ref.get_decay(1) == 0.0  # the first update copies
    for step in (2, 50):
        assert ema_decay(step, **settings) == ref.get_decay(step) == 0.9


def test_mismatched_models_are_refused():
    net = _net()
    ema = EMA(net)
    with pytest.raises(ValueError, match="EMA tracks 4 parameters, got 3"):
        ema.step(list(net.parameters())[:3])
    bigger = torch.nn.Sequential(*_net(), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="does not match the EMA's parameters"):
        ema.copy_to(bigger)
    with pytest.raises(ValueError, match="does not match the EMA's parameters"):
        ema.copy_to(torch.nn.Sequential(torch.nn.Linear(3, 4)))
