"""``echofast.pipelines.graphs``: CUDA-graph replay of UNet calls.

On CPU: the availability reasons, the fallback (exactly the plain call), the signature that one
graph serves, and the static-buffer plumbing with the capture replaced by an eager re-run (so
every replay's result must equal a fresh plain call). On CUDA (skipped elsewhere): real captures
of echofast's LVDM and LIDM against eager calls, in fp32 and under fp16 autocast.
"""

from __future__ import annotations

import pytest
import torch
from support.weights import TINY_LIDM, TINY_LVDM

from echofast.errors import BackendUnavailable
from echofast.models import LIDM, LVDM
from echofast.pipelines import graphs
from echofast.pipelines.graphs import CUDAGraphUNet, not_supported_reasons, signature

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _lvdm(device="cpu", seed=0):
    torch.manual_seed(seed)
    return LVDM.from_config(TINY_LVDM).to(device).eval()


def _lvdm_inputs(batch=2, frames=4, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 8, 8, 8, generator=g)
    ef = torch.rand(batch, 1, 1, generator=g)
    ids = torch.zeros(batch, 1)
    return x.to(device), {"encoder_hidden_states": ef.to(device), "added_time_ids": ids.to(device)}


def test_reasons_on_cpu(monkeypatch):
    model = _lvdm()
    x, kw = _lvdm_inputs()
    with torch.no_grad():
        reasons = not_supported_reasons(model, x, 500, **kw)
    assert any("not on a CUDA device" in r for r in reasons)
    if not torch.cuda.is_available():
        assert any("CUDA is not available" in r for r in reasons)
    assert not any("autograd" in r for r in reasons)

    assert any("autograd is enabled" in r for r in not_supported_reasons(model, x, 500, **kw))
    with torch.no_grad():
        assert any("Python float" in r for r in not_supported_reasons(model, x, 500.0, **kw))
        assert any("holding tensors" in r for r in not_supported_reasons(model, x, 5, [x]))
        model.train()
        assert any("training mode" in r for r in not_supported_reasons(model, x, 500, **kw))
        model.eval()
        monkeypatch.setenv(graphs.ENV_VAR, "0")
        assert any(graphs.ENV_VAR in r for r in not_supported_reasons(model, x, 500, **kw))


@torch.no_grad()
def test_fallback_is_the_plain_call():
    model = _lvdm()
    x, kw = _lvdm_inputs()
    wrapped = CUDAGraphUNet(model)
    for t in (900, torch.tensor(15)):
        got = wrapped(x, t, **kw).sample
        want = model(x, t, **kw).sample
        assert torch.equal(got, want)
    assert wrapped.last_reasons and wrapped.captures == 0 and wrapped.num_graphs == 0
    assert CUDAGraphUNet(model, enabled=False).reasons(x, 5, **kw) == [
        "CUDA graphs are disabled for this wrapper (enabled=False)"
    ]


@torch.no_grad()
def test_forced_graphs_raise_with_every_reason():
    model = _lvdm()
    x, kw = _lvdm_inputs()
    with pytest.raises(BackendUnavailable) as info:
        CUDAGraphUNet(model, enabled=True)(x, 500.0, **kw)
    assert "Python float" in str(info.value) and "not on a CUDA device" in str(info.value)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphUNet(model, warmup=0)


def test_signature_ignores_timestep_values_only():
    x, kw = _lvdm_inputs()
    base = signature(x, 900, **kw)
    assert signature(x.clone(), 15, **kw) == base
    assert signature(x, torch.tensor(900), **kw) != base
    assert signature(x, torch.tensor(900), **kw) == signature(x, torch.tensor(3), **kw)
    assert signature(x[:1], 900, **{k: v[:1] for k, v in kw.items()}) != base
    assert signature(x.half(), 900, **kw) != base
    assert signature(x, 900, return_dict=False, **kw) != base
    assert signature(x.transpose(3, 4), 900, **kw) != base


class _EagerCapture:
    """Stands in for ``cuda_graph_capture`` on CPU: "replay" re-runs the captured function and
    writes its result into the output captured first, as a graph writes its static outputs. As
    after a real capture, that output holds no result until the first replay (NaN here)."""

    def __init__(self):
        self.warmups = 0

    def __call__(self, fn, device, warmup):
        for _ in range(warmup):
            fn()
            self.warmups += 1
        output = fn()
        output.sample.fill_(float("nan"))

        def replay():
            output.sample.copy_(fn().sample)

        return replay, output


@pytest.fixture
def eager_capture(monkeypatch):
    capture = _EagerCapture()
    monkeypatch.setattr(graphs, "cuda_graph_capture", capture)
    monkeypatch.setattr(graphs, "not_supported_reasons", lambda *a, **k: [])
    return capture


@torch.no_grad()
def test_static_buffers_serve_every_timestep(eager_capture):
    model = _lvdm()
    wrapped = CUDAGraphUNet(model, warmup=2)
    forward = model.forward
    memo_during_calls = []

    def spy(*args, **kwargs):
        memo_during_calls.append(model._run_memo)
        return forward(*args, **kwargs)

    model.forward = spy
    calls = [
        (945, 0),
        (torch.tensor(500), 1),
        (torch.tensor([15]), 2),
        (30, 3),
        (torch.tensor(7), 4),
    ]
    with model.sampling_cache() as memo:
        for t, seed in calls:
            x, kw = _lvdm_inputs(seed=seed)
            got = wrapped(x, t, **kw).sample
            assert model._run_memo is memo
            assert torch.equal(got, forward(x, t, **kw).sample), f"timestep {t}"
    # an int timestep, a 0-d and a (1,) tensor: three signatures, each replayed with new values
    assert wrapped.captures == 3 and wrapped.num_graphs == 3 and wrapped.replays == len(calls)
    assert eager_capture.warmups == 3 * 2
    # the module ran with the sampling memo off (a capture cannot read timesteps on the host)
    assert memo_during_calls and all(m is None for m in memo_during_calls)


@torch.no_grad()
def test_one_graph_per_shape_and_recapture_on_new_weights(eager_capture):
    model = _lvdm()
    wrapped = CUDAGraphUNet(model, warmup=1, max_graphs=2)
    for t in (900, 500, 100):
        x, kw = _lvdm_inputs(batch=2, seed=t)
        assert torch.equal(wrapped(x, t, **kw).sample, model(x, t, **kw).sample)
    assert wrapped.captures == 1 and wrapped.replays == 3
    out2 = wrapped(x, 5, **kw)
    assert out2 is wrapped(x, 6, **kw), "outputs are the graph's static buffers"
    x1, kw1 = _lvdm_inputs(batch=1)
    assert torch.equal(wrapped(x1, 7, **kw1).sample, model(x1, 7, **kw1).sample)
    assert wrapped.captures == 2
    x3, kw3 = _lvdm_inputs(batch=3)
    wrapped(x3, 7, **kw3)
    assert wrapped.captures == 3 and wrapped.num_graphs == 2  # oldest dropped
    # a weight moved to new storage: every graph is captured again
    model.conv_out.weight.data = torch.randn_like(model.conv_out.weight)
    assert torch.equal(wrapped(x3, 7, **kw3).sample, model(x3, 7, **kw3).sample)
    assert wrapped.captures == 4 and wrapped.num_graphs == 1
    # replaced parameter objects: reset() drops the graphs
    model.conv_out.weight = torch.nn.Parameter(torch.randn_like(model.conv_out.weight))
    wrapped.reset()
    assert torch.equal(wrapped(x3, 7, **kw3).sample, model(x3, 7, **kw3).sample)
    assert wrapped.captures == 5 and wrapped.num_graphs == 1


@torch.no_grad()
def test_failed_capture_falls_back_or_raises(monkeypatch):
    def broken(fn, device, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "cuda_graph_capture", broken)
    monkeypatch.setattr(graphs, "not_supported_reasons", lambda *a, **k: [])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    model = _lvdm()
    x, kw = _lvdm_inputs()
    wrapped = CUDAGraphUNet(model)
    for t in (900, 15):
        assert torch.equal(wrapped(x, t, **kw).sample, model(x, t, **kw).sample)
        assert "capture failed" in wrapped.last_reasons[0]
    assert wrapped.captures == 0
    with pytest.raises(BackendUnavailable, match="capture failed"):
        CUDAGraphUNet(model, enabled=True)(x, 900, **kw)


# ---- CUDA: real captures ----------------------------------------------------------------------


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@torch.no_grad()
def test_cuda_lvdm_graph_matches_eager(dtype):
    model = _lvdm("cuda")
    wrapped = CUDAGraphUNet(model, enabled=True)
    outs = []
    with (
        model.sampling_cache(),
        torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32),
    ):
        for seed, t in enumerate((945, 500, 15)):
            x, kw = _lvdm_inputs(batch=3, device="cuda", seed=seed)
            got = wrapped(x, torch.tensor(t, device="cuda"), **kw).sample.clone()
            want = model(x, t, **kw).sample
            assert torch.isfinite(got).all()
            assert _rel(got, want) <= (1e-6 if dtype == torch.float32 else 2e-3), t
            outs.append(got)
    assert wrapped.captures == 1 and wrapped.replays == 3
    assert _rel(outs[0], outs[2]) > 1e-3  # replays follow the inputs


@cuda
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_cuda_lidm_graph_matches_eager(batch):
    torch.manual_seed(0)
    model = LIDM.from_config(TINY_LIDM).cuda().eval()
    wrapped = CUDAGraphUNet(model)
    x = torch.randn(batch, 4, 8, 8, device="cuda")
    with model.sampling_cache(), torch.autocast("cuda", dtype=torch.float16):
        for t in (900, 40):
            got = wrapped(x, t).sample.clone()
            want = model(x, t).sample
            assert _rel(got, want) <= 2e-3
    # batch > 1: the LIDM may synchronise on the timestep (distinct_timesteps); then the wrapper
    # runs it eagerly and says why
    assert wrapped.captures == 1 or "capture failed" in wrapped.last_reasons[0]
