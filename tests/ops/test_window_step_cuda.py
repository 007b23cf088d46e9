"""The COMPILED Triton window_step kernels on a CUDA device, against an fp64 oracle and the
``torch`` reference backend.

``tests/triton/test_window_step_triton.py`` runs the kernels under the Triton interpreter; this
module runs the compiled ones (which contract multiply-adds into FMAs, so they are not bitwise
equal to PyTorch's op-by-op fp32) on LVDM-shaped steps: 4 latent channels, 14x14 and odd 15x15
latents, windows of 16 frames over 24 (two windows), a ragged last window, a video shorter than
the window, replicate padding 0/1, DDPM (v-prediction, clip, noise) and DDIM (epsilon, no clip,
no noise, |c0| ~ 80 at the first step), different timesteps per video, fp32/fp16/bf16 UNet
predictions and fp32/half next-input buffers.

Tolerances
----------
The step is an affine map evaluated in fp32 by both backends: x̂_0 = clip(c0·x + c1·m),
x' = c2·x̂_0 + c3·x + c4·m + c5·z. Done op by op (the reference) it takes at most 10 roundings,
each of relative size u = 2^-24 of a partial result bounded by
S = |c2|·(|c0·x| + |c1·m|) + |c3·x| + |c4·m| + |c5·z| (clip is 1-Lipschitz, so it adds none);
to first order both results lie within 6·u·S of the exact value (FMAs only remove roundings).
Checked per element against the fp64 oracle with 8·u·S (slack for second-order terms), for the
kernel and for the reference (which shows the bound is honest), and kernel vs reference with
twice that. Rounding the model output to fp16/bf16 happens before the op, so both backends and
the oracle read the same values and the fp32 bound applies at every prediction dtype (stricter
than "2x PyTorch's error"). The next-input buffer is pure data movement: its first C channels
must EQUAL the replicate-padded windows of the kernel's own output cast to the buffer's dtype
(both Triton and PyTorch round to nearest even), the conditioning channels must be untouched.

Every helper takes the device as an argument so that the logic can be exercised on the CPU
under ``TRITON_INTERPRET=1`` outside pytest; the tests themselves need CUDA and the compiled
kernels, and skip when ``TRITON_INTERPRET`` is set.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.markers import COMPILED_TRITON_ON_GPU

from echofast.ops.window_step import window_step, window_tables
from echofast.schedulers import DDIMScheduler, DDPMScheduler

pytestmark = COMPILED_TRITON_ON_GPU

U = 2.0**-24  # unit roundoff of fp32
ORACLE_ULPS = 8  # per backend vs fp64, in units of u·S (first-order bound: 6)
FILL = 3.0  # initial value of the next-input buffer (its conditioning channels must keep it)


def make_case(b, total, window, stride, c, h, w, pad, device, pred_dtype, seed=0):
    """One step's inputs laid out as the LVDM pipeline does: windows of ``window`` frames
    every ``stride`` frames (a last window ending at the last frame when ``total`` is not
    covered; one window of ``total`` frames when the video is shorter than a window)."""
    window = min(window, total)
    starts = list(range(0, total - window + 1, stride))
    if starts[-1] + window < total:
        starts.append(total - window)
    overlap = window - stride
    n_win = len(starts)
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b * n_win, window, c, h + 2 * pad, w + 2 * pad, generator=g)
    latents = torch.randn(b, total, c, h, w, generator=g)
    noise = torch.randn(b, total, c, h, w, generator=g)
    fw, fo = window_tables(total, starts, window, overlap)
    tables = [torch.tensor(v, dtype=torch.int32, device=device) for v in (fw, fo, starts)]
    return {
        "pred": pred.to(device, pred_dtype),
        "latents": latents.to(device),
        "noise": noise.to(device),
        "tables": tables,
        "starts": starts,
        "window": window,
        "overlap": overlap,
        "pad": pad,
    }


def make_scheduler(name):
    if name == "ddpm":  # the LVDM's scheduler (spec): v-prediction, clip to ±4, noise for t > 0
        s = DDPMScheduler(prediction_type="v_prediction", clip_sample=True, clip_sample_range=4.0)
    else:  # deterministic, unclipped, large |c0|, |c1| at high t (cancellation in x̂_0)
        s = DDIMScheduler(prediction_type="epsilon", clip_sample=False)
    s.set_timesteps(64)
    return s


def oracle(case, coeffs, noise, clip):
    """fp64 result and the rounding scale S per element; the windows stitched here
    independently of ``window_tables``: window 0 gives frames [0, window), window k >= 1
    (starting at s) frames [s + overlap, s + window), later windows winning."""
    pad, window, overlap, starts = case["pad"], case["window"], case["overlap"], case["starts"]
    x = case["latents"].double()
    b, total, c, h, w = x.shape
    p = case["pred"][..., pad : pad + h, pad : pad + w].double()
    p = p.reshape(b, len(starts), window, c, h, w)
    m = torch.empty_like(x)
    m[:, :window] = p[:, 0]
    for k, s in enumerate(starts[1:], start=1):
        m[:, s + overlap : s + window] = p[:, k, overlap:]
    k = coeffs.double().reshape(b, 6, 1, 1, 1, 1).unbind(1)
    z = torch.zeros_like(x) if noise is None else noise.double()
    x0 = k[0] * x + k[1] * m
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = k[2] * x0 + k[3] * x + k[4] * m + k[5] * z
    scale = (
        k[2].abs() * ((k[0] * x).abs() + (k[1] * m).abs())
        + (k[3] * x).abs()
        + (k[4] * m).abs()
        + (k[5] * z).abs()
    )
    return out, scale


def padded_windows(out, starts, window, pad):
    """Replicate-padded windows of ``out`` (B, T, C, H, W): (B·n_win, window, C, H+2p, W+2p)."""
    b, _, c, h, w = out.shape
    wins = torch.stack([out[:, s : s + window] for s in starts], dim=1)
    flat = wins.reshape(-1, c, h, w)
    if pad:
        flat = F.pad(flat, (pad,) * 4, mode="replicate")
    return flat.reshape(b * len(starts), window, c, h + 2 * pad, w + 2 * pad)


def check_window_step(shape, scheduler, step_indices, device, pred_dtype, next_dtype, seed=0):
    """Forced triton backend vs the fp64 oracle and vs the torch backend, plus the next-input
    buffer; returns the worst error/bound ratios (every one already asserted <= 1)."""
    case = make_case(*shape, device, pred_dtype, seed=seed)
    latents = case["latents"]
    b, _, c = latents.shape[:3]
    s = make_scheduler(scheduler)
    steps = torch.tensor([int(s.timesteps[i]) for i in step_indices])
    assert len(steps) == b
    coeffs = s.step_coefficients(steps, b).to(device)
    noise = case["noise"] if s.step_needs_noise(steps) else None
    clip = s.clip_bound
    results = {}
    for backend in ("triton", "torch"):
        nxt = torch.full(
            (case["pred"].shape[0], case["window"], 2 * c, *case["pred"].shape[3:]),
            FILL,
            device=device,
            dtype=next_dtype,
        )
        out = window_step(
            case["pred"],
            latents,
            coeffs,
            noise,
            *case["tables"],
            pad=case["pad"],
            clip=clip,
            next_input=nxt,
            backend=backend,
        )
        results[backend] = (out, nxt)
    (got, got_next), (want, _) = results["triton"], results["torch"]
    assert got.dtype == torch.float32 and got.shape == latents.shape and got.is_contiguous()
    exact, scale = oracle(case, coeffs, noise, clip)
    bound = ORACLE_ULPS * U * scale
    ratios = {
        "triton_vs_fp64": ((got.double() - exact).abs() / bound).nan_to_num(0.0).max().item(),
        "torch_vs_fp64": ((want.double() - exact).abs() / bound).nan_to_num(0.0).max().item(),
        "triton_vs_torch": ((got.double() - want.double()).abs() / (2 * bound))
        .nan_to_num(0.0)
        .max()
        .item(),
    }
    for name, ratio in ratios.items():
        assert ratio <= 1.0, f"{name}: error is {ratio:.3g}x its bound ({shape}, {scheduler})"
    expected = padded_windows(got, case["starts"], case["window"], case["pad"]).to(next_dtype)
    assert torch.equal(got_next[:, :, :c], expected), "next_input != padded windows of x_prev"
    assert (got_next[:, :, c:] == FILL).all(), "conditioning channels must be left alone"
    return ratios


# b, total, window, stride, c, h, w, pad; scheduler; step index per video
CASES = {
    "lvdm_14": ((2, 24, 16, 8, 4, 14, 14, 1), "ddpm", (0, 31)),
    "odd_15": ((2, 24, 16, 8, 4, 15, 15, 1), "ddim", (0, 40)),
    "pad0": ((2, 24, 16, 8, 4, 15, 14, 0), "ddpm", (10, -1)),  # video 1 at t = 0: c5 = 0
    "ragged_last_window": ((1, 21, 16, 8, 4, 14, 15, 1), "ddim", (5,)),  # starts 0, 5
    "total_below_window": ((2, 5, 16, 8, 4, 15, 15, 1), "ddpm", (-1, -1)),  # t = 0: no noise
    "many_windows": ((1, 64, 16, 8, 4, 14, 14, 1), "ddim", (0,)),  # 7 windows
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    from echofast.kernels import window_step as kernels

    if type(kernels._window_step_kernel).__name__ == "InterpretedFunction":
        pytest.fail(
            "echofast.kernels.window_step was imported under TRITON_INTERPRET in this process: "
            "these tests must run the compiled kernels"
        )


@pytest.mark.parametrize("pred_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_name", list(CASES))
def test_gpu_matches_fp64_and_reference(case_name, pred_dtype):
    shape, scheduler, steps = CASES[case_name]
    # the pipeline's buffer is fp32; a half buffer (fp16/bf16 UNet input) for the DDIM cases
    next_dtype = torch.float32 if scheduler == "ddpm" else pred_dtype
    check_window_step(shape, scheduler, steps, "cuda", pred_dtype, next_dtype, seed=sum(shape))
