"""``echofast.patch`` options: backend strings, dtypes, re-patching with other options, autocast
reaching every entry point, and a patch that fails half-way leaving the model as it was.

Oracle: the same diffusers modules, unpatched (and ``torch.autocast`` for the dtype checks).
"""

from __future__ import annotations

import pytest
import torch
from support.models import rel_err

import echofast
from echofast.errors import BackendUnavailable
from echofast.patching import PatchError
from echofast.patching import models as patch_models
from echofast.patching.core import RECORD, STATE

pytest.importorskip("diffusers")

TOL = 1e-5


def _output_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    """A list that receives the output dtype of each call of ``module``."""
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    return seen


def test_backend_string_tolerates_spaces_and_empty_parts(kit):
    block = kit.resnet()
    report = echofast.patch(block, backend=" group_norm = torch , , attention=sdpa ,")
    assert report.backend == {"group_norm": "torch", "attention": "sdpa"}
    echofast.unpatch(block)


def test_named_backends_win_over_the_wildcard(kit):
    """``"torch,attention=sdpa"``: every op on torch except attention, whatever the order."""
    block = kit.resnet()
    for spec in ("torch,attention=sdpa", "attention=sdpa,torch"):
        report = echofast.patch(block, backend=spec)
        assert report.backend["attention"] == "sdpa", spec
        assert report.backend["group_norm"] == "torch" and report.backend["layer_norm"] == "torch"
        echofast.unpatch(block)
    report = echofast.patch(block, backend={"group_norm": "torch"})
    assert report.backend == {"group_norm": "torch"}
    echofast.unpatch(block)
    with pytest.raises(BackendUnavailable):
        echofast.patch(block, backend={"group_norm": "sdpa"})


def test_dtype_names_and_torch_dtypes(kit):
    block = kit.resnet()
    for dtype, expected in [
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.float32),
    ]:
        assert echofast.patch(block, dtype=dtype).dtype == expected, dtype
        echofast.unpatch(block)
    for bad in (torch.int8, torch.float64, "half", 16):
        with pytest.raises(PatchError, match="dtype"):
            echofast.patch(block, dtype=bad)
        assert RECORD not in block.__dict__


def test_changing_only_the_dtype_patches_anew(kit):
    block = kit.resnet()
    first = echofast.patch(block)
    second = echofast.patch(block, dtype="bfloat16")
    assert second is not first and second.dtype == torch.bfloat16
    assert block.__dict__[STATE].dtype == torch.bfloat16
    assert echofast.patch(block, dtype=torch.bfloat16) is second  # the same dtype, not by name
    assert echofast.patch(block).dtype is None
    echofast.unpatch(block)


@torch.no_grad()
def test_dtype_on_a_lone_block_runs_it_under_autocast(kit):
    """A module with no diffusers model inside is its own entry: its forward runs in bf16 (as
    under ``torch.autocast``) and its output comes back in the input's dtype."""
    block = kit.resnet()
    g = torch.Generator().manual_seed(3)
    x, temb = torch.randn(2, 8, 6, 5, generator=g), torch.randn(2, 6, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = block(x, temb).float()
    inner = _output_dtypes(block.conv1)
    report = echofast.patch(block, dtype="bfloat16")
    assert report.counts() == {"resnet": 1}
    got = block(x, temb)
    assert got.dtype == torch.float32 and inner == [torch.bfloat16]
    assert rel_err(got, plain) <= 2e-2
    echofast.unpatch(block)


@torch.no_grad()
def test_dtype_tuple_outputs_are_cast_back(kit):
    """``return_dict=False`` gives a tuple: its tensors come back in the input's dtype too."""
    model, x = kit.build("lidm"), kit.inputs("lidm")
    inner = _output_dtypes(model.conv_in)
    echofast.patch(model, dtype="bfloat16", replace_models=False)
    (got,) = model(**x, return_dict=False)
    assert got.dtype == torch.float32 and inner == [torch.bfloat16]
    assert torch.equal(got, model(**x).sample)
    echofast.unpatch(model)


@torch.no_grad()
def test_dtype_reaches_vae_encode_and_decode(kit):
    """``AutoencoderKL.encode``/``decode`` do not go through ``forward``: the autocast is on
    the encoder and decoder themselves."""
    vae, x = kit.build("vae"), kit.inputs("vae")
    enc, dec = _output_dtypes(vae.encoder.conv_in), _output_dtypes(vae.decoder.conv_in)
    report = echofast.patch(vae, dtype="bfloat16", replace_models=False)
    assert {s.path for s in report.patched if s.kind == "autocast"} == {"encoder", "decoder"}
    got = kit.run("vae", vae, x)
    assert enc == [torch.bfloat16] and dec == [torch.bfloat16]
    assert all(v.dtype == torch.float32 for v in got.values())
    echofast.unpatch(vae)


@torch.no_grad()
def test_changing_only_replace_models_patches_anew(kit):
    model = kit.build("lidm")
    first = echofast.patch(model)
    assert first.replaced
    second = echofast.patch(model, replace_models=False)
    assert second is not first and second.replaced == []
    assert not any(
        STATE in m.__dict__ and m.__dict__[STATE].echo is not None for m in model.modules()
    )
    echofast.unpatch(model)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("patched_before", [False, True], ids=["new", "again"])
def test_a_patch_that_fails_half_way_changes_nothing(kit, monkeypatch, error, patched_before):
    """Call sites are patched before whole models are built: an error while building undoes
    them, also an interrupt (Ctrl-C), and also when patching again with other options (the
    earlier patch is undone first: the model is left unpatched)."""
    from diffusers.models.attention_processor import Attention

    model = kit.build("lidm")
    classes = [type(m) for m in model.modules()]
    processors = [m.processor for m in model.modules() if isinstance(m, Attention)]
    if patched_before:
        assert echofast.patch(model, replace_models=False).patched

    def failing_build(diff):
        raise error("out of memory while building")

    monkeypatch.setattr(patch_models, "build_echofast", failing_build)
    with pytest.raises(error, match="out of memory"):
        echofast.patch(model)
    assert [type(m) for m in model.modules()] == classes
    assert [m.processor for m in model.modules() if isinstance(m, Attention)] == processors
    assert not any(STATE in m.__dict__ for m in model.modules()) and RECORD not in model.__dict__
    monkeypatch.undo()
    assert echofast.patch(model).replaced
    assert echofast.unpatch(model) is True


@torch.no_grad()
def test_dtype_leaves_a_model_patched_through_another_call_alone(kit):
    """Patching a container with a dtype does not re-switch a model inside it that another
    ``patch`` call owns; each call undoes only its own changes."""
    model, x = kit.build("lidm"), kit.inputs("lidm")
    expected = model(**x).sample
    echofast.patch(model)
    patched = [type(m) for m in model.modules()]
    holder = torch.nn.ModuleList([model])
    report = echofast.patch(holder, dtype="bfloat16")
    assert "autocast" not in report.counts()
    assert [type(m) for m in model.modules()] == patched
    assert rel_err(model(**x).sample, expected) <= TOL  # fp32: not under the holder's autocast
    assert echofast.unpatch(holder) is True
    assert [type(m) for m in model.modules()] == patched
    assert echofast.unpatch(model) is True
    assert torch.equal(model(**x).sample, expected)


@torch.no_grad()
def test_dtype_casts_back_floating_tensors_in_lists_and_tuples_only():
    """Outputs of any structure: floating tensors in lists and nested tuples come back in the
    input's dtype, integer tensors are left as they are."""

    class Pieces(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 4)

        def forward(self, x):
            y = self.proj(x)  # bf16 under autocast
            return [y, (y, y.argmax(dim=-1))]

    torch.manual_seed(0)
    module = Pieces()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    report = echofast.patch(module, dtype="bfloat16")
    assert report.counts() == {"autocast": 1}
    out = module(x)
    assert type(out) is list and type(out[1]) is tuple
    assert out[0].dtype == torch.float32 and out[1][0].dtype == torch.float32
    assert out[1][1].dtype == torch.int64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = module.proj(x)
    assert torch.equal(out[0], expected.float())
    echofast.unpatch(module)


@torch.no_grad()
def test_dtype_on_a_replaced_model_is_its_call_under_autocast(kit):
    """The echofast model serving a diffusers model runs under the patch's autocast too."""
    model, x = kit.build("lidm"), kit.inputs("lidm")
    assert echofast.patch(model).replaced
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**x).sample.float()
    report = echofast.patch(model, dtype="bfloat16")
    assert report.replaced and "autocast" not in report.counts()
    got = model(**x).sample
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    echofast.unpatch(model)


def test_a_sibling_named_like_a_module_patched_elsewhere_is_patched(kit):
    """Only the subtree of a module patched through another call is left alone, not siblings
    whose names start with its name."""
    outer = torch.nn.Module()
    outer.block, outer.block_b = kit.resnet(), kit.resnet()
    inner = echofast.patch(outer.block)
    report = echofast.patch(outer)
    assert [(i.path, i.reason) for i in report.left_alone] == [
        ("block", "already patched by another echofast.patch call")
    ]
    assert [(p.path, p.kind) for p in report.patched] == [("block_b", "resnet")]
    assert echofast.unpatch(outer) is True and echofast.patch(outer.block) is inner
    echofast.unpatch(outer.block)
