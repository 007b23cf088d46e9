"""Backend selection: automatic fallback is quiet, forcing is loud and lists every reason."""

from __future__ import annotations

import pytest
import torch

from echofast.errors import BackendUnavailable
from echofast.ops import ENV_VAR, Backend, Op, _dispatch, registered_ops, use_backend


def _fake_op(monkeypatch: pytest.MonkeyPatch | None = None) -> Op:
    """A two-backend op, "fast" (CUDA float16 only) and "torch"; registered for the test's
    duration when given ``monkeypatch`` (so that a spec may name "fast" for every op)."""

    def fast(x):
        return x + 1

    def fast_reasons(x):
        reasons = []
        if x.device.type != "cuda":
            reasons.append(f"needs a CUDA tensor, got device {x.device}")
        if x.dtype != torch.float16:
            reasons.append(f"needs float16, got {x.dtype}")
        return reasons

    op = Op(
        "fake",
        [Backend("fast", fast, fast_reasons), Backend("torch", lambda x: x, lambda x: [])],
        lambda device: ((torch.empty(1, device=device),), {}),
        register=False,
    )
    if monkeypatch is not None:
        monkeypatch.setitem(_dispatch._OPS, "fake", op)
    return op


def test_auto_falls_back_quietly():
    op = _fake_op()
    x = torch.zeros(2)
    assert op.select(x).name == "torch"
    assert torch.equal(op(x), x)
    assert op.reference.name == "torch"


def test_forced_backend_lists_every_reason():
    op = _fake_op()
    with pytest.raises(BackendUnavailable) as err:
        op(torch.zeros(2), backend="fast")
    msg = str(err.value)
    assert "needs a CUDA tensor, got device cpu" in msg
    assert "needs float16, got torch.float32" in msg
    assert "backend= argument" in msg
    assert err.value.reasons[:2] == [
        "needs a CUDA tensor, got device cpu",
        "needs float16, got torch.float32",
    ]


def test_unknown_backend_named():
    with pytest.raises(BackendUnavailable, match="no such backend.*known: \\['fast', 'torch'\\]"):
        _fake_op()(torch.zeros(1), backend="nope")


def test_context_manager_forces_and_nests(monkeypatch):
    op = _fake_op(monkeypatch)
    x = torch.zeros(1)
    with use_backend("fast"):
        with pytest.raises(BackendUnavailable, match="use_backend"):
            op(x)
        with use_backend("torch"):
            assert op.select(x).name == "torch"
    assert op.select(x).name == "torch"


def test_per_op_context_and_unknown_op():
    x = torch.randn(1, 2, 3, 4)
    with use_backend(attention="torch"):
        assert registered_ops()["attention"].select(x, x, x).name == "torch"
    assert registered_ops()["attention"].select(x, x, x).name == "sdpa"
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        with use_backend(nope="torch"):
            pass


def test_env_var(monkeypatch):
    op = _fake_op(monkeypatch)
    x = torch.zeros(1)
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(BackendUnavailable, match=ENV_VAR):
        op(x)
    monkeypatch.setenv(ENV_VAR, "attention=torch")
    assert op.select(x).name == "torch"
    q = torch.randn(1, 1, 3, 8)
    assert registered_ops()["attention"].select(q, q, q).name == "torch"
    monkeypatch.setenv(ENV_VAR, "sdpa")
    assert registered_ops()["group_norm"].select(q, 1).name == "torch"
    monkeypatch.setenv(ENV_VAR, "bogus=torch")
    with pytest.raises(ValueError, match="unknown op 'bogus'"):
        op(x)


def test_argument_beats_context():
    x = torch.randn(1, 1, 3, 8)
    with use_backend(attention="torch"):
        out = registered_ops()["attention"](x, x, x, backend="sdpa")
    assert out.shape == x.shape


def test_report_for_info():
    report = registered_ops()["attention"].report("cpu")
    assert list(report) == ["triton", "xformers", "sdpa", "torch"]
    assert report["sdpa"] == [] and report["torch"] == []
    assert any("not CUDA" in r for r in report["triton"])
    assert any("xformers needs CUDA" in r for r in report["xformers"])


@pytest.mark.parametrize("name", sorted(registered_ops()))
@pytest.mark.parametrize("interpret", [False, True])
def test_dispatch_keeps_no_reference_to_its_inputs(name, interpret, monkeypatch):
    """Every backend's support check, and the op call, let their inputs be freed: a check cached
    on the tensors themselves kept every GroupNorm input alive (15 GiB after one VAE decode on an
    H200). Checked with and without TRITON_INTERPRET, whose value is part of the checks."""
    import gc
    import weakref

    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    op = registered_ops()[name]
    args, kwargs = op._example("cpu")
    args = tuple(
        a.normal_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )
    refs = [weakref.ref(t) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    assert refs
    for backend in op.backends.values():
        backend.not_supported_reasons(*args, **kwargs)
    if not interpret:  # (the interpreter would run the example's full-size kernels: slow)
        op(*args, **kwargs)
    del args, kwargs
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{name}: {len(alive)} input tensors still referenced after dispatch"


def test_triton_backends_say_when_triton_is_missing(monkeypatch):
    """The installation check is looked up once (not on every dispatch: it reads the file
    system); a missing Triton is the first reason every Triton backend gives."""
    from echofast.ops import _triton

    assert _triton.triton_installed.cache_info().currsize <= 1
    monkeypatch.setattr(_triton, "triton_installed", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name, op in registered_ops().items():
        if "triton" not in op.backends:
            continue
        args, kwargs = op._example("cpu")
        reasons = op.backends["triton"].not_supported_reasons(*args, **kwargs)
        assert reasons[0] == "triton is not installed", (name, reasons)


@pytest.mark.parametrize("version", ["3.0.0", "3.5.1", "2.3.1"])
def test_a_triton_older_than_the_checked_one_is_refused(version, monkeypatch):
    """Triton releases older than the kernels were checked with (the ones torch <= 2.10 pins):
    every Triton backend gives the version as its reason, automatic dispatch falls back quietly,
    and a forced Triton backend fails loudly with the version."""
    import importlib.metadata

    from echofast.ops import _triton

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda d: version if d == "triton" else real(d)
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU's cheap checks pass: only the version
    _triton.triton_too_old.cache_clear()
    try:
        want = f"triton {version} is older than 3.6, the oldest release these kernels are checked"
        for name, op in registered_ops().items():
            if "triton" not in op.backends:
                continue
            args, kwargs = op._example("cpu")
            reasons = op.backends["triton"].not_supported_reasons(*args, **kwargs)
            assert len(reasons) == 1 and reasons[0].startswith(want), (name, reasons)
            assert op.select(*args, **kwargs).name != "triton", name
        y = torch.randn(2, 5, 3, 3).contiguous(memory_format=torch.channels_last)
        add = registered_ops()["bias_residual"]
        with pytest.raises(BackendUnavailable, match=rf"triton {version} is older than 3\.6"):
            add(y, residual=y.clone(), backend="triton")
    finally:
        _triton.triton_too_old.cache_clear()


@pytest.mark.parametrize(("version", "old"), [("3.6.0", False), ("3.10.2", False), ("3.5.9", True)])
def test_triton_version_comparison_is_numeric(version, old, monkeypatch):
    import importlib.metadata

    from echofast.ops import _triton

    monkeypatch.setattr(importlib.metadata, "version", lambda d: version)
    _triton.triton_too_old.cache_clear()
    try:
        assert (_triton.triton_too_old() is not None) == old
    finally:
        _triton.triton_too_old.cache_clear()


@pytest.mark.parametrize("spec", ["trition", "group_norm=torch, torhc"])
def test_a_name_no_op_has_is_refused_naming_where_it_came_from(spec, monkeypatch):
    """A misspelt backend for every op would otherwise force nothing, silently."""
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"use_backend: no op has a backend named 't.*'triton'"):
        with use_backend(spec):
            pass
    monkeypatch.setenv(ENV_VAR, spec)
    with pytest.raises(ValueError, match=rf"{ENV_VAR}: no op has a backend named"):
        registered_ops()["group_norm"](x, 2)
    with pytest.raises(ValueError, match=r"use_backend: unknown op 'bogus'"):
        with use_backend("bogus=torch"):
            pass


@pytest.mark.parametrize("spec", [" torch ", "torch,", ",torch, ", "sdpa, torch"])
def test_spaces_and_empty_entries_in_a_spec_are_ignored(spec, monkeypatch):
    """The last name for every op wins; blanks around names and empty entries do not count."""
    q = torch.randn(1, 1, 3, 8)
    attention = registered_ops()["attention"]
    for force in (use_backend(spec), monkeypatch.context()):
        with force as m:
            if m is not None:
                m.setenv(ENV_VAR, spec)
            assert attention.select(q, q, q).name == "torch"


def test_a_name_for_every_op_passes_over_ops_without_it(monkeypatch):
    """The name "sdpa" forces attention only: GroupNorm (which has no such backend) chooses as
    usual."""
    x = torch.randn(1, 4, 3, 3)
    group_norm = registered_ops()["group_norm"]
    auto = group_norm.select(x, 2).name
    with use_backend("sdpa"):
        assert group_norm.select(x, 2).name == auto
        assert group_norm(x, 2).shape == x.shape


def test_nested_contexts_combine_and_the_environment_fills_in(monkeypatch):
    """An inner use_backend() for one op keeps the outer one's choice for another, and an op
    neither names is still forced by ECHOFAST_BACKEND."""
    op = _fake_op(monkeypatch)
    x = torch.zeros(1)
    q = torch.randn(1, 1, 3, 8)
    attention = registered_ops()["attention"]
    monkeypatch.setenv(ENV_VAR, "fake=fast")
    with use_backend(attention="torch"):
        with use_backend(group_norm="torch"):
            assert attention.select(q, q, q).name == "torch"
            with pytest.raises(BackendUnavailable, match=rf"requested by {ENV_VAR}='fake=fast'"):
                op.select(x)


def test_while_compiling_only_untraceable_backends_step_aside(monkeypatch):
    """Inside torch.compile a backend with its own kernels says why it cannot run, a traceable
    one can, and use_backend() (a ContextVar, which compile cannot trace) is not consulted."""
    op = _fake_op(monkeypatch)
    x = torch.zeros(1)
    own = Backend("own", lambda x: x, lambda x: [], traceable=False)
    traced = Backend("traced", lambda x: x, lambda x: [])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert traced.not_supported_reasons(x) == []
    assert "inside torch.compile" in own.not_supported_reasons(x)[0]
    with use_backend(fake="fast"):
        assert op.select(x).name == "torch"


def test_an_op_needs_a_backend_and_registers_only_when_asked():
    with pytest.raises(ValueError, match="op 'empty' needs at least one backend"):
        Op("empty", [], lambda device: ((), {}))
    _fake_op()
    assert "fake" not in registered_ops()
    registered_ops()["fake"] = _fake_op()
    assert "fake" not in registered_ops()


@pytest.mark.parametrize("value", ["1", "TRUE", "on", "Y", "yes", "0", " 1 ", "ON ", "", "2"])
def test_the_interpreter_flag_is_read_as_triton_reads_it(value, monkeypatch):
    """Where echofast and Triton disagreed (" 1 ": echofast said interpreted, Triton compiled
    for the GPU), dispatch chose the kernels for CPU tensors that Triton would not interpret."""
    from echofast.ops import _triton

    triton = pytest.importorskip("triton")
    if not hasattr(triton, "knobs"):
        pytest.skip(f"triton {triton.__version__} has no triton.knobs to read the flag with")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _triton.interpret() is triton.knobs.runtime.interpret


def test_a_triton_without_package_metadata_is_left_to_its_import(monkeypatch):
    """A source build of Triton has no metadata: the version check gives way to the import."""
    import importlib.metadata

    from echofast.ops import _triton

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    _triton.triton_too_old.cache_clear()
    try:
        assert _triton.triton_too_old() is None
    finally:
        _triton.triton_too_old.cache_clear()


def test_kernels_compiled_for_the_gpu_run_on_cuda_tensors_only(monkeypatch):
    """A kernel module imported without TRITON_INTERPRET can run CUDA tensors and says why it
    cannot run CPU ones; one imported under the interpreter runs CPU tensors. (Which form this
    process imported depends on the tests before: the probe is replaced by each form.)"""
    pytest.importorskip("triton")
    import importlib

    from echofast.ops import _triton

    if _triton.triton_too_old():
        pytest.skip(_triton.triton_too_old())
    kernels = importlib.import_module("echofast.kernels.layer_norm")
    interpreted = type("InterpretedFunction", (), {})
    cpu_reason = (
        "echofast.kernels.layer_norm was imported without TRITON_INTERPRET=1, so its kernels "
        "cannot run on CPU"
    )
    for probe, on_cpu in ((object(), [cpu_reason]), (interpreted(), [])):
        monkeypatch.setattr(kernels, "_layer_norm_fwd_kernel", probe)
        assert _triton.kernel_reasons([], "layer_norm", "_layer_norm_fwd_kernel", True) == []
        assert _triton.kernel_reasons([], "layer_norm", "_layer_norm_fwd_kernel", False) == on_cpu
