"""``echofast.pipelines.graphs``: CUDA-graph replay of UNet calls.

On CPU: the availability reasons, the fallback (exactly the plain call), the signature that one
graph serves, and the static-buffer plumbing with the capture replaced by an eager re-run (so
every replay's result must equal a fresh plain call). On CUDA (skipped elsewhere): real captures
of echofast's LVDM and LIDM against eager calls, in fp32 and under fp16 autocast.

The pipelines' ``cuda_graphs`` option: on CPU auto mode equals eager bit for bit and forced
graphs raise with the reasons; with the capture stood in by eager re-runs, one capture serves every
step, batch and later call while reading the pipeline's own input tensors (only the timestep is
copied). The step loop's CUDA-side parts without host syncs (deferred finiteness check, staged
noise) are run on CPU where they can be; on CUDA, real graphs vs eager pipelines.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from support.threads import one_torch_thread
from support.weights import TINY_LIDM, TINY_LVDM

from echofast.errors import BackendUnavailable, NonFiniteError
from echofast.models import LIDM, LVDM
from echofast.pipelines import LIDMPipeline, LVDMPipeline, common, graphs
from echofast.pipelines.graphs import CUDAGraphUNet, not_supported_reasons, signature
from echofast.rng import randn_tensor

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def cuda(test):
    """A GPU test: marked ``gpu`` (the GPU session runs those) and skipped without CUDA."""
    return pytest.mark.gpu(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    )


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
    monkeypatch.setattr(graphs, "_reasons", lambda *a, **k: [])
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
    monkeypatch.setattr(graphs, "_reasons", lambda *a, **k: [])
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


# ---- the pipelines' cuda_graphs option ----------------------------------------------------------

PIPE_STEPS = 3


def _lvdm_pipe_args(device="cpu"):
    cond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(7)).to(device)
    kw = dict(
        num_frames=12,
        seed=3,
        num_inference_steps=PIPE_STEPS,
        batch_size=1,
        output_type="latent",
        progress=False,
    )
    return cond, [35.0, 70.0], kw


def _lidm_pipe_kw(batch_size=2):
    return dict(seed=5, num_inference_steps=PIPE_STEPS, batch_size=batch_size, progress=False)


def _lidm(device="cpu", seed=0):
    torch.manual_seed(seed)
    return LIDM.from_config(TINY_LIDM).to(device).eval()


def test_pipelines_auto_equals_eager_on_cpu():
    lvdm_pipe = LVDMPipeline(_lvdm())
    cond, ef, kw = _lvdm_pipe_args()
    eager = lvdm_pipe(cond, ef, cuda_graphs=False, **kw).latents
    auto = lvdm_pipe(cond, ef, **kw).latents
    assert torch.equal(auto, eager)
    assert lvdm_pipe.graphs.captures == 0 and lvdm_pipe.graphs.last_reasons
    lidm_pipe = LIDMPipeline(_lidm())
    eager = lidm_pipe(3, cuda_graphs=False, **_lidm_pipe_kw()).latents
    auto = lidm_pipe(3, cuda_graphs=None, **_lidm_pipe_kw()).latents
    assert torch.equal(auto, eager)
    if not torch.cuda.is_available():
        for pipe in (lvdm_pipe, lidm_pipe):
            assert any("CUDA is not available" in r for r in pipe.graphs.last_reasons)


def test_pipelines_forced_graphs_fail_loudly():
    cond, ef, kw = _lvdm_pipe_args()
    pipes = [
        lambda g: LVDMPipeline(_lvdm())(cond, ef, cuda_graphs=g, **kw),
        lambda g: LIDMPipeline(_lidm())(2, cuda_graphs=g, **_lidm_pipe_kw()),
    ]
    for run in pipes:
        with pytest.raises(BackendUnavailable) as info:
            run(True)
        assert "not on a CUDA device" in str(info.value)
        if not torch.cuda.is_available():
            assert "CUDA is not available" in str(info.value)
        with pytest.raises(ValueError, match="cuda_graphs must be"):
            run("on")


@pytest.fixture
def counted_copies(monkeypatch):
    """Shapes of the static inputs that a call had to copy into (borrowed ones are not)."""
    copies = []
    real = graphs._copy_into

    def spy(static, value):
        if value.data_ptr() != static.data_ptr():
            copies.append(tuple(static.shape))
        real(static, value)

    monkeypatch.setattr(graphs, "_copy_into", spy)
    return copies


@torch.no_grad()
def test_lvdm_pipeline_replays_its_own_inputs(eager_capture, counted_copies):
    """Graph plumbing on CPU (capture stood in by eager re-runs): one capture serves every step
    of both batches and of the next call, and only the timestep is ever copied."""
    pipe = LVDMPipeline(_lvdm())
    cond, ef, kw = _lvdm_pipe_args()
    eager = pipe(cond, ef, cuda_graphs=False, **kw).latents
    graphed = pipe(cond, ef, cuda_graphs=True, **kw).latents
    assert torch.equal(graphed, eager)
    assert pipe.graphs.captures == 1 and pipe.graphs.replays == 2 * PIPE_STEPS
    again = pipe(cond, ef, **kw).latents
    assert torch.equal(again, eager)
    assert pipe.graphs.captures == 1 and pipe.graphs.replays == 4 * PIPE_STEPS
    assert counted_copies and set(counted_copies) == {()}  # 0-d timesteps only
    pipe.release_graphs()
    assert pipe.graphs.num_graphs == 0


@torch.no_grad()
def test_lidm_pipeline_replays_its_own_inputs(eager_capture, counted_copies):
    pipe = LIDMPipeline(_lidm())
    eager = pipe(4, cuda_graphs=False, **_lidm_pipe_kw()).latents
    graphed = pipe(4, cuda_graphs=True, **_lidm_pipe_kw()).latents
    assert torch.equal(graphed, eager)
    assert pipe.graphs.captures == 1 and pipe.graphs.replays == 2 * PIPE_STEPS
    assert set(counted_copies) == {()}


# ---- no per-step host sync: deferred finiteness check, staged noise -----------------------------


@pytest.fixture
def deferred_on_cpu(monkeypatch):
    """Run the CUDA-style deferred finiteness check on CPU."""
    monkeypatch.setattr(common, "DEFERRED_CHECK_DEVICES", frozenset({"cpu", "cuda"}))


def _poison(module, monkeypatch, item, from_call):
    real, calls = module.forward, []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) > from_call:
            out.sample[item].fill_(float("nan"))
        return out

    monkeypatch.setattr(module, "forward", poisoned)


@pytest.mark.parametrize("deferred", [False, True])
def test_non_finite_named_with_sample_and_step(monkeypatch, request, deferred):
    """The same error whether checked at every step or recorded on the device and checked once:
    the sample (global index) and the first step at which it went non-finite."""
    if deferred:
        request.getfixturevalue("deferred_on_cpu")
    lidm = _lidm()
    _poison(lidm, monkeypatch, item=1, from_call=1)
    with pytest.raises(NonFiniteError, match="LIDM latent of sample 8 is not finite at step 1$"):
        LIDMPipeline(lidm)(2, seed=0, sample_indices=[7, 8], num_inference_steps=3, progress=False)
    lvdm = _lvdm()
    _poison(lvdm, monkeypatch, item=2, from_call=0)  # window 0 of the second video
    cond, ef, kw = _lvdm_pipe_args()
    with pytest.raises(NonFiniteError, match="LVDM latent of sample 5 is not finite at step 0$"):
        LVDMPipeline(lvdm)(cond, ef, **{**kw, "batch_size": 2, "sample_indices": [4, 5]})


def test_non_finite_in_a_later_batch_names_its_own_sample(monkeypatch):
    """Batches of one: the third image's first step goes non-finite. It is named by its global
    index (given, or its position when none is given), not by the first of the whole call."""
    kw = dict(seed=0, num_inference_steps=1, batch_size=1, progress=False)
    for indices, named in ((None, 2), ([7, 9, 40], 40)):
        lidm = _lidm()
        _poison(lidm, monkeypatch, item=0, from_call=2)
        with pytest.raises(
            NonFiniteError, match=f"latent of sample {named} is not finite at step 0$"
        ):
            LIDMPipeline(lidm)(3, sample_indices=indices, **kw)


@pytest.mark.parametrize("steps", [None, 3, 2], ids=["no_table", "table", "past_the_table"])
def test_finite_watch_reports_the_earliest_step(deferred_on_cpu, steps):
    """Recorded in a (steps, batch) table (two kernels per step), or per sample's first bad step
    beyond it / without one: the same error either way."""
    watch = common.FiniteWatch("x", [10, 11, 12], torch.device("cpu"), steps)
    assert watch.deferred
    x = torch.zeros(3, 2)
    watch.update(x, 0)
    x[2, 1] = float("inf")
    watch.update(x, 1)
    x[0, 0] = float("nan")
    watch.update(x, 2)
    with pytest.raises(NonFiniteError, match="x of sample 12 is not finite at step 1"):
        watch.check()
    clean = common.FiniteWatch("x", [0], torch.device("cpu"))
    clean.update(torch.zeros(1, 3), 0)
    clean.check()


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
def test_the_first_of_several_non_finite_samples_is_named(monkeypatch, deferred):
    """Two samples going non-finite at the same step: the error names the first of them in the
    batch, whether checked at once or recorded and checked after the loop."""
    if deferred:
        monkeypatch.setattr(common, "DEFERRED_CHECK_DEVICES", frozenset({"cpu", "cuda"}))
    watch = common.FiniteWatch("x", [10, 11, 12, 13], torch.device("cpu"))
    assert watch.deferred == deferred
    x = torch.zeros(4, 3)
    watch.update(x, 0)
    x[1, 0], x[3, 2] = float("nan"), float("inf")
    with pytest.raises(NonFiniteError, match="x of sample 11 is not finite at step 1$"):
        watch.update(x, 1)
        watch.check()


def test_staged_noise_draws_the_seed_contract_numbers():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    same = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    for shape in ((3, 5, 4, 6, 6), (3, 1, 4, 6, 6), (3, 7)):
        staged = common.draw_noise(gens, torch.empty(shape))
        assert torch.equal(staged, randn_tensor(shape, generator=same, dtype=torch.float32))


@cuda
def test_cuda_noise_source_and_deferred_watch():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    same = [torch.Generator().manual_seed(s) for s in (1, 2)]
    source = common.NoiseSource(gens, (2, 3, 4, 6, 6), torch.device("cuda"))
    assert source.staged
    for _ in range(5):  # more draws than ring slots
        got = source()
        want = randn_tensor((2, 3, 4, 6, 6), generator=same, dtype=torch.float32)
        assert got.is_cuda and torch.equal(got.cpu(), want)
    watch = common.FiniteWatch("v", [3, 4], torch.device("cuda"))
    assert watch.deferred
    x = torch.zeros(2, 5, device="cuda")
    watch.update(x, 0)
    x[1, 2] = float("nan")
    watch.update(x, 1)
    with pytest.raises(NonFiniteError, match="v of sample 4 is not finite at step 1"):
        watch.check()


# ---- CUDA: the pipelines with real graphs ------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_lvdm_pipeline_graphs_match_eager(dtype):
    pipe = LVDMPipeline(_lvdm("cuda"))
    cond, ef, kw = _lvdm_pipe_args("cuda")
    kw["dtype"] = dtype
    eager = pipe(cond, ef, cuda_graphs=False, **kw).latents
    graphed = pipe(cond, ef, cuda_graphs=True, **kw).latents
    assert torch.isfinite(graphed).all()
    assert _rel(graphed, eager) <= (1e-5 if dtype == torch.float32 else 1e-3)
    assert pipe.graphs.captures == 1 and pipe.graphs.replays == 2 * PIPE_STEPS
    assert pipe.graphs.last_reasons == []
    pipe(cond, ef, cuda_graphs=True, **kw)  # the next call replays the same graph
    assert pipe.graphs.captures == 1 and pipe.graphs.replays == 4 * PIPE_STEPS


@cuda
@pytest.mark.parametrize("batch_size", [1, 3])
def test_cuda_lidm_pipeline_graphs_match_eager(batch_size):
    pipe = LIDMPipeline(_lidm("cuda"))
    kw = _lidm_pipe_kw(batch_size)
    eager = pipe(3, cuda_graphs=False, **kw).latents
    graphed = pipe(3, cuda_graphs=True, **kw).latents
    assert _rel(graphed, eager) <= 1e-5
    assert pipe.graphs.captures == 1 and pipe.graphs.replays == 3 // batch_size * PIPE_STEPS


# ---- what is decided on the host: reasons, signatures, bookkeeping ----------------------------


class _Toy(torch.nn.Module):
    """``sample * w + timestep``, then ``* scale`` and ``+ shift``: every input reaches the output.
    Records the dtype and shape of each timestep it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 2.0, 3))
        self.timesteps = []

    def forward(self, sample, timestep, scale=None, *, shift=None):
        t = torch.as_tensor(timestep)
        self.timesteps.append((t.dtype, tuple(t.shape)))
        out = sample * self.w + t.double().sum().float()
        if scale is not None:
            out = out * scale
        if shift is not None:
            out = out + shift
        return SimpleNamespace(sample=out)


def _toy_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, generator=g), torch.randn(2, 1, generator=g) + 2


@torch.no_grad()
def test_reasons_name_every_argument_a_graph_cannot_take():
    model = _lvdm()
    x, kw = _lvdm_inputs()

    def reasons(*args, **kwargs):
        return "\n".join(not_supported_reasons(model, *args, **kwargs))

    assert "sample is a list, not a tensor" in reasons(x.tolist(), 5, **kw)
    assert "timestep is a bool" in reasons(x, True, **kw)
    assert "timestep has shape (2, 1); expected 0-d or 1-d" in reasons(x, torch.ones(2, 1), **kw)
    assert "timestep" not in reasons(x, torch.ones(2, dtype=torch.int64), **kw)
    assert "argument flags is a dict holding tensors" in reasons(x, 5, flags={"ef": x}, **kw)
    assert "argument arg0 is a tuple holding tensors" in reasons(x, 5, ((x,),), **kw)
    assert "argument arg1 is a list holding tensors" in reasons(x, 5, 1, [[0, x]], **kw)
    assert "argument extra (dict) is not hashable" in reasons(x, 5, extra={"a": 1}, **kw)
    assert "argument arg0 (list) is not hashable" in reasons(x, 5, [1, 2], **kw)
    assert "argument" not in reasons(x, 5, 1, None, mode="a", pair=(1, 2), **kw)


@pytest.mark.parametrize(
    ("value", "disabled"),
    [("0", True), ("OFF", True), (" No ", True), ("False", True), ("1", False), ("", False)],
)
def test_environment_switch_reads_common_spellings(monkeypatch, value, disabled):
    monkeypatch.setenv(graphs.ENV_VAR, value)
    with torch.no_grad():
        reasons = not_supported_reasons(_Toy().eval(), torch.zeros(2, 3), 5)
    assert any(f"disabled by {graphs.ENV_VAR}={value!r}" in r for r in reasons) == disabled


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA reported available and not capturing, and a factory of fake tensors on CUDA devices
    (shapes and devices only, no memory), so the device checks run without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.delenv(graphs.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    mode = FakeTensorMode()

    def make(*shape, device="cuda:0", param=False):
        with mode:
            t = torch.empty(shape, device=device)
            return torch.nn.Parameter(t) if param else t

    try:
        make(1)
    except RuntimeError as err:  # torch 2.5's CUDA builds initialise CUDA for a fake CUDA tensor
        pytest.skip(f"torch {torch.__version__} cannot make fake CUDA tensors here: {err}")
    return make


def _module_on(make, *devices):
    module = torch.nn.Module()
    for i, device in enumerate(devices):
        module.register_parameter(f"p{i}", make(3, device=device, param=True))
    return module.eval()


@torch.no_grad()
def test_one_cuda_device_is_supported_and_mixed_devices_are_named(fake_cuda, monkeypatch):
    module = _module_on(fake_cuda, "cuda:0")
    x, ef = fake_cuda(2, 3), fake_cuda(2, 1, 1)
    assert not_supported_reasons(module, x, 5, encoder_hidden_states=ef) == []
    assert not_supported_reasons(module, x, torch.tensor(5), ef) == []  # CPU timestep: copied
    other = fake_cuda(2, 1, 1, device="cuda:1")
    assert not_supported_reasons(module, x, 5, encoder_hidden_states=other) == [
        "tensors on several devices ['cuda:0', 'cuda:1']"
    ]
    on_meta = "\n".join(not_supported_reasons(module, x, 5, torch.zeros(1, device="meta")))
    assert "tensors or parameters on ['meta'], not on a CUDA device" in on_meta
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not_supported_reasons(module, x, 5) == [
        "the current stream is already capturing a graph"
    ]


def test_signature_tells_apart_what_a_graph_depends_on():
    x = torch.zeros(2, 3)
    base = signature(x, torch.tensor(5))
    assert signature(x, torch.tensor(5, dtype=torch.int32)) != base  # timestep dtype
    assert signature(x, torch.tensor(5).reshape(1)) != base  # timestep shape
    assert signature(x.to("meta"), torch.tensor(5)) != base  # device
    # argument values of equal hash but other types: a module may branch on the type
    assert len({signature(x, 5, flag=v) for v in (1, True, 1.0)}) == 3
    assert signature(x, 5, flag=2) != signature(x, 5, flag=1)
    try:  # the CUDA autocast state (settable without a GPU)
        torch.set_autocast_enabled("cuda", True)
        for dtype in (torch.float16, torch.bfloat16):
            torch.set_autocast_dtype("cuda", dtype)
            assert signature(x, torch.tensor(5))[-1] == ("cuda", dtype)
    finally:
        torch.set_autocast_enabled("cuda", False)
        torch.set_autocast_dtype("cuda", torch.float16)
    assert signature(x, torch.tensor(5)) == base


def test_capture_reenters_autocast_without_the_cast_cache(monkeypatch):
    made = []

    def autocast(device_type, **kwargs):
        made.append((device_type, kwargs))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", autocast)
    assert isinstance(graphs._capture_autocast(), contextlib.nullcontext) and made == []
    try:
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        graphs._capture_autocast()
    finally:
        torch.set_autocast_enabled("cuda", False)
        torch.set_autocast_dtype("cuda", torch.float16)
    assert made == [("cuda", {"dtype": torch.bfloat16, "cache_enabled": False})]


class _FakeStreams:
    """Stands in for torch.cuda's streams and graphs: records, in order, which stream each event
    happens on (``current`` is the caller's, ``side`` the one ``torch.cuda.Stream`` makes)."""

    def __init__(self, monkeypatch):
        self.log, self.active = [], "current"
        fake = self

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                fake.log.append(f"{self.name} waits for {other.name}")

        streams = {"current": Stream("current"), "side": Stream("side")}

        @contextlib.contextmanager
        def on(stream):
            before, self.active = self.active, stream.name
            yield
            self.active = before

        @contextlib.contextmanager
        def capture(graph):
            self.active = "capture"  # like torch.cuda.graph, not restored on an exception
            yield
            self.active = "current"

        class Graph:
            def replay(self):
                fake.log.append("replay")

        monkeypatch.setattr(torch.cuda, "current_stream", lambda device: streams[self.active])
        monkeypatch.setattr(torch.cuda, "Stream", lambda device: streams["side"])
        monkeypatch.setattr(torch.cuda, "stream", on)
        monkeypatch.setattr(torch.cuda, "graph", capture)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "set_stream", lambda s: setattr(self, "active", s.name))

    def call(self, fail_in=None):
        def fn():
            self.log.append(f"call on {self.active}")
            if self.active == fail_in:
                raise RuntimeError("operation not permitted when stream is capturing")
            return "output"

        return fn


def test_capture_warms_up_on_a_side_stream_then_records_one_call(monkeypatch):
    streams = _FakeStreams(monkeypatch)
    replay, output = graphs.cuda_graph_capture(streams.call(), torch.device("cuda"), warmup=3)
    assert output == "output" and streams.active == "current"
    assert streams.log == [
        "side waits for current",
        *["call on side"] * 3,
        "current waits for side",
        "call on capture",
    ]
    replay()
    assert streams.log[-1] == "replay"


def test_a_failed_capture_gives_the_caller_its_stream_back(monkeypatch):
    streams = _FakeStreams(monkeypatch)
    with pytest.raises(RuntimeError, match="capturing"):
        graphs.cuda_graph_capture(streams.call(fail_in="capture"), torch.device("cuda"), 1)
    assert streams.active == "current"


def test_max_graphs_must_be_positive():
    with pytest.raises(ValueError, match="max_graphs must be >= 1, got 0"):
        CUDAGraphUNet(_Toy(), max_graphs=0)


@torch.no_grad()
def test_beyond_max_graphs_the_first_captured_is_dropped(eager_capture):
    model = _Toy()
    wrapped = CUDAGraphUNet(model, max_graphs=2)
    a, b, c = (torch.zeros(n, 3) for n in (1, 2, 3))
    for x in (a, b, c):
        wrapped(x, 5)
    assert wrapped.captures == 3 and wrapped.num_graphs == 2
    wrapped(b, 6)  # kept
    wrapped(c, 6)  # kept
    assert wrapped.captures == 3
    assert torch.equal(wrapped(a, 7).sample, model(a, 7).sample)  # dropped: captured again
    assert wrapped.captures == 4 and wrapped.replays == 6


@torch.no_grad()
def test_a_failed_capture_is_tried_once_per_signature_until_reset(monkeypatch):
    tries, synced = [], []

    def broken(fn, device, warmup):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "cuda_graph_capture", broken)
    monkeypatch.setattr(graphs, "_reasons", lambda *a, **k: [])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: synced.append(device))
    model = _Toy()
    wrapped = CUDAGraphUNet(model)
    x = torch.randn(2, 3)
    for t in (900, 15, 3):
        assert torch.equal(wrapped(x, t).sample, model(x, t).sample)
        assert wrapped.last_reasons[0].startswith("capture failed (RuntimeError: operation not")
    assert len(tries) == 1 and synced == [x.device]  # the failed stream work waited for once
    wrapped(torch.randn(1, 3), 3)  # another signature: tried
    assert len(tries) == 2
    wrapped.reset()
    wrapped(x, 3)
    assert len(tries) == 3 and wrapped.captures == 0 and wrapped.replays == 0


@torch.no_grad()
def test_last_reasons_are_cleared_when_a_call_replays(eager_capture):
    wrapped = CUDAGraphUNet(_Toy(), enabled=False)
    x = torch.randn(2, 3)
    wrapped(x, 5)
    assert wrapped.last_reasons == ["CUDA graphs are disabled for this wrapper (enabled=False)"]
    wrapped.enabled = None
    wrapped(x, 5)
    assert wrapped.last_reasons == [] and wrapped.captures == 1


@torch.no_grad()
def test_callers_tensors_are_only_read_unless_borrowed(eager_capture):
    """Without ``borrow_inputs`` the wrapper copies into buffers of its own; a tensor timestep is
    copied in either mode. A Python int timestep reaches the module as an int64 0-d tensor."""
    for borrow in (False, True):
        model = _Toy()
        wrapped = CUDAGraphUNet(model, borrow_inputs=borrow)
        x1, s1 = _toy_inputs(1)
        t1, shift1 = torch.tensor(900), s1 + 1
        kept = x1.clone(), s1.clone(), shift1.clone()
        wrapped(x1, t1, s1, shift=shift1)
        x2, s2 = _toy_inputs(2)
        got = wrapped(x2, torch.tensor(15), s2, shift=s2 * 2).sample
        assert torch.equal(got, model(x2, 15, s2, shift=s2 * 2).sample)
        assert t1.item() == 900
        if not borrow:
            assert all(torch.equal(a, b) for a, b in zip((x1, s1, shift1), kept))
    model = _Toy()
    wrapped = CUDAGraphUNet(model)
    for t in (945, 30):
        x, s = _toy_inputs(t)
        assert torch.equal(wrapped(x, t, s).sample, model(x, t, s).sample)
    assert wrapped.captures == 1 and wrapped.replays == 2
    assert set(model.timesteps[:-2]) == {(torch.int64, ())}  # the wrapper's calls


@torch.no_grad()
def test_reset_forgets_the_parameters_it_watched(eager_capture):
    """After ``reset`` (parameter objects replaced) the new parameters are the ones watched: a
    later move of one to new storage is a re-capture."""
    model = _Toy()
    wrapped = CUDAGraphUNet(model)
    x = torch.randn(2, 3)
    wrapped(x, 5)
    model.w = torch.nn.Parameter(torch.randn(3))
    wrapped.reset()
    wrapped(x, 5)
    assert wrapped.captures == 2
    model.w.data = torch.randn(3)
    assert torch.equal(wrapped(x, 5).sample, model(x, 5).sample)
    assert wrapped.captures == 3


# ---- contract points the current source does not meet ------------------------------------------


@torch.no_grad()
def test_every_parameter_must_be_on_the_one_cuda_device(fake_cuda):
    """The docstring: "every tensor argument and every parameter on one CUDA device". A module
    whose later parameters are on another GPU is named, not captured."""
    module = _module_on(fake_cuda, "cuda:0", "cuda:1")
    x = fake_cuda(2, 3)
    assert not_supported_reasons(module, x, 5) == [
        "tensors on several devices ['cuda:0', 'cuda:1']"
    ]


@torch.no_grad()
def test_borrowed_inputs_passed_twice_replay_like_the_plain_call(eager_capture):
    """A capturing call that passes one tensor as two arguments: a later call with two different
    tensors must still give the plain call's result (the two static inputs must not alias)."""
    model = _Toy()
    wrapped = CUDAGraphUNet(model, borrow_inputs=True)
    x1, s1 = _toy_inputs(1)
    wrapped(x1, 900, s1, shift=s1)
    x2, s2 = _toy_inputs(2)
    got = wrapped(x2, 15, s2, shift=s2 * 2).sample
    assert torch.equal(got, model(x2, 15, s2, shift=s2 * 2).sample)


@torch.no_grad()
def test_the_wrapper_checks_every_parameter_and_buffer():
    module = torch.nn.Module().eval()
    module.p0 = torch.nn.Parameter(torch.ones(3))
    module.register_buffer("b0", torch.ones(3, device="meta"))
    wrapped = CUDAGraphUNet(module)
    reasons = wrapped.reasons(torch.ones(2, 3), 5)
    assert "tensors or parameters on ['cpu', 'meta'], not on a CUDA device" in reasons
