"""A patched diffusers model with gradient checkpointing on is trained through the echofast model,
which checkpoints its blocks with the diffusers model's own checkpointing function: the gradients
are unpatched diffusers', diffusers' attention processors stay idle, less is stored."""

from __future__ import annotations

import pytest
import torch

import echofast

KINDS = ["lidm", "lvdm", "vae"]


def _backward(kind, kit, model, x):
    """Every parameter's gradient of a fixed weighting of the outputs, and the bytes autograd
    stored for the backward pass."""
    model.zero_grad(set_to_none=True)
    stored = [0]

    def pack(t):
        stored[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = kit.run(kind, model, x)
    loss = sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in out.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, stored[0]


def _processors(model):
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_training_is_served_with_diffusers_gradients(kit, kind):
    model, x = kit.build(kind), kit.inputs(kind)
    calls = []

    def func(block, *args):
        calls.append(block)
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(func)
    theirs, _ = _backward(kind, kit, model, x)
    diffusers_blocks = len(calls)
    model.disable_gradient_checkpointing()
    assert echofast.patch(model).replaced
    plain, plain_bytes = _backward(kind, kit, model, x)
    model.enable_gradient_checkpointing(func)
    calls.clear()
    ours, ours_bytes = _backward(kind, kit, model, x)
    # the echofast model ran (diffusers' processors idle), checkpointing through `func`
    assert all(p.last_path == "" for p in _processors(model))
    assert (
        calls and diffusers_blocks and all(type(b).__module__.startswith("echofast") for b in calls)
    )
    assert ours_bytes < 0.6 * plain_bytes, (ours_bytes, plain_bytes)
    scale = max(g.abs().max().item() for g in theirs.values())
    assert ours.keys() <= theirs.keys()
    for name, grad in theirs.items():
        mine = ours.get(name, torch.zeros_like(grad))
        assert (mine - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-6 * scale, name
        if name in plain:
            assert torch.allclose(mine, plain[name], rtol=1e-5, atol=1e-7), name
    # turned off again in diffusers: off in echofast too (everything is stored again)
    model.disable_gradient_checkpointing()
    calls.clear()
    assert _backward(kind, kit, model, x)[1] == plain_bytes and calls == []
    echofast.unpatch(model)


def test_checkpointing_follows_a_later_change_of_function(kit):
    model, x = kit.build("lidm"), kit.inputs("lidm")
    echofast.patch(model)
    seen = []

    def first(block, *args):
        seen.append("first")
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    def second(block, *args):
        seen.append("second")
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(first)
    _backward("lidm", kit, model, x)
    model.enable_gradient_checkpointing(second)
    seen.clear()
    _backward("lidm", kit, model, x)
    assert seen and set(seen) == {"second"}
    with torch.no_grad():
        seen.clear()
        kit.run("lidm", model, x)
    assert seen == []  # inference is not checkpointed
    echofast.unpatch(model)
