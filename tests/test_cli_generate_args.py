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
        "--privacy-shift-tolerance", "2", "--allow-pickle",
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
        writer_threads=0,
        decode_dtype="float16",
        cuda_graphs=False,
    )
    assert {k: got[k] for k in expected} == expected
    assert (cfg.shard.index, cfg.shard.count) == (1, 2)
    assert "privacy:" in capsys.readouterr().out


def test_generate_defaults_with_user_weights(captured, tmp_path):
    assert cli.main(_args(tmp_path)) == 0
    (cfg,) = captured
    assert (cfg.frames, cfg.fps, cfg.batch_size, cfg.steps) == (192, 32.0, 8, 64)
    assert (cfg.seed, cfg.ef_range, cfg.name_prefix) == (0, (10, 90), "synthetic_")
    assert (cfg.dtype, cfg.decode_dtype) == ("float32", "float32")
    assert (cfg.privacy, cfg.oversample, cfg.auc_threshold, cfg.privacy_percentile) == (
        None,
        2.0,
        0.9,
        95.0,
    )
    assert (cfg.privacy_frame_step, cfg.privacy_shift_tolerance, cfg.writer_threads) == (8, 0, 1)
    assert cfg.cuda_graphs is None and not cfg.allow_weak_privacy and not cfg.allow_pickle


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--privacy", "m"], "--privacy and --reference-latents go together"),
        (["--reference-latents", "r"], "--privacy and --reference-latents go together"),
        (["--writer-threads", "-1"], "--writer-threads must be >= 0"),
        (["--frames", "0"], "must be >= 1"),
        (["--fps", "nan"], "--fps must be a finite number"),
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
