"""Trainers for EchoNet-Synthetic's VAE, LIDM and LVDM: ``echofast train ...``.

Usage::

    echofast train lidm --config lidm.toml                 # start (or --resume to continue)
    echofast train lidm --config lidm.toml --resume        # newest checkpoint of output_dir
    echofast train lvdm --config lvdm.toml --set train.max_steps=1000 --set seed=1
    torchrun --nproc_per_node 8 -m echofast train lvdm --config lvdm.toml   # DDP
    echofast train export --checkpoint runs/lidm/checkpoints/step-00500000.pt --out lidm_dynamic
                                                           # [--overwrite another model folder]
    echofast train reid --config reid.toml [--resume]      # privacy re-identification model

The config schema and the reference defaults are in :mod:`echofast.train.config`; examples are
in ``echofast/train/configs/``. The loop (data order, checkpoints, DDP) is described in
:mod:`echofast.train.loop`, the losses in :mod:`echofast.train.objectives`.
"""

from __future__ import annotations

from ..models.provenance import read_export_info
from .config import (
    MODEL_TYPES,
    REFERENCE_ARCHITECTURES,
    TrainConfig,
    config_from_dict,
    default_config,
    load_config,
)
from .ema import EMA, ema_decay
from .loop import (
    StreamBatchSampler,
    TrainingConflict,
    export_checkpoint,
    list_checkpoints,
    load_checkpoint,
    train,
    write_loss_plot,
)

__all__ = [
    "EMA",
    "MODEL_TYPES",
    "REFERENCE_ARCHITECTURES",
    "StreamBatchSampler",
    "TrainConfig",
    "TrainingConflict",
    "config_from_dict",
    "default_config",
    "ema_decay",
    "export_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "main_train",
    "read_export_info",
    "train",
    "write_loss_plot",
]


def main_train(argv: list[str]) -> int:
    """``echofast train {vae,lidm,lvdm,reid} --config FILE`` and ``echofast train export``."""
    import argparse
    import os

    if argv and argv[0] == "reid":
        from .reid import main_train_reid

        return main_train_reid(argv[1:])

    p = argparse.ArgumentParser(
        prog="echofast train",
        description="Train EchoNet-Synthetic's models with the reference recipes (resumable, "
        "multi-GPU with torchrun), or export a checkpoint's EMA weights as a diffusers folder.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{vae,lidm,lvdm,reid,export}")
    sub.add_parser(
        "reid", help="train the privacy filter's re-identification model (see: train reid -h)"
    )
    for kind in MODEL_TYPES:
        s = sub.add_parser(kind, help=f"train the {kind.upper()}")
        s.add_argument(
            "--config",
            required=True,
            help="TOML, JSON or YAML config file, or a packaged config by name (lidm, lvdm, "
            "vae, reid, reid_phantom)",
        )
        s.add_argument(
            "--resume",
            nargs="?",
            const="latest",
            metavar="CKPT",
            help="continue from CKPT (default: the newest checkpoint in output_dir)",
        )
        s.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key (value in TOML syntax), e.g. train.max_steps=100",
        )
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("export", help="write a checkpoint's weights as a diffusers folder")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True)
    e.add_argument(
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="ema (released weights; the default) or the raw trained weights",
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace another model folder at --out (an export of the same model is always "
        "replaced; a folder that is not a model folder never is)",
    )
    a = p.parse_args(argv)

    if a.command == "export":
        folder = export_checkpoint(a.checkpoint, a.out, weights=a.weights, overwrite=a.overwrite)
        info = read_export_info(folder)
        written = info["weights"] if info else a.weights
        note = " (the run had no EMA)" if written != a.weights else ""
        print(f"{folder}: wrote {written} weights of {a.checkpoint}{note}")
        return 0

    flags = ["train.progress=false"] if a.no_progress else []
    cfg = load_config(a.config, a.command, a.set, flags=flags)
    summary = train(cfg, resume=a.resume)
    if int(os.environ.get("RANK", "0")) == 0 and summary["steps_trained"] == 0:
        print(
            f"{cfg.output_dir}: already at step {summary['step']} = train.max_steps; nothing "
            f"trained (raise train.max_steps to continue); checkpoint {summary['checkpoint']}"
            + (f"; released weights in {summary['export']}" if "export" in summary else "")
        )
    elif int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{cfg.output_dir}: step {summary['step']}, loss {summary['loss']:.5g} "
            f"(global batch {summary['global_batch']} on {summary['world_size']} rank(s)); "
            f"checkpoint {summary['checkpoint']}"
            + (f"; released weights in {summary['export']}" if "export" in summary else "")
        )
    return 0
