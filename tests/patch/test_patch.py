"""``echofast.patch``: patched diffusers models compute what diffusers computes, on echofast.

Oracle: the same diffusers model, unpatched (fp32, random weights and norm affines). Both paths
are tested for every model class: whole-model replacement (``replace_models=True``) and call-site
patching only (``replace_models=False``), with every op backend that runs on CPU.
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import pytest
import torch
from support.models import build_diffusers, randomize_norms, rel_err
from support.triton_interp import without_interpreter

import echofast
from echofast.errors import BackendUnavailable
from echofast.ops import registered_ops
from echofast.patching import PatchError
from echofast.patching.core import RECORD, STATE
from echofast.patching.sites import AttentionProcessor

pytest.importorskip("diffusers")

TOL = 1e-5
KINDS = ["vae", "lidm", "lidm_scale_shift", "lvdm", "svd_like"]


def _cpu_backends(op: str) -> list[str]:
    """Backends of ``op`` that can run a typical CPU input (no Triton interpreter here)."""
    with without_interpreter():  # as in the tests' run (tests/conftest.py)
        return [name for name, why in registered_ops()[op].report("cpu").items() if not why]


BACKENDS = [
    {"group_norm": gn, "attention": at}
    for gn, at in itertools.product(_cpu_backends("group_norm"), _cpu_backends("attention"))
]


def _ids(spec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items())


@pytest.fixture(scope="module")
def models(kit) -> dict[str, torch.nn.Module]:
    return {kind: kit.build(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def references(kit, models) -> dict[str, dict[str, torch.Tensor]]:
    with torch.no_grad():
        return {kind: kit.run(kind, models[kind], kit.inputs(kind)) for kind in KINDS}


@pytest.fixture(autouse=True)
def _always_unpatched(models):
    yield
    for model in models.values():
        echofast.unpatch(model)


def _attention_modules(model):
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if type(m) is Attention]


def _processors(model) -> dict:
    from diffusers.models.attention_processor import Attention

    return {n: m.processor for n, m in model.named_modules() if type(m) is Attention}


def _count(model, class_name: str) -> int:
    return sum(type(m).__name__ == class_name for m in model.modules())


@pytest.mark.parametrize("backend", BACKENDS, ids=_ids)
@pytest.mark.parametrize("replace", [True, False], ids=["replace", "call_sites"])
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_patched_matches_diffusers(
    kit, kind, replace, backend, models, references, op_calls, diffusers_calls
):
    model, x = models[kind], kit.inputs(kind)
    report = echofast.patch(model, backend=backend, replace_models=replace)
    got = kit.run(kind, model, x)
    for key, ref in references[kind].items():
        assert got[key].shape == ref.shape and got[key].dtype == ref.dtype
        assert rel_err(got[key], ref) <= TOL, key

    # the work ran on echofast's ops with the forced backends, not on diffusers' norm/attention
    assert op_calls[("group_norm", backend["group_norm"])] > 0
    if kind != "vae" or not replace:  # (the replaced VAE's one attention has a single token)
        assert op_calls[("attention", backend["attention"])] > 0
    forced = {(op, name) for op, name in backend.items()}
    assert {key for key, n in op_calls.items() if n and key[0] in backend} <= forced
    assert diffusers_calls["AttnProcessor2_0"] == 0 and diffusers_calls["GroupNorm"] == 0

    # the report names what was swapped
    counts = report.counts()
    assert counts.get("resnet", 0) == _count(model, "ResnetBlock2D")
    assert counts.get("temporal_resnet", 0) == _count(model, "TemporalResnetBlock")
    assert counts["attention"] == len(_attention_modules(model))
    assert report.backend == backend and not report.left_alone
    expected = {"vae": "VAE", "lvdm": "LVDM", "svd_like": "LVDM"}.get(kind, "LIDM")
    if replace:
        assert [r.echofast_class for r in report.replaced] == [f"echofast.models.{expected}"]
        assert all(p.last_path == "" for p in _processors(model).values())  # diffusers idle
    else:
        assert report.replaced == []
        paths = {p.last_path for n, p in _processors(model).items() if n.endswith(".attn2")}
        if kind == "lvdm":  # the EF is one token: the exact single-key path
            assert paths == {"single_key"}
        elif kind == "svd_like":
            assert paths == {"general"}
    assert str(report).startswith(f"echofast.patch({type(model).__name__})")

    assert echofast.unpatch(model) is True
    again = kit.run(kind, model, x)
    for key, ref in references[kind].items():
        assert torch.equal(again[key], ref), f"{key}: unpatch is not bit-identical"


@pytest.mark.parametrize("kind", KINDS)
def test_unpatch_restores_classes_and_processors(kind, models):
    model = models[kind]
    classes = {name: type(m) for name, m in model.named_modules()}
    processors = _processors(model)
    report = echofast.patch(model)
    assert report.patched
    assert any(type(m) is not classes[n] for n, m in model.named_modules())
    assert all(isinstance(p, AttentionProcessor) for p in _processors(model).values())
    # same class names, so isinstance checks and save_pretrained's _class_name are unchanged
    assert all(type(m).__name__ == classes[n].__name__ for n, m in model.named_modules())
    assert all(isinstance(m, classes[n]) for n, m in model.named_modules())

    assert echofast.unpatch(model) is True
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert _processors(model) == processors
    assert not any(STATE in m.__dict__ for m in model.modules()) and RECORD not in model.__dict__
    assert echofast.unpatch(model) is False


@torch.no_grad()
def test_patching_twice_is_harmless(kit, models, references):
    model = models["svd_like"]
    first = echofast.patch(model)
    processors = _processors(model)
    classes = [type(m) for m in model.modules()]
    assert echofast.patch(model) is first
    assert _processors(model) == processors and [type(m) for m in model.modules()] == classes
    assert (
        rel_err(
            kit.run("svd_like", model, kit.inputs("svd_like"))["sample"],
            references["svd_like"]["sample"],
        )
        <= TOL
    )
    # other options: unpatched, then patched anew
    second = echofast.patch(model, replace_models=False, backend="torch")
    assert second is not first and second.replaced == [] and second.backend
    assert (
        rel_err(
            kit.run("svd_like", model, kit.inputs("svd_like"))["sample"],
            references["svd_like"]["sample"],
        )
        <= TOL
    )
    echofast.unpatch(model)
    assert torch.equal(
        kit.run("svd_like", model, kit.inputs("svd_like"))["sample"],
        references["svd_like"]["sample"],
    )


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_shared_not_copied(kind, models):
    model = models[kind]
    before = {k: (v.data_ptr(), v.dtype, v.shape) for k, v in model.state_dict().items()}
    echofast.patch(model)
    after = model.state_dict()
    assert {k: (v.data_ptr(), v.dtype, v.shape) for k, v in after.items()} == before
    echo_parts = [
        m.__dict__[STATE].echo
        for m in model.modules()
        if STATE in m.__dict__ and m.__dict__[STATE].echo is not None
    ]
    assert echo_parts, "no model was replaced"
    own = {id(p) for p in model.parameters()}
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for echo in echo_parts:
        params = list(echo.parameters())
        assert params and all(id(p) in own for p in params)
        assert {p.untyped_storage().data_ptr() for p in params} <= storages
        assert not list(echo.buffers())


@torch.no_grad()
def test_sharing_survives_dtype_moves_and_assigned_weights(kit, models):
    model = models["svd_like"]
    x = kit.inputs("svd_like")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    echofast.patch(model)
    try:
        model.to(torch.float64)
        x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
        got = kit.run("svd_like", model, x64)["sample"]
        assert got.dtype == torch.float64
        echofast.unpatch(model)
        ref = kit.run("svd_like", model, x64)["sample"]
        assert rel_err(got, ref) <= 1e-12
        echofast.patch(model)
        # assign=True replaces every Parameter object: the echofast model must follow
        other = kit.build("svd_like", seed=7).double().state_dict()
        model.load_state_dict(other, assign=True)
        got = kit.run("svd_like", model, x64)["sample"]
        echofast.unpatch(model)
        assert rel_err(got, kit.run("svd_like", model, x64)["sample"]) <= 1e-12
    finally:
        echofast.unpatch(model)
        model.load_state_dict(original, assign=True)


@pytest.mark.parametrize("kind", ["vae", "svd_like"])
@torch.no_grad()
def test_save_pretrained_of_patched_model_loads_in_diffusers(
    kit, kind, models, references, tmp_path
):
    model = models[kind]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    echofast.patch(model)
    model.save_pretrained(tmp_path)
    loaded = kit.diffusers_class(kind).from_pretrained(tmp_path).eval()
    assert type(loaded) is kit.diffusers_class(kind)
    assert loaded.config["_class_name"] == kit.diffusers_class(kind).__name__
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state)
    assert all(torch.equal(loaded_state[k], v) for k, v in state.items())
    got = kit.run(kind, loaded, kit.inputs(kind))
    for key, ref in references[kind].items():
        assert torch.equal(got[key], ref)


@torch.no_grad()
def test_left_alone_with_reasons(kit, models, references):
    """Custom processors and hooked submodules are kept; the rest is still patched, and the
    model is not replaced (echofast would bypass them)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MyProcessor(AttnProcessor2_0):
        pass

    model = models["svd_like"]
    seen = []
    attn = _attention_modules(model)[0]
    custom = MyProcessor()
    original_processor = attn.processor
    attn.set_processor(custom)
    resnet = next(m for m in model.modules() if type(m).__name__ == "ResnetBlock2D")
    handle = resnet.norm1.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        report = echofast.patch(model)
        assert report.replaced == []
        reasons = {(item.what, item.reason) for item in report.left_alone}
        assert ("Attention", "custom processor MyProcessor (kept)") in reasons
        assert ("ResnetBlock2D", "norm1 has forward hooks: a fused call would bypass it") in reasons
        assert any(
            what == "UNetSpatioTemporalConditionModel" and "not replaced" in why
            for what, why in reasons
        )
        assert attn.processor is custom
        assert type(resnet).__dict__.get("_echofast_kind") is None
        assert report.counts()["attention"] == len(_attention_modules(model)) - 1
        got = kit.run("svd_like", model, kit.inputs("svd_like"))["sample"]
        assert rel_err(got, references["svd_like"]["sample"]) <= TOL
        assert seen, "the hook on the unpatched resnet's norm must still fire"
        assert "left alone:" in str(report)
        echofast.unpatch(model)
        assert attn.processor is custom
    finally:
        handle.remove()
        attn.set_processor(original_processor)


@torch.no_grad()
def test_submodule_patch_and_nesting(kit, models, references):
    model = models["lvdm"]
    block = model.down_blocks[0]
    report = echofast.patch(block)
    assert report.replaced == [] and report.counts()["resnet"] == _count(block, "ResnetBlock2D")
    got = kit.run("lvdm", model, kit.inputs("lvdm"))["sample"]
    assert rel_err(got, references["lvdm"]["sample"]) <= TOL
    # patching the whole model now keeps the block as it is (patched through another object)
    outer = echofast.patch(model, replace_models=False)
    assert [(i.path, i.reason) for i in outer.left_alone] == [
        ("down_blocks.0", "already patched by another echofast.patch call")
    ]
    echofast.unpatch(model)
    with pytest.raises(PatchError, match="unpatch that one"):
        echofast.unpatch(model)
    assert echofast.unpatch(block) is True
    assert torch.equal(
        kit.run("lvdm", model, kit.inputs("lvdm"))["sample"], references["lvdm"]["sample"]
    )


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "call_sites"])
def test_gradients_reach_the_diffusers_parameters(kit, replace, models):
    model = models["lidm"]
    x = kit.inputs("lidm")

    def grads():
        model.zero_grad(set_to_none=True)
        model(**x).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model.train()
    try:
        ref = grads()
        echofast.patch(model, replace_models=replace)
        got = grads()
        assert set(got) == set(ref)
        # a key bias has an exactly-zero gradient (softmax ignores a shift shared by all keys):
        # its values are rounding noise, so errors are measured against the largest gradient too
        scale = max(g.abs().max().item() for g in ref.values())
        for name in ref:
            err = (got[name] - ref[name]).abs().max().item()
            assert err <= 1e-4 * ref[name].abs().max().item() + 1e-6 * scale, name
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@torch.no_grad()
def test_deepcopy_of_patched_model(kit, models, references):
    model = models["svd_like"]
    echofast.patch(model)
    clone = copy.deepcopy(model)
    echofast.unpatch(model)
    echo = clone.__dict__[STATE].echo
    assert echo.conv_in.weight is clone.conv_in.weight
    assert echo.conv_in.weight is not model.conv_in.weight
    got = kit.run("svd_like", clone, kit.inputs("svd_like"))["sample"]
    assert rel_err(got, references["svd_like"]["sample"]) <= TOL


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "call_sites"])
@torch.no_grad()
def test_dtype_autocast_bf16(kit, replace, models, references):
    """bf16 autocast: the patched model's error vs fp32 is within 2x diffusers' own under the same
    autocast (plus a small floor)."""
    model = models["lidm"]
    x = kit.inputs("lidm")
    ref = references["lidm"]["sample"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(**x).sample.float()
    report = echofast.patch(model, dtype="bfloat16", replace_models=replace)
    assert report.dtype == torch.bfloat16
    got = model(**x).sample
    assert got.dtype == torch.float32  # cast back to the input's dtype
    assert rel_err(got, ref) <= 2 * rel_err(plain, ref) + 1e-3
    assert rel_err(got, ref) > 1e-6  # it really ran in bf16


def test_bad_options_raise_and_change_nothing(models):
    model = models["lidm"]
    classes = [type(m) for m in model.modules()]
    with pytest.raises(BackendUnavailable, match="nope"):
        echofast.patch(model, backend="nope")
    with pytest.raises(BackendUnavailable, match="known"):
        echofast.patch(model, backend="group_norm=nope")
    with pytest.raises(PatchError, match="unknown op"):
        echofast.patch(model, backend="softmax=torch")
    with pytest.raises(PatchError, match="dtype"):
        echofast.patch(model, dtype="int8")
    with pytest.raises(PatchError, match="diffusers pipeline or a torch.nn.Module"):
        echofast.patch(42)
    assert [type(m) for m in model.modules()] == classes and RECORD not in model.__dict__


def test_forced_backend_that_cannot_run_raises_at_call_time(kit, models):
    model = models["lidm"]
    assert registered_ops()["group_norm"].report("cpu").get("triton")  # cannot run on CPU
    echofast.patch(model, backend="group_norm=triton", replace_models=False)
    with pytest.raises(BackendUnavailable, match="triton"), torch.no_grad():
        kit.run("lidm", model, kit.inputs("lidm"))


def test_import_stays_cheap():
    code = (
        "import sys, echofast; f = echofast.patch, echofast.unpatch; "
        "print(sorted(m for m in ('diffusers', 'triton', 'echofast._C') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("processor", ["AttnProcessor2_0", "AttnProcessor"])
@torch.no_grad()
def test_attention_processor_paths(processor):
    """Every branch of the echofast processor against the diffusers processor it replaces:
    feature maps and tokens, GroupNorm, residual + rescale, cross-attention norm, q/k norms,
    one-token self- and cross-attention (exact shortcut), and masks (handed back to diffusers)."""
    from diffusers.models import attention_processor as ap

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    own = dict(heads=2, dim_head=16, bias=True, scale_qk=processor == "AttnProcessor")
    self_attn = ap.Attention(
        32, norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0, **own
    )
    cross_attn = ap.Attention(
        32, cross_attention_dim=12, cross_attention_norm="layer_norm", qk_norm="layer_norm", **own
    )
    cases = [
        (self_attn, torch.randn(2, 32, 5, 3, generator=g), None, None, "general"),
        (self_attn, torch.randn(2, 32, 1, 1, generator=g), None, None, "single_key"),
        (self_attn, torch.randn(2, 7, 32, generator=g), None, None, "general"),
        (
            cross_attn,
            torch.randn(2, 7, 32, generator=g),
            torch.randn(2, 1, 12, generator=g),
            None,
            "single_key",
        ),
        (
            cross_attn,
            torch.randn(2, 32, 3, 3, generator=g),
            torch.randn(2, 1, 12, generator=g),
            None,
            "single_key",
        ),
        (
            cross_attn,
            torch.randn(2, 7, 32, generator=g),
            torch.randn(2, 4, 12, generator=g),
            None,
            "general",
        ),
        (
            cross_attn,
            torch.randn(2, 7, 32, generator=g),
            torch.randn(2, 4, 12, generator=g),
            torch.tensor([[[0.0, 0.0, -1e4, 0.0]], [[0.0, -1e4, 0.0, 0.0]]]),
            "original",
        ),
    ]
    for attn, x, ctx, mask, path in cases:
        randomize_norms(attn.eval())
        attn.set_processor(getattr(ap, processor)())
        expected = attn(x, ctx, attention_mask=mask)
        report = echofast.patch(attn)
        assert report.counts() == {"attention": 1}
        got = attn(x, ctx, attention_mask=mask)
        assert attn.processor.last_path == path
        assert got.shape == expected.shape and got.is_contiguous() == expected.is_contiguous()
        assert rel_err(got, expected) <= TOL, path
        echofast.unpatch(attn)
        assert type(attn.processor).__name__ == processor


@torch.no_grad()
def test_classic_attention_processor_uses_the_module_scale():
    """``AttnProcessor`` scales the scores by ``attn.scale`` (1 with ``scale_qk=False``), where
    ``AttnProcessor2_0`` keeps SDPA's 1/sqrt(D): the replacement must do the same."""
    from diffusers.models import attention_processor as ap

    torch.manual_seed(0)
    attn = ap.Attention(32, heads=2, dim_head=16, bias=True, scale_qk=False).eval()
    attn.set_processor(ap.AttnProcessor())
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    expected = attn(x)
    assert echofast.patch(attn).counts() == {"attention": 1}
    got = attn(x)
    assert attn.processor.last_path == "general"
    assert rel_err(got, expected) <= TOL
    echofast.unpatch(attn)


@torch.no_grad()
def test_resnet_block_options():
    """Patched ``ResnetBlock2D`` options the test models leave at their defaults, against
    diffusers: output scale factor, no activation on the time embedding, up/down sampling with
    a shortcut conv, scale-shift modulation, no time embedding."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = dict(in_channels=16, out_channels=16, temb_channels=12, groups=4)
    cases = [
        dict(base, output_scale_factor=2.0),
        dict(base, skip_time_act=True),
        dict(base, out_channels=24, up=True),
        dict(base, down=True, time_embedding_norm="scale_shift"),
        dict(base, out_channels=24, temb_channels=None),
    ]
    for kwargs in cases:
        block = randomize_norms(ResnetBlock2D(**kwargs).eval())
        x = torch.randn(2, 16, 6, 6, generator=g)
        temb = None if kwargs["temb_channels"] is None else torch.randn(2, 12, generator=g)
        expected = block(x, temb)
        assert echofast.patch(block).counts().get("resnet") == 1, kwargs
        got = block(x, temb)
        assert got.shape == expected.shape and rel_err(got, expected) <= TOL, kwargs
        echofast.unpatch(block)
    # another activation than SiLU: left alone (the fused op would apply SiLU)
    mish = randomize_norms(ResnetBlock2D(**base, non_linearity="mish").eval())
    x, temb = torch.randn(2, 16, 6, 6, generator=g), torch.randn(2, 12, generator=g)
    expected = mish(x, temb)
    assert "resnet" not in echofast.patch(mish).counts()
    assert rel_err(mish(x, temb), expected) <= TOL
    echofast.unpatch(mish)


@torch.no_grad()
def test_replaced_unet_still_refuses_class_labels(kit, models):
    """A UNet2DModel without class embedding refuses class labels (diffusers raises); served by
    echofast, such a call still goes to diffusers instead of being silently ignored."""
    model, x = models["lidm"], kit.inputs("lidm")
    report = echofast.patch(model, replace_models=True)
    assert [r.diffusers_class for r in report.replaced] == ["UNet2DModel"]
    with pytest.raises(ValueError, match="class_embedding"):
        model(**x, class_labels=torch.tensor([1, 2]))


@torch.no_grad()
def test_replaced_model_follows_the_training_mode(kit):
    """The echofast model serving a diffusers model takes its train/eval mode at each call:
    with dropout, training-mode outputs differ from evaluation-mode ones."""
    from diffusers import UNet2DModel

    model = build_diffusers(UNet2DModel, {**kit.configs["lidm"], "dropout": 0.5}, 0)
    x = kit.inputs("lidm")
    echofast.patch(model, replace_models=True)
    evaluated = model(**x).sample
    model.train()
    torch.manual_seed(0)
    assert (model(**x).sample - evaluated).abs().max() > 1e-3
    model.eval()
    torch.testing.assert_close(model(**x).sample, evaluated, rtol=0, atol=0)
