"""Reduced-precision sampling calls the UNet's ``autocast_copy`` (GEMM weights cast once, not at
every call or graph replay): the same latents as the fp32-weight model under autocast, one copy
kept between runs, a new one after the model's weights changed. Run on CPU by letting the
pipelines autocast to bfloat16 there (on CUDA only, normally)."""

from __future__ import annotations

import pytest
import torch
from support.threads import one_torch_thread
from support.weights import TINY_LIDM, TINY_LVDM

from echofast.models import LIDM, LVDM
from echofast.pipelines import LIDMPipeline, LVDMPipeline, lidm, lvdm

BF16 = torch.bfloat16


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture
def bf16_on_cpu(monkeypatch):
    """The pipelines' precision check accepts bfloat16 on CPU (autocast runs there)."""

    def check(dtype, device):
        return {"float32": torch.float32, "bfloat16": BF16}.get(dtype, dtype)

    monkeypatch.setattr(lvdm, "check_precision", check)
    monkeypatch.setattr(lidm, "check_precision", check)


def _models():
    torch.manual_seed(0)
    return LVDM.from_config(TINY_LVDM).eval(), LIDM.from_config(TINY_LIDM).eval()


def _lvdm_run(pipe, dtype=BF16):
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(7))
    return pipe(
        cond,
        [35.0, 70.0],
        num_frames=12,
        seed=3,
        num_inference_steps=3,
        batch_size=2,
        output_type="latent",
        dtype=dtype,
        cuda_graphs=False,
        progress=False,
    ).latents


def _lidm_run(pipe, dtype=BF16):
    return pipe(3, seed=5, num_inference_steps=3, batch_size=3, dtype=dtype, progress=False).latents


@pytest.mark.parametrize("which", ["lvdm", "lidm"])
def test_copy_gives_the_autocast_results_and_is_kept(which, bf16_on_cpu, monkeypatch):
    lvdm_model, lidm_model = _models()
    model, pipe, run = (
        (lvdm_model, LVDMPipeline(lvdm_model), _lvdm_run)
        if which == "lvdm"
        else (lidm_model, LIDMPipeline(lidm_model), _lidm_run)
    )
    made = []
    real = type(model).autocast_copy

    def counted(self, dtype):
        made.append(dtype)
        return real(self, dtype)

    monkeypatch.setattr(type(model), "autocast_copy", counted)
    with_copy = run(pipe)
    assert made == [BF16]
    again = run(pipe)
    assert made == [BF16] and torch.equal(again, with_copy)  # kept between runs
    with monkeypatch.context() as m:  # the fp32-weight model itself under autocast
        m.setattr(type(pipe), "_sampling_model", lambda self, dtype: model)
        plain = run(pipe)
    assert torch.equal(with_copy, plain)
    assert not torch.equal(run(pipe, torch.float32), with_copy)  # bf16 did run in bf16
    assert made == [BF16]  # float32 calls the model itself

    with torch.no_grad():  # an in-place update of a weight (as an optimizer or EMA step)
        next(p for n, p in model.named_parameters() if n.endswith("conv_in.weight")).mul_(1.5)
    changed = run(pipe)
    assert made == [BF16, BF16] and not torch.equal(changed, with_copy)
    with monkeypatch.context() as m:
        m.setattr(type(pipe), "_sampling_model", lambda self, dtype: model)
        assert torch.equal(run(pipe), changed)
    pipe.release_graphs()
    assert pipe._autocast_model is None


def test_other_modules_are_called_as_they_are(bf16_on_cpu):
    lvdm_model, _ = _models()
    pipe = LVDMPipeline(lvdm_model)
    assert pipe._sampling_model(torch.float32) is lvdm_model
    plain = torch.nn.Identity()
    pipe.lvdm = plain
    assert pipe._sampling_model(BF16) is plain
    compiled = torch.compile(lvdm_model)  # delegates autocast_copy, but is called as it is
    pipe.lvdm = compiled
    assert pipe._sampling_model(BF16) is compiled


def test_a_copy_passed_to_the_pipeline_runs(bf16_on_cpu):
    """A pipeline built on an autocast_copy (as a compiled or user-made one would be): its
    fp32 conditioning meets bf16 conv_in weights outside autocast and must still run."""
    lvdm_model, _ = _models()
    copy = lvdm_model.autocast_copy(BF16)
    pipe = LVDMPipeline(copy)
    latents = _lvdm_run(pipe)
    assert torch.isfinite(latents).all()
    # the same as the original's run up to the conditioning computed from bf16-rounded weights
    ref = _lvdm_run(LVDMPipeline(lvdm_model))
    assert ((latents - ref).norm() / ref.norm()).item() < 2e-2
