"""geglu reference vs an independent fp64 formula; shapes, errors, dispatch, the GEGLU module."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.activations import GEGLU as DiffusersGEGLU
from support.triton_interp import require_triton

from echofast.errors import BackendUnavailable
from echofast.nn.spatiotemporal import GEGLU
from echofast.ops import geglu, geglu_linear, geglu_reference, registered_ops

_op = registered_ops()["geglu"]


def oracle(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x·gelu(gate) in fp64, GELU written out (erf / tanh formulas), no F.gelu."""
    h = h.double()
    d = h.shape[-1] // 2
    x, g = h[..., :d], h[..., d:]
    if approximate == "tanh":
        return x * 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    return x * 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))


def oracle_grad(h: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d<out, dy>/dh in fp64 for the exact GELU: [dy·gelu(g), dy·x·(Φ(g) + g·φ(g))]."""
    h, dy = h.double(), dy.double()
    d = h.shape[-1] // 2
    x, g = h[..., :d], h[..., d:]
    cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
    pdf = torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    return torch.cat([dy * g * cdf, dy * x * (cdf + g * pdf)], dim=-1)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


SHAPES = [(2 * 37,), (3, 2 * 37), (2, 5, 2 * 16), (2, 3, 4, 2 * 8), (4, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_reference_matches_fp64_formula(shape, approximate, grad):
    h = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 2
    with torch.set_grad_enabled(grad):
        out = geglu(h.requires_grad_(grad), approximate=approximate)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == torch.float32
    assert rel(out.detach(), oracle(h.detach(), approximate)) <= 1e-6


def test_gradient_formula_matches_autograd_of_the_reference():
    """The analytic gradient the Triton tests use as oracle, checked against autograd (fp64)."""
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(5, 2 * 37, generator=g, dtype=torch.float64) * 3).requires_grad_()
    dy = torch.randn(5, 37, generator=g, dtype=torch.float64)
    (dh,) = torch.autograd.grad(geglu_reference(h), h, dy)
    torch.testing.assert_close(dh, oracle_grad(h.detach(), dy), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: geglu_reference(t, approximate="tanh"), (h[:2],))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_in_place_inference_path_equals_the_autograd_path(dtype):
    """Without autograd the reference multiplies in place; the values are bit-identical."""
    h = torch.randn(3, 4, 2 * 24).to(dtype)
    with torch.no_grad():
        fast = geglu(h)
    slow = geglu(h.clone().requires_grad_()).detach()
    assert fast.dtype == dtype
    assert torch.equal(fast, slow)
    assert torch.equal(fast, h[..., :24] * torch.nn.functional.gelu(h[..., 24:]))


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 6)], ids=str)
def test_empty_tensors(shape):
    out = geglu(torch.empty(shape))
    assert out.shape == (*shape[:-1], shape[-1] // 2)


@pytest.mark.parametrize(
    ("h", "kwargs", "message"),
    [
        (torch.randn(3, 7), {}, r"even last dim, got shape \(3, 7\)"),
        (torch.randn(2, 4, 1), {}, r"got shape \(2, 4, 1\)"),
        (torch.tensor(1.0), {}, r"got shape \(\)"),
        (torch.randn(3, 8), {"approximate": "sigmoid"}, "approximate must be one of"),
    ],
)
def test_bad_arguments_are_named(h, kwargs, message):
    with pytest.raises(ValueError, match=message):
        geglu(h, **kwargs)


def test_integer_input_has_no_backend():
    with pytest.raises(BackendUnavailable, match="floating point"):
        geglu(torch.ones(2, 4, dtype=torch.int64))


def test_automatic_choice_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h = torch.randn(4, 16)
    assert _op.select(h).name == "torch"
    assert _op.report("cpu")["torch"] == []


def test_forced_triton_on_cpu_without_interpreter_lists_every_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable) as err:
        geglu(torch.randn(4, 16, dtype=torch.float64), backend="triton")
    text = str(err.value)
    assert err.value.backend == "triton"
    assert "not CUDA" in text and "TRITON_INTERPRET" in text and "float64" in text
    assert "backend= argument" in text
    huge = torch.empty(1, 4).expand(2**31, 4)  # no memory: a stride-0 view
    with pytest.raises(BackendUnavailable, match=r"2147483648 rows \(>= 2\^31"):
        geglu(huge, backend="triton")


def _pair(dim_in=24, dim_out=40, seed=0):
    torch.manual_seed(seed)
    ref = DiffusersGEGLU(dim_in, dim_out)
    ours = GEGLU(dim_in, dim_out)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["proj.weight", "proj.bias"]
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_module_matches_diffusers_inference():
    ref, ours = _pair()
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    assert got.shape == expected.shape == (2, 7, 40)
    assert rel(got, expected.double()) <= 1e-6


def test_module_matches_diffusers_training():
    ref, ours = _pair(seed=1)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2))
    dy = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(3))
    grads = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        out = m(xi)
        grads.append((out.detach(), *torch.autograd.grad(out, [xi, *m.parameters()], dy)))
    for got, expected in zip(grads[1], grads[0]):
        assert rel(got, expected.double()) <= 1e-6


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("approx_tanh", [False, True])
def test_kernels_compile_for_sm90_with_16_byte_accesses(dtype, approx_tanh):
    """The compiled path, without a device: Triton's front end (which the interpreter skips, e.g.
    non-constexpr globals are an error there only) through PTX and cubin for an H100 (sm_90) with
    the bundled ptxas. With 16-divisible pointers, D and row strides (the model's case) every
    load and store is a 16-byte vector access."""
    require_triton()
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend is not installed")
    from echofast.kernels import geglu as kernels

    if type(kernels._geglu_fwd_kernel).__name__ == "InterpretedFunction":
        pytest.skip("echofast.kernels.geglu was imported under TRITON_INTERPRET")
    plan = kernels.Plan(16384, 512, interpreted=False)  # the LVDM's top level, one window
    consts = {"BLOCK_R": plan.BLOCK_R, "BLOCK_D": plan.BLOCK_D, "APPROX_TANH": approx_tanh}
    options = {"num_warps": plan.num_warps, "enable_fp_fusion": True}
    kinds = [
        (kernels._geglu_fwd_kernel, ["h_ptr", "out_ptr"], ["R", "D", "stride_h"], 2),
        (
            kernels._geglu_bwd_kernel,
            ["h_ptr", "dy_ptr", "dh_ptr"],
            ["R", "D", "stride_h", "stride_dy"],
            3,
        ),
    ]
    elems = 16 // (4 if dtype == "fp32" else 2)  # elements per 16-byte access
    for fn, ptrs, ints, n_tensors in kinds:
        sig = {**{p: f"*{dtype}" for p in ptrs}, **{i: "i32" for i in ints}}
        attrs = {(k,): [["tt.divisibility", 16]] for k in range(len(sig))}
        sig.update({k: "constexpr" for k in consts})
        src = ASTSource(fn, sig, consts, attrs)
        target = GPUTarget("cuda", 90, 32)
        ptx = triton.compile(src, target=target, options=options).asm["ptx"]
        # per thread and tensor: the tile's elements over the threads, 16 bytes at a time
        tile_accesses = plan.BLOCK_R * plan.BLOCK_D // (plan.num_warps * 32) // elems
        loads = ptx.count("ld.global.v4")
        stores = ptx.count("st.global.v4")
        assert loads == tile_accesses * n_tensors, (fn.__name__, loads)
        assert stores == tile_accesses * (1 if n_tensors == 2 else 2), (fn.__name__, stores)


# ---- geglu_linear -------------------------------------------------------------------------------


def test_geglu_linear_reference_is_the_module():
    """The reference is the GEGLU module's computation: projection, then geglu."""
    torch.manual_seed(3)
    module = GEGLU(24, 40)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        got = geglu_linear(x, module.proj.weight, module.proj.bias, backend="torch")
        assert torch.equal(got, module(x))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((4, 8), (6, 7), None), r"weight \(2·N, K\)"),
        (((4, 8), (5, 8), None), r"weight \(2·N, K\)"),
        (((4, 8), (6, 8), (5,)), r"bias \(2·N,\)"),
    ],
)
def test_geglu_linear_bad_shapes_are_named(shapes, message):
    x, w, b = (None if s is None else torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        geglu_linear(x, w, b)
    with pytest.raises(ValueError, match="approximate must be one of"):
        geglu_linear(torch.randn(2, 8), torch.randn(6, 8), approximate="erf")


def test_geglu_linear_on_cpu_is_torch_and_triton_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    op = registered_ops()["geglu_linear"]
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    assert op.select(x, w).name == "torch"
    with pytest.raises(BackendUnavailable) as err:
        geglu_linear(x.double(), w, backend="triton")
    text = str(err.value)
    assert "not CUDA" in text and "float64" in text and "one GEMM dtype" in text


def test_in_place_inference_path_allocates_only_gelus_output():
    """The documented temporary saved without autograd: gelu's output is multiplied in place."""
    from support.dispatch import CountOps

    h = torch.randn(3, 2 * 16)
    with torch.no_grad(), CountOps() as ops:
        geglu(h, backend="torch")
    assert ops.without_views() == {"gelu": 1, "mul_": 1}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_linear_reference_matches_fp64_formula(approximate):
    g = torch.Generator().manual_seed(11)
    x, w, b = torch.randn(3, 5, 24, generator=g), torch.randn(80, 24, generator=g), torch.randn(80)
    got = geglu_linear(x, w, b, approximate=approximate)
    want = oracle(torch.nn.functional.linear(x.double(), w.double(), b.double()), approximate)
    assert got.shape == (3, 5, 40) and rel(got, want) <= 1e-6


@pytest.mark.parametrize(
    ("x", "w"),
    [(torch.tensor(1.0), torch.randn(6, 1)), (torch.randn(2, 6), torch.randn(6))],
    ids=["0-D x", "1-D weight"],
)
def test_geglu_linear_rank_errors_are_value_errors(x, w):
    with pytest.raises(ValueError, match=r"need x \(\.\.\., K\), weight \(2·N, K\)"):
        geglu_linear(x, w)
