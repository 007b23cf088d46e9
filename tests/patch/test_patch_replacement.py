"""Whole-model replacement by ``echofast.patch``: when a diffusers model is (not) served by an
echofast model, and that the served calls return what diffusers returns, in diffusers' form.

Oracle: the same diffusers model, unpatched (fp32, random weights and norm affines).
"""

from __future__ import annotations

import pytest
import torch
from support.models import build_diffusers, rel_err

import echofast

pytest.importorskip("diffusers")

TOL = 1e-5


def _not_replaced_because(report, fragment: str) -> bool:
    return not report.replaced and any(
        i.path == "" and "not replaced" in i.reason and fragment in i.reason
        for i in report.left_alone
    )


def _patched_but_not_replaced(model, x, expected, fragment: str) -> None:
    """echofast.patch(model) leaves the model unreplaced, saying why, and its outputs as they
    were; then unpatch."""
    report = echofast.patch(model)
    assert _not_replaced_because(report, fragment)
    assert rel_err(model(**x).sample, expected) <= TOL
    echofast.unpatch(model)


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
    _patched_but_not_replaced(model, x, expected, f"{path} has custom attention processor Doubling")


@torch.no_grad()
def test_a_model_with_extra_buffers_is_not_replaced(kit):
    model, x = kit.build("lidm"), kit.inputs("lidm")
    model.conv_in.register_buffer("calibration", torch.ones(1))
    expected = model(**x).sample
    _patched_but_not_replaced(model, x, expected, "conv_in has buffers echofast does not use")


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
    _patched_but_not_replaced(
        model, x, expected, f"parameters of {where} have no echofast counterpart"
    )


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


@pytest.mark.parametrize("kind", ["lidm", "lvdm"])
@torch.no_grad()
def test_return_dict_false_gives_diffusers_tuple(kit, kind):
    model, x = kit.build(kind), kit.inputs(kind)
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


@torch.no_grad()
def test_a_hook_on_the_model_itself_keeps_it_replaced(kit):
    """The replaced forward is reached through the model's own ``__call__``: hooks there fire,
    so they do not keep the model from being served."""
    model, x = kit.build("lidm"), kit.inputs("lidm")
    expected = model(**x).sample
    seen = []
    model.register_forward_hook(lambda *a: seen.append(1))
    model.register_forward_pre_hook(lambda *a: seen.append(2))
    report = echofast.patch(model)
    assert [r.path for r in report.replaced] == [""] and report.left_alone == []
    assert rel_err(model(**x).sample, expected) <= TOL and seen == [2, 1]
    echofast.unpatch(model)


@torch.no_grad()
def test_a_model_whose_forward_is_wrapped_per_instance_is_not_replaced(kit):
    """accelerate's offload hooks replace ``forward`` on the instance: switching the class would
    not change what the model's calls run, so it is not reported as replaced."""
    model, x = kit.build("lidm"), kit.inputs("lidm")
    expected = model(**x).sample
    original = model.forward
    model.forward = lambda *a, **k: original(*a, **k)
    report = echofast.patch(model)
    assert _not_replaced_because(report, "its forward is wrapped at instance level")
    assert report.counts()["resnet"] > 0
    assert rel_err(model(**x).sample, expected) <= TOL
    echofast.unpatch(model)


@pytest.mark.parametrize(
    ("attribute", "value", "shown"),
    [("merge_strategy", "learned", "'learned'"), ("switch_spatial_to_temporal_mix", True, "")],
    ids=["merge_strategy", "switched_mix"],
)
@torch.no_grad()
def test_a_video_unet_with_another_temporal_mix_is_not_replaced(kit, attribute, value, shown):
    """echofast's LVDM mixes spatial and temporal features as SVD's default blender does."""
    model, x = kit.build("lvdm"), kit.inputs("lvdm")
    path = next(n for n, m in model.named_modules() if type(m).__name__ == "AlphaBlender")
    setattr(model.get_submodule(path), attribute, value)
    expected = model(**x).sample
    _patched_but_not_replaced(model, x, expected, f"{path}: AlphaBlender {shown}")


@torch.no_grad()
def test_a_diffusers_model_echofast_has_no_model_of_is_reported(kit):
    from diffusers import UNet2DConditionModel

    model = build_diffusers(
        UNet2DConditionModel,
        {
            "sample_size": 8,
            "block_out_channels": [16, 32],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 8,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
    )
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    expected = model(x, 10, ctx).sample
    report = echofast.patch(model)
    assert report.replaced == [] and report.counts()["attention"] > 0
    assert (
        "",
        "UNet2DConditionModel",
        "not replaced: echofast has no model of this class; call sites patched",
    ) in {(i.path, i.what, i.reason) for i in report.left_alone}
    assert rel_err(model(x, 10, ctx).sample, expected) <= TOL
    # the autocast entry is the outermost diffusers model, not the ones inside it
    report = echofast.patch(model, dtype="bfloat16")
    assert [s.path for s in report.patched if s.kind == "autocast"] == [""]
    echofast.unpatch(model)


@torch.no_grad()
def test_a_vae_with_a_subclassed_encoder_is_not_replaced(kit):
    from diffusers.models.autoencoders.vae import Encoder

    class Doubling(Encoder):
        def forward(self, sample):
            return 2 * super().forward(sample)

    vae, x = kit.build("vae"), kit.inputs("vae")
    vae.encoder.__class__ = Doubling
    expected = kit.run("vae", vae, x)
    report = echofast.patch(vae)
    assert _not_replaced_because(report, "encoder/decoder are not diffusers' Encoder/Decoder")
    got = kit.run("vae", vae, x)
    for key, ref in expected.items():
        assert rel_err(got[key], ref) <= TOL, key
    echofast.unpatch(vae)


@torch.no_grad()
def test_a_model_with_a_parameter_of_another_shape_is_not_replaced(kit):
    """A conv without its bias (diffusers runs it as it is; echofast's layer expects one)."""
    model, x = kit.build("lidm"), kit.inputs("lidm")
    model.conv_out.register_parameter("bias", None)
    expected = model(**x).sample
    _patched_but_not_replaced(model, x, expected, "parameters of conv_out differ")


@torch.no_grad()
def test_replaced_vae_halves_return_diffusers_layouts_and_errors(kit):
    """Encoder and decoder outputs are contiguous, as diffusers' are; a decoder call with
    ``latent_embeds`` is diffusers' business (an ``AutoencoderKL`` decoder fails on it)."""
    vae, x = kit.build("vae"), kit.inputs("vae")
    with pytest.raises(RuntimeError, match="must match the size"):
        vae.decoder(x["z"], x["z"])
    assert [r.path for r in echofast.patch(vae).replaced] == [""]
    assert vae.encoder(x["x"]).is_contiguous()
    assert vae.decoder(x["z"]).is_contiguous()
    with pytest.raises(RuntimeError, match="must match the size"):
        vae.decoder(x["z"], x["z"])
    echofast.unpatch(vae)


def _lora_like(linear: torch.nn.Linear) -> torch.nn.Module:
    """A wrapper as PEFT's LoRA layers are: the base layer plus a low-rank update."""

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = linear
            self.down = torch.nn.Linear(linear.in_features, 2, bias=False)
            self.up = torch.nn.Linear(2, linear.out_features, bias=False)
            torch.nn.init.normal_(self.up.weight, std=0.5)

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    return Wrapped()


@torch.no_grad()
@pytest.mark.parametrize(
    "change",
    ["submodule", "same_class", "hook", "pre_hook", "diffusers_hook", "processor"],
)
def test_patching_again_after_a_change_serves_the_changed_model(kit, change):
    """A change to the module tree after patching is not seen by the echofast model serving the
    forward (documented); ``patch`` again sees it and patches anew, and then the outputs are the
    changed diffusers model's. Patching again without a change changes nothing. The changes: a
    LoRA-like wrapper, a new layer of the same class in place of one, forward (pre-)hooks, a hook
    of diffusers' own HookRegistry (it wraps the forward at instance level, as its offloading
    and layerwise casting do), another attention processor."""
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    model, x = kit.build("lidm"), kit.inputs("lidm")
    report = echofast.patch(model)
    assert report.replaced and echofast.patch(model) is report
    path, attn = next((n, m) for n, m in model.named_modules() if isinstance(m, Attention))
    if change == "submodule":
        attn.to_q = _lora_like(attn.to_q)
    elif change == "same_class":
        old = model.conv_out
        model.conv_out = torch.nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1)
    elif change == "hook":
        model.conv_out.register_forward_hook(lambda m, i, o: o * 0.5)
    elif change == "pre_hook":
        model.conv_out.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    elif change == "diffusers_hook":

        class Halving(ModelHook):
            def post_forward(self, module, output):
                return output * 0.5

        HookRegistry.check_if_exists_or_initialize(model.conv_out).register_hook(Halving(), "h")
    else:

        class Doubling(AttnProcessor2_0):
            def __call__(self, *args, **kwargs):
                return 2 * super().__call__(*args, **kwargs)

        attn.set_processor(Doubling())
    again = echofast.patch(model)
    assert again is not report
    got = model(**x).sample
    echofast.unpatch(model)
    expected = model(**x).sample
    assert rel_err(got, expected) <= TOL
    plain = kit.build("lidm")  # the change matters: the outputs differ from the unchanged model
    assert rel_err(expected, plain(**x).sample) > 1e-2
