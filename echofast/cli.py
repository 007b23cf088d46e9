"""The ``echofast`` command. Subcommands are thin: they parse arguments and call the library."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from .errors import EchofastError

Command = Callable[[list[str]], int]


def _info(argv: list[str]) -> int:
    from .info import main

    return main(argv)


_WEIGHTS_DEFAULTS = {"fps": 32.0, "batch_size": 8, "steps": 64}
"""Generation defaults with user weights (the reference's; frames: the reference dataset's, see
``echofast.data.REFERENCE_FRAMES``); the demo weights bring their own."""


def _defaults_help(key: str) -> str:
    ref = "192, or 128 for ped_*" if key == "frames" else _WEIGHTS_DEFAULTS.get(key)
    return ("with --weights: " + str(ref) + "; " if ref is not None else "") + "demo: see demo.json"


def frame_rate(text: str) -> float:
    """``--fps``: a number (29.97) or a ratio ``N/D`` (30000/1001)."""
    import argparse
    from fractions import Fraction

    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or a ratio N/D: {text!r}") from None


def resolve_dtype(dtype: str, device: str) -> str:
    """``--dtype auto``: float16 on a CUDA device, float32 elsewhere; other values unchanged."""
    import torch

    if dtype != "auto":
        return dtype
    return "float16" if torch.device(device).type == "cuda" else "float32"


def _generate(argv: list[str]) -> int:
    import argparse
    import math

    import torch

    from .data.echonet import splits_argument
    from .pipelines.dataset import (
        GenerateConfig,
        Shard,
        check_device,
        ef_bounds,
        generate_dataset,
        recorded_batch_size,
    )

    p = argparse.ArgumentParser(
        prog="echofast generate",
        description="Generate a synthetic EchoNet-Dynamic-layout dataset (resumable: re-run the "
        "same command after an interruption).",
    )
    p.add_argument(
        "--weights",
        help="weights root with vae/, lidm_<dataset>/ and lvdm/ (diffusers folders); default: the "
        "demo models shipped with echofast (trained on phantom echoes, see MODEL_CARD.md)",
    )
    p.add_argument(
        "--no-vae-check",
        dest="check_vae",
        action="store_false",
        help="load UNets whose exports (echofast_export.json) record training latents of another "
        "VAE than the root's vae/ (e.g. the same weights saved in another format); refused by "
        "default",
    )
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument(
        "--dataset",
        default="dynamic",
        choices=["dynamic", "ped_a4c", "ped_psax"],
        help="which LIDM (lidm_<dataset>/) draws the hearts; also the default --frames and the "
        "reference split proportions (default dynamic)",
    )
    p.add_argument(
        "--num-videos",
        type=int,
        help="videos in the dataset (required with --weights; without: see demo.json)",
    )
    p.add_argument(
        "--frames", type=int, help=f"frames per video (default {_defaults_help('frames')})"
    )
    p.add_argument(
        "--fps",
        type=frame_rate,
        help=f"frame rate in AVI and CSV, a number or a ratio such as 30000/1001 "
        f"({_defaults_help('fps')})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="videos per UNet batch (default: the one --out records, else "
        f"{_defaults_help('batch_size')}); every shard of a sharded job uses the same",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="job seed: each video's noise and EF derive from (seed, its index) alone (default 0)",
    )
    p.add_argument(
        "--splits",
        type=splits_argument,
        metavar="TRAIN,VAL,TEST",
        help="TRAIN,VAL,TEST counts (default: the reference's proportions)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--ef-range",
        type=float,
        nargs=2,
        default=(10, 90),
        metavar=("LO", "HI"),
        help="requested EF drawn as a uniform integer in [LO, HI] (default 10 90)",
    )
    group.add_argument("--ef-from", help="draw requested EFs from this FileList.csv's EF column")
    p.add_argument("--steps", type=int, help=f"denoising steps ({_defaults_help('steps')})")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="UNet sampling precision: auto = float16 on CUDA (fp16 autocast, as the reference "
        "samples; fp32 weights and statistics), float32 elsewhere (default auto)",
    )
    p.add_argument(
        "--shard",
        help="i/N: generate the chunks c of --batch-size consecutive samples with c %% N == i "
        "(default: torchrun's RANK/WORLD_SIZE, else all); a value starting with '-' needs "
        "--shard=VALUE",
    )
    p.add_argument(
        "--name-prefix",
        default="synthetic_",
        help="FileName of video i: <prefix><i, 6 digits> (default synthetic_)",
    )
    p.add_argument(
        "--decode-dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="VAE decode precision (float32; reduced precision changes pixels by about one level, "
        "see README)",
    )
    p.add_argument(
        "--cuda-graphs",
        default="auto",
        choices=["auto", "on", "off"],
        help="replay UNet calls as CUDA graphs: auto = when supported (default), on = required "
        "(fails with the reasons), off = eager; same outputs",
    )
    p.add_argument(
        "--writer-threads",
        type=int,
        default=1,
        metavar="N",
        help="threads that encode and write videos while the next batch is generated (default "
        "1; 0: write inline in the generating thread, same files)",
    )
    p.add_argument("--no-progress", action="store_true")
    priv = p.add_argument_group(
        "privacy",
        "filter near copies of real patients (see README, Privacy); without --privacy the "
        "dataset's privacy_report.json says it is NOT privacy-filtered",
    )
    priv.add_argument("--privacy", metavar="DIR", help="re-identification model folder")
    priv.add_argument(
        "--reference-latents",
        metavar="LATENTS",
        help="the real training data encoded with these weights' VAE (echofast encode)",
    )
    priv.add_argument(
        "--oversample",
        type=float,
        default=2.0,
        help="LIDM candidates per requested video (2)",
    )
    priv.add_argument(
        "--auc-threshold",
        type=float,
        default=0.9,
        help="refuse a re-identification model whose test AUC is below this (0.9)",
    )
    priv.add_argument(
        "--allow-weak-privacy",
        action="store_true",
        help="run with a model below --auc-threshold (recorded in the report)",
    )
    priv.add_argument("--privacy-percentile", type=float, default=95.0, help="tau percentile (95)")
    priv.add_argument(
        "--privacy-frame-step",
        type=int,
        default=8,
        help="reference frames per real clip and re-encoded frames per generated video: every "
        "k-th (8); 0 = frame 0 only",
    )
    priv.add_argument(
        "--privacy-normalization",
        choices=["frame", "clip", "channel"],
        help="override the re-identification model's input normalisation",
    )
    priv.add_argument(
        "--privacy-shift-tolerance",
        type=int,
        default=0,
        metavar="R",
        help="also match frames moved by up to R latent pixels (0 = exact, the reference)",
    )
    priv.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickled weights (weights_only=True): a reidentification_*_best_network.pth, "
        "and model folders holding a .bin instead of safetensors",
    )
    a = p.parse_args(argv)
    if (a.privacy is None) != (a.reference_latents is None):
        p.error("--privacy and --reference-latents go together")
    if a.weights is None:
        from .weights import DEMO_DATASET, demo_defaults, demo_root

        if a.dataset != DEMO_DATASET:
            p.error(f"the demo weights cover --dataset {DEMO_DATASET} only; pass --weights")
        a.weights, defaults = str(demo_root()), demo_defaults()
    else:
        from .data import REFERENCE_FRAMES

        defaults = dict(_WEIGHTS_DEFAULTS, frames=REFERENCE_FRAMES[a.dataset])
        if a.num_videos is None:
            p.error("--num-videos is required with --weights")
    if a.batch_size is None:
        a.batch_size = recorded_batch_size(a.out)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.num_videos < 1 or a.frames < 1 or a.batch_size < 1 or a.steps < 1:
        p.error("--num-videos, --frames, --batch-size, --steps must be >= 1")
    if not math.isfinite(a.fps) or a.fps <= 0:
        p.error(f"--fps must be a finite number > 0, got {a.fps}")
    try:
        ef_bounds(a.ef_range)
    except ValueError as err:
        p.error(str(err))
    check_device(a.device)
    if a.writer_threads < 0:
        p.error("--writer-threads must be >= 0")
    cfg = GenerateConfig(
        weights=a.weights,
        out=a.out,
        num_videos=a.num_videos,
        dataset=a.dataset,
        frames=a.frames,
        fps=a.fps,
        seed=a.seed,
        splits=a.splits,
        ef_range=tuple(a.ef_range),
        ef_from=a.ef_from,
        steps=a.steps,
        dtype=resolve_dtype(a.dtype, a.device),
        name_prefix=a.name_prefix,
        batch_size=a.batch_size,
        device=a.device,
        shard=Shard.parse(a.shard),
        progress=not a.no_progress,
        privacy=a.privacy,
        reference_latents=a.reference_latents,
        oversample=a.oversample,
        auc_threshold=a.auc_threshold,
        allow_weak_privacy=a.allow_weak_privacy,
        privacy_percentile=a.privacy_percentile,
        privacy_frame_step=a.privacy_frame_step,
        privacy_normalization=a.privacy_normalization,
        privacy_shift_tolerance=a.privacy_shift_tolerance,
        allow_pickle=a.allow_pickle,
        check_vae=a.check_vae,
        decode_dtype=a.decode_dtype,
        cuda_graphs={"auto": None, "on": True, "off": False}[a.cuda_graphs],
        writer_threads=a.writer_threads,
    )
    summary = generate_dataset(cfg)
    rate = summary["generated"] / summary["seconds"] if summary["seconds"] else 0.0
    print(
        f"{summary['folder']}: generated {summary['generated']} video(s) in "
        f"{summary['seconds']:.1f} s ({rate:.2f} videos/s); {summary['already_done']} were "
        f"already done; dataset holds {summary['in_dataset']} of {summary['expected']}"
        + ("" if summary["complete"] else " (other shards pending)")
    )
    if "privacy" in summary:
        pr = summary["privacy"]
        print(
            f"privacy: {pr['status']}; tau {pr['tau']:.5f}, re-id test AUC {pr['test_auc']:.4f}; "
            f"{pr['kept']} of {pr['candidates']} candidates kept, {pr['dropped_video_level']} "
            f"of {pr['video_attempts']} videos dropped by the video check"
        )
    else:
        print("privacy: NOT privacy-filtered (no --privacy); see privacy_report.json")
    return 0


def _privacy_filter(argv: list[str]) -> int:
    from .privacy.cli import main_privacy_filter

    return main_privacy_filter(argv)


def _privacy_audit(argv: list[str]) -> int:
    from .privacy.cli import main_privacy_audit

    return main_privacy_audit(argv)


def _merge(argv: list[str]) -> int:
    import argparse

    from .pipelines.dataset import merge_datasets

    p = argparse.ArgumentParser(
        prog="echofast merge", description="Combine shard folders of one generation job."
    )
    p.add_argument("--out", required=True)
    p.add_argument("shards", nargs="+")
    a = p.parse_args(argv)
    summary = merge_datasets(a.out, a.shards)
    print(
        f"{summary['folder']}: {summary['in_dataset']} of {summary['expected']} videos"
        + ("" if summary["complete"] else " (incomplete: shards missing)")
    )
    return 0 if summary["complete"] else 1


def _phantom(argv: list[str]) -> int:
    from .data.phantom import main_phantom

    return main_phantom(argv)


def _encode(argv: list[str]) -> int:
    from .data.encode import main_encode

    return main_encode(argv)


def _train(argv: list[str]) -> int:
    from .train import main_train

    return main_train(argv)


def _metrics(argv: list[str]) -> int:
    from .eval.fidelity import main_metrics

    return main_metrics(argv)


def _evaluate(argv: list[str]) -> int:
    from .eval.downstream import main_evaluate

    return main_evaluate(argv)


def _report(argv: list[str]) -> int:
    from .eval.report import main_report

    return main_report(argv)


def _bench(argv: list[str]) -> int:
    from .benchmark import main_bench

    return main_bench(argv)


COMMANDS: dict[str, tuple[Command, str]] = {
    "info": (_info, "versions, the compiled extension, and which backend each op uses"),
    "generate": (_generate, "generate a synthetic dataset (EchoNet-Dynamic layout), resumably"),
    "merge": (_merge, "combine shard folders of one generation job into one dataset"),
    "phantom": (
        _phantom,
        "write procedural phantom echo videos with ground truth (EchoNet layout)",
    ),
    "encode": (_encode, "encode a video dataset into VAE latents (one safetensors file per video)"),
    "train": (_train, "train the VAE, LIDM, LVDM or re-id model from a config (torchrun: DDP)"),
    "privacy-filter": (
        _privacy_filter,
        "keep candidate latents that are not near copies of real training frames",
    ),
    "privacy-audit": (
        _privacy_audit,
        "measure the privacy filter: planted copies caught, held-out real frames flagged",
    ),
    "metrics": (_metrics, "FID / IS / FVD16 / FVD128 on the reference protocol (no downloads)"),
    "evaluate": (
        _evaluate,
        "downstream EF regression: R(2+1)D trained on one dataset, tested on another",
    ),
    "report": (_report, "one Markdown/HTML page: manifest, privacy, metrics, downstream results"),
    "bench": (_bench, "generation speed vs the reference's way and compiled diffusers (CSV rows)"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: echofast <command> [options]   (echofast --version)\n\ncommands:\n{rows}\n"


def _one_line_warnings(name: str):
    """``warnings.showwarning`` for the command line: ``echofast NAME: warning: message`` on
    stderr (not Python's file, line number and source line)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"echofast {name}: warning: {message}", file=sys.stderr)

    return show


def error_text(err: BaseException) -> str:
    """``err``'s message; for an error raised in a DataLoader worker process, which torch
    re-raises here with the worker's whole traceback as its message, the original message."""
    text = str(err)
    cls = type(err)
    if not text.startswith(f"Caught {cls.__name__} in DataLoader worker process"):
        return text
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    at = text.rfind(f"\n{name}: ")
    return text[at + len(name) + 3 :].rstrip("\n") if at >= 0 else text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"echofast {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"echofast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(name)
            return COMMANDS[name][0](rest)
    except (EchofastError, ValueError, OSError) as err:
        print(f"echofast {name}: error: {type(err).__name__}: {error_text(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"echofast {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
