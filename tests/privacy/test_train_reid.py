"""``echofast train reid``: config checks, early stopping, exact resume, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from privacy.phantom_latents import reid_config
from support.threads import one_torch_thread

from echofast.errors import ConfigError
from echofast.privacy import ReIdentificationModel
from echofast.train.config import flatten
from echofast.train.loop import TrainingConflict
from echofast.train.reid import (
    EarlyStopping,
    ReidConfig,
    _batches,
    load_reid_config,
    reid_config_from_dict,
    train_reid,
)

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


# the reference recipe (echosyn/privacy/configs/config_dynamic.json) as the module documents it
_DOCUMENTED_DEFAULTS = {
    "seed": 42,
    "output_dir": "runs/reid",
    "name": "reidentification",
    "model.architecture": "ResNet-50",
    "model.layers": [3, 4, 6, 3],
    "model.width": 64,
    "model.n_features": 128,
    "model.normalization": "frame",
    "model.init_weights": "",
    "data.root": "",
    "data.pairs_per_video": 1,
    "data.eval_pairs_per_video": 1,
    "augment.enabled": False,
    "augment.max_shift": 0,
    "augment.gain": 0.1,
    "augment.offset": 0.1,
    "augment.noise": 0.05,
    "augment.copy_positives": 0.0,
    "optim.lr": 1e-4,
    "train.batch_size": 128,
    "train.max_epochs": 1000,
    "train.patience": 50,
    "train.device": "auto",
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 2,
    "train.progress": True,
    "eval.bootstrap": 10_000,
    "eval.ci": 0.95,
}


def test_every_default_is_the_documented_recipe():
    resolved = flatten(ReidConfig().to_dict())
    assert resolved == _DOCUMENTED_DEFAULTS
    assert all(type(resolved[k]) is type(v) for k, v in _DOCUMENTED_DEFAULTS.items())


def test_the_packaged_config_spells_out_the_defaults():
    """reid.toml differs from the defaults only in where the run reads and writes."""
    packaged = flatten(load_reid_config("reid").to_dict())
    differ = sorted(k for k in packaged if packaged[k] != _DOCUMENTED_DEFAULTS[k])
    assert differ == ["data.root", "name", "output_dir"]


def test_early_stopping_follows_the_reference_rule():
    es = EarlyStopping(patience=2)
    assert [es.step(v) for v in (1.0, 0.9, 0.95, 0.9)] == [False, False, False, True]
    assert EarlyStopping(patience=0).step(float("nan")) is False
    never = EarlyStopping(patience=0)
    assert not any(never.step(v) for v in (1.0, 2.0, 3.0, float("nan")))
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


@pytest.mark.parametrize(
    "change, key",
    [
        ({"seed": True}, "'seed'"),
        ({"seed": "42"}, "'seed'"),
        ({"train": {"batch_size": 1}}, "'train.batch_size'"),
        ({"train": {"keep_checkpoints": -1}}, "'train.patience'.*keep_checkpoints"),
        ({"train": {"patience": -1}}, "'train.patience'"),
        ({"augment": {"gain": 1.0}}, "'augment.gain'"),
        ({"augment": {"copy_positives": 1.5}}, "'augment.copy_positives'"),
        ({"name": "log.csv"}, "'name'.*used by the run itself"),
        ({"name": "checkpoints"}, "'name'.*used by the run itself"),
    ],
)
def test_bad_settings_name_their_key(phantom_latents, tmp_path, change, key):
    base = reid_config(phantom_latents, tmp_path)
    data = {k: {**base.get(k, {}), **v} if isinstance(v, dict) else v for k, v in change.items()}
    with pytest.raises(ConfigError, match=key):
        reid_config_from_dict({**base, **data})


def test_boundary_settings_are_accepted(phantom_latents, tmp_path):
    base = reid_config(phantom_latents, tmp_path)
    cfg = reid_config_from_dict(
        {
            **base,
            "augment": {"enabled": True, "copy_positives": 1.0, "gain": 0.0, "noise": 0.0},
            "train": {**base["train"], "batch_size": 2, "keep_checkpoints": 0, "patience": 0},
        }
    )
    assert cfg.augment.augmentation().copy_positives == 1.0 and cfg.train.batch_size == 2


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


def test_an_interrupted_final_write_leaves_the_earlier_model_folder(
    phantom_latents, tmp_path, monkeypatch
):
    """The model folder (weights, evaluation.json, test_scores.csv) is written beside the run's
    files and renamed into place: a run that fails while writing it leaves the earlier one
    whole (it mixed new weights with the old evaluation)."""
    import echofast.train.reid as reid

    def config(epochs):
        return reid_config_from_dict(
            {
                "output_dir": str(tmp_path / "run"),
                "model": {"architecture": "ResNet", "layers": [1, 1, 1, 1], "width": 4},
                "data": {"root": str(phantom_latents)},
                "train": {"max_epochs": epochs, "progress": False},
                "eval": {"bootstrap": 50},
            }
        )

    train_reid(config(1))
    folder = tmp_path / "run" / "reidentification"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(before) >= {"config.json", "evaluation.json", "test_scores.csv"}
    original = reid.atomic_write_text

    def fail_on_scores(path, text):
        if str(path).endswith("test_scores.csv"):
            raise OSError(28, "No space left on device")
        return original(path, text)

    monkeypatch.setattr(reid, "atomic_write_text", fail_on_scores)
    with pytest.raises(OSError, match="No space left"):
        train_reid(config(2), resume="latest")  # one more epoch, then the final write
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["reid", "reid_phantom.toml"])
def test_a_packaged_config_is_found_by_name_from_anywhere(tmp_path, monkeypatch, name):
    """README: ``echofast train reid --config reid`` (and the name ``reid_phantom.toml`` that
    the packaged file's own comment gives) finds the packaged recipe from any folder."""
    from echofast.cli import main
    from echofast.train.config import PACKAGED_CONFIGS, read_config_file

    monkeypatch.chdir(tmp_path)
    cfg = load_reid_config(name, ["train.max_epochs=3"])
    packaged = read_config_file(PACKAGED_CONFIGS / f"{name.removesuffix('.toml')}.toml")
    assert cfg.output_dir == packaged["output_dir"] and cfg.name == packaged["name"]
    assert cfg.model.architecture == packaged["model"]["architecture"]
    assert cfg.train.max_epochs == 3
    # the CLI gets as far as the data, which the packaged recipe names relative to the folder
    assert main(["train", "reid", "--config", name, "--set", "data.root='nowhere'"]) == 1
    assert not (tmp_path / packaged["output_dir"]).exists()


def test_a_config_name_that_is_neither_lists_the_packaged_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_reid_config("reld")
    assert str(err.value).startswith("reld: config file does not exist (nor is it a packaged")
    assert "reid, reid_phantom" in str(err.value)
    with pytest.raises(
        ConfigError, match=r"configs/reid\.toml with --set optim\.lr=-1: config key"
    ):
        load_reid_config("reid.toml", ["optim.lr=-1"])


def _pair_batches(pairs, size):
    """Consecutive batches of ``size`` pairs as (x1, x2, y) tensors (no batch of one here)."""
    for start in range(0, len(pairs), size):
        items = [pairs[i] for i in range(start, min(start + size, len(pairs)))]
        yield tuple(torch.stack(column) for column in zip(*items))


def test_training_is_adam_on_bce_and_keeps_the_best_validation_weights(phantom_latents, tmp_path):
    """Two epochs replayed with torch's Adam and BCE-with-logits on the documented pairs: TRAIN
    pairs re-drawn per epoch (seed), VAL pairs fixed (seed + 1) and scored in eval mode. The
    learning rate is one at which the validation loss rises in epoch 2 (which one depends on
    torch's numerics), so the exported model and the test scores (TEST pairs fixed, seed + 2)
    must come from the epoch-1 weights, not the last ones."""
    import torch.nn.functional as F

    from echofast.privacy.data import LatentClips, PairDataset
    from echofast.train.reid import build_reid_model, list_reid_checkpoints

    for lr in (0.05, 0.1, 0.02, 0.2, 0.01, 0.5):  # the first whose validation loss rises
        run = tmp_path / f"run-{lr}"
        config = reid_config(phantom_latents, run, max_epochs=2, keep_checkpoints=0)
        config["data"] = {**config["data"], "pairs_per_video": 2, "eval_pairs_per_video": 1}
        config["eval"]["bootstrap"] = 20
        config["optim"]["lr"] = lr
        cfg = reid_config_from_dict(config)
        summary = train_reid(cfg)
        logged = list(csv.reader((run / "log.csv").open()))
        if float(logged[2][2]) > float(logged[1][2]):
            break
    else:
        pytest.fail("the validation loss fell in epoch 2 at every learning rate tried")

    splits = ("TRAIN", "VAL", "TEST")
    clips = {s: LatentClips(phantom_latents, s, normalization="frame") for s in splits}
    train_pairs = PairDataset(clips["TRAIN"], seed=42, pairs_per_video=2)
    val_pairs = PairDataset(clips["VAL"], seed=43, pairs_per_video=1, shuffle=False)
    model = build_reid_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=config["optim"]["lr"])
    checkpoints = dict(list_reid_checkpoints(run))
    assert sorted(checkpoints) == [1, 2]
    val_losses, weights = [], []
    for epoch in range(2):
        train_pairs.set_epoch(epoch)
        model.train()
        for x1, x2, y in _pair_batches(train_pairs, 32):
            loss = F.binary_cross_entropy_with_logits(model(x1, x2).reshape(-1), y.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = [
                float(F.binary_cross_entropy_with_logits(model(x1, x2).reshape(-1), y.float()))
                for x1, x2, y in _pair_batches(val_pairs, 32)
            ]
        val_losses.append(float(np.mean(val)))
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        saved = torch.load(checkpoints[epoch + 1], weights_only=True)["model"]
        for k, v in weights[-1].items():
            torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-5, msg=k)

    rows = [line.split(",") for line in (run / "log.csv").read_text().split()]
    assert rows[0] == ["epoch", "train_loss", "val_loss", "time"]
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], val_losses, rtol=1e-4)
    best = int(np.argmin(val_losses))
    assert best == 0, val_losses  # the kept weights are not the final ones
    assert summary["best_epoch"] == best + 1
    assert summary["best_val_loss"] == pytest.approx(val_losses[best], rel=1e-4)
    exported = ReIdentificationModel.from_pretrained(run / cfg.name).state_dict()
    for k, v in weights[best].items():
        torch.testing.assert_close(exported[k], v, rtol=1e-4, atol=1e-5, msg=k)

    model.load_state_dict(weights[best])
    model.eval()
    test_pairs = PairDataset(clips["TEST"], seed=44, pairs_per_video=1, shuffle=False)
    with torch.no_grad():
        scores = torch.cat(
            [
                torch.sigmoid(model(x1, x2).reshape(-1))
                for x1, x2, _ in _pair_batches(test_pairs, 32)
            ]
        )
    rows = [line.split(",") for line in (run / cfg.name / "test_scores.csv").read_text().split()]
    np.testing.assert_allclose(
        [float(r[1]) for r in rows[1:]], scores.numpy(), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("max_epochs, early", [(1, False), (3, True)])
def test_an_early_stop_is_saved_and_reported(
    phantom_latents, tmp_path, monkeypatch, max_epochs, early
):
    """The epoch that stops the run is checkpointed whatever checkpoint_every says, and the run
    counts as stopped early only when epochs were left."""
    from echofast.train import reid
    from echofast.train.reid import list_reid_checkpoints

    monkeypatch.setattr(reid.EarlyStopping, "step", lambda self, value: True)
    config = reid_config(
        phantom_latents, tmp_path / "run", max_epochs=max_epochs, checkpoint_every=5, patience=1
    )
    config["data"] = {**config["data"], "pairs_per_video": 1, "eval_pairs_per_video": 1}
    config["eval"]["bootstrap"] = 20
    summary = train_reid(reid_config_from_dict(config))
    assert summary["epochs"] == 1 and summary["stopped_early"] is early
    assert [e for e, _ in list_reid_checkpoints(tmp_path / "run")] == [1]
    ev = json.loads((tmp_path / "run" / config["name"] / "evaluation.json").read_text())
    assert ev["stopped_early"] is early and ev["epochs_run"] == 1


def test_resume_restores_early_stopping_state_and_history(phantom_latents, tmp_path, monkeypatch):
    from echofast.train import reid
    from echofast.train.reid import list_reid_checkpoints

    def count_epochs(self, value):  # an epoch without improvement, every time
        self.bad += 1
        return False

    monkeypatch.setattr(reid.EarlyStopping, "step", count_epochs)

    def run(out, epochs, resume=None):
        config = reid_config(
            phantom_latents, out, max_epochs=epochs, patience=10, keep_checkpoints=1
        )
        config["data"] = {**config["data"], "pairs_per_video": 1, "eval_pairs_per_video": 1}
        config["eval"]["bootstrap"] = 20
        train_reid(reid_config_from_dict(config), resume=resume)
        (epoch, path), *older = reversed(list_reid_checkpoints(out))
        assert epoch == epochs and not older  # keep_checkpoints = 1
        log = [line.split(",")[:3] for line in (out / "log.csv").read_text().split()]
        return torch.load(path, weights_only=True)["es_bad"], log

    full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 2)
    assert run(tmp_path / "part", 3, resume="latest") == full
    assert full[0] == 3 and len(full[1]) == 4
