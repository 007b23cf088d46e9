"""``echofast train``'s arguments: what each flag hands to the trainer and the exporter, and
what it prints (trainer and exporter are replaced: these tests train nothing)."""

from __future__ import annotations

import pytest

import echofast.train as train_pkg
from echofast.train import main_train


class Trainer:
    """Stands in for echofast.train.train: records each call, returns ``summary``."""

    def __init__(self):
        self.calls: list = []
        self.summary = {
            "step": 7,
            "steps_trained": 3,
            "loss": 0.125,
            "global_batch": 4,
            "world_size": 1,
            "checkpoint": "ck.pt",
        }

    def __call__(self, cfg, resume=None):
        self.calls.append((cfg, resume))
        return dict(self.summary)


@pytest.fixture
def trainer(monkeypatch, tmp_path):
    fake = Trainer()
    monkeypatch.setattr(train_pkg, "train", fake)
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "c.toml").write_text('output_dir = "out"\n[data]\nroot = "r"\n')
    return fake


def _run(tmp_path, *args: str) -> int:
    return main_train(["lvdm", "--config", str(tmp_path / "c.toml"), *args])


@pytest.mark.parametrize(
    "args, resume",
    [
        ((), None),
        (("--resume",), "latest"),
        (("--resume", "x/step-00000002.pt"), "x/step-00000002.pt"),
    ],
)
def test_resume_flag(trainer, tmp_path, args, resume):
    assert _run(tmp_path, *args) == 0
    assert [r for _, r in trainer.calls] == [resume]


def test_set_and_no_progress_reach_the_config(trainer, tmp_path):
    _run(tmp_path)
    _run(tmp_path, "--set", "seed=1", "--set", "seed=2", "--set", "data.frames=8", "--no-progress")
    (default, _), (changed, _) = trainer.calls
    assert default.train.progress and default.model.type == "lvdm"
    assert not changed.train.progress
    assert (changed.seed, changed.data.frames) == (2, 8)


def test_summary_lines(trainer, tmp_path, capsys, monkeypatch):
    _run(tmp_path)
    assert capsys.readouterr().out == (
        "out: step 7, loss 0.125 (global batch 4 on 1 rank(s)); checkpoint ck.pt\n"
    )
    trainer.summary.update(steps_trained=0, export="out/export")
    _run(tmp_path)
    out = capsys.readouterr().out
    assert out.startswith("out: already at step 7 = train.max_steps; nothing trained")
    assert out.endswith("; released weights in out/export\n")
    monkeypatch.setenv("RANK", "1")
    _run(tmp_path)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "args, weights, overwrite",
    [((), "ema", False), (("--weights", "model", "--overwrite"), "model", True)],
)
def test_export_arguments(monkeypatch, capsys, args, weights, overwrite):
    seen = []

    def fake_export(checkpoint, out, *, weights, overwrite):
        seen.append((checkpoint, out, weights, overwrite))
        return out

    monkeypatch.setattr(train_pkg, "export_checkpoint", fake_export)
    assert main_train(["export", "--checkpoint", "a.pt", "--out", "dest", *args]) == 0
    assert seen == [("a.pt", "dest", weights, overwrite)]
    assert capsys.readouterr().out == f"dest: wrote {weights} weights of a.pt\n"


def test_reid_goes_to_its_own_command(monkeypatch):
    import echofast.train.reid as reid

    seen = []
    monkeypatch.setattr(reid, "main_train_reid", lambda argv: seen.append(argv) or 5)
    assert main_train(["reid", "--config", "r.toml", "--resume"]) == 5
    assert seen == [["--config", "r.toml", "--resume"]]
