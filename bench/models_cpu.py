"""echofast vs diffusers forward on CPU, fp32, same weights and inputs, alternating in one process.

    python bench/models_cpu.py [--models vae_decode,vae_encode,lidm,lvdm] [--repeats 7]
                               [--frames 16] [--attention auto|sdpa|torch] [--layout cl|nchw]
                               [--csv bench/results/models_cpu.csv]

Full EchoNet-Synthetic configs with random weights. Each round times diffusers then echofast (the
order alternates between rounds); the reported number is the median over rounds of the per-round
ratio diffusers_time / echofast_time (> 1 means echofast is faster). CPU timings on shared machines
are noisy: compare ratios, not absolute times. ``--attention`` forces echofast's attention backend
(default: automatic, i.e. sdpa on CPU); ``--layout nchw`` runs echofast's models in NCHW
(``use_channels_last(False)``) instead of the default channels-last.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from benchutil import append_csv, git_sha

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.configs import LIDM_FULL_CONFIG, VAE_FULL_CONFIG  # noqa: E402
from support.models import build_diffusers  # noqa: E402


@dataclass
class Case:
    name: str
    shape: str
    reference: Callable[[], torch.Tensor]
    candidate: Callable[[], torch.Tensor]


def _pair(diffusers_cls, ours_cls, config, layout="cl"):
    ref = build_diffusers(diffusers_cls, config)
    ours = ours_cls.from_config(config).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours.use_channels_last(layout == "cl")


def _decode(model, z):
    return model.decode(z).sample


def _encode(model, x):
    return model.encode(x).latent_dist.mean


def _unet(model, sample, **kwargs):
    return model(sample, 500, **kwargs).sample


def make_cases(names: list[str], batch: int, frames: int, layout: str = "cl") -> list[Case]:
    from diffusers import AutoencoderKL, UNet2DModel

    from echofast.models import LIDM, VAE

    g = torch.Generator().manual_seed(0)
    cases = []
    if {"vae_decode", "vae_encode"} & set(names):
        ref, ours = _pair(AutoencoderKL, VAE, VAE_FULL_CONFIG, layout)
        z = torch.randn(batch, 4, 14, 14, generator=g)
        x = torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1
        if "vae_decode" in names:
            cases.append(
                Case(
                    "vae_decode",
                    f"z {tuple(z.shape)}",
                    partial(_decode, ref, z),
                    partial(_decode, ours, z),
                )
            )
        if "vae_encode" in names:
            cases.append(
                Case(
                    "vae_encode",
                    f"x {tuple(x.shape)}",
                    partial(_encode, ref, x),
                    partial(_encode, ours, x),
                )
            )
    if "lidm" in names:
        ref, ours = _pair(UNet2DModel, LIDM, LIDM_FULL_CONFIG, layout)
        s = torch.randn(batch, 4, 16, 16, generator=g)
        cases.append(
            Case(
                "lidm",
                f"sample {tuple(s.shape)}, t=500",
                partial(_unet, ref, s),
                partial(_unet, ours, s),
            )
        )
    if "lvdm" in names:
        from diffusers import UNetSpatioTemporalConditionModel
        from support.configs import LVDM_FULL_CONFIG

        from echofast.models import LVDM

        ref, ours = _pair(UNetSpatioTemporalConditionModel, LVDM, LVDM_FULL_CONFIG, layout)
        s = torch.randn(1, frames, 8, 16, 16, generator=g)
        ehs = torch.rand(1, 1, 1, generator=g)
        ids = torch.zeros(1, 1)
        kw = {"encoder_hidden_states": ehs, "added_time_ids": ids}
        cases.append(
            Case(
                "lvdm",
                f"sample {tuple(s.shape)}, t=500",
                partial(_unet, ref, s, **kw),
                partial(_unet, ours, s, **kw),
            )
        )
    return cases


def _timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(case: Case, repeats: int, attention: str = "auto") -> dict:
    from echofast.ops import use_backend

    forced = contextlib.nullcontext() if attention == "auto" else use_backend(attention=attention)
    with torch.no_grad(), forced:
        a, b = case.reference(), case.candidate()
        err = ((a - b).abs().max() / a.abs().max()).item()
        ref_t, ours_t, ratios = [], [], []
        for i in range(repeats):
            if i % 2:
                o, r = _timed(case.candidate), _timed(case.reference)
            else:
                r, o = _timed(case.reference), _timed(case.candidate)
            ref_t.append(r)
            ours_t.append(o)
            ratios.append(r / o)
    return {
        "model": case.name,
        "shape": case.shape,
        "repeats": repeats,
        "diffusers_median_s": statistics.median(ref_t),
        "echofast_median_s": statistics.median(ours_t),
        "median_ratio": statistics.median(ratios),
        "max_rel_diff": err,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vae_decode,vae_encode,lidm,lvdm")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16, help="LVDM window length T")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--attention", default="auto", help="echofast attention backend (auto, sdpa, torch, ...)"
    )
    parser.add_argument(
        "--layout",
        choices=("cl", "nchw"),
        default="cl",
        help="echofast's activation layout: channels-last (the default) or NCHW",
    )
    parser.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows = []
    for case in make_cases(names, args.batch, args.frames, args.layout):
        row = run_case(case, args.repeats, args.attention)
        if args.attention != "auto":
            row["shape"] += f", attention={args.attention}"
        if args.layout != "cl":
            row["shape"] += f", layout={args.layout}"
        row.update(
            device=f"cpu: {platform.processor() or platform.machine()}",
            threads=args.threads,
            torch=torch.__version__,
            git_sha=git_sha(),
        )
        rows.append(row)
        print(
            f"{row['model']:<11} {row['shape']:<34} diffusers {row['diffusers_median_s']:.3f}s "
            f"echofast {row['echofast_median_s']:.3f}s  ratio {row['median_ratio']:.3f}  "
            f"max rel diff {row['max_rel_diff']:.1e}",
            flush=True,
        )
    if args.csv:
        append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
