"""Patched objects under ``pickle``/``torch.save`` (stored unpatched, as plain diffusers objects)
and ``copy`` (copies stay patched), and ``unpatch``'s error for objects patched through another.

Oracle: the same diffusers model or pipeline, unpatched (fp32, random weights and norm affines).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from support.configs import LIDM_SMALL_CONFIG
from support.models import build_diffusers, rel_err

import echofast
from echofast.patching import PatchError
from echofast.patching.core import RECORD, STATE
from echofast.patching.sites import AttentionProcessor

pytest.importorskip("diffusers")

TOL = 1e-5


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _globals_in(data: bytes) -> set[str]:
    """The modules whose names a pickle refers to (classes, functions)."""
    modules: set[str] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            modules.add(module)
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    return modules


def _one_sample(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first sample of a batch of inputs (scalar timesteps kept)."""
    return {k: v[:1] if v.dim() else v for k, v in x.items()}


def _layout(model: torch.nn.Module) -> dict[str, tuple[type, type | None]]:
    """Each module's class and (for attention modules) its processor's class, by path."""
    return {
        name: (type(m), type(getattr(m, "processor", None))) for name, m in model.named_modules()
    }


def _processors(model: torch.nn.Module) -> list:
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


def _ddpm_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = build_diffusers(UNet2DModel, {**LIDM_SMALL_CONFIG, "sample_size": 16})
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe) -> torch.Tensor:
    out = pipe(
        batch_size=1,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=2,
        output_type="np",
    )
    return torch.from_numpy(out.images)


@pytest.mark.parametrize(
    ("kind", "replace"),
    [("lidm", True), ("vae", True), ("lidm", False)],
    ids=["lidm-replace", "vae-replace", "lidm-call_sites"],
)
@torch.no_grad()
def test_pickle_and_torch_save_store_the_unpatched_model(kit, kind, replace):
    model, x = kit.build(kind), _one_sample(kit.inputs(kind))
    layout = _layout(model)
    reference = kit.run(kind, model, x)
    report = echofast.patch(model, replace_models=replace)
    assert bool(report.replaced) is replace and report.counts()["attention"] > 0
    patched_layout = _layout(model)

    data = pickle.dumps(model)
    assert not any(m.split(".")[0] == "echofast" for m in _globals_in(data))
    for loaded in (pickle.loads(data), _torch_saved(model)):
        assert _layout(loaded) == layout
        assert not any(STATE in m.__dict__ for m in loaded.modules())
        assert echofast.unpatch(loaded) is False
        got = kit.run(kind, loaded, x)
        for key, ref in reference.items():
            assert torch.equal(got[key], ref), key
        # the loaded copy can be patched again, like the original
        assert echofast.patch(loaded, replace_models=replace).counts() == report.counts()
        assert _layout(loaded) == patched_layout

    # pickling left the model patched
    assert _layout(model) == patched_layout
    assert echofast.patch(model, replace_models=replace) is report
    assert echofast.unpatch(model) is True


@torch.no_grad()
def test_pickle_and_torch_save_of_a_patched_pipeline():
    pipe = _ddpm_pipeline()
    layout = _layout(pipe.unet)
    expected = _sample(pipe)
    report = echofast.patch(pipe)
    assert [r.path for r in report.replaced] == ["unet"]
    patched_layout = _layout(pipe.unet)

    for loaded in (_pickled(pipe), _torch_saved(pipe)):
        assert type(loaded) is type(pipe)
        assert _layout(loaded.unet) == layout
        assert echofast.unpatch(loaded) is False
        assert torch.equal(_sample(loaded), expected)

    assert _layout(pipe.unet) == patched_layout  # pickling left the pipeline patched
    assert echofast.unpatch(pipe) is True


@torch.no_grad()
def test_copies_stay_patched_with_their_own_record(kit):
    model, x = kit.build("lidm"), _one_sample(kit.inputs("lidm"))
    reference = kit.run("lidm", model, x)["sample"]
    echofast.patch(model)
    patched_layout = _layout(model)

    clone = copy.deepcopy(model)
    assert _layout(clone) == patched_layout
    record = clone.__dict__[RECORD]
    assert record is not model.__dict__[RECORD]
    switched = [m for m in clone.modules() if STATE in m.__dict__]
    assert switched and all(record.owns(m) for m in switched)
    assert not any(record.owns(m) for m in model.modules())
    assert rel_err(kit.run("lidm", clone, x)["sample"], reference) <= TOL
    # the copy's tree is unchanged: patching it again changes nothing, as for the original
    assert echofast.patch(clone) is record.report and clone.__dict__[RECORD] is record
    assert _layout(clone) == patched_layout
    handle = clone.conv_out.register_forward_hook(lambda module, args, out: out)
    assert echofast.patch(clone) is not record.report  # a change to the copy is seen
    handle.remove()

    resnet = model.down_blocks[0].resnets[0]
    shallow = copy.copy(resnet)
    assert type(shallow) is type(resnet) and shallow.__dict__[STATE] is resnet.__dict__[STATE]
    processor = next(p for p in _processors(model) if isinstance(p, AttentionProcessor))
    assert type(copy.copy(processor)) is AttentionProcessor

    assert echofast.unpatch(model) is True
    assert echofast.unpatch(clone) is True
    assert torch.equal(kit.run("lidm", clone, x)["sample"], reference)


def test_unpatch_of_a_module_patched_through_its_pipeline_names_the_modules():
    pipe = _ddpm_pipeline()
    assert [r.path for r in echofast.patch(pipe).replaced] == ["unet"]
    n = len([m for m in pipe.unet.modules() if STATE in m.__dict__])
    assert n > 1
    try:
        with pytest.raises(PatchError) as info:
            echofast.unpatch(pipe.unet)
        assert str(info.value) == (
            "UNet2DModel was not passed to echofast.patch itself, but holds modules patched "
            f"through another object (<root> and {n - 1} more): unpatch that one"
        )
        block = pipe.unet.down_blocks[0]
        with pytest.raises(PatchError, match=r"\(resnets\.0 and \d+ more\): unpatch that one$"):
            echofast.unpatch(block)
        with pytest.raises(PatchError, match=r"\(<root>\): unpatch that one$"):
            echofast.unpatch(block.resnets[0])
    finally:
        assert echofast.unpatch(pipe) is True


@torch.no_grad()
def test_a_processor_shared_by_attention_modules_stays_shared_when_pickled(kit):
    """One processor object set on every attention module (as ``set_attn_processor`` does): the
    pickle of the patched model keeps that sharing, as the pickle of the plain model does."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    model = kit.build("lidm")
    processor = AttnProcessor()
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(processor)
    plain = {id(p) for p in _processors(_pickled(model))}
    echofast.patch(model)
    assert len({id(p) for p in _processors(model)}) > 1  # one echofast processor per module
    for loaded in (_pickled(model), _torch_saved(model)):
        shared = {id(p) for p in _processors(loaded)}
        assert len(shared) == len(plain) == 1
        assert type(_processors(loaded)[0]) is AttnProcessor
    echofast.unpatch(model)
