"""The COMPILED Triton geglu kernels on a CUDA device, against an fp64 oracle.

``tests/triton/test_geglu_triton.py`` runs the same kernels under the Triton interpreter (NumPy,
one big tile per program); this module runs what a GPU executes: the compiled kernels with the
launcher's GPU tiles (BLOCK_D dividing D, several row tiles), libdevice erf/exp, vectorised
fp16/bf16 loads and stores, and the echo-sized shapes of the LVDM's top-level feed-forward
(h of 81,920 x 1,024 and 20,480 x 2,048 elements, D = 512 and 1,024). Forward and the gradient
of h, exact (erf) GELU on every shape, the tanh approximation on the small ones.

Oracle: the GELU and its derivative written out in float64 (erf, exp, tanh formulas; no
``F.gelu``) on the same inputs, so the oracle shares no code with either implementation.

Tolerances (relative to max|ref| of each output)
-----------------------------------------------
* fp32: forward <= 1e-6, gradient <= 1e-5. The kernel does a handful of fp32 operations per
  element (erf to <= 2 ulp in libdevice), so its error is a few 1e-7 of the value; there are
  no reductions.
* fp16/bf16: the kernel's max error must be <= 2x that of plain PyTorch at that precision on the
  same inputs (``x * F.gelu(gate)`` in the half dtype, as diffusers computes it, and its autograd
  for the gradient), floored at half an ulp of max|ref| (the error of rounding the exact result
  once). The kernel computes in fp32 and rounds once at the store, so it is also held to one ulp
  of max|ref|.

Every helper takes the device as an argument so that the logic can be exercised on the CPU
under ``TRITON_INTERPRET=1`` outside pytest; the tests themselves need CUDA and the compiled
kernels, and skip when ``TRITON_INTERPRET`` is set.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.markers import COMPILED_TRITON_ON_GPU

from echofast.ops import geglu, geglu_linear

pytestmark = COMPILED_TRITON_ON_GPU

FP32_FWD_TOL = 1e-6
FP32_GRAD_TOL = 1e-5


def make_inputs(shape, device, dtype, *, layout=None, seed=0):
    """h (``shape``, values ~ N(0, 3²)) and dy (the output's shape), drawn on ``device``.

    ``layout="row_strided"``: h is a column slice of a wider buffer (rows strided, no copy);
    ``"transposed"``: h is the transpose of a contiguous 2-D buffer (the launcher copies it)."""
    g = torch.Generator(device).manual_seed(seed)

    def draw(*size, std=1.0):
        return (torch.randn(*size, generator=g, device=device) * std).to(dtype)

    if layout == "row_strided":
        h = draw(*shape[:-1], shape[-1] + 24, std=3.0)[..., 8 : 8 + shape[-1]]
    elif layout == "transposed":
        h = draw(shape[1], shape[0], std=3.0).t()
    else:
        h = draw(*shape, std=3.0)
    return h, draw(*shape[:-1], shape[-1] // 2)


def oracle(h, dy, approximate="none"):
    """fp64 output and dh = d<out, dy>/dh, gelu and gelu' written out."""
    h, dy = h.double(), dy.double()
    d = h.shape[-1] // 2
    x, g = h[..., :d], h[..., d:]
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        t = torch.tanh(k * (g + 0.044715 * g**3))
        gelu = 0.5 * g * (1 + t)
        dgelu = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k * (1 + 3 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1 + torch.erf(g * (1 / math.sqrt(2))))
        gelu = g * cdf
        dgelu = cdf + g * torch.exp(-0.5 * g * g) * (1 / math.sqrt(2 * math.pi))
    return x * gelu, torch.cat([dy * gelu, dy * x * dgelu], dim=-1)


def torch_plain(h, approximate="none"):
    """Plain PyTorch at h's precision, as diffusers' GEGLU computes it."""
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate, approximate=approximate)


def run(fn, h, dy, **kw):
    """fn's output and the gradient of <out, dy> with respect to h."""
    leaf = h.detach().requires_grad_()  # a view: keeps h's layout
    out = fn(leaf, **kw)
    (dh,) = torch.autograd.grad(out, leaf, dy)
    return out.detach(), dh


def max_err(a, ref):
    return (a.double() - ref).abs().max().item()


def check_geglu(shape, device, dtype, approximate="none", *, layout=None, seed=0):
    """Forward and gradient of the forced triton backend vs the fp64 oracle; returns
    ``{name: {"err", "bound", "scale", "torch_err"}}`` for "out" and "dh", every error already
    asserted <= its bound (``scale`` = max|ref|; ``torch_err``: plain PyTorch's error at that
    precision, None in fp32)."""
    h, dy = make_inputs(shape, device, dtype, layout=layout, seed=seed)
    out, dh = run(geglu, h, dy, approximate=approximate, backend="triton")
    out64, dh64 = oracle(h, dy, approximate)
    if layout is not None:
        assert not h.is_contiguous(), layout
    assert out.shape == out64.shape and out.dtype == dtype and out.device == h.device
    assert out.is_contiguous()
    assert dh.shape == h.shape and dh.dtype == dtype
    plain = (None, None)
    if dtype != torch.float32:
        plain = run(torch_plain, h, dy, approximate=approximate)
    results = {}
    for name, got, ref, pt in zip(("out", "dh"), (out, dh), (out64, dh64), plain):
        scale = ref.abs().max().item()
        err = max_err(got, ref)
        where = f"{name} ({dtype}, {shape}, {approximate}, {layout})"
        torch_err = None
        if dtype == torch.float32:
            bound = (FP32_FWD_TOL if name == "out" else FP32_GRAD_TOL) * scale
            assert err <= bound, f"{where}: error {err:.3g} > {bound:.3g}"
        else:
            ulp = torch.finfo(dtype).eps * scale
            torch_err = max_err(pt, ref)
            torch_bound = 2 * max(torch_err, 0.5 * ulp)
            assert err <= torch_bound, f"{where}: error {err:.3g} > 2x PyTorch's {torch_err:.3g}"
            assert err <= ulp, f"{where}: error {err:.3g} > one ulp of max|ref| {ulp:.3g}"
            bound = min(torch_bound, ulp)
        results[name] = {"err": err, "bound": bound, "scale": scale, "torch_err": torch_err}
    return results


# name: (shape of h, layout)
SHAPES = {
    "odd_d": ((3, 2 * 37), None),  # D = 37: masked lanes, 3 rows
    "d1": ((5, 2), None),  # D = 1
    "d320_3d": ((7, 33, 2 * 320), None),  # D = 320: BLOCK_D = 64, ragged row tiles
    "row_strided": ((300, 2 * 256), "row_strided"),  # rows strided, read in place
    "transposed": ((96, 2 * 64), "transposed"),  # last dim strided: the launcher copies
    "echo_top": ((81920, 1024), None),  # LVDM top level, 1 window: D = 512
    "echo_mid": ((20480, 2048), None),  # LVDM second level: D = 1024
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [(name, "none", dtype) for name in SHAPES for dtype in DTYPES]
CASES += [(name, "tanh", dtype) for name in ("odd_d", "d320_3d") for dtype in DTYPES]


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    from echofast.kernels import geglu as kernels

    if type(kernels._geglu_fwd_kernel).__name__ == "InterpretedFunction":
        pytest.fail(
            "echofast.kernels.geglu was imported under TRITON_INTERPRET in this process: these "
            "tests must run the compiled kernels"
        )


@pytest.mark.parametrize(("shape_name", "approximate", "dtype"), CASES, ids=str)
def test_gpu_forward_and_grad_match_fp64(shape_name, approximate, dtype):
    shape, layout = SHAPES[shape_name]
    check_geglu(shape, "cuda", dtype, approximate, layout=layout, seed=sum(shape))


def test_gpu_automatic_dispatch_picks_triton():
    from echofast.ops import registered_ops

    h = torch.empty(4, 64, device="cuda", dtype=torch.float16)
    assert registered_ops()["geglu"].select(h).name == "triton"


def _geglu_linear_error_vs_twice_pytorch(m, k, n, dtype, config=None):
    """(error of the fused projection + GEGLU against fp64, 2x PyTorch's own error: cuBLAS
    F.linear, then geglu, in dtype; floored at half an ulp of max|ref|) on random inputs."""
    g = torch.Generator("cuda").manual_seed(m + k)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    w = (torch.randn(2 * n, k, generator=g, device="cuda") / math.sqrt(k)).to(dtype)
    b = (torch.randn(2 * n, generator=g, device="cuda") * 0.1).to(dtype)
    with torch.no_grad():
        if config is None:
            out = geglu_linear(x, w, b, backend="triton")
        else:
            from echofast.kernels.geglu_linear import geglu_linear_fwd

            out = geglu_linear_fwd(x, w, b, config=config)
        plain = geglu(F.linear(x, w, b), backend="torch")
    h = F.linear(x.double(), w.double(), b.double())
    ref = h[:, :n] * F.gelu(h[:, n:])
    floor = 0.5 * torch.finfo(dtype).eps * ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    return err, 2 * max((plain.double() - ref).abs().max().item(), floor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("m", "k"), [(81920, 128), (20480, 256), (5120, 512), (1000, 40)])
def test_gpu_geglu_linear_within_twice_pytorch(m, k, dtype):
    """The fused projection + GEGLU (the LVDM's feed-forward shapes at one window, and an awkward
    one) against fp64, with the tiles the launcher picks (tuned or default)."""
    err, bound = _geglu_linear_error_vs_twice_pytorch(m, k, 4 * k, dtype)
    assert err <= bound


@pytest.mark.parametrize(("m", "k"), [(81920, 128), (1000, 40)])
def test_gpu_geglu_linear_on_a_persistent_grid_within_twice_pytorch(m, k):
    """The persistent variant (one flattened loop over several tiles per program), which the
    tuner may choose: the same bound as the one-tile-per-program grid."""
    config = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    config["PROGRAMS_PER_SM"] = 2
    err, bound = _geglu_linear_error_vs_twice_pytorch(m, k, 4 * k, torch.float16, config)
    assert err <= bound


def test_gpu_every_tuned_entry_of_this_gpu_within_twice_pytorch():
    """Each entry of the shipped tuned table for this GPU's architecture: the launcher picks it
    at its own M, and its tiles at an awkward M (a partial row tile) stay within 2x PyTorch."""
    from echofast.kernels import geglu_linear as kernel

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    entries = [e for e in kernel.read_tuned_table(kernel.TUNED_TABLE) if e["arch"] == arch]
    if not entries:
        pytest.skip(f"the tuned table has no entries for {arch}")
    for e in entries:
        dtype = getattr(torch, e["dtype"])
        device = torch.device("cuda")
        assert kernel.gpu_config(device, dtype, e["m"], e["k"], e["n"]) == e["config"], e
        m = min(e["m"], 40000) + 37
        err, bound = _geglu_linear_error_vs_twice_pytorch(m, e["k"], e["n"], dtype, e["config"])
        assert err <= bound, e
