"""Bad input to the trainers and to ``train export``: typed errors that name the key and the
data, raised before any file is written; exports never write into another folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.weights import TINY_LIDM, TINY_LVDM
from train.test_training import make_config

from echofast.cli import main
from echofast.data import write_filelist
from echofast.errors import ConfigError, EchofastError, NonFiniteError, WeightsError
from echofast.train import export_checkpoint, train
from echofast.train.config import load_config
from echofast.train.loop import TrainingConflict
from echofast.train.reid import reid_config_from_dict, train_reid


def _latents(root: Path, clips: int = 4, frames: int = 8, ef: bool = True) -> Path:
    """A latent dataset (echofast encode layout): ``clips`` random (frames, 4, 6, 6) clips."""
    (root / "Latents").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(clips):
        name = f"v{i}"
        save_file(
            {"latents": torch.randn(frames, 4, 6, 6, generator=g)},
            str(root / "Latents" / f"{name}.safetensors"),
            metadata={"fps": "8.0"},
        )
        split = ("TRAIN", "TRAIN", "VAL", "VAL", "TEST", "TEST")[i % 6] if clips > 4 else "TRAIN"
        rows.append({"FileName": name, "EF": 50 + i if ef else "", "FPS": 8, "Split": split})
    write_filelist(root, rows)
    return root


@pytest.fixture(scope="module")
def lidm_run(tmp_path_factory) -> Path:
    """A finished 2-step LIDM run (checkpoints at steps 1 and 2, export/)."""
    out = tmp_path_factory.mktemp("lidm") / "run"
    train(make_config(out, "lidm", steps=2, train={"checkpoint_every": 1}))
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---- export ----------------------------------------------------------------------------------


def test_export_refuses_other_folders_and_replaces_its_own(lidm_run, tmp_path):
    ckpt = lidm_run / "checkpoints" / "step-00000002.pt"
    vae_copy = tmp_path / "vae"
    vae_copy.mkdir()
    (vae_copy / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "a": 1}))
    (vae_copy / "diffusion_pytorch_model.safetensors").write_bytes(b"vae weights")
    dataset = tmp_path / "dataset"
    (dataset / "Videos").mkdir(parents=True)
    (dataset / "FileList.csv").write_text("FileName,Split\n")
    before = {p: _tree(p) for p in (vae_copy, dataset)}

    with pytest.raises(TrainingConflict, match="--overwrite"):
        export_checkpoint(ckpt, vae_copy)
    with pytest.raises(TrainingConflict, match="not a model folder"):
        export_checkpoint(ckpt, dataset, overwrite=True)
    assert {p: _tree(p) for p in (vae_copy, dataset)} == before
    assert main(["train", "export", "--checkpoint", str(ckpt), "--out", str(dataset)]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "vae"]  # no temporaries

    # an export of the same model is replaced (the trainer's own re-export); --overwrite
    # replaces another model folder
    same = tmp_path / "same"
    export_checkpoint(lidm_run / "checkpoints" / "step-00000001.pt", same)
    export_checkpoint(ckpt, same)
    assert _tree(same) == _tree(lidm_run / "export")
    export_checkpoint(ckpt, vae_copy, overwrite=True)
    assert _tree(vae_copy) == _tree(lidm_run / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "same", "vae"]


def test_export_cli_overwrite_flag(lidm_run, tmp_path, capsys):
    ckpt = str(lidm_run / "checkpoints" / "step-00000002.pt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "x": 2}))
    assert main(["train", "export", "--checkpoint", ckpt, "--out", str(other)]) == 1
    assert "use --overwrite" in capsys.readouterr().err
    assert json.loads((other / "config.json").read_text())["x"] == 2
    assert main(["train", "export", "--checkpoint", ckpt, "--out", str(other), "--overwrite"]) == 0
    assert _tree(other) == _tree(lidm_run / "export")


def test_interrupted_export_leaves_the_old_folder(lidm_run, tmp_path, monkeypatch):
    from echofast.models.base import ModelBase

    out = tmp_path / "out"
    export_checkpoint(lidm_run / "checkpoints" / "step-00000001.pt", out)
    old = _tree(out)
    original = ModelBase.save_pretrained

    def crash_after_weights(self, path, **kw):
        original(self, path, **kw)
        (Path(path) / "config.json").unlink()
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ModelBase, "save_pretrained", crash_after_weights)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(lidm_run / "checkpoints" / "step-00000002.pt", out)
    assert _tree(out) == old
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---- the training loop -----------------------------------------------------------------------


def test_trainer_checks_its_export_folder_first(tmp_path):
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "notes.txt").write_text("mine")
    with pytest.raises(TrainingConflict, match="train.export_at_end = false"):
        train(make_config(tmp_path / "run", "lidm", steps=1))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["export"]


def test_non_finite_loss_is_a_typed_error(tmp_path, capsys):
    assert issubclass(NonFiniteError, EchofastError)
    config = tmp_path / "lidm.json"
    config.write_text(json.dumps(make_config(tmp_path / "run", "lidm").to_dict()))
    argv = ["train", "lidm", "--config", str(config), "--no-progress", "--set", "optim.lr=1e30"]
    assert main([*argv, "--set", "train.max_steps=3", "--set", "optim.warmup_steps=0"]) == 1
    assert "training loss is not finite (nan)" in capsys.readouterr().err


def test_channel_mismatch_is_found_before_any_file(tmp_path):
    root = _latents(tmp_path / "latents")
    arch = {**TINY_LIDM, "in_channels": 3, "out_channels": 3}
    data = {"source": "files", "root": str(root)}
    cfg = make_config(tmp_path / "run", "lidm", model={"config": arch}, data=data)
    with pytest.raises(ConfigError, match="'model.config.in_channels' = 3") as err:
        train(cfg)
    assert str(root) in str(err.value) and "4-channel" in str(err.value)
    assert not (tmp_path / "run").exists()
    lvdm_arch = {**TINY_LVDM, "in_channels": 4}
    lvdm = make_config(tmp_path / "run", "lvdm", model={"config": lvdm_arch})
    with pytest.raises(ConfigError, match=r"in_channels = 2·C = 8"):
        train(lvdm)
    assert not (tmp_path / "run").exists()


def test_latents_of_two_vaes_are_not_mixed(tmp_path):
    from diffusers import AutoencoderKL
    from support.models import save_diffusers
    from support.weights import TINY_VAE

    from echofast.data.encode import main_encode
    from echofast.io import write_video
    from echofast.train.loop import build_dataset

    videos = tmp_path / "videos"
    frames = torch.arange(4 * 12 * 12, dtype=torch.uint8).reshape(4, 12, 12).numpy()
    write_video(videos / "Videos" / "v0.avi", frames, 8.0)
    write_filelist(videos, [{"FileName": "v0", "EF": 50, "FPS": 8, "Split": "TRAIN"}])
    roots = []
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        vae = tmp_path / f"vae{seed}"
        if not vae.exists():
            save_diffusers(AutoencoderKL, TINY_VAE, vae, seed=seed)
        roots.append(str(tmp_path / name))
        argv = ["--vae", str(vae), "--input", str(videos), "--out", roots[-1], "--no-progress"]
        assert main_encode([*argv, "--device", "cpu"]) == 0
    data = {"source": "files", "root": roots[:2], "frames": 4, "target_fps": 8.0}
    same = make_config(tmp_path / "run", "lvdm", data=data)
    assert len(build_dataset(same, same.architecture())) == 2
    for kind in ("lidm", "lvdm"):
        mixed = make_config(tmp_path / "run", kind, data={**data, "root": roots})
        with pytest.raises(ConfigError, match="'data.root'.* hold latents of different VAEs"):
            train(mixed)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("norm_num_groups", 7, "model.config"),
        ("layers_per_block", -1, "'model.config.layers_per_block'"),
        ("layers_per_block", [2, 0, 2, 2], "'model.config.layers_per_block'"),
    ],
)
def test_bad_architecture_names_model_config(tmp_path, key, value, match):
    cfg = make_config(tmp_path / "run", "lidm", model={"config": {**TINY_LIDM, key: value}})
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_resume_past_max_steps(lidm_run, tmp_path, capsys):
    config = tmp_path / "lidm.json"
    config.write_text(json.dumps(load_checkpoint_config(lidm_run)))
    before = _tree(lidm_run)
    argv = ["train", "lidm", "--config", str(config), "--resume", "--no-progress"]
    assert main([*argv, "--set", "train.max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert "already at step 2, past train.max_steps = 1" in err
    assert _tree(lidm_run) == before
    assert main(argv) == 0  # at max_steps: nothing to train, said plainly
    printed = capsys.readouterr().out
    assert "nothing trained" in printed and "nan" not in printed


def load_checkpoint_config(run: Path) -> dict:
    return json.loads((run / "train_config.json").read_text())


# ---- configs ---------------------------------------------------------------------------------


def test_yaml_numbers_in_exponent_notation(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  type: lidm\ndata:\n  root: r\noptim:\n  lr: 1e-4\n  eps: 1E-8\n"
        "  betas: [9e-1, 0.99]\nema:\n  decay: '0.999'\n"
    )
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.betas) == (1e-4, 1e-8, [0.9, 0.99])
    assert cfg.ema.decay == 0.999
    for bad, match in (("nan", "expected a finite number"), ("fast", "expected a number")):
        with pytest.raises(ConfigError, match=match):
            load_config(path, overrides=[f"optim.lr={bad}"])


@pytest.mark.parametrize("name", [".", "..", "a\\b", "a/b", "x\x00y", " x", "checkpoints"])
def test_reid_name_must_stay_inside_output_dir(tmp_path, name):
    with pytest.raises(ConfigError, match="'name'"):
        reid_config_from_dict({"output_dir": str(tmp_path), "data": {"root": "r"}, "name": name})


def test_reid_non_finite_loss(tmp_path):
    root = _latents(tmp_path / "latents", clips=12)
    cfg = reid_config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"architecture": "ResNet", "layers": [1, 1, 1, 1], "width": 4},
            "data": {"root": str(root)},
            "optim": {"lr": 1e30},
            "train": {"max_epochs": 2, "batch_size": 4, "progress": False},
            "eval": {"bootstrap": 10},
        }
    )
    with pytest.raises(NonFiniteError, match=r"training loss is not finite \(nan\) in epoch"):
        train_reid(cfg)
    assert not (tmp_path / "run" / "reidentification").exists()


def test_checkpoints_that_are_not_ours_are_refused(lidm_run, tmp_path):
    good = torch.load(lidm_run / "checkpoints" / "step-00000002.pt", weights_only=True)
    cases = {
        "newer.pt": ({**good, "version": 2}, "checkpoint version 2"),
        "other.pt": ({**good, "format": "someone-else"}, "not an echofast training checkpoint"),
        "list.pt": ([good["model"]], "not an echofast training checkpoint"),
    }
    for name, (payload, match) in cases.items():
        torch.save(payload, tmp_path / name)
        with pytest.raises(TrainingConflict, match=match):
            export_checkpoint(tmp_path / name, tmp_path / "out")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(TrainingConflict, match="torn.pt: cannot read checkpoint"):
        train(make_config(tmp_path / "run", "lidm", steps=3), resume=tmp_path / "torn.pt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("edit", "entry"),
    [
        (lambda s: s.pop("model"), "model"),
        (lambda s: s.__setitem__("model", [1]), "model"),
        (lambda s: s.__setitem__("step", "2"), "step"),
        (lambda s: s["ema"].pop("shadow"), "ema"),
    ],
)
def test_checkpoints_with_missing_entries_are_refused(lidm_run, tmp_path, edit, entry):
    """They were KeyError or TypeError tracebacks."""
    state = torch.load(lidm_run / "checkpoints" / "step-00000002.pt", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "torn.pt")
    match = rf"torn.pt: checkpoint entries \['{entry}'\] are missing or malformed"
    with pytest.raises(TrainingConflict, match=match):
        export_checkpoint(tmp_path / "torn.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights", ["ema", "model"])
@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_export_refuses_weights_that_do_not_fit_and_keeps_the_earlier_export(
    lidm_run, tmp_path, weights, bad
):
    """Non-finite EMA (or model) weights were exported, replacing the earlier export with a
    folder that from_pretrained refuses; a wrong shape was torch's RuntimeError traceback."""
    ckpt = lidm_run / "checkpoints" / "step-00000002.pt"
    out = export_checkpoint(ckpt, tmp_path / "out", weights=weights)
    before = _tree(out)
    state = torch.load(ckpt, weights_only=True)
    tensors = state["ema"]["shadow"] if weights == "ema" else state["model"]
    key = "conv_in.weight"
    tensors[key] = tensors[key].fill_(float("nan")) if bad == "nan" else torch.zeros(3)
    torch.save(state, tmp_path / "bad.pt")
    problem = "holds non-finite values" if bad == "nan" else r"has shape \(3,\), LIDM expects"
    with pytest.raises(WeightsError, match=rf"bad.pt \({weights} weights\): key '{key}' {problem}"):
        export_checkpoint(tmp_path / "bad.pt", out, weights=weights)
    assert _tree(out) == before


def test_export_refuses_bad_targets_and_weights(lidm_run, tmp_path):
    ckpt = lidm_run / "checkpoints" / "step-00000002.pt"
    with pytest.raises(ValueError, match="weights must be 'ema' or 'model'"):
        export_checkpoint(ckpt, tmp_path / "x", weights="raw")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingConflict, match="is not a folder"):
        export_checkpoint(ckpt, tmp_path / "file")
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    (unnamed / "config.json").write_text(json.dumps({"in_channels": 4}))
    with pytest.raises(TrainingConflict, match="not a model folder"):
        export_checkpoint(ckpt, unnamed, overwrite=True)
    # this model's export with files of someone else's in it: replaced only as a whole
    same = export_checkpoint(ckpt, tmp_path / "same")
    (same / "notes.txt").write_text("mine")
    with pytest.raises(TrainingConflict, match=r"other files \['notes.txt'\]"):
        export_checkpoint(ckpt, same)
    assert (same / "notes.txt").is_file()
    export_checkpoint(ckpt, same, overwrite=True)
    assert not (same / "notes.txt").exists()
    assert (tmp_path / "file").read_text() == "x" and list(unnamed.iterdir()) == [
        unnamed / "config.json"
    ]


def test_latest_checkpoint_is_the_highest_step(tmp_path):
    from echofast.train.loop import resolve_resume

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step-00000009.pt", "step-00000010.pt", "step-00000002.pt", "step-11.pt.tmp"):
        (folder / name).write_bytes(b"")
    assert resolve_resume("latest", str(tmp_path)) == folder / "step-00000010.pt"
    assert resolve_resume("latest", str(tmp_path / "none")) is None
    assert resolve_resume(None, str(tmp_path)) is None


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the training dataset is empty"):
        train(make_config(tmp_path / "run", "lidm"), dataset=[])


def test_export_interrupted_while_renaming_keeps_the_old_folder(lidm_run, tmp_path, monkeypatch):
    """The old export is moved aside before the new one is renamed into place: a failure in
    between puts it back."""
    import os

    out = tmp_path / "out"
    export_checkpoint(lidm_run / "checkpoints" / "step-00000001.pt", out)
    old = _tree(out)
    real = os.replace

    def fail_into_place(src, dst):
        if Path(dst) == out and str(src).endswith(".tmp"):
            raise OSError("simulated failure")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_place)
    with pytest.raises(OSError, match="simulated"):
        export_checkpoint(lidm_run / "checkpoints" / "step-00000002.pt", out)
    assert _tree(out) == old
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_folder_gets_the_umask_permissions(lidm_run, tmp_path):
    """Not the private 0700 of the temporary folder it is written in."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    out = export_checkpoint(lidm_run / "checkpoints" / "step-00000002.pt", tmp_path / "x")
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
