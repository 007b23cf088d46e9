"""The ``triton`` window_step backend (Triton interpreter on CPU) against the torch reference,
and on CUDA tensors when a GPU is present (bf16/fp16 predictions and next-input buffers)."""

from __future__ import annotations

import pytest
import torch
from support.triton_interp import interpreted_kernels

from echofast.ops.window_step import window_step, window_tables
from echofast.schedulers import DDIMScheduler, DDPMScheduler

kernels = interpreted_kernels("window_step", "_window_step_kernel")

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def case(b, total, num_frames, c, h, w, pad, device, pred_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    window = min(num_frames, total)
    overlap = window - num_frames // 2
    stride = max(1, num_frames // 2)
    starts = list(range(0, max(1, total - window + 1), stride))
    if starts[-1] + window < total:
        starts.append(total - window)
    n_win = len(starts)
    fw, fo = window_tables(total, starts, window, overlap)
    pred = torch.randn(b * n_win, window, c, h + 2 * pad, w + 2 * pad, generator=g)
    latents = torch.randn(b, total, c, h, w, generator=g)
    noise = torch.randn(b, total, c, h, w, generator=g)
    tables = [torch.tensor(v, dtype=torch.int32, device=device) for v in (fw, fo, starts)]
    return (
        pred.to(device, pred_dtype),
        latents.to(device),
        noise.to(device),
        tables,
        (b * n_win, window, 2 * c, h + 2 * pad, w + 2 * pad),
    )


SHAPES = [
    # b, total, num_frames, c, h, w, pad: tiny, odd sizes, long video with wide padding
    (1, 1, 4, 1, 1, 1, 0),
    (2, 11, 6, 3, 5, 7, 1),
    (1, 20, 8, 2, 3, 5, 2),
]
CASES = [(shape, "ddpm_v_clip", torch.float32) for shape in SHAPES] + [
    (SHAPES[1], "ddim_eps", torch.float32),
    (SHAPES[1], "ddpm_v_clip", torch.float16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,scheduler,pred_dtype", CASES)
def test_matches_reference(device, shape, scheduler, pred_dtype):
    if scheduler == "ddpm_v_clip":
        s = DDPMScheduler(prediction_type="v_prediction", clip_sample=True)
    else:
        s = DDIMScheduler(prediction_type="epsilon", clip_sample=False)
    s.set_timesteps(10)
    t = int(s.timesteps[3])
    pred, latents, noise, tables, nxt_shape = case(*shape, device, pred_dtype)
    noise = noise if s.step_needs_noise(t) else None
    coeffs = s.step_coefficients(t, latents.shape[0]).to(device)
    results = {}
    for backend in ("torch", "triton"):
        nxt = torch.full(nxt_shape, 3.0, device=device, dtype=pred_dtype)
        out = window_step(
            pred,
            latents,
            coeffs,
            noise,
            *tables,
            pad=shape[-1],
            clip=s.clip_bound,
            next_input=nxt,
            backend=backend,
        )
        results[backend] = (out, nxt)
    (want, want_next), (got, got_next) = results["torch"], results["triton"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_next, want_next, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_frames_spanning_several_tiles(device, monkeypatch):
    """40×40 latents: H·W = 1600 positions, over the launcher's largest tile (1024), so each
    (video, frame, channel) plane is two programs along the grid's second axis (the second one
    ragged), in the step and in the scatter into the padded 42×42 windows: every position is
    computed from its own tile's offsets (one channel, 3 frames in 2 windows: a cheap case).
    The launcher is called directly (what the backend runs) so that its grids can be watched:
    the dispatcher would refuse spies in place of interpreted kernels."""
    shape = (1, 3, 2, 1, 40, 40, 1)
    s = DDPMScheduler(prediction_type="v_prediction", clip_sample=True)
    s.set_timesteps(10)
    t = int(s.timesteps[3])
    pred, latents, noise, tables, nxt_shape = case(*shape, device, torch.float32, seed=9)
    coeffs = s.step_coefficients(t, latents.shape[0]).to(device)
    want_next = torch.full(nxt_shape, 3.0, device=device)
    want = window_step(
        pred,
        latents,
        coeffs,
        noise,
        *tables,
        pad=1,
        clip=s.clip_bound,
        next_input=want_next,
        backend="torch",
    )
    grids = {}
    for name in ("_window_step_kernel", "_window_scatter_kernel"):
        kernel = getattr(kernels, name)

        class Spy:
            def __getitem__(self, grid, name=name, kernel=kernel):
                grids[name] = tuple(grid)
                return kernel[grid]

        monkeypatch.setattr(kernels, name, Spy())
    got_next = torch.full(nxt_shape, 3.0, device=device)
    got = kernels.window_step_fwd(pred, latents, coeffs, noise, *tables, 1, s.clip_bound, got_next)
    # (b·t·c planes, tiles per plane) and (b·n_win·window·c planes, tiles per plane)
    assert grids == {"_window_step_kernel": (3, 2), "_window_scatter_kernel": (4, 2)}
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_next, want_next, rtol=0, atol=0)


def _frames_last(t: torch.Tensor) -> torch.Tensor:
    """(N, T, C, H, W) with channels-last frames (the LVDM's activation layout), same values."""
    return t.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, t.shape[:2])


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_frames_prediction_and_next_input(device):
    """The pipeline's layout for echofast's LVDM: the UNet output is a view of its channels-last
    frames and the next input is written into channels-last frames (fp16 here): same values as
    the contiguous layout, and the conditioning channels are left alone."""
    shape = SHAPES[1]
    s = DDPMScheduler(prediction_type="v_prediction", clip_sample=True)
    s.set_timesteps(10)
    t = int(s.timesteps[2])
    pred, latents, noise, tables, nxt_shape = case(*shape, device, torch.float16, seed=5)
    coeffs = s.step_coefficients(t, latents.shape[0]).to(device)
    outs = {}
    for layout in ("contiguous", "frames_last"):
        p = pred if layout == "contiguous" else _frames_last(pred)
        nxt = torch.full(nxt_shape, 3.0, device=device, dtype=torch.float16)
        if layout == "frames_last":
            nxt = _frames_last(nxt)
            assert not nxt.is_contiguous() and not p.is_contiguous()
        out = window_step(
            p,
            latents,
            coeffs,
            noise,
            *tables,
            pad=1,
            clip=s.clip_bound,
            next_input=nxt,
            backend="triton",
        )
        outs[layout] = (out, nxt)
    torch.testing.assert_close(outs["frames_last"][0], outs["contiguous"][0], rtol=0, atol=0)
    torch.testing.assert_close(outs["frames_last"][1], outs["contiguous"][1], rtol=0, atol=0)
    assert (outs["frames_last"][1][:, :, shape[3] :] == 3.0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 runs on the GPU only")
def test_bf16_prediction_on_gpu():
    pred, latents, noise, tables, nxt_shape = case(2, 24, 16, 4, 14, 14, 1, "cuda", torch.bfloat16)
    s = DDPMScheduler(prediction_type="v_prediction")
    s.set_timesteps(16)
    coeffs = s.step_coefficients(int(s.timesteps[0]), 2).cuda()
    outs = [
        window_step(pred, latents, coeffs, noise, *tables, pad=1, clip=1.0, backend=b)
        for b in ("torch", "triton")
    ]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_auto_picks_triton_when_interpreting():
    from echofast.ops.window_step import _op

    pred, latents, noise, tables, _ = case(1, 4, 4, 1, 3, 3, 0, "cpu", torch.float32)
    chosen = _op.select(pred, latents, torch.zeros(1, 6), None, *tables, pad=0)
    assert chosen.name == "triton"


@pytest.mark.parametrize("device", DEVICES)
def test_strided_latents_and_noise(device):
    """Latents and noise read through their strides: channels-last frames and a transposed
    (B, T, C, W, H) view give the values of their contiguous copies (torch backend)."""
    shape = SHAPES[1]
    s = DDPMScheduler(prediction_type="v_prediction", clip_sample=True)
    s.set_timesteps(10)
    t = int(s.timesteps[3])
    pred, latents, noise, tables, _ = case(*shape, device, torch.float32, seed=11)
    coeffs = s.step_coefficients(t, latents.shape[0]).to(device)
    assert s.step_needs_noise(t)
    kw = dict(pad=shape[-1], clip=s.clip_bound)
    want = window_step(pred, latents, coeffs, noise, *tables, backend="torch", **kw)
    lat = _frames_last(latents)
    z = noise.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not lat.is_contiguous() and not z.is_contiguous()
    got = window_step(pred, lat, coeffs, z, *tables, backend="triton", **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_noise", [True, False], ids=["noise", "no_noise"])
@pytest.mark.parametrize("device", DEVICES)
def test_each_video_takes_its_own_coefficients(device, with_noise):
    """Two videos at different timesteps (one coefficient row each, the noise's among those
    that differ), with clipping: each video's step uses its own row. Without noise the noise
    coefficient is unused, as in the reference."""
    s = DDPMScheduler(prediction_type="v_prediction", clip_sample=True)
    s.set_timesteps(10)
    t1, t2 = int(s.timesteps[2]), int(s.timesteps[6])
    coeffs = torch.cat([s.step_coefficients(t1, 1), s.step_coefficients(t2, 1)]).to(device)
    assert coeffs[0, 5] != coeffs[1, 5]
    pred, latents, noise, tables, _ = case(*SHAPES[1], device, torch.float32, seed=12)
    noise = noise if with_noise else None
    kw = dict(pad=SHAPES[1][-1], clip=s.clip_bound)
    want = window_step(pred, latents, coeffs, noise, *tables, backend="torch", **kw)
    got = window_step(pred, latents, coeffs, noise, *tables, backend="triton", **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
