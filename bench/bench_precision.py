"""Reduced-precision sampling vs fp32: latent error and non-finite videos (issue 9's quality goal).

    python bench/bench_precision.py [--weights ROOT] [--num-videos 100] [--frames 64]
        [--steps 64] [--batch-size 8] [--dtypes float16,bfloat16] [--device cuda]
        [--csv bench/results/precision_<card>.csv]

The LIDM draws the conditioning images once in fp32; the LVDM then animates every image with
the same per-sample seeds in fp32 and in each reduced precision (UNet under autocast, fp32
weights and statistics). Per video: the relative L2 error of its latents against the fp32 ones,
‖x_d − x_32‖ / ‖x_32‖; a video whose latents go non-finite (the pipeline's NonFiniteError) is
counted and left out of the error. Default weights: the demo weights shipped with echofast.
Diffusion sampling amplifies rounding differences along the trajectory, so the error is a
statement about how far reduced-precision samples drift, not a kernel accuracy.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchutil import append_csv, git_sha

from echofast.errors import NonFiniteError
from echofast.pipelines import EchoSyntheticPipeline


def _card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _animate(pipe, images, efs, indices, args, dtype) -> tuple[torch.Tensor | None, bool]:
    try:
        out = pipe.lvdm_pipe(
            images,
            efs,
            num_frames=args.frames,
            seed=args.seed,
            sample_indices=indices,
            num_inference_steps=args.steps,
            batch_size=len(indices),
            output_type="latent",
            dtype=dtype,
            progress=False,
        )
    except NonFiniteError:
        return None, False
    return out.latents.float().cpu(), True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="weights root (default: echofast's demo weights)")
    p.add_argument("--num-videos", type=int, default=100)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", type=Path)
    a = p.parse_args(argv)
    if a.weights is None:
        from echofast.weights import demo_root

        a.weights = str(demo_root())
    device = torch.device(a.device)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if device.type != "cuda" and set(dtypes) - {"float32"}:
        p.error(
            f"reduced-precision sampling needs a CUDA device (got {device}); on a CPU only "
            "--dtypes float32 runs (a smoke test of this script: errors ~1e-7, batch-size rounding)"
        )
    pipe = EchoSyntheticPipeline.from_pretrained(a.weights, dataset="dynamic", device=device)
    errors: dict[str, list[float]] = {d: [] for d in dtypes}
    nonfinite = {d: 0 for d in ["float32", *dtypes]}
    t0 = time.perf_counter()
    for s in range(0, a.num_videos, a.batch_size):
        idx = list(range(s, min(s + a.batch_size, a.num_videos)))
        images = pipe.lidm_pipe(
            len(idx), seed=a.seed, sample_indices=idx, num_inference_steps=a.steps, progress=False
        ).latents
        efs = [10.0 + 80.0 * ((i * 0.618) % 1.0) for i in idx]
        ref, ok = _animate(pipe, images, efs, idx, a, "float32")
        if not ok:
            nonfinite["float32"] += len(idx)
            continue
        for d in dtypes:
            for i, k in enumerate(idx):  # one video per call: a non-finite video is counted alone
                x, ok = _animate(pipe, images[i : i + 1], efs[i : i + 1], [k], a, d)
                if not ok:
                    nonfinite[d] += 1
                    continue
                errors[d].append(float((x[0] - ref[i]).norm() / ref[i].norm()))
        print(f"{idx[-1] + 1}/{a.num_videos} videos, {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for d in dtypes:
        e = np.asarray(errors[d])
        row = {
            "card": _card(device),
            "weights": Path(a.weights).name,
            "frames": a.frames,
            "steps": a.steps,
            "videos": a.num_videos,
            "dtype": d,
            "nonfinite": nonfinite[d],
            "nonfinite_fp32": nonfinite["float32"],
            "rel_err_median": float(np.median(e)) if len(e) else "",
            "rel_err_p95": float(np.percentile(e, 95)) if len(e) else "",
            "rel_err_max": float(e.max()) if len(e) else "",
            "torch": torch.__version__,
            "git": git_sha(),
        }
        rows.append(row)
        print(
            f"{d}: {nonfinite[d]} non-finite of {a.num_videos}; latent rel. error vs fp32 "
            f"median {row['rel_err_median']}, p95 {row['rel_err_p95']}, max {row['rel_err_max']}"
        )
    if a.csv is not None:
        append_csv(a.csv, rows)
    return 1 if any(nonfinite.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
