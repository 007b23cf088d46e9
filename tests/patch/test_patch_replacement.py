"""Whole-model replacement by ``echofast.patch``: when a diffusers model is (not) served by an
echofast model, and that the served calls return what diffusers returns, in diffusers' form.

Oracle: the same diffusers model, unpatched (fp32, random weights and norm affines).
"""

from __future__ import annotations

import pytest
import torch
from support.models import rel_err

import echofast

pytest.importorskip("diffusers")

TOL = 1e-5


def _not_replaced_because(report, fragment: str) -> bool:
    return not report.replaced and any(
        i.path == "" and "not replaced" in i.reason and fragment in i.reason
        for i in report.left_alone
    )


@torch.no_grad()
def test_a_hook_anywhere_in_the_model_keeps_it_unreplaced(kit):
    model, x = kit.build("lidm"), kit.inputs("lidm")
    expected = model(**x).sample
    seen = []
    model.conv_in.register_forward_hook(lambda *a: seen.append(1))
    report = echofast.patch(model)
    assert _not_replaced_because(report, "conv_in has forward hooks")
    assert rel_err(model(**x).sample, expected) <= TOL and seen
    echofast.unpatch(model)


@torch.no_grad()
def test_a_custom_attention_processor_keeps_the_model_unreplaced(kit):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    class Doubling:
        def __init__(self):
            self.inner = AttnProcessor2_0()

        def __call__(self, *args, **kwargs):
            return 2 * self.inner(*args, **kwargs)

    model, x = kit.build("lidm"), kit.inputs("lidm")
    path, attn = next((n, m) for n, m in model.named_modules() if isinstance(m, Attention))
    attn.set_processor(Doubling())
    expected = model(**x).sample
    report = echofast.patch(model)
    assert _not_replaced_because(report, f"{path} has custom attention processor Doubling")
    assert rel_err(model(**x).sample, expected) <= TOL
    echofast.unpatch(model)


@torch.no_grad()
def test_a_model_with_extra_buffers_is_not_replaced(kit):
    model, x = kit.build("lidm"), kit.inputs("lidm")
    model.conv_in.register_buffer("calibration", torch.ones(1))
    expected = model(**x).sample
    report = echofast.patch(model)
    assert _not_replaced_because(report, "conv_in has buffers echofast does not use")
    assert rel_err(model(**x).sample, expected) <= TOL
    echofast.unpatch(model)


@pytest.mark.parametrize("where", ["down_blocks.0", "extra"])
@torch.no_grad()
def test_a_model_with_parameters_echofast_would_not_use_is_not_replaced(kit, where):
    """Extra parameters on a module echofast has without parameters, or on a module it does
    not have: the model is left to diffusers."""
    model, x = kit.build("lidm"), kit.inputs("lidm")
    if where == "extra":
        model.extra = torch.nn.Linear(2, 2)
    else:
        model.get_submodule(where).register_parameter("gate", torch.nn.Parameter(torch.ones(1)))
    expected = model(**x).sample
    report = echofast.patch(model)
    assert _not_replaced_because(report, f"parameters of {where} have no echofast counterpart")
    assert rel_err(model(**x).sample, expected) <= TOL
    echofast.unpatch(model)


@pytest.mark.parametrize("kind", ["lidm", "lvdm"])
@torch.no_grad()
def test_gradient_checkpointing_without_gradients_is_still_served(kit, kind):
    """Checkpointing only matters while training: under ``no_grad`` the echofast model runs
    (diffusers' attention processors stay idle)."""
    model, x = kit.build(kind), kit.inputs(kind)
    expected = kit.run(kind, model, x)["sample"]
    model.enable_gradient_checkpointing()
    assert echofast.patch(model).replaced
    got = kit.run(kind, model, x)["sample"]
    assert rel_err(got, expected) <= TOL
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert processors and all(p.last_path == "" for p in processors)
    echofast.unpatch(model)


@torch.no_grad()
def test_return_dict_false_gives_diffusers_tuple(kit):
    model, x = kit.build("lidm"), kit.inputs("lidm")
    (expected,) = model(**x, return_dict=False)
    assert echofast.patch(model).replaced
    out = model(**x, return_dict=False)
    assert type(out) is tuple and len(out) == 1
    assert rel_err(out[0], expected) <= TOL
    echofast.unpatch(model)


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "call_sites"])
@torch.no_grad()
def test_a_subclassed_default_processor_keeps_its_behaviour(kit, replace):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    class Doubling(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            return 2 * super().__call__(*args, **kwargs)

    model, x = kit.build("lidm"), kit.inputs("lidm")
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    attn.set_processor(Doubling())
    expected = model(**x).sample
    report = echofast.patch(model, replace_models=replace)
    assert report.replaced == []
    assert rel_err(model(**x).sample, expected) <= 1e-5
    echofast.unpatch(model)
