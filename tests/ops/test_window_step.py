"""window_step: the fused windowed sampler step equals stitching + the scheduler's own `step` +
re-windowing with F.pad, for DDPM and DDIM of every prediction type; and the dispatcher rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from echofast.errors import BackendUnavailable
from echofast.ops.window_step import window_step, window_tables
from echofast.schedulers import DDIMScheduler, DDPMScheduler


def unfused(pred, latents, scheduler, t, noise, starts, window, overlap, pad, cond_channels):
    """The pipeline's unfused sequence, written independently of the op."""
    b, total, c, h, w = latents.shape
    n_win = len(starts)
    p = pred[..., pad : pad + h, pad : pad + w].reshape(b, n_win, window, c, h, w)
    stitched = torch.empty_like(latents)
    stitched[:, :window] = p[:, 0]
    for k, s in enumerate(starts[1:], start=1):
        stitched[:, s + overlap : s + window] = p[:, k, overlap:]
    prev = scheduler.step(stitched, t, latents, noise=noise).prev_sample
    wins = torch.stack([prev[:, s : s + window] for s in starts], dim=1)
    flat = wins.reshape(b * n_win * window, c, h, w)
    padded = F.pad(flat, (pad,) * 4, mode="replicate").reshape(
        b * n_win, window, c, h + 2 * pad, w + 2 * pad
    )
    return prev, padded


def make_case(b=2, total=11, window=6, overlap=3, c=3, h=5, w=7, pad=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    starts = list(range(0, total - window + 1, window - overlap))
    if starts[-1] + window < total:
        starts.append(total - window)
    n_win = len(starts)
    pred = torch.randn(b * n_win, window, c, h + 2 * pad, w + 2 * pad, generator=g)
    latents = torch.randn(b, total, c, h, w, generator=g)
    noise = torch.randn(b, total, c, h, w, generator=g)
    fw, fo = window_tables(total, starts, window, overlap)
    tables = (
        torch.tensor(fw, dtype=torch.int32),
        torch.tensor(fo, dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32),
    )
    return pred, latents, noise, starts, tables


SCHEDULERS = [
    (DDPMScheduler, {"prediction_type": "v_prediction", "clip_sample": True}),
    (DDPMScheduler, {"prediction_type": "epsilon", "clip_sample": False}),
    (DDPMScheduler, {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5}),
    (DDPMScheduler, {"prediction_type": "v_prediction", "variance_type": "fixed_small_log"}),
    (DDIMScheduler, {"prediction_type": "v_prediction", "clip_sample": False}),
    (DDIMScheduler, {"prediction_type": "epsilon", "clip_sample": True}),
    (DDIMScheduler, {"prediction_type": "sample", "set_alpha_to_one": False}),
]


@pytest.mark.parametrize("cls,config", SCHEDULERS)
@pytest.mark.parametrize("step_index", [0, 5, -1])
def test_matches_scheduler_step(cls, config, step_index):
    scheduler = cls(**config)
    scheduler.set_timesteps(12)
    t = int(scheduler.timesteps[step_index])
    pred, latents, noise, starts, tables = make_case(seed=step_index % 7)
    noise_in = noise if scheduler.step_needs_noise(t) else None
    want, want_next = unfused(pred, latents, scheduler, t, noise_in, starts, 6, 3, 1, 3)
    coeffs = scheduler.step_coefficients(t, latents.shape[0])
    nxt = torch.full((pred.shape[0], 6, 5, 7, 9), 7.0)
    got = window_step(
        pred, latents, coeffs, noise_in, *tables, pad=1, clip=scheduler.clip_bound, next_input=nxt
    )
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(nxt[:, :, :3], want_next, rtol=2e-6, atol=2e-6)
    assert (nxt[:, :, 3:] == 7.0).all(), "conditioning channels must be left alone"


def test_final_ddpm_step_draws_no_noise():
    s = DDPMScheduler()
    s.set_timesteps(4)
    assert s.step_needs_noise(int(s.timesteps[0])) and not s.step_needs_noise(0)
    assert s.step_coefficients(0, 3)[:, 5].abs().max() == 0
    assert not DDIMScheduler().step_needs_noise(500)


def test_per_sample_timesteps():
    s = DDPMScheduler(prediction_type="v_prediction")
    s.set_timesteps(10)
    ts = [int(s.timesteps[0]), int(s.timesteps[4])]
    pred, latents, noise, starts, tables = make_case(pad=0)
    coeffs = s.step_coefficients(torch.tensor(ts), 2)
    got = window_step(pred, latents, coeffs, noise, *tables, clip=s.clip_bound)
    for i, t in enumerate(ts):
        want, _ = unfused(pred, latents, s, t, noise, starts, 6, 3, 0, 3)
        torch.testing.assert_close(got[i], want[i], rtol=2e-6, atol=2e-6)


def test_half_precision_prediction():
    s = DDPMScheduler(prediction_type="v_prediction")
    s.set_timesteps(8)
    t = int(s.timesteps[2])
    pred, latents, noise, starts, tables = make_case()
    coeffs = s.step_coefficients(t, 2)
    got = window_step(pred.half(), latents, coeffs, noise, *tables, pad=1, clip=s.clip_bound)
    want, _ = unfused(pred.half().float(), latents, s, t, noise, starts, 6, 3, 1, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_window_tables():
    assert window_tables(5, [0], 5, 2) == [[0] * 5, [0, 1, 2, 3, 4]]
    assert window_tables(10, [0, 2, 4, 6], 4, 2) == [
        [0, 0, 0, 0, 1, 1, 2, 2, 3, 3],
        [0, 1, 2, 3, 2, 3, 2, 3, 2, 3],
    ]
    with pytest.raises(ValueError, match="covered by no window"):
        window_tables(10, [0, 6], 4, 2)
    with pytest.raises(ValueError, match=r"frames \[4\] of 5 are covered by no window"):
        window_tables(5, [0], 4, 1)  # only the last frame uncovered


def test_window_tables_clip_windows_to_the_video():
    assert window_tables(3, [0], 5, 2) == [[0, 0, 0], [0, 1, 2]]  # shorter than a window
    assert window_tables(5, [0, 3], 4, 1) == [
        [0, 0, 0, 0, 1],
        [0, 1, 2, 3, 1],
    ]  # last one runs over


def test_bad_shapes_name_the_argument():
    pred, latents, noise, starts, tables = make_case()
    coeffs = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"pred must be .*got \(6, 6, 3, 6, 9\)"):
        window_step(pred[:, :, :, :-1], latents, coeffs, None, *tables, pad=1)
    with pytest.raises(ValueError, match="coeffs must be float32"):
        window_step(pred, latents, coeffs.double(), None, *tables, pad=1)
    with pytest.raises(ValueError, match="frame_window must be int32"):
        window_step(pred, latents, coeffs, None, tables[0].long(), *tables[1:], pad=1)


def test_triton_forced_on_cpu_explains(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pred, latents, noise, starts, tables = make_case()
    with pytest.raises(BackendUnavailable, match="not CUDA"):
        window_step(pred, latents, torch.zeros(2, 6), None, *tables, pad=1, backend="triton")


def _bad(case, **change):
    """window_step's positional arguments of ``case`` with some replaced, and its keywords."""
    pred, latents, noise, starts, (fw, fo, start) = case
    args = {"pred": pred, "latents": latents, "coeffs": torch.zeros(2, 6), "noise": None}
    args.update(frame_window=fw, frame_offset=fo, window_start=start)
    kwargs = {"pad": 1, "next_input": None}
    for name, value in change.items():
        (kwargs if name in kwargs else args)[name] = value
    return list(args.values()), kwargs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latents": torch.zeros(2, 11, 3, 5)}, "latents must be"),
        ({"pad": -1}, "pad must be >= 0"),
        ({"pred": torch.zeros(5, 6, 3, 7, 9)}, r"pred must be .*got \(5, 6, 3, 7, 9\)"),
        ({"coeffs": torch.zeros(2, 5)}, "coeffs must be float32"),
        ({"noise": torch.zeros(2, 10, 3, 5, 7)}, "noise must be"),
        ({"frame_offset": torch.zeros(10, dtype=torch.int32)}, "frame_offset must be int32"),
        ({"window_start": torch.tensor([0, 3, 5])}, "window_start must be int32"),
        ({"next_input": torch.zeros(6, 6, 2, 7, 9)}, r"next_input must be .*got \(6, 6, 2, 7, 9\)"),
        ({"next_input": torch.zeros(5, 6, 3, 7, 9)}, r"next_input must be .*got \(5, 6, 3, 7, 9\)"),
        ({"coeffs": torch.zeros(2, 6, device="meta")}, "all tensors must be on one device"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_bad_arguments_name_the_argument(change, message):
    args, kwargs = _bad(make_case(), **change)
    with pytest.raises(ValueError, match=message):
        window_step(*args, **kwargs)


def test_next_input_of_exactly_c_channels():
    pred, latents, noise, starts, tables = make_case(seed=3)
    coeffs = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    wide = torch.zeros(6, 6, 5, 7, 9)
    exact = torch.zeros(6, 6, 3, 7, 9)
    for nxt in (wide, exact):
        window_step(pred, latents, coeffs, noise, *tables, pad=1, next_input=nxt)
    assert torch.equal(exact, wide[:, :, :3])


def test_no_autograd_graph_is_built():
    pred, latents, noise, starts, tables = make_case()
    pred.requires_grad_()
    out = window_step(pred, latents, torch.randn(2, 6), noise, *tables, pad=1)
    assert not out.requires_grad and out.grad_fn is None


def test_zero_clip_bound_clamps_x0_to_zero():
    """clip = 0 is a bound (x̂_0 = 0), not "no clipping": the same as zero x̂_0 coefficients."""
    pred, latents, noise, starts, tables = make_case(seed=4)
    coeffs = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    no_x0 = coeffs.clone()
    no_x0[:, :2] = 0
    got = window_step(pred, latents, coeffs, noise, *tables, pad=1, clip=0.0)
    want = window_step(pred, latents, no_x0, noise, *tables, pad=1)
    torch.testing.assert_close(got, want)
