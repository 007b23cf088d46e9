"""The demo weights shipped in the package: they load, generate finite phantom-like clips, and
`echofast generate` uses them when no --weights is given."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from echofast.cli import main as cli
from echofast.data.phantom import make_phantom
from echofast.errors import MissingFileError
from echofast.io import read_video
from echofast.pipelines import EchoSyntheticPipeline
from echofast.weights import DEMO_ROOT, demo_defaults, demo_root
from echofast.weights.build import appearance, fan_masks

FRAMES = 16


@pytest.fixture(scope="module")
def phantom_stats() -> dict:
    """Fan masks and appearance of real phantom clips drawn like the demo's training data."""
    clips = np.stack(
        [make_phantom(seed, frames=48, fps=16.0, hr_range=(60.0, 90.0)).frames for seed in range(6)]
    )
    inside, outside = fan_masks(clips)
    assert inside.sum() > 2000 and outside.sum() > 1000
    return {"inside": inside, "outside": outside, **appearance(clips[:, :FRAMES], inside, outside)}


def test_shipped_files_and_size():
    root = demo_root()
    assert root == DEMO_ROOT
    total = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    assert 0 < total <= 20 * 2**20, total
    card = (root / "MODEL_CARD.md").read_text()
    quality = json.loads((root / "quality.json").read_text())
    assert f"{quality['ef_conditioning']['pearson_r']:.3f}" in card
    defaults = demo_defaults()
    assert {"num_videos", "frames", "fps", "steps", "batch_size"} <= set(defaults)


def test_demo_clip_is_finite_and_looks_like_a_phantom(phantom_stats):
    pipe = EchoSyntheticPipeline.from_pretrained(demo_root())
    out = pipe([30.0, 70.0], seed=5, num_frames=FRAMES, num_inference_steps=8)
    assert torch.isfinite(out.image_latents).all()
    videos = out.videos.numpy()
    assert videos.shape == (2, FRAMES, 112, 112) and videos.dtype == np.uint8
    gen = appearance(videos, phantom_stats["inside"], phantom_stats["outside"])
    assert gen["mean_outside"] < 8.0, gen
    assert 0.6 < gen["mean_inside"] / phantom_stats["mean_inside"] < 1.4, (gen, phantom_stats)
    assert gen["std_inside"] > 0.4 * phantom_stats["std_inside"], (gen, phantom_stats)
    assert np.abs(np.diff(videos.astype(np.float32), axis=1)).mean() > 0.5, "clip does not move"


def test_generate_without_weights_uses_the_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["generate", "--out", str(out), "--num-videos", "1", "--frames", "8", "--steps", "4"]
    assert cli([*args, "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "FileList.csv")))
    assert len(rows) == 1 and rows[0]["FPS"] == f"{demo_defaults()['fps']:g}"
    frames, fps = read_video(out / "Videos" / f"{rows[0]['FileName']}.avi")
    assert frames.shape == (8, 112, 112) and fps == demo_defaults()["fps"]
    manifest = json.loads((out / "generation.json").read_text())
    assert str(DEMO_ROOT) in json.dumps(manifest)
    assert '"dtype": "float32"' in json.dumps(manifest)  # --dtype auto, resolved on CPU


def test_demo_weights_cover_one_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["generate", "--out", str(tmp_path / "x"), "--dataset", "ped_a4c"])
    assert "demo weights cover --dataset dynamic" in capsys.readouterr().err


def _fake_demo(monkeypatch, tmp_path, folders=("vae", "lidm_dynamic", "lvdm")):
    import echofast.weights

    for name in ("vae", "lidm_dynamic", "lvdm"):
        (tmp_path / name).mkdir(parents=True)
        if name in folders:
            (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.setattr(echofast.weights, "DEMO_ROOT", tmp_path)
    return tmp_path


def test_demo_root_names_each_model_folder_without_a_config(monkeypatch, tmp_path):
    for present in (("vae", "lidm_dynamic"), ("vae", "lvdm"), ()):
        root = _fake_demo(monkeypatch, tmp_path / "_".join(present or ("none",)), present)
        with pytest.raises(MissingFileError, match="demo weights are not installed") as excinfo:
            demo_root()
        absent = [name for name in ("vae", "lidm_dynamic", "lvdm") if name not in present]
        assert str([str(root / name) for name in absent]) in str(excinfo.value)


@pytest.mark.parametrize("text", [None, "{not json", '{"defaults": {"frames": 8}}', "\xff"])
def test_unreadable_demo_defaults_are_a_missing_file_error(monkeypatch, tmp_path, text):
    root = _fake_demo(monkeypatch, tmp_path)
    assert demo_root() == root
    if text is not None:
        (root / "demo.json").write_text(text, encoding="latin-1")
    with pytest.raises(MissingFileError, match="demo.json: unreadable demo defaults"):
        demo_defaults()
    (root / "demo.json").write_text('{"generate": {"frames": 8, "fps": 16.0}}')
    assert demo_defaults() == {"frames": 8, "fps": 16.0}


@pytest.mark.parametrize("text", ['["generate"]', '{"generate": null}', '{"generate": 8}'])
def test_demo_defaults_that_are_not_a_mapping_are_a_missing_file_error(
    monkeypatch, tmp_path, capsys, text
):
    root = _fake_demo(monkeypatch, tmp_path / "demo")
    (root / "demo.json").write_text(text)
    with pytest.raises(MissingFileError, match="demo.json: unreadable demo defaults"):
        demo_defaults()
    assert cli(["generate", "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "unreadable demo defaults" in capsys.readouterr().err
