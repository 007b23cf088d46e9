"""``echofast privacy-audit``: positive and negative controls of a calibrated filter.

Positive control: copies of real TRAIN reference frames (the frames the filter compares against)
are planted as candidates, one per source frame and kind, and the report gives the fraction
caught (max correlation ≥ τ) per kind, with a Wilson 95% interval:

- ``exact``: the latent as it is;
- ``shift``: moved by one latent pixel (8 image pixels) in a seeded direction, edge replicated;
- ``brightness``: per-channel gain U(0.9, 1.1) and offset U(−0.1, 0.1)·std;
- ``noise``: plus Gaussian noise of 0.05·std;
- ``renoise_<s>``: partially re-noised to timestep ``s·1000`` (x_t = √ᾱ·x + √(1−ᾱ)·ε) and
  denoised. With a LIDM (``--lidm``: a LIDM folder or a weights root) the sampler its folder
  records (``scheduler_config.json``, else the reference sampler) runs from that timestep to 0
  (SDEdit). Without one, the denoiser is the posterior mean under a
  per-element Gaussian prior fitted to the TRAIN reference frames,
  ``x̂ = μ + √ᾱ·σ²/(ᾱ·σ² + 1 − ᾱ)·(x_t − √ᾱ·μ)``, which pulls the copy toward the data mean
  by the same amount of signal the noise destroyed (the report names the denoiser used);
- ``other_frame``: another frame of the same TRAIN clip that is not a reference frame (same
  patient, not a copy; reported, no goal).

The goal for ``exact``, ``shift``, ``brightness`` and ``noise`` is ≥ 99 % caught.

Negative control: the reference frames of a held-out split (default VAL, never seen by the filter)
are scored as candidates; the fraction flagged should be ≈ 100 − percentile % when the TRAIN
gallery and the TEST calibration set have the same number of frames (the calibration takes each
TRAIN frame's max over the TEST frames, a candidate's max is over the TRAIN frames: a larger
gallery gives larger maxima, so with more TRAIN than TEST frames more real frames are flagged).
So the held-out frames are also scored against a seeded random subset of the gallery with as
many frames as the TEST calibration set (``matched_gallery``): that fraction is the calibrated
rate the percentile promises, whatever the split sizes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.datasets import normalize_split, read_latent_records
from ..rng import sample_seed
from .data import frames_from_clips, read_clip, select_frames, translate
from .filter import PrivacyError
from .metrics import wilson_interval
from .report import FilterSetup

if TYPE_CHECKING:
    from ..schedulers import SchedulerBase

LIGHT_KINDS = ("exact", "shift", "brightness", "noise")
DEFAULT_STRENGTHS = (0.1, 0.25, 0.5)
GOAL = 0.99


def _gen(seed: int, index: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index, stream))


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Move (C, h, w) by one pixel in a random direction (edge replicated)."""
    d = int(torch.randint(4, (1,), generator=g))
    return translate(x, *[(0, 1), (0, -1), (1, 0), (-1, 0)][d])


def brightness(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    c = x.shape[0]
    gain = 0.9 + 0.2 * torch.rand(c, 1, 1, generator=g)
    offset = (torch.rand(c, 1, 1, generator=g) - 0.5) * 0.2 * x.std()
    return x * gain + offset


def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x + 0.05 * x.std() * torch.randn(x.shape, generator=g)


def _timestep(scheduler, strength: float) -> tuple[int, list[int]]:
    """The first sampler timestep at or below ``strength·num_train_timesteps`` and the
    timesteps from there to the end."""
    scheduler.set_timesteps(64)
    steps = [int(t) for t in scheduler.timesteps]
    target = strength * scheduler.config.num_train_timesteps
    rest = [t for t in steps if t <= target] or steps[-1:]
    return rest[0], rest


@torch.no_grad()
def renoise_lidm(
    x0: torch.Tensor,
    strength: float,
    lidm,
    *,
    seed: int,
    batch_size: int = 32,
    scheduler: SchedulerBase | None = None,
) -> torch.Tensor:
    """SDEdit with ``scheduler`` (None: the reference sampler): noise (N, C, h, w) latents to
    ``strength`` and run the LIDM back to t = 0. Sample ``i`` draws from its own generator."""
    from ..pipelines.common import latent_padding, pad_replicate, reference_scheduler, unpad

    sched = reference_scheduler() if scheduler is None else scheduler
    t0, steps = _timestep(sched, strength)
    cfg = lidm.config
    pad = latent_padding(x0.shape[-1], 2 ** (len(cfg.block_out_channels) - 1))
    out = []
    for s in range(0, x0.shape[0], batch_size):
        x = x0[s : s + batch_size].float()
        gens = [_gen(seed, s + i, f"renoise-{strength}") for i in range(x.shape[0])]
        eps = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens])
        xt = sched.add_noise(x, eps, t0).to(lidm.device)
        for t in steps:
            pred = unpad(lidm(pad_replicate(xt, pad), t).sample, pad).float()
            xt = sched.step(pred, t, xt, generator=gens).prev_sample
        out.append(xt.cpu())
    return torch.cat(out)


def renoise_gaussian(
    x0: torch.Tensor, strength: float, mean: torch.Tensor, var: torch.Tensor, *, seed: int
) -> torch.Tensor:
    """Re-noise to ``strength`` and denoise with the Gaussian-prior posterior mean (no LIDM)."""
    from ..pipelines.common import reference_scheduler

    sched = reference_scheduler()
    t0, _ = _timestep(sched, strength)
    a = float(sched.alphas_cumprod[t0])
    gens = [_gen(seed, i, f"renoise-{strength}") for i in range(x0.shape[0])]
    eps = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in gens])
    xt = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    gain = a**0.5 * var / (a * var + 1 - a)
    return mean + gain * (xt - a**0.5 * mean)


def _load_lidm(path: str | os.PathLike, dataset: str):
    from ..models import LIDM
    from ..pipelines.echo_synthetic import DATASETS

    p = Path(path)
    folder = p / DATASETS[dataset] if (p / DATASETS[dataset]).is_dir() else p
    return LIDM.from_pretrained(folder), folder


def heldout_records(reference: str | os.PathLike, split: str) -> list:
    """The clips of the negative control's held-out ``split`` of ``reference``. Refused with a
    :class:`PrivacyError` naming the split: TRAIN (the gallery: its frames match themselves),
    TEST (it calibrates τ) and ALL (both) are not held out, and a split without clips leaves
    nothing to score."""
    name = normalize_split(split)
    if name in ("TRAIN", "TEST", "ALL"):
        raise PrivacyError(
            f"held-out split {split!r} is not held out: the filter's gallery is TRAIN and its "
            "threshold is calibrated on TEST; name a split the filter has not seen (VAL)"
        )
    held = read_latent_records(reference, split)
    if not held:
        raise PrivacyError(f"{reference}: no clips in the held-out split {split!r}")
    return held


def run_audit(
    setup: FilterSetup,
    reference: str | os.PathLike,
    *,
    num_planted: int = 200,
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS,
    heldout_split: str = "VAL",
    lidm: str | os.PathLike | None = None,
    dataset: str = "dynamic",
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run both controls; returns (the audit dict, max correlations per kind)."""
    flt = setup.filter
    tau = flt.tau
    step = flt.frame_step
    held = heldout_records(reference, heldout_split)
    records = read_latent_records(reference, "TRAIN")
    raw = [read_clip(r.path) for r in records]
    flt.check_clips(raw, [r.path for r in records])
    held_clips = [read_clip(r.path) for r in held]
    flt.check_clips(held_clips, [r.path for r in held])
    sources = [(c, f) for c, x in enumerate(raw) for f in select_frames(len(x), step)]
    if not sources:
        raise PrivacyError(f"{reference}: no TRAIN reference frames to plant")
    g = torch.Generator().manual_seed(sample_seed(seed, 0, "audit-plant"))
    pick = torch.randperm(len(sources), generator=g)[: min(num_planted, len(sources))].sort().values
    chosen = [sources[int(i)] for i in pick]
    base = torch.stack([raw[c][f] for c, f in chosen]).float()
    names = [f"{records[c].name}#{f}" for c, f in chosen]

    planted: dict[str, torch.Tensor] = {"exact": base}
    planted["shift"] = torch.stack(
        [shift(x, _gen(seed, i, "audit-shift")) for i, x in enumerate(base)]
    )
    planted["brightness"] = torch.stack(
        [brightness(x, _gen(seed, i, "audit-brightness")) for i, x in enumerate(base)]
    )
    planted["noise"] = torch.stack(
        [noise(x, _gen(seed, i, "audit-noise")) for i, x in enumerate(base)]
    )
    if lidm is not None:
        from ..pipelines.common import model_scheduler
        from ..schedulers import CONFIG_NAME

        model, folder = _load_lidm(lidm, dataset)
        sched = model_scheduler(folder)
        sampler = (
            f"its recorded {type(sched).__name__} sampler, {CONFIG_NAME}"
            if (folder / CONFIG_NAME).is_file()
            else "reference DDPM sampler"
        )
        denoiser = f"LIDM {folder.name} ({sampler}, from the re-noised timestep)"
        for s in strengths:
            planted[f"renoise_{s:g}"] = renoise_lidm(base, s, model, seed=seed, scheduler=sched)
    else:
        frames = torch.stack([raw[c][f] for c, f in sources]).float()
        mean, var = frames.mean(0), frames.var(0, unbiased=False)
        denoiser = (
            "Gaussian-prior posterior mean fitted to the TRAIN reference frames (no LIDM given)"
        )
        for s in strengths:
            planted[f"renoise_{s:g}"] = renoise_gaussian(base, s, mean, var, seed=seed)
    others = []
    for c, _ in chosen:
        ref = set(select_frames(len(raw[c]), step))
        alt = [k for k in range(len(raw[c])) if k not in ref]
        if alt:
            others.append(raw[c][alt[int(torch.randint(len(alt), (1,), generator=g))]])
    if others:
        planted["other_frame"] = torch.stack(others).float()

    scores: dict[str, np.ndarray] = {}
    positive = {}
    for kind, x in planted.items():
        s = flt.score_clips(list(x), [f"{kind}:{n}" for n in names[: len(x)]], frame_step=0)
        caught = int((s.max_corr >= tau).sum())
        lo, hi = wilson_interval(caught, len(x))
        scores[kind] = s.max_corr
        positive[kind] = {
            "planted": len(x),
            "caught": caught,
            "fraction_caught": caught / len(x),
            "wilson95": [lo, hi],
            "goal": GOAL if kind in LIGHT_KINDS else None,
            "meets_goal": (caught / len(x) >= GOAL) if kind in LIGHT_KINDS else None,
            "nearest_is_source": float(
                np.mean([n.split("#")[0] == c for n, c in zip(names, s.nearest_clip)])
            )
            if kind != "other_frame"
            else None,
        }

    fs = frames_from_clips(
        held_clips,
        [r.name for r in held],
        frame_step=step,
        normalization=flt.model.normalization,
    )
    v, _ = flt.score_frames(fs.frames)
    flagged = int((v >= tau).sum())
    lo, hi = wilson_interval(flagged, len(v))
    size = min(flt.num_test_frames, int(flt.gallery_unit.shape[0]))
    g = torch.Generator().manual_seed(sample_seed(seed, 0, "audit-matched-gallery"))
    rows = torch.randperm(int(flt.gallery_unit.shape[0]), generator=g)[:size].sort().values
    vm, _ = flt.score_frames(fs.frames, rows)
    flagged_m = int((vm >= tau).sum())
    lo_m, hi_m = wilson_interval(flagged_m, len(vm))
    expected = 1 - flt.calibration.percentile / 100
    scores["heldout"] = v
    negative = {
        "split": heldout_split,
        "clips": len(held),
        "frames": len(v),
        "flagged": flagged,
        "fraction_flagged": flagged / len(v),
        "wilson95": [lo, hi],
        "expected_fraction": expected,
        "gallery_frames": int(flt.gallery_unit.shape[0]),
        "calibration_test_frames": flt.num_test_frames,
        "note": "calibrated rate holds when the TRAIN gallery and the TEST calibration set have "
        "equal frame counts; a larger gallery flags more real frames",
        "matched_gallery": {
            "gallery_frames": size,
            "flagged": flagged_m,
            "fraction_flagged": flagged_m / len(vm),
            "wilson95": [lo_m, hi_m],
            "note": "the same frames against a seeded random subset of the TRAIN gallery as large "
            "as the TEST calibration set: the rate the percentile calibrates",
        },
    }
    audit = {
        "positive_control": positive,
        "negative_control": negative,
        "denoiser": denoiser,
        "renoise_strengths": list(strengths),
        "num_planted": len(base),
        "seed": seed,
        "tau": tau,
        "light_copies_meet_goal": all(positive[k]["meets_goal"] for k in LIGHT_KINDS),
    }
    return audit, scores
