"""End-to-end training runs on tiny models: files, exact resume, accumulation, export, CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from support.weights import TINY_LIDM, TINY_LVDM, TINY_VAE

from echofast.errors import ConfigError
from echofast.train import config_from_dict, main_train, train
from echofast.train.loop import (
    TrainingConflict,
    list_checkpoints,
    load_checkpoint,
    read_log,
)

ARCH = {"vae": TINY_VAE, "lidm": TINY_LIDM, "lvdm": TINY_LVDM}
DIFFUSERS = {
    "vae": "AutoencoderKL",
    "lidm": "UNet2DModel",
    "lvdm": "UNetSpatioTemporalConditionModel",
}


def make_config(out, kind, *, steps=4, batch=2, accum=1, **sections):
    data = {
        "model": {"type": kind, "config": ARCH[kind]},
        "output_dir": str(out),
        "data": {"source": "random", "num_workers": 0, "random_items": 12, "frames": 8},
        "train": {
            "max_steps": steps,
            "batch_size": batch,
            "grad_accum": accum,
            "checkpoint_every": 2,
            "progress": False,
        },
        "optim": {"warmup_steps": 2, "lr": 1e-3},
    }
    if kind == "vae":
        data["vae"] = {"disc_start": 2, "disc_layers": 1, "disc_channels": 8}
        data["ema"] = {"enabled": True}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def _assert_states_close(a, b, atol, path="state"):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=path)
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_states_close(a[k], b[k], atol, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_states_close(x, y, atol, f"{path}[{i}]")
    else:
        assert a == b, path


def _rows(out):
    with open(out / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("kind", ["vae", "lidm", "lvdm"])
def test_run_writes_everything_and_export_loads(tmp_path, kind):
    from diffusers import AutoencoderKL, UNet2DModel, UNetSpatioTemporalConditionModel

    from echofast.models import LIDM, LVDM, VAE

    out = tmp_path / "run"
    cfg = make_config(out, kind, train={"keep_checkpoints": 1})
    summary = train(cfg)
    assert summary["step"] == 4 and torch.isfinite(torch.tensor(summary["loss"]))
    assert [s for s, _ in list_checkpoints(out)] == [4]  # step 2 was rotated out
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[0]["lr"]) == 0.0 and float(rows[2]["lr"]) == 1e-3  # warm-up, constant
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "train_config.json").read_text()) == cfg.to_dict()

    state = load_checkpoint(out / "checkpoints" / "step-00000004.pt")
    assert state["config"] == cfg.to_dict() and state["step"] == 4
    assert state["sampler"]["position"] == 4 * summary["global_batch"]
    assert {"torch", "numpy", "python"} <= set(state["rng"][0])
    ema = state["ema"]["shadow"]
    assert any(not torch.equal(ema[k], state["model"][k]) for k in ema)

    ours = {"vae": VAE, "lidm": LIDM, "lvdm": LVDM}[kind].from_pretrained(out / "export")
    theirs_cls = {
        "vae": AutoencoderKL,
        "lidm": UNet2DModel,
        "lvdm": UNetSpatioTemporalConditionModel,
    }[kind]
    theirs = theirs_cls.from_pretrained(out / "export")
    assert (
        json.loads((out / "export" / "config.json").read_text())["_class_name"] == DIFFUSERS[kind]
    )
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, ema[name], rtol=0, atol=0, msg=name)
    for name, tensor in theirs.state_dict().items():
        torch.testing.assert_close(tensor, ema[name], rtol=0, atol=0, msg=name)
    if kind == "lidm":
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        with torch.no_grad():
            torch.testing.assert_close(ours(x, t).sample, theirs(x, t).sample, rtol=1e-4, atol=1e-5)


def test_vae_loss_decreases_with_progress_bar(tmp_path, capsys):
    cfg = make_config(
        tmp_path / "run",
        "vae",
        steps=16,
        batch=4,
        train={"checkpoint_every": 16, "progress": True, "export_at_end": False},
        vae={"disc_start": 100},
    )
    train(cfg)
    _, losses = read_log(tmp_path / "run" / "log.csv")
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    err = capsys.readouterr().err
    assert "train vae" in err and "16/16" in err and "steps_per_s" in err


@pytest.mark.parametrize(
    "kind, k, batch, accum, extra",
    [
        ("lidm", 3, 2, 2, {}),
        ("vae", 2, 2, 1, {}),
        ("lvdm", 2, 1, 1, {}),
        # dropout draws from the global RNG, restored from the checkpoint
        ("lidm", 2, 2, 1, {"model": {"config": {**TINY_LIDM, "dropout": 0.5}}}),
        # the discriminator and its optimizer already train before the checkpoint
        ("vae", 2, 2, 1, {"vae": {"disc_start": 1}}),
    ],
    ids=["lidm", "vae", "lvdm", "lidm-dropout", "vae-discriminator"],
)
def test_resume_is_exact(tmp_path, kind, k, batch, accum, extra):
    def config(out, steps):
        return make_config(
            out,
            kind,
            steps=steps,
            batch=batch,
            accum=accum,
            train={"checkpoint_every": k, "export_at_end": False},
            **extra,
        )

    train(config(tmp_path / "a", 2 * k))
    train(config(tmp_path / "b", k))
    second = config(tmp_path / "b", 2 * k)
    summary = train(second, resume="latest")
    assert summary["step"] == 2 * k and summary["steps_trained"] == k
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / f"step-{2 * k:08d}.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / f"step-{2 * k:08d}.pt")
    for key in (
        "model",
        "ema",
        "optimizer",
        "lr_scheduler",
        "aux",
        "aux_optimizers",
        "scaler",
        "sampler",
    ):
        _assert_states_close(a[key], b[key], atol=1e-6, path=key)
    assert read_log(tmp_path / "a" / "log.csv") == read_log(tmp_path / "b" / "log.csv")
    times = [float(r["time"]) for r in _rows(tmp_path / "b")]
    assert times == sorted(times)  # the clock goes on from the checkpoint's


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("lidm", {"model": {"config": {**TINY_LIDM, "dropout": 0.3}}}), ("vae", {}), ("lvdm", {})],
    ids=["lidm-dropout", "vae", "lvdm"],
)
def test_gradient_checkpointing_trains_the_same_weights(tmp_path, monkeypatch, kind, extra):
    """train.gradient_checkpointing recomputes the blocks in backward (the stages run through
    the checkpoint function) and trains the weights the plain run trains."""
    import echofast.models.base as base

    calls = []

    def counted(stage, *args):
        calls.append(stage)
        return base.torch.utils.checkpoint.checkpoint(stage, *args, use_reentrant=False)

    monkeypatch.setattr(base, "checkpoint_stage", counted)
    states = {}
    for on in (False, True):
        cfg = make_config(
            tmp_path / str(on),
            kind,
            steps=2,
            train={"export_at_end": False, "gradient_checkpointing": on},
            **extra,
        )
        train(cfg)
        assert bool(calls) == on
        states[on] = load_checkpoint(tmp_path / str(on) / "checkpoints" / "step-00000002.pt")
    _assert_states_close(
        without_key_biases(states[True]["model"]),
        without_key_biases(states[False]["model"]),
        atol=1e-6,
    )
    assert read_log(tmp_path / "True" / "log.csv") == read_log(tmp_path / "False" / "log.csv")


def test_grad_accumulation_matches_big_batch(tmp_path):
    class Latents(torch.utils.data.Dataset):  # any dataset with the item structure works
        def __init__(self):
            self.x = torch.randn(10, 4, 6, 6, generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    results = []
    for name, batch, accum in [("b4", 4, 1), ("b2a2", 2, 2), ("b1a4", 1, 4)]:
        cfg = make_config(
            tmp_path / name,
            "lidm",
            steps=3,
            batch=batch,
            accum=accum,
            train={"export_at_end": False},
        )
        train(cfg, dataset=Latents())
        state = load_checkpoint(tmp_path / name / "checkpoints" / "step-00000003.pt")
        results.append((read_log(tmp_path / name / "log.csv")[1], state["model"]))
    for losses, model in results[1:]:
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(results[0][0]), rtol=1e-5, atol=1e-6
        )
        _assert_states_close(
            without_key_biases(model), without_key_biases(results[0][1]), atol=1e-5
        )


def test_accumulated_gradients_are_averaged_not_summed(tmp_path):
    """Each micro-batch's loss is divided by grad_accum. Adam's normalisation hides a constant
    gradient factor, so this runs with eps = 1 (update ≈ lr · gradient) and no clipping."""
    x = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    states = []
    for name, batch, accum in [("b4", 4, 1), ("b1a4", 1, 4)]:
        cfg = make_config(
            tmp_path / name,
            "lidm",
            steps=1,
            batch=batch,
            accum=accum,
            train={"export_at_end": False, "checkpoint_every": 1},
            optim={"eps": 1.0, "lr": 0.1, "warmup_steps": 0, "max_grad_norm": 0.0},
        )
        train(cfg, dataset=list(x))
        states.append(load_checkpoint(tmp_path / name / "checkpoints" / "step-00000001.pt"))
    _assert_states_close(states[1]["model"], states[0]["model"], atol=1e-6)


def without_key_biases(state: dict) -> dict:
    """Attention key biases get a zero gradient in exact arithmetic (softmax ignores a constant
    added to every score): their float gradients are rounding noise, which Adam's normalisation
    turns into lr-sized steps in arbitrary directions. Compare everything else."""
    return {k: v for k, v in state.items() if not k.endswith("to_k.bias")}


def test_guards(tmp_path):
    cfg = make_config(tmp_path / "run", "lidm", steps=2)
    train(cfg)
    with pytest.raises(TrainingConflict, match="--resume"):
        train(cfg)
    changed = make_config(tmp_path / "run", "lidm", steps=3, optim={"lr": 5e-4})
    with pytest.raises(TrainingConflict, match="optim.lr"):
        train(changed, resume="latest")
    fp16 = make_config(
        tmp_path / "other", "lidm", train={"mixed_precision": "fp16", "device": "cpu"}
    )
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(fp16)
    with pytest.raises(FileNotFoundError):
        train(make_config(tmp_path / "x", "lidm"), resume=tmp_path / "none.pt")


def test_cli(tmp_path, capsys):
    from diffusers import UNet2DModel

    config = tmp_path / "lidm.toml"
    arch = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_LIDM.items())
    config.write_text(
        f'output_dir = "{tmp_path / "run"}"\n[model]\ntype = "lidm"\n[model.config]\n{arch}\n'
        '[data]\nsource = "random"\nnum_workers = 0\nrandom_items = 8\n'
        "[train]\nmax_steps = 2\nbatch_size = 2\ncheckpoint_every = 1\n"
    )
    assert main_train(["lidm", "--config", str(config), "--no-progress"]) == 0
    assert "step 2" in capsys.readouterr().out
    assert (
        main_train(
            [
                "lidm",
                "--config",
                str(config),
                "--resume",
                "--no-progress",
                "--set",
                "train.max_steps=3",
            ]
        )
        == 0
    )
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1, 2, 3]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003.pt"
    assert main_train(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x")]) == 0
    assert (
        main_train(
            [
                "export",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(tmp_path / "raw"),
                "--weights",
                "model",
            ]
        )
        == 0
    )
    state = load_checkpoint(ckpt)
    ema = UNet2DModel.from_pretrained(tmp_path / "x").state_dict()
    raw = UNet2DModel.from_pretrained(tmp_path / "raw").state_dict()
    for name in state["model"]:
        assert torch.equal(ema[name], state["ema"]["shadow"][name])
        assert torch.equal(raw[name], state["model"][name])
    with pytest.raises(ConfigError, match="trains 'vae'"):
        main_train(["vae", "--config", str(config)])
    with pytest.raises(SystemExit):
        main_train(["gan", "--config", str(config)])


def test_log_rows_average_their_interval_and_the_last_step_is_logged_and_saved(tmp_path):
    """With log_every = 2 and checkpoint_every = 2 a 5-step run logs and saves steps 2, 4 and 5;
    each row's loss is the mean of the per-step losses since the previous row, and its lr the
    one the logged step trained with."""
    every_step = make_config(tmp_path / "a", "lidm", steps=5, train={"export_at_end": False})
    train(every_step)
    per_step = _rows(tmp_path / "a")
    grouped = make_config(
        tmp_path / "b",
        "lidm",
        steps=5,
        train={"export_at_end": False, "log_every": 2, "checkpoint_every": 2},
    )
    summary = train(grouped)
    rows = _rows(tmp_path / "b")
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2, 4, 5]
    assert summary["checkpoint"].endswith("step-00000005.pt")
    losses = [float(r["loss"]) for r in per_step]
    want = [(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2, losses[4]]
    assert [float(r["loss"]) for r in rows] == pytest.approx(want, rel=1e-6)
    assert [r["lr"] for r in rows] == [per_step[i]["lr"] for i in (1, 3, 4)]
    assert summary["loss"] == pytest.approx(losses[4], rel=1e-6)
    assert "export" not in summary and not (tmp_path / "b" / "export").exists()
    # resuming the finished run trains nothing and reports the last logged loss
    again = train(grouped, resume="latest")
    assert again["steps_trained"] == 0 and again["loss"] == float(rows[-1]["loss"])
    assert _rows(tmp_path / "b") == rows


def test_resumed_log_keeps_only_its_own_rows_up_to_the_checkpoint(tmp_path):
    from echofast.train.loop import CSVLog

    columns = ["step", "loss", "lr", "time"]
    path = tmp_path / "log.csv"
    path.write_text("step,loss,lr,time\n1,0.5,0.0,1.0\n2,0.4,0.1,2.0\n3,0.3,0.1,3.0\n")
    log = CSVLog(path, columns, resume_step=2)
    log.write({"step": 3, "loss": 0.25, "lr": 0.1, "time": 3.5})
    log.close()
    assert read_log(path) == ([1, 2, 3], [0.5, 0.4, 0.25])
    path.write_text("step,loss\n1,0.5\n")  # another layout (an older run): not carried over
    CSVLog(path, columns, resume_step=2).close()
    assert path.read_text().splitlines() == ["step,loss,lr,time"]


def test_a_resume_removes_the_partial_checkpoint_and_export_a_kill_left(tmp_path):
    """A run killed (SIGKILL, SIGTERM) while it wrote a checkpoint (or its export) leaves the
    write's temporary file, a partial checkpoint about as large as a whole one (or folder), which
    every resume kept; the resumed run removes them (and leaves other files alone)."""
    out = tmp_path / "run"
    cfg = make_config(out, "lidm", steps=2, train={"export_at_end": False})
    train(cfg)
    cut = out / "checkpoints" / ".step-00000004.pt.a1b2c3d4.tmp"
    cut.write_bytes(b"PK\x03\x04 cut short")
    notes = out / "checkpoints" / "notes.txt"
    notes.write_text("mine")
    partial_export = out / ".export.k1l2m3n4.tmp"
    partial_export.mkdir()
    (partial_export / "config.json").write_text("{")
    longer = make_config(out, "lidm", steps=4, train={"export_at_end": False})
    assert train(longer, resume="latest")["step"] == 4
    assert not cut.exists() and not partial_export.exists() and notes.read_text() == "mine"
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]


def test_a_resume_killed_while_it_rewrites_the_log_keeps_the_earlier_rows(tmp_path, monkeypatch):
    """A resumed run rewrites log.csv with the rows up to its checkpoint: it truncated the file
    first, so a kill before the rows were written back lost the whole loss history (and the
    loss plot drawn from it). The log is now replaced whole."""
    import echofast.train.loop as loop

    columns = ["step", "loss", "lr", "time"]
    path = tmp_path / "log.csv"
    text = "step,loss,lr,time\r\n1,0.5,0.0,1.0\r\n2,0.4,0.1,2.0\r\n3,0.3,0.1,3.0\r\n"
    path.write_bytes(text.encode())
    writer = csv.writer

    class KilledWhileWritingRows:
        def __init__(self, fh, **kw):
            self.inner = writer(fh, **kw)

        def writerow(self, row):
            self.inner.writerow(row)

        def writerows(self, rows):
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.csv, "writer", KilledWhileWritingRows)
    with pytest.raises(KeyboardInterrupt):
        loop.CSVLog(path, columns, resume_step=2)
    monkeypatch.setattr(loop.csv, "writer", writer)
    assert path.read_bytes() == text.encode()
    log = loop.CSVLog(path, columns, resume_step=2)
    log.write({"step": 3, "loss": 0.25, "lr": 0.1, "time": 3.5})
    log.close()
    assert path.read_bytes() == text.replace("3,0.3,", "3,0.25,").replace(",3.0", ",3.5").encode()
