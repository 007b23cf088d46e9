"""``echofast generate`` and ``echofast merge`` parse their options into the library call: every
option reaches ``GenerateConfig`` (no generation runs: ``generate_dataset`` is replaced)."""

from __future__ import annotations

import dataclasses

import pytest

import echofast.pipelines.dataset as dataset_mod
from echofast import cli


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """Replace ``generate_dataset``; returns the list its configs are appended to."""
    configs = []

    def fake_generate(cfg):
        configs.append(cfg)
        return {
            "folder": cfg.out,
            "generated": 0,
            "seconds": 0.0,
            "already_done": 0,
            "in_dataset": 0,
            "expected": cfg.num_videos,
            "complete": True,
        }

    monkeypatch.setattr(dataset_mod, "generate_dataset", fake_generate)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "w").mkdir()
    return configs


def _args(tmp_path, *extra: str) -> list[str]:
    return ["generate", "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
            "--num-videos", "6", "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def test_every_generate_option_reaches_the_config(captured, tmp_path, capsys):
    extra = [
        "--dataset", "ped_a4c", "--frames", "17", "--fps", "12.5", "--batch-size", "3",
        "--seed", "7", "--splits", "3,2,1", "--ef-range", "20", "70", "--steps", "5",
        "--dtype", "bfloat16", "--shard", "1/2", "--name-prefix", "x_",
        "--decode-dtype", "float16", "--cuda-graphs", "off", "--writer-threads", "0",
        "--privacy", "m", "--reference-latents", "r", "--oversample", "3.5",
        "--auc-threshold", "0.75", "--allow-weak-privacy", "--privacy-percentile", "90",
        "--privacy-frame-step", "4", "--privacy-normalization", "channel",
        "--privacy-shift-tolerance", "2", "--allow-pickle", "--no-vae-check",
    ]  # fmt: skip
    assert cli.main(_args(tmp_path, *extra)) == 0
    (cfg,) = captured
    got = dataclasses.asdict(cfg)
    expected = dict(
        weights=str(tmp_path / "w"),
        out=str(tmp_path / "out"),
        num_videos=6,
        dataset="ped_a4c",
        frames=17,
        fps=12.5,
        seed=7,
        splits=(3, 2, 1),
        ef_range=(20.0, 70.0),
        ef_from=None,
        steps=5,
        dtype="bfloat16",
        name_prefix="x_",
        batch_size=3,
        device="cpu",
        progress=False,
        privacy="m",
        reference_latents="r",
        oversample=3.5,
        auc_threshold=0.75,
        allow_weak_privacy=True,
        privacy_percentile=90.0,
        privacy_frame_step=4,
        privacy_normalization="channel",
        privacy_shift_tolerance=2,
        allow_pickle=True,
        check_vae=False,
        writer_threads=0,
        decode_dtype="float16",
        cuda_graphs=False,
    )
    assert {k: got[k] for k in expected} == expected
    assert (cfg.shard.index, cfg.shard.count) == (1, 2)
    assert "privacy:" in capsys.readouterr().out


@pytest.mark.parametrize("dataset, frames", [("ped_a4c", 128), ("ped_psax", 128)])
def test_pediatric_datasets_default_to_the_reference_length(captured, tmp_path, dataset, frames):
    """The reference's pediatric sets have 128 frames a video, EchoNet-Dynamic's 192."""
    assert cli.main([*_args(tmp_path), "--dataset", dataset]) == 0
    assert captured[0].frames == frames
    assert cli.main([*_args(tmp_path), "--dataset", dataset, "--frames", "40"]) == 0
    assert captured[1].frames == 40


def test_the_api_defaults_to_the_reference_length_of_its_dataset():
    from echofast.pipelines.dataset import GenerateConfig

    for dataset, frames in (("dynamic", 192), ("ped_a4c", 128), ("ped_psax", 128)):
        assert GenerateConfig("w", "o", 1, dataset=dataset).frames == frames
    assert GenerateConfig("w", "o", 1, dataset="ped_a4c", frames=64).frames == 64


def test_generate_defaults_with_user_weights(captured, tmp_path):
    assert cli.main(_args(tmp_path)) == 0
    (cfg,) = captured
    assert (cfg.frames, cfg.fps, cfg.batch_size, cfg.steps) == (192, 32.0, 8, 64)
    assert (cfg.seed, cfg.ef_range, cfg.name_prefix) == (0, (10, 90), "synthetic_")
    assert (cfg.dataset, cfg.splits, cfg.ef_from, cfg.progress) == ("dynamic", None, None, False)
    assert (cfg.shard.index, cfg.shard.count) == (0, 1)
    assert (cfg.dtype, cfg.decode_dtype) == ("float32", "float32")
    assert (cfg.privacy, cfg.oversample, cfg.auc_threshold, cfg.privacy_percentile) == (
        None,
        2.0,
        0.9,
        95.0,
    )
    assert (cfg.privacy_frame_step, cfg.privacy_shift_tolerance, cfg.writer_threads) == (8, 0, 1)
    assert cfg.cuda_graphs is None and not cfg.allow_weak_privacy and not cfg.allow_pickle
    assert cfg.check_vae


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--privacy", "m"], "--privacy and --reference-latents go together"),
        (["--reference-latents", "r"], "--privacy and --reference-latents go together"),
        (["--writer-threads", "-1"], "--writer-threads must be >= 0"),
        (["--frames", "0"], "must be >= 1"),
        (["--fps", "nan"], "--fps must be a finite number"),
        (["--fps", "0"], "--fps must be a finite number > 0, got 0.0"),
        (["--num-videos", "0"], "must be >= 1"),
        (["--batch-size", "0"], "must be >= 1"),
        (["--steps", "0"], "must be >= 1"),
        (["--ef-range", "90", "10"], "--ef-range needs LO <= HI"),
        (["--ef-range", "20", "30", "--ef-from", "f.csv"], "not allowed with argument"),
        (["--splits", "5,a,4"], "TRAIN,VAL,TEST: three non-negative integers such as 7,1,2"),
        (["--splits", "5,4"], "three non-negative integers such as 7,1,2, got '5,4'"),
        (["--splits=-1,5,4"], "three non-negative integers such as 7,1,2, got '-1,5,4'"),
    ],
)
def test_generate_usage_errors_run_nothing(captured, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(_args(tmp_path, *extra))
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert captured == []


def test_dtype_auto_is_float16_on_cuda_only():
    assert cli.resolve_dtype("auto", "cuda:0") == "float16"
    assert cli.resolve_dtype("auto", "cpu") == "float32"
    assert cli.resolve_dtype("bfloat16", "cuda") == "bfloat16"


@pytest.mark.parametrize("complete,status", [(True, 0), (False, 1)])
def test_merge_fails_while_shards_are_missing(monkeypatch, tmp_path, capsys, complete, status):
    calls = []

    def fake_merge(out, shards):
        calls.append((out, list(shards)))
        return {"folder": out, "in_dataset": 3, "expected": 6, "complete": complete}

    monkeypatch.setattr(dataset_mod, "merge_datasets", fake_merge)
    assert cli.main(["merge", "--out", "o", "a", "b"]) == status
    assert calls == [("o", ["a", "b"])]
    assert ("incomplete" in capsys.readouterr().out) == (not complete)


def test_ef_from_reaches_the_config(captured, tmp_path):
    assert cli.main(_args(tmp_path, "--ef-from", "real/FileList.csv")) == 0
    (cfg,) = captured
    assert cfg.ef_from == "real/FileList.csv"


@pytest.mark.parametrize("value,expected", [("auto", None), ("on", True), ("off", False)])
def test_cuda_graphs_choice_reaches_the_config(captured, tmp_path, value, expected):
    assert cli.main(_args(tmp_path, "--cuda-graphs", value)) == 0
    assert captured[0].cuda_graphs is expected


def test_on_a_cuda_machine_the_defaults_are_cuda_and_float16(captured, tmp_path, monkeypatch):
    """Without --device and --dtype: the GPU, sampled in float16 as the reference does."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dataset_mod, "check_device", lambda device: torch.device(device))
    argv = ["generate", "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
            "--num-videos", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    (cfg,) = captured
    assert (cfg.device, cfg.dtype, cfg.progress) == ("cuda", "float16", True)


@pytest.mark.parametrize(
    "drop,message",
    [("--num-videos", "--num-videos is required with --weights"), ("--out", "--out")],
)
def test_generate_requires_out_and_with_weights_num_videos(
    captured, tmp_path, capsys, drop, message
):
    argv = _args(tmp_path)
    at = argv.index(drop)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv[:at] + argv[at + 2 :])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error:" in err and message in err.split("error:")[1]
    assert captured == []


@pytest.mark.parametrize("complete", [True, False])
def test_generate_prints_the_summary_and_privacy_lines(monkeypatch, tmp_path, capsys, complete):
    summary = {"folder": "ds", "generated": 3, "seconds": 2.0, "already_done": 1,
               "in_dataset": 4, "expected": 6, "complete": complete}  # fmt: skip
    privacy = {"status": "filtered", "tau": 0.123456, "test_auc": 0.98765, "kept": 5,
               "candidates": 8, "dropped_video_level": 1, "video_attempts": 6}  # fmt: skip
    monkeypatch.setattr(dataset_mod, "generate_dataset", lambda cfg: dict(summary, privacy=privacy))
    assert cli.main(_args(tmp_path, "--privacy", "m", "--reference-latents", "r")) == 0
    lines = capsys.readouterr().out.splitlines()
    pending = "" if complete else " (other shards pending)"
    assert lines == [
        "ds: generated 3 video(s) in 2.0 s (1.50 videos/s); 1 were already done; dataset holds "
        f"4 of 6{pending}",
        "privacy: filtered; tau 0.12346, re-id test AUC 0.9877; 5 of 8 candidates kept, 1 of 6 "
        "videos dropped by the video check",
    ]


@pytest.mark.parametrize("argv", [["--out", "o"], ["a", "b"]])
def test_merge_needs_out_and_at_least_one_shard(monkeypatch, capsys, argv):
    monkeypatch.setattr(dataset_mod, "merge_datasets", lambda out, shards: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["merge", *argv])
    assert exc.value.code == 2 and "required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, fps", [("30000/1001", 30000 / 1001), ("25", 25.0), ("29.97", 29.97), ("1/2", 0.5)]
)
def test_fps_is_a_number_or_a_ratio(captured, tmp_path, text, fps):
    assert cli.main(_args(tmp_path, "--fps", text)) == 0
    assert captured[0].fps == fps


@pytest.mark.parametrize("text", ["30000/0", "1/2/3", "thirty", "30/x"])
def test_fps_that_is_neither_is_refused_naming_the_text(capsys, tmp_path, text):
    with pytest.raises(SystemExit) as exit_:
        cli.main(_args(tmp_path, "--fps", text))
    assert exit_.value.code == 2
    assert f"argument --fps: not a number or a ratio N/D: '{text}'" in capsys.readouterr().err
