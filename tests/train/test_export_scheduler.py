"""The export records the training noise schedule (``scheduler_config.json`` in the model
folder), and the pipelines built from the folder sample with it: a model trained with epsilon
prediction is sampled as diffusers' DDPMScheduler of its training config samples it."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from support.weights import TINY_LIDM

from echofast.errors import WeightsError
from echofast.pipelines import LIDMPipeline
from echofast.schedulers import CONFIG_NAME, DDIMScheduler
from echofast.train import (
    config_from_dict,
    load_checkpoint,
    main_train,
    read_export_info,
    train,
)
from echofast.train.loop import export_checkpoint, list_checkpoints

SCHEDULE = {"prediction_type": "epsilon", "beta_schedule": "scaled_linear", "beta_end": 0.012}
STEPS = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step LIDM run trained with :data:`SCHEDULE`, exported at its end."""
    out = tmp_path_factory.mktemp("run")
    cfg = config_from_dict(
        {
            "model": {"type": "lidm", "config": TINY_LIDM},
            "output_dir": str(out),
            "data": {"source": "random", "num_workers": 0, "random_items": 4},
            "train": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 1, "progress": False},
            "diffusion": {"scheduler": SCHEDULE},
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/train/conftest.py, which a module fixture precedes
    try:
        with torch.random.fork_rng():
            summary = train(cfg)
    finally:
        torch.set_num_threads(threads)
    return cfg, out, summary


def test_export_records_the_training_schedule(run, tmp_path):
    cfg, out, summary = run
    export = out / "export"
    assert summary["export"] == str(export)
    recorded = json.loads((export / CONFIG_NAME).read_text())
    assert recorded["_class_name"] == "DDPMScheduler"
    trained = cfg.noise_scheduler()
    assert {k: recorded[k] for k in trained.config} == dict(trained.config)
    assert recorded["prediction_type"] == "epsilon"
    # diffusers' model loading ignores the file; its scheduler loading reads the training config
    diffusers.UNet2DModel.from_pretrained(export)
    theirs = diffusers.DDPMScheduler.from_pretrained(export).config
    want = diffusers.DDPMScheduler(**cfg.scheduler_config()).config
    assert {k: theirs[k] for k in want if not k.startswith("_")} == {
        k: v for k, v in want.items() if not k.startswith("_")
    }
    # an export of the same model replaces the folder, its scheduler_config.json included
    ckpt = list_checkpoints(out)[-1][1]
    assert export_checkpoint(ckpt, export) == export
    assert json.loads((export / CONFIG_NAME).read_text()) == recorded
    raw = export_checkpoint(ckpt, tmp_path / "raw", weights="model")
    assert json.loads((raw / CONFIG_NAME).read_text()) == recorded


def test_the_export_records_its_checkpoint_step_and_weights(run, tmp_path, capsys):
    """``echofast_export.json``; ``train export`` says which weights it wrote: a run without
    EMA gets the model's weights for ``--weights ema``, and the command says so."""
    cfg, out, _ = run
    step, ckpt = list_checkpoints(out)[-1]
    assert read_export_info(out / "export") == {
        "checkpoint": str(ckpt.resolve()),
        "step": step,
        "weights_requested": "ema",
        "weights": "ema",
        "latents_vae": None,  # trained on random data
    }
    assert read_export_info(tmp_path) is None  # no record: another folder, an older export
    state = load_checkpoint(ckpt)
    assert state["ema"] is not None
    argv = ["export", "--checkpoint", str(ckpt)]
    assert main_train([*argv, "--out", str(tmp_path / "a"), "--weights", "model"]) == 0
    assert read_export_info(tmp_path / "a")["weights"] == "model"
    assert capsys.readouterr().out == f"{tmp_path / 'a'}: wrote model weights of {ckpt}\n"

    without_ema = tmp_path / "no-ema.pt"
    torch.save({**state, "ema": None}, without_ema)
    assert (
        main_train([*argv[:1], "--checkpoint", str(without_ema), "--out", str(tmp_path / "b")]) == 0
    )
    assert read_export_info(tmp_path / "b") == {
        "checkpoint": str(without_ema.resolve()),
        "step": step,
        "weights_requested": "ema",
        "weights": "model",
        "latents_vae": None,
    }
    assert capsys.readouterr().out == (
        f"{tmp_path / 'b'}: wrote model weights of {without_ema} (the run had no EMA)\n"
    )
    a, b = (load_file(tmp_path / name / "diffusion_pytorch_model.safetensors") for name in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (tmp_path / "b" / "echofast_export.json").write_text("[1]")
    with pytest.raises(WeightsError, match="echofast_export.json: not an export record"):
        read_export_info(tmp_path / "b")


def test_pipeline_from_the_export_samples_with_the_training_schedule(run):
    cfg, out, _ = run
    export = out / "export"
    pipe = LIDMPipeline.from_pretrained(export)
    assert dict(pipe.scheduler.config) == dict(cfg.noise_scheduler().config)

    seeds = [5, 6]
    latents = pipe(
        len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=STEPS,
        progress=False,
    ).latents

    # the reference loop with diffusers' UNet and DDPMScheduler of the training config
    unet = diffusers.UNet2DModel.from_pretrained(export).eval()
    scheduler = diffusers.DDPMScheduler(**cfg.scheduler_config())
    scheduler.set_timesteps(STEPS)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    want = torch.cat([torch.randn(1, 4, 6, 6, generator=g) for g in gens])
    with torch.no_grad():
        for t in scheduler.timesteps:
            pred = unet(F.pad(want, (1, 1, 1, 1), mode="replicate"), t).sample[..., 1:-1, 1:-1]
            want = scheduler.step(pred, t, want, generator=gens).prev_sample
    torch.testing.assert_close(latents, want, rtol=1e-5, atol=1e-5)

    # a scheduler passed explicitly wins
    ddim = DDIMScheduler(prediction_type="epsilon")
    assert LIDMPipeline.from_pretrained(export, scheduler=ddim).scheduler is ddim
