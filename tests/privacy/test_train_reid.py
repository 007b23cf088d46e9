"""``echofast train reid``: config checks, early stopping, exact resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from privacy.phantom_latents import reid_config

from echofast.errors import ConfigError
from echofast.privacy import ReIdentificationModel
from echofast.train.loop import TrainingConflict
from echofast.train.reid import EarlyStopping, _batches, reid_config_from_dict, train_reid


def test_early_stopping_follows_the_reference_rule():
    es = EarlyStopping(patience=2)
    assert [es.step(v) for v in (1.0, 0.9, 0.95, 0.9)] == [False, False, False, True]
    assert EarlyStopping(patience=0).step(float("nan")) is False
    es = EarlyStopping(patience=5)
    es.step(1.0)
    assert es.step(float("nan")) is True


def test_batches_never_leave_a_single_item_batch():
    """Batch norm needs two samples per training batch: a last batch of one joins the previous."""
    assert _batches(7, 3) == [range(0, 3), range(3, 7)]
    assert _batches(6, 3) == [range(0, 3), range(3, 6)]
    assert _batches(5, 2) == [range(0, 2), range(2, 5)]
    assert _batches(1, 4) == [range(0, 1)]
    assert _batches(3, 8) == [range(0, 3)]


def test_config_errors_name_the_key(phantom_latents, tmp_path):
    base = reid_config(phantom_latents, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.lrr'\]"):
        reid_config_from_dict({**base, "optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="model.architecture"):
        reid_config_from_dict({**base, "model": {"architecture": "ResNet-50", "width": 8}})
    with pytest.raises(ConfigError, match="model.normalization"):
        reid_config_from_dict({**base, "model": {**base["model"], "normalization": "global"}})


@pytest.mark.parametrize("augment", [False, True])
def test_resume_equals_an_uninterrupted_run(phantom_latents, tmp_path, augment):
    def cfg(out, epochs):
        c = reid_config(phantom_latents, out, max_epochs=epochs)
        c["data"]["pairs_per_video"] = 1
        c["augment"] = {"enabled": augment}
        c["eval"]["bootstrap"] = 100
        return reid_config_from_dict(c)

    full = train_reid(cfg(tmp_path / "full", 3))
    train_reid(cfg(tmp_path / "part", 2))
    with pytest.raises(TrainingConflict, match="--resume"):
        train_reid(cfg(tmp_path / "part", 3))
    resumed = train_reid(cfg(tmp_path / "part", 3), resume="latest")
    assert resumed == {**full, "model": resumed["model"]}
    a = ReIdentificationModel.from_pretrained(tmp_path / "full" / "reidentification_phantom")
    b = ReIdentificationModel.from_pretrained(tmp_path / "part" / "reidentification_phantom")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert (tmp_path / "full" / "log.csv").read_text().splitlines()[1:] != []
    ev = json.loads(
        (tmp_path / "part" / "reidentification_phantom" / "evaluation.json").read_text()
    )
    assert ev["epochs_run"] == 3 and ev["test_auc"]["n_pairs"] == 24 * 4


def test_cli(phantom_latents, tmp_path):
    from echofast.cli import main

    cfg = tmp_path / "reid.toml"
    cfg.write_text(
        f'output_dir = "{tmp_path / "run"}"\n[model]\narchitecture = "ResNet"\n'
        f'layers = [1, 1, 1, 1]\nwidth = 4\nn_features = 8\n[data]\nroot = "{phantom_latents}"\n'
        "[train]\nmax_epochs = 1\n[eval]\nbootstrap = 50\n"
    )
    assert main(["train", "reid", "--config", str(cfg), "--no-progress"]) == 0
    folder = tmp_path / "run" / "reidentification"
    assert (folder / "reidentification_best_network.safetensors").is_file()
    assert ReIdentificationModel.from_pretrained(folder).width == 4
    # test_scores.csv: the saved model on the TEST pairs of the documented seed (seed + 2)
    from echofast.privacy.data import LatentClips
    from echofast.privacy.filter import evaluate_reid

    model = ReIdentificationModel.from_pretrained(folder)
    clips = LatentClips(phantom_latents, "TEST", normalization="frame")
    _, labels, scores = evaluate_reid(model, clips, seed=42 + 2, n_bootstrap=20)
    rows = [line.split(",") for line in (folder / "test_scores.csv").read_text().split()[1:]]
    assert [int(y) for y, _ in rows] == labels.astype(int).tolist()
    np.testing.assert_allclose([float(s) for _, s in rows], scores, rtol=1e-5)
    assert main(["train", "reid", "--config", str(cfg), "--set", "optim.lr=-1"]) == 1
