"""echofast.weights.build, the demo weights' release step: export_fp16, the training summary,
the measuring helpers against NumPy, and ``--measure-only`` end to end with faked models."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from echofast.errors import MissingFileError
from echofast.schedulers import CONFIG_NAME, DDPMScheduler
from echofast.weights.build import (
    WEIGHTS_FILE,
    appearance,
    export_fp16,
    fan_masks,
    frame_strip,
    model_card,
    pearson,
    training_summary,
)
from echofast.weights.build import main as build_main


def test_export_fp16_halves_the_weights_and_keeps_the_recorded_schedule(tmp_path):
    src, dst = tmp_path / "run" / "export", tmp_path / "demo" / "lidm_dynamic"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    state = {"w": torch.randn(3, 5), "steps": torch.arange(4)}
    save_file(state, str(src / WEIGHTS_FILE))
    DDPMScheduler(prediction_type="epsilon").save_config(src)
    size = export_fp16(src, dst)
    out = load_file(str(dst / WEIGHTS_FILE))
    assert size == (dst / WEIGHTS_FILE).stat().st_size
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], state["w"].half())
    assert torch.equal(out["steps"], state["steps"])
    assert (dst / CONFIG_NAME).read_bytes() == (src / CONFIG_NAME).read_bytes()
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_export_fp16_keeps_integer_tensors_and_needs_both_files(tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    state = {"w": torch.randn(2, 3, dtype=torch.float64), "ids": torch.arange(5, dtype=torch.int32)}
    save_file(state, str(src / WEIGHTS_FILE))
    with pytest.raises(MissingFileError, match="missing config.json"):
        export_fp16(src, tmp_path / "a")
    (src / "config.json").write_text("{}")
    export_fp16(src, tmp_path / "b")  # no scheduler_config.json: none is written
    out = load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert {k: v.dtype for k, v in out.items()} == {"w": torch.float16, "ids": torch.int32}
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["config.json", WEIGHTS_FILE]
    (src / WEIGHTS_FILE).unlink()
    with pytest.raises(MissingFileError, match=f"missing {WEIGHTS_FILE}"):
        export_fp16(src, tmp_path / "c")


def _write_run(run: Path, n_rows: int) -> None:
    run.mkdir(parents=True)
    cfg = {
        "train": {"batch_size": 4},
        "optim": {"lr": 1e-4},
        "ema": {"decay": 0.999},
        "model": {"config": {"_class_name": "UNet2DModel", "sample_size": 14}},
    }
    (run / "train_config.json").write_text(json.dumps(cfg))
    lines = ["step,loss,time"] + [f"{5 * (i + 1)},{i},{36 * (i + 1)}" for i in range(n_rows)]
    (run / "log.csv").write_text("\n".join(lines) + "\n")


def test_training_summary_reads_the_last_logged_step(tmp_path):
    _write_run(tmp_path / "long", 12)
    got = training_summary(tmp_path / "long")
    assert got == {
        "steps": 60,
        "batch_size": 4,
        "lr": 1e-4,
        "ema_decay": 0.999,
        "final_loss": pytest.approx(np.mean(np.arange(2, 12))),  # the last ten logged losses
        "hours": pytest.approx(432 / 3600),
        "model_config": {"_class_name": "UNet2DModel", "sample_size": 14},
    }
    _write_run(tmp_path / "short", 3)
    assert training_summary(tmp_path / "short")["final_loss"] == pytest.approx(1.0)
    _write_run(tmp_path / "empty", 0)
    with pytest.raises(MissingFileError, match="no logged steps"):
        training_summary(tmp_path / "empty")


def test_fan_masks_need_every_clip_and_leave_a_margin():
    clips = np.zeros((3, 4, 2, 3), np.uint8)
    clips[:, :, 0, 0] = 200  # bright in every clip: inside
    clips[:, :2, 0, 1] = 100  # mean 50 in every clip: inside
    clips[0, :, 0, 2] = 200  # bright in one clip only: neither
    clips[:, :, 1, 0] = 10  # dim grey: neither (the margin)
    clips[:, 0, 1, 1] = 4  # mean 1 in every clip: outside
    inside, outside = fan_masks(clips)
    assert inside.tolist() == [[True, True, False], [False, False, False]]
    assert outside.tolist() == [[False, False, False], [False, True, True]]


def test_appearance_and_pearson_match_numpy():
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (3, 5, 7, 6), dtype=np.uint8)
    inside, outside = rng.random((7, 6)) < 0.4, rng.random((7, 6)) < 0.3
    got = appearance(videos, inside, outside)
    v = videos.astype(np.float64)
    want_in, want_out = v[:, :, inside], v[:, :, outside]
    assert got == pytest.approx(
        {
            "mean_inside": want_in.mean(),
            "mean_outside": want_out.mean(),
            "std_inside": want_in.std(),
        }
    )
    a, b = rng.normal(size=11) * 7 + 3, rng.normal(size=11) + 40
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)


def test_frame_strip_tiles_the_chosen_frames():
    videos = np.random.default_rng(1).integers(0, 200, (2, 9, 3, 4), dtype=np.uint8)
    frames = [0, 5, 8]
    white = np.full((3, 2), 255, np.uint8)
    rows = []
    for clip in videos:
        tiles = [clip[t] for t in frames]
        rows.append(np.concatenate([tiles[0], white, tiles[1], white, tiles[2]], axis=1))
    gap = np.full((2, rows[0].shape[1]), 255, np.uint8)
    np.testing.assert_array_equal(
        frame_strip(videos, frames), np.concatenate([rows[0], gap, rows[1]])
    )


# ---- python -m echofast.weights.build --measure-only, with a fake pipeline, EF meter and VAE ----

FPS = 16.0
PLANNED_EF = [22.0, float("nan"), 57.5, 90.0]  # "measured" for requested 20, 40, 60, 80
VAE_OFFSET = 2.4  # grey levels the fake VAE adds: reconstructions are x + 2 after rounding


def _clip(value: int, marker: int, frames: int = 10) -> np.ndarray:
    clip = np.zeros((frames, 16, 16), np.uint8)
    clip[:, :, 8:] = value + np.arange(frames)[:, None, None]
    clip[0, 0, 0] = marker
    return clip


def _fake_models(monkeypatch) -> None:
    import echofast.data
    import echofast.models
    import echofast.pipelines

    def pipe(requested, *, seed, num_frames, num_inference_steps, batch_size, progress):
        assert (seed, num_inference_steps, batch_size) == (3, 2, 2)
        videos = [_clip(40 * i + 60, i + 1, num_frames) for i in range(len(requested))]
        return types.SimpleNamespace(videos=torch.as_tensor(np.stack(videos)))

    def measure_ef(clip, fps):
        assert fps == FPS
        ef = PLANNED_EF[int(clip[0, 0, 0]) - 1]
        if math.isnan(ef):
            raise ValueError("no cavity found")
        return ef

    class FakeVAE:
        def eval(self):
            return self

        def encode(self, x):
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=x))

        def decode(self, z):
            return types.SimpleNamespace(sample=z + VAE_OFFSET / 128)

    monkeypatch.setattr(
        echofast.pipelines.EchoSyntheticPipeline, "from_pretrained", lambda *a, **k: pipe
    )
    monkeypatch.setattr(echofast.data, "measure_ef", measure_ef)
    monkeypatch.setattr(echofast.models.VAE, "from_pretrained", lambda *a, **k: FakeVAE())


def _build_inputs(tmp_path, fps=(FPS, FPS)) -> tuple[Path, Path, Path]:
    from echofast.data.echonet import write_filelist
    from echofast.io import write_video

    runs, phantom, out = tmp_path / "runs", tmp_path / "phantom", tmp_path / "out"
    for run, n_rows in (("vae", 12), ("lidm", 3), ("lvdm", 20)):
        _write_run(runs / run, n_rows)
    args = {"num_videos": 3, "frames": [10, 10], "fps": list(fps), "hr_range": [60, 90]}
    args.update({"seed": 0, "ef_range": [20, 80], "splits": [1, 1, 1]})
    phantom.mkdir()
    (phantom / "phantom.json").write_text(json.dumps({"arguments": args}))
    rows = [("train", "TRAIN", 246), ("val", "VAL", 30), ("test", "TEST", 120)]
    for name, _, value in rows:
        write_video(phantom / "Videos" / f"{name}.avi", _clip(value, value), FPS)
    write_filelist(phantom, [{"FileName": n, "EF": 50, "Split": s} for n, s, _ in rows])
    for i, name in enumerate(("vae", "lidm_dynamic", "lvdm")):
        (out / name).mkdir(parents=True)
        (out / name / WEIGHTS_FILE).write_bytes(b"\0" * (1_500_000 * (i + 1)))
    (out / "vae" / "config.json").write_text(json.dumps({"scaling_factor": 0.625}))
    return runs, phantom, out


def test_measure_only_build_writes_the_measured_numbers(tmp_path, monkeypatch, capsys):
    from echofast.io import read_video
    from echofast.png import encode_png

    _fake_models(monkeypatch)
    runs, phantom, out = _build_inputs(tmp_path)
    argv = ["--runs", str(runs), "--phantom", str(phantom), "--out", str(out), "--measure-only"]
    argv += ["--num-eval", "4", "--ef-range", "20", "80", "--frames", "8", "--steps", "2"]
    assert build_main([*argv, "--seed", "3", "--batch-size", "2"]) == 0
    quality = json.loads((out / "quality.json").read_text())
    ev = quality["ef_conditioning"]
    req, meas = [20.0, 60.0, 80.0], [22.0, 57.5, 90.0]
    assert ev["requested_ef"] == [20.0, 40.0, 60.0, 80.0]
    assert ev["measure_failures"] == [{"index": 1, "requested": 40.0, "error": "no cavity found"}]
    assert ev["pearson_r"] == pytest.approx(np.corrcoef(req, meas)[0, 1])
    assert ev["mae"] == pytest.approx(np.mean(np.abs(np.subtract(meas, req))))
    assert ev["mean_error"] == pytest.approx(np.mean(np.subtract(meas, req)))
    assert ev["settings"] == {"frames": 8, "fps": FPS, "steps": 2, "seed": 3}
    real = np.asarray(read_video(phantom / "Videos" / "test.avi")[0])[None, :8]
    inside, outside = fan_masks(real)
    assert ev["appearance_phantom_test"] == pytest.approx(appearance(real, inside, outside))
    assert ev["fan_pixels"] == {"inside": int(inside.sum()), "outside": int(outside.sum())}
    assert quality["vae_psnr"] == pytest.approx(10 * math.log10(255**2 / 4))
    assert quality["scaling_factor"] == 0.625
    assert quality["file_bytes"] == {"vae": 1_500_000, "lidm_dynamic": 3_000_000, "lvdm": 4_500_000}
    assert quality["training"]["lidm"] == training_summary(runs / "lidm")
    assert quality["strip"] == {"ef": [20.0, 40.0, 60.0, 80.0], "frames": [0, 2, 4, 6]}
    videos = np.stack([_clip(40 * i + 60, i + 1, 8) for i in range(4)])
    strip = frame_strip(videos, [0, 2, 4, 6])
    assert (out / "demo_strip.png").read_bytes() == encode_png(strip)
    demo = json.loads((out / "demo.json").read_text())
    assert demo == {
        "generate": {"num_videos": 8, "frames": 8, "fps": FPS, "steps": 2, "batch_size": 8}
    }
    card = (out / "MODEL_CARD.md").read_text()
    assert card == model_card(quality)
    assert "| `vae` | 1.50 MB | 60 × 4 |" in card and "| `lvdm` | 4.50 MB | 100 × 4 |" in card
    assert "| sample_size=14 |" in card and "_class_name" not in card
    assert f"Pearson r = {ev['pearson_r']:.3f}" in card and "1 clip(s) where the" in card
    assert f"r = {ev['pearson_r']:.3f}" in capsys.readouterr().out


def test_build_refuses_a_phantom_with_a_range_of_fps(tmp_path, monkeypatch):
    _fake_models(monkeypatch)
    runs, phantom, out = _build_inputs(tmp_path, fps=(16.0, 32.0))
    argv = ["--runs", str(runs), "--phantom", str(phantom), "--out", str(out), "--measure-only"]
    with pytest.raises(ValueError, match="the demo expects one phantom fps"):
        build_main(argv)
    assert not (out / "demo.json").exists()
