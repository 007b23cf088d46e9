"""Backend selection: automatic fallback is quiet, forcing is loud and lists every reason."""

from __future__ import annotations

import pytest
import torch

from echofast.errors import BackendUnavailable
from echofast.ops import ENV_VAR, Backend, Op, registered_ops, use_backend


def _fake_op() -> Op:
    def fast(x):
        return x + 1

    def fast_reasons(x):
        reasons = []
        if x.device.type != "cuda":
            reasons.append(f"needs a CUDA tensor, got device {x.device}")
        if x.dtype != torch.float16:
            reasons.append(f"needs float16, got {x.dtype}")
        return reasons

    return Op(
        "fake",
        [Backend("fast", fast, fast_reasons), Backend("torch", lambda x: x, lambda x: [])],
        lambda device: ((torch.empty(1, device=device),), {}),
        register=False,
    )


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


def test_context_manager_forces_and_nests():
    op = _fake_op()
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
    op = _fake_op()
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
