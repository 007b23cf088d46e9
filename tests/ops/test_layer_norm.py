"""layer_norm reference and mixed backend vs an fp64 formula; dtypes, errors, dispatch.

The Triton backend is tested under the interpreter (tests/triton/test_layer_norm_triton.py) and
compiled on a GPU (tests/ops/test_layer_norm_cuda.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from support.oracles import layer_norm_oracle

from echofast.errors import BackendUnavailable
from echofast.ops import add_layer_norm, layer_norm, layer_norm_reference, registered_ops

_op = registered_ops()["layer_norm"]


def affine(c, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(c, generator=g) * 0.3 + 1).to(dtype)
    b = (torch.randn(c, generator=g) * 0.3).to(dtype)
    return w, b


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


SHAPES = [(3, 37), (2, 5, 320), (1, 1), (4, 1280), (2, 3, 4, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "mixed"])
def test_fp32_matches_the_fp64_formula(shape, backend):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * 3 + 1
    w, b = affine(shape[-1])
    y = layer_norm(x, w, b, 1e-5, backend=backend)
    assert y.dtype == torch.float32 and y.shape == x.shape
    ref = layer_norm_oracle(x, w, b)
    if shape[-1] == 1:  # one element per row: y = b exactly
        assert torch.equal(y, b.expand_as(y))
    else:
        assert rel(y, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "mixed"])
def test_half_input_with_fp32_affine_is_the_fp32_result_rounded(dtype, backend):
    """x's dtype out, within one rounding of the fp32 LayerNorm of x's values."""
    x = (torch.randn(64, 320, generator=torch.Generator().manual_seed(1)) * 3 + 1).to(dtype)
    w, b = affine(320, seed=2)
    y = layer_norm(x, w, b, backend=backend)
    assert y.dtype == dtype
    ref = layer_norm_oracle(x, w, b)
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1.0)).max() <= ulp


def test_no_weight_no_bias():
    x = torch.randn(5, 24)
    for backend in ("torch", "mixed"):
        torch.testing.assert_close(
            layer_norm(x, None, None, 1e-6, backend=backend),
            layer_norm_oracle(x, eps=1e-6).float(),
            rtol=1e-5,
            atol=1e-5,
        )


def test_reference_is_differentiable():
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    w, b = (t.double().requires_grad_() for t in affine(16))
    assert torch.autograd.gradcheck(lambda *a: layer_norm_reference(*a), (x, w, b))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.tensor(1.0),), "at least one dim"),
        ((torch.randn(3, 8), torch.ones(7)), r"weight must be \(8,\)"),
        ((torch.randn(3, 8), None, torch.ones(8, 1)), r"bias must be \(8,\)"),
        ((torch.randn(3, 8), torch.ones(8, device="meta")), "weight is on meta"),
    ],
)
def test_bad_arguments_raise_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        layer_norm(*args)


def test_automatic_dispatch_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8).bfloat16()
    w = torch.ones(8)
    assert _op.select(x, w, w).name == "mixed"  # CPU has the mixed-dtype kernel
    # fp32 input with a half weight: no mixed kernel for that, the reference runs
    assert _op.select(x.float(), w.half(), None).name == "torch"
    with pytest.raises(BackendUnavailable, match="not CUDA"):
        layer_norm(x, w, w, backend="triton")


def test_mixed_backend_without_the_kernel_reports_why(monkeypatch):
    m = sys.modules["echofast.ops.layer_norm"]  # the package's attribute is the function
    monkeypatch.setattr(m, "mixed_layer_norm_works", lambda device_type, dtype: False)
    x = torch.randn(2, 8).half()
    w = torch.ones(8)
    with pytest.raises(BackendUnavailable, match="takes no torch.float16 input with fp32 affine"):
        layer_norm(x, w, w, backend="mixed")
    y = layer_norm(x, w, w)  # automatic: the reference
    assert y.dtype == torch.float16 and torch.equal(y, layer_norm_reference(x, w, w))


def test_triton_backend_declares_it_is_forward_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 8, requires_grad=True)
    reasons = _op.backends["triton"].not_supported_reasons(x, None, None)
    assert any("forward only" in r for r in reasons), reasons
    with torch.no_grad():
        assert not any("forward only" in r for r in _op.backends["triton"].not_supported_reasons(x))
    too_wide = torch.empty(1, 16385)
    assert any("16385" in r for r in _op.backends["triton"].not_supported_reasons(too_wide))


# ---- add_layer_norm ------------------------------------------------------------------------------


def test_add_layer_norm_reference_adds_then_normalises_in_place():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 24, generator=g)
    branch = torch.randn(2, 6, 24, generator=g)
    rows = torch.randn(2, 24, generator=g)
    w, b = affine(24)
    want_h = branch + x + rows[:, None]
    storage = branch.data_ptr()
    with torch.no_grad():
        h, y = add_layer_norm(x, branch, rows, w, b)
    assert h.data_ptr() == storage  # written over the residual (a temporary)
    torch.testing.assert_close(h, want_h)
    assert rel(y, layer_norm_oracle(want_h, w, b)) <= 1e-5
    # without rows; under autograd nothing is overwritten
    x.requires_grad_()
    r = torch.randn(2, 6, 24, generator=g)
    h, y = add_layer_norm(x, r, None, w, b)
    assert h.data_ptr() != r.data_ptr() and h.grad_fn is not None
    torch.testing.assert_close(y, layer_norm_reference(r + x, w, b))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((3, 8), (3, 7), None), "residual must match x"),
        (((6, 8), (6, 8), (4, 8)), r"add must be \(M, 8\)"),
        (((6, 8), (6, 8), (3, 7)), r"add must be \(M, 8\)"),
        (((6, 8), (6, 8), None, (7,)), r"shift must be \(8,\)"),
    ],
)
def test_add_layer_norm_bad_arguments(shapes, message):
    x, r, a, *s = (None if s is None else torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        add_layer_norm(x, r, a, shift=s[0] if s else None)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_add_layer_norm_shift_goes_to_h_only(grad):
    """The norm reads h; the h returned is h + shift, rounded once to h's dtype."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 40, generator=g).bfloat16()
    r = torch.randn(3, 5, 40, generator=g).bfloat16()
    rows = torch.randn(3, 40, generator=g).bfloat16()
    shift = torch.randn(40, generator=g)  # fp32, as an fp32 Linear bias under autocast
    w, b = affine(40)
    plain_h, plain_y = add_layer_norm(x, r.clone(), rows, w, b)
    with torch.set_grad_enabled(grad):
        h, y = add_layer_norm(x, r.clone().requires_grad_(grad), rows, w, b, shift=shift)
    assert h.dtype == torch.bfloat16 and torch.equal(y, plain_y)
    assert torch.equal(h, (plain_h.float() + shift).bfloat16())


def test_add_layer_norm_half_residual_with_fp32_affine():
    x = torch.randn(4, 5, 64).bfloat16()
    r = torch.randn(4, 5, 64).bfloat16()
    w, b = affine(64)
    want = r + x
    h, y = add_layer_norm(x, r.clone(), None, w, b)
    assert h.dtype == y.dtype == torch.bfloat16
    assert torch.equal(h, want) and torch.equal(y, layer_norm(want, w, b))


@pytest.mark.parametrize("backend", ["torch", "mixed"])
def test_eps_reaches_the_norm(backend):
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(3))
    w, b = affine(24, seed=4)
    y = layer_norm(x, w, b, 0.5, backend=backend)
    assert rel(y, layer_norm_oracle(x, w, b, eps=0.5)) <= 1e-5
    h, y = add_layer_norm(x, torch.zeros_like(x), None, w, b, 0.5, backend="torch")
    assert rel(y, layer_norm_oracle(x, w, b, eps=0.5)) <= 1e-5


@pytest.mark.parametrize(
    ("residual", "message"),
    [
        (torch.zeros(3, 8, dtype=torch.bfloat16), "torch.bfloat16"),
        (torch.zeros(3, 8, device="meta"), "meta"),
    ],
    ids=["dtype", "device"],
)
def test_add_layer_norm_residual_must_match_x(residual, message):
    with pytest.raises(ValueError, match=f"residual must match x .*got .*{message}"):
        add_layer_norm(torch.randn(3, 8), residual)


@pytest.mark.parametrize(
    ("add", "add_group", "message"),
    [(torch.zeros(0, 8), None, r"add must be \(M, 8\)"), (torch.zeros(2, 8), 0, "add_group = 0")],
)
def test_add_layer_norm_empty_add_or_zero_group_is_a_value_error(add, add_group, message):
    with pytest.raises(ValueError, match=message):
        add_layer_norm(torch.randn(6, 8), torch.zeros(6, 8), add, add_group=add_group)


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no residual"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_add_layer_norm_add_group_adds_one_row_per_frame(with_residual, grad):
    """Frame-major (B, T, S, C) tokens, add (T, C), add_group = S: token (b, t, s) gets add[t]."""
    g = torch.Generator().manual_seed(12)
    x, r = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(2))
    add = torch.randn(3, 8, generator=g)
    want = x + add[:, None] + (r if with_residual else 0)
    residual = r.clone() if with_residual else None
    with torch.set_grad_enabled(grad):
        h, y = add_layer_norm(x, residual, add, add_group=5)
    torch.testing.assert_close(h, want)
    assert rel(y, layer_norm_oracle(want)) <= 1e-5


@torch.no_grad()
def test_add_layer_norm_without_residual_adds_in_xs_dtype_and_keeps_x():
    x = torch.randn(4, 6, 16).bfloat16()
    x0 = x.clone()
    add = torch.randn(4, 16) * 3.3  # fp32 rows
    h, _ = add_layer_norm(x, None, add)
    assert torch.equal(x, x0)  # h is a new tensor
    assert h.dtype == torch.bfloat16 and torch.equal(h, x + add.bfloat16()[:, None])


@torch.no_grad()
def test_add_layer_norm_in_place_over_a_strided_residual():
    """A residual whose row dims do not merge (a permuted view), row groups that straddle them:
    the adds still land on the right rows."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 8, generator=g)
    r = torch.randn(3, 2, 8, generator=g).transpose(0, 1)
    add = torch.randn(3, 8, generator=g)  # 6 rows, 3 groups of 2: rows (0, 0)-(0, 1), ...
    want = r + x + add.repeat_interleave(2, 0).view(2, 3, 8)
    h, y = add_layer_norm(x, r, add)
    torch.testing.assert_close(h, want)


@torch.no_grad()
def test_add_layer_norm_shift_is_added_in_place_without_autograd():
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    storage = r.data_ptr()
    h, _ = add_layer_norm(x, r, None, shift=torch.randn(8))
    assert h.data_ptr() == storage
