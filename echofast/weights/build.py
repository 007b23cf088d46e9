"""Build the shipped demo weights from ``echofast train`` runs, and measure what they do.

Usage (the recipe behind ``echofast/weights/demo``; ``MODEL_CARD.md`` there records the run)::

    python -m echofast.weights.build --runs RUNS --phantom PHANTOM --out echofast/weights/demo

``RUNS`` holds ``vae/``, ``lidm/`` and ``lvdm/`` training folders (``export/`` = the EMA weights,
``train_config.json``, ``log.csv``) and ``PHANTOM`` the phantom dataset they were trained on.
The command

1. copies each export with its floating-point tensors stored in float16 (they load as float32),
2. writes ``demo.json`` (generation defaults for ``echofast generate`` without ``--weights``),
3. generates ``--num-eval`` clips with requested EFs evenly spread over the training range and
   measures each with :func:`echofast.data.measure_ef`: Pearson r and MAE against the request,
4. compares appearance with the phantom data (mean grey level inside / outside the sector fan),
   measures the VAE's reconstruction PSNR on TEST phantom frames,
5. writes ``quality.json`` (every number), ``demo_strip.png`` (frames of generated clips) and
   ``MODEL_CARD.md`` (made from those numbers).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingFileError
from ..fsutil import atomic_write, atomic_write_text
from ..png import write_png

RUNS = {"vae": "vae", "lidm_dynamic": "lidm", "lvdm": "lvdm"}
"""Demo folder name → training run folder name."""

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def export_fp16(src: Path, dst: Path) -> int:
    """Copy a diffusers folder with floating tensors stored as float16, with the noise schedule
    it records (``scheduler_config.json``) if any; returns the weights file's size. The export
    record (``echofast_export.json``) is not copied: the VAE digest it may hold names the
    float32 VAE, which the demo root does not ship."""
    from safetensors.torch import load_file, save_file

    from ..schedulers import CONFIG_NAME

    for name in ("config.json", WEIGHTS_FILE):
        if not (src / name).is_file():
            raise MissingFileError(f"{src}: missing {name} (is the training run exported?)")
    state = load_file(str(src / WEIGHTS_FILE))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    if (src / CONFIG_NAME).is_file():
        shutil.copyfile(src / CONFIG_NAME, dst / CONFIG_NAME)
    atomic_write(dst / WEIGHTS_FILE, lambda tmp: save_file(half, tmp))
    return (dst / WEIGHTS_FILE).stat().st_size


def training_summary(run: Path) -> dict:
    """Steps, batch size, final smoothed loss and wall time of a training run folder."""
    cfg = json.loads((run / "train_config.json").read_text())
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise MissingFileError(f"{run / 'log.csv'}: no logged steps")
    tail = [float(r["loss"]) for r in rows[-10:]]
    return {
        "steps": int(rows[-1]["step"]),
        "batch_size": cfg["train"]["batch_size"],
        "lr": cfg["optim"]["lr"],
        "ema_decay": cfg["ema"]["decay"],
        "final_loss": sum(tail) / len(tail),
        "hours": float(rows[-1]["time"]) / 3600,
        "model_config": cfg["model"]["config"],
    }


def fan_masks(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inside / outside masks of the sector fan from phantom clips (N, T, H, W) uint8: inside =
    bright on average in every clip, outside = black in every clip (a margin is left between)."""
    mean = frames.astype(np.float32).mean(axis=1)
    return (mean > 20).all(axis=0), (mean < 2).all(axis=0)


def appearance(videos: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> dict:
    """Mean grey level inside and outside the fan, and the inside standard deviation."""
    v = videos.astype(np.float32)
    return {
        "mean_inside": float(v[..., inside].mean()),
        "mean_outside": float(v[..., outside].mean()),
        "std_inside": float(v[..., inside].std()),
    }


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def frame_strip(videos: np.ndarray, frames: Sequence[int], gap: int = 2) -> np.ndarray:
    """Rows = videos, columns = the given frame indices, separated by ``gap`` white pixels."""
    n, _, h, w = videos.shape
    out = np.full((n * (h + gap) - gap, len(frames) * (w + gap) - gap), 255, np.uint8)
    for i in range(n):
        for j, t in enumerate(frames):
            out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = videos[i, t]
    return out


def vae_psnr(vae_dir: Path, phantom: Path, every: int = 8) -> float:
    """PSNR (dB) of VAE reconstructions of every ``every``-th frame of the TEST phantom clips."""
    from ..data.echonet import read_filelist
    from ..io import read_video
    from ..models import VAE

    vae = VAE.from_pretrained(vae_dir).eval()
    rows = [r for r in read_filelist(phantom / "FileList.csv") if r["Split"] == "TEST"]
    errors = []
    for row in rows:
        frames, _ = read_video(phantom / "Videos" / f"{row['FileName']}.avi")
        x = torch.as_tensor(np.asarray(frames)[::every]).float()
        x = (x / 128 - 1)[:, None].expand(-1, 3, -1, -1)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.mean(1)
        rec = ((y + 1) * 128).round().clamp(0, 255)
        errors.append(((rec - x[:, 0].add(1).mul(128)) ** 2).mean().item())
    return 10 * math.log10(255**2 / float(np.mean(errors)))


def evaluate(
    root: Path,
    phantom: Path,
    *,
    num_eval: int,
    ef_range: tuple[float, float],
    frames: int,
    fps: float,
    steps: int,
    seed: int,
    batch_size: int,
) -> tuple[dict, np.ndarray]:
    """Generate ``num_eval`` clips and measure EF conditioning and appearance."""
    from ..data import measure_ef
    from ..data.echonet import read_filelist
    from ..io import read_video
    from ..pipelines import EchoSyntheticPipeline

    pipe = EchoSyntheticPipeline.from_pretrained(root, dataset="dynamic")
    requested = np.linspace(*ef_range, num_eval).round(1)
    start = time.perf_counter()
    videos = pipe(
        requested.tolist(),
        seed=seed,
        num_frames=frames,
        num_inference_steps=steps,
        batch_size=batch_size,
        progress=True,
    ).videos.numpy()
    seconds = time.perf_counter() - start
    measured, failed = [], []
    for i, clip in enumerate(videos):
        try:
            measured.append(measure_ef(clip, fps))
        except ValueError as err:
            failed.append({"index": i, "requested": float(requested[i]), "error": str(err)})
            measured.append(float("nan"))
    ok = [i for i, m in enumerate(measured) if math.isfinite(m)]
    req_ok = [float(requested[i]) for i in ok]
    meas_ok = [measured[i] for i in ok]
    rows = read_filelist(phantom / "FileList.csv")
    real = np.stack(
        [
            np.asarray(read_video(phantom / "Videos" / f"{r['FileName']}.avi")[0])[:frames]
            for r in rows
            if r["Split"] == "TEST"
        ]
    )
    inside, outside = fan_masks(real)
    result = {
        "num_clips": num_eval,
        "requested_ef": requested.tolist(),
        "measured_ef": measured,
        "measure_failures": failed,
        "pearson_r": pearson(req_ok, meas_ok) if len(ok) > 2 else float("nan"),
        "mae": float(np.mean(np.abs(np.subtract(req_ok, meas_ok)))) if ok else float("nan"),
        "mean_error": float(np.mean(np.subtract(meas_ok, req_ok))) if ok else float("nan"),
        "generation_seconds": seconds,
        "settings": {"frames": frames, "fps": fps, "steps": steps, "seed": seed},
        "appearance_generated": appearance(videos, inside, outside),
        "appearance_phantom_test": appearance(real, inside, outside),
        "fan_pixels": {"inside": int(inside.sum()), "outside": int(outside.sum())},
    }
    return result, videos


def model_card(quality: dict) -> str:
    """MODEL_CARD.md text from the measured numbers."""
    t, ev, d = quality["training"], quality["ef_conditioning"], quality["data"]
    g, p = ev["appearance_generated"], ev["appearance_phantom_test"]
    sizes = quality["file_bytes"]
    lines = [
        "# echofast demo weights",
        "",
        "Small VAE, LIDM and LVDM with EchoNet-Synthetic's architectures, trained by "
        "`echofast train` on CPU on procedural phantom echoes (`echofast phantom`). They make "
        "`echofast generate` run out of the box on a CPU in minutes. They are **not** "
        "EchoNet-Synthetic's published weights and have never seen a real echocardiogram: "
        "their outputs look like phantoms, not patients.",
        "",
        "## Data",
        f"`echofast phantom --num-videos {d['num_videos']} --frames {d['frames'][0]} "
        f"--fps {d['fps'][0]:g} --hr-range {d['hr_range'][0]:g} {d['hr_range'][1]:g}` "
        f"(seed {d['seed']}; EF uniform in {d['ef_range'][0]:g}–{d['ef_range'][1]:g} %; splits "
        f"TRAIN/VAL/TEST {d['splits']}), 112×112 grey, then `echofast encode` with the demo VAE. "
        "Trained on TRAIN only.",
        "",
        "## Models and training",
        "| folder | weights (fp16) | steps × batch | final training loss | CPU hours | config |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in RUNS.items():
        s = t[run]
        cfg = ", ".join(f"{k}={v}" for k, v in s["model_config"].items() if k != "_class_name")
        lines.append(
            f"| `{name}` | {sizes[name] / 1e6:.2f} MB | {s['steps']} × {s['batch_size']} | "
            f"{s['final_loss']:.4f} | {s['hours']:.2f} | {cfg} |"
        )
    lines += [
        "",
        "Training configs: `train_vae.json`, `train_lidm.json`, `train_lvdm.json` next to this "
        "card (learning rate, warm-up, EMA decay; the EMA weights are shipped). The VAE's "
        f"`scaling_factor` is 1/std of its TRAIN latents ({quality['scaling_factor']:.4f}).",
        "",
        "## Measured quality",
        "- VAE reconstruction of TEST phantom frames (every 8th): "
        f"PSNR {quality['vae_psnr']:.1f} dB.",
        f"- EF conditioning: {ev['num_clips']} clips generated with requested EF evenly spread "
        f"over {min(ev['requested_ef']):g}–{max(ev['requested_ef']):g} % "
        f"({ev['settings']['frames']} frames at {ev['settings']['fps']:g} fps, "
        f"{ev['settings']['steps']} steps of the reference DDPM sampler, seed "
        f"{ev['settings']['seed']}); "
        "`echofast.data.measure_ef` on each generated clip vs the requested EF: "
        f"**Pearson r = {ev['pearson_r']:.3f}, MAE = {ev['mae']:.1f} EF points** "
        f"(mean error {ev['mean_error']:+.1f}; {len(ev['measure_failures'])} clip(s) where the "
        "cavity could not be segmented). On the phantoms themselves `measure_ef` has MAE 0.8.",
        f"- Appearance (mean grey level, fan interior / outside the fan; interior std): "
        f"generated {g['mean_inside']:.1f} / {g['mean_outside']:.1f}; {g['std_inside']:.1f} — "
        f"phantom TEST clips {p['mean_inside']:.1f} / {p['mean_outside']:.1f}; "
        f"{p['std_inside']:.1f}.",
        f"- Generating those {ev['num_clips']} clips took {ev['generation_seconds']:.0f} s on "
        f"this build machine's CPU ({quality['machine']}).",
        "",
        "`demo_strip.png`: rows = generated clips with requested EF "
        + ", ".join(f"{e:g}" for e in quality["strip"]["ef"])
        + " %; columns = frames "
        + ", ".join(str(f) for f in quality["strip"]["frames"])
        + ". Every number here is in `quality.json`, written by "
        "`python -m echofast.weights.build`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m echofast.weights.build", description=__doc__)
    p.add_argument("--runs", required=True, type=Path)
    p.add_argument("--phantom", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-eval", type=int, default=32)
    p.add_argument("--ef-range", type=float, nargs=2, default=(15.0, 85.0))
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--measure-only", action="store_true", help="reuse the exported weights")
    a = p.parse_args(argv)
    out: Path = a.out
    sizes = {}
    for name, run in RUNS.items():
        if not a.measure_only:
            export_fp16(a.runs / run / "export", out / name)
            shutil.copyfile(a.runs / run / "train_config.json", out / f"train_{run}.json")
        sizes[name] = (out / name / WEIGHTS_FILE).stat().st_size
    phantom_meta = json.loads((a.phantom / "phantom.json").read_text())
    data = phantom_meta["arguments"]
    if data["fps"][0] != data["fps"][1]:
        raise ValueError(f"{a.phantom}: the demo expects one phantom fps, got {data['fps']}")
    fps = float(data["fps"][0])
    defaults = {"num_videos": 8, "frames": a.frames, "fps": fps, "steps": a.steps, "batch_size": 8}
    atomic_write_text(out / "demo.json", json.dumps({"generate": defaults}, indent=2) + "\n")
    ev, videos = evaluate(
        out,
        a.phantom,
        num_eval=a.num_eval,
        ef_range=tuple(a.ef_range),
        frames=a.frames,
        fps=fps,
        steps=a.steps,
        seed=a.seed,
        batch_size=a.batch_size,
    )
    rows = np.linspace(0, a.num_eval - 1, 4).round().astype(int)
    cols = list(range(0, min(a.frames, 16), 2))
    write_png(out / "demo_strip.png", frame_strip(videos[rows], cols))
    import platform

    quality = {
        "training": {run: training_summary(a.runs / run) for run in RUNS.values()},
        "data": data,
        "scaling_factor": json.loads((out / "vae" / "config.json").read_text())["scaling_factor"],
        "vae_psnr": vae_psnr(out / "vae", a.phantom),
        "ef_conditioning": ev,
        "file_bytes": sizes,
        "strip": {"ef": [ev["requested_ef"][i] for i in rows], "frames": cols},
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
    }
    atomic_write_text(out / "quality.json", json.dumps(quality, indent=2) + "\n")
    atomic_write_text(out / "MODEL_CARD.md", model_card(quality))
    print(
        f"{out}: r = {ev['pearson_r']:.3f}, MAE = {ev['mae']:.2f}, "
        f"failures = {len(ev['measure_failures'])}, total {sum(sizes.values()) / 1e6:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
