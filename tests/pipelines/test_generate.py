"""`echofast generate` / `echofast merge`: layout, manifest, crash-resume, sharding, refusals."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from echofast.errors import EchofastError
from echofast.pipelines import EchoSyntheticPipeline
from echofast.pipelines.dataset import (
    GenerateConfig,
    GenerationConflict,
    Shard,
    generate_dataset,
    merge_datasets,
    read_journal,
    requested_ef,
)

N, FRAMES, STEPS, FPS = 5, 12, 3, 30.0


def _cfg(weights_root, out, **kw) -> GenerateConfig:
    base = dict(
        weights=str(weights_root),
        out=str(out),
        num_videos=N,
        frames=FRAMES,
        fps=FPS,
        steps=STEPS,
        seed=4,
        batch_size=2,
        progress=False,
    )
    base.update(kw)
    return GenerateConfig(**base)


def _cli(weights_root, out, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "echofast",
        "generate",
        "--weights",
        str(weights_root),
        "--out",
        str(out),
        "--num-videos",
        str(N),
        "--frames",
        str(FRAMES),
        "--fps",
        str(FPS),
        "--steps",
        str(STEPS),
        "--seed",
        "4",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _videos(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "Videos").iterdir())}


def _decode(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "mjpeg" and s.codec_context.pix_fmt == "yuvj420p"
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(s)]), float(s.average_rate)


def echonet_style_load(root: Path) -> list[list]:
    """What echonet.datasets.Echo does with a dataset folder (pandas, FileName + '.avi')."""
    pd = pytest.importorskip("pandas")
    data = pd.read_csv(root / "FileList.csv")
    data["Split"] = data["Split"].map(lambda x: x.upper())
    fnames = [fn + ".avi" for fn in data["FileName"].tolist() if os.path.splitext(fn)[1] == ""]
    missing = set(fnames) - set(os.listdir(root / "Videos"))
    assert not missing, f"{len(missing)} videos could not be found"
    with open(root / "VolumeTracings.csv") as f:
        assert f.readline().strip().split(",") == ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]
    return data.values.tolist()


@pytest.fixture(scope="module")
def reference_run(weights_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ds"
    summary = generate_dataset(_cfg(weights_root, out))
    return out, summary


def test_layout_and_manifest(reference_run):
    out, summary = reference_run
    assert summary["complete"] and summary["generated"] == N
    assert sorted(_videos(out)) == [f"synthetic_{i:06d}.avi" for i in range(N)]
    with open(out / "FileList.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "FileName",
        "EF",
        "ESV",
        "EDV",
        "FrameHeight",
        "FrameWidth",
        "FPS",
        "NumberOfFrames",
        "Split",
    ]
    for i, row in enumerate(rows):
        assert row["FileName"] == f"synthetic_{i:06d}"
        assert 10 <= float(row["EF"]) <= 90 and float(row["EF"]).is_integer()
        assert row["ESV"] == row["EDV"] == ""
        assert (row["FrameHeight"], row["FrameWidth"], row["NumberOfFrames"]) == ("12", "12", "12")
        assert float(row["FPS"]) == FPS
    assert [r["Split"] for r in rows] == ["TRAIN", "TRAIN", "TRAIN", "TRAIN", "VAL"]
    manifest = json.loads((out / "generation.json").read_text())
    args = manifest["arguments"]
    assert args["seed"] == 4 and args["num_videos"] == N and args["splits"] == [4, 1, 0]
    assert set(args["weights_sha256"]) == {"vae", "lidm", "lvdm"}
    assert "sha256" in manifest["seed_rule"] and manifest["packages"]["torch"]
    assert len(echonet_style_load(out)) == N


def test_avi_decodes_to_generated_frames(reference_run, weights_root):
    out, _ = reference_run
    pipe = EchoSyntheticPipeline.from_pretrained(weights_root)
    cfg = _cfg(weights_root, out)
    efs = [requested_ef(cfg, i, None) for i in (1, 2)]
    with open(out / "FileList.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(rows[i]["EF"]) for i in (1, 2)] == efs
    videos = pipe(
        efs, seed=4, sample_indices=[1, 2], num_frames=FRAMES, num_inference_steps=STEPS
    ).videos.numpy()
    for video, i in zip(videos, (1, 2)):
        frames, fps = _decode(out / "Videos" / f"synthetic_{i:06d}.avi")
        assert frames.shape == video.shape and fps == FPS
        err = np.abs(frames.astype(int) - video.astype(int))
        assert err.mean() <= 2.0 and err.max() <= 24, (err.mean(), err.max())


class _NonSquarePipe:
    """Stands in for the models (whose frames are square): uint8 videos of ``height`` ×
    ``width``, a different smooth ramp per sample."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def __call__(self, efs, *, sample_indices, num_frames, **_):
        t, y, x = torch.meshgrid(
            torch.arange(num_frames),
            torch.arange(self.height),
            torch.arange(self.width),
            indexing="ij",
        )
        videos = [
            ((40 + 8 * t + 5 * y + 3 * x + 11 * i) % 200).to(torch.uint8) for i in sample_indices
        ]
        return SimpleNamespace(videos=torch.stack(videos))


@pytest.mark.parametrize(
    "fps,stored,text",
    [
        (29.97, Fraction(2997, 100), "29.97"),
        (30000 / 1001, Fraction(30000, 1001), "29.97002997"),
        (12.3456789, Fraction(1000, 81), "12.34567901"),
    ],
)
def test_filelist_rows_describe_the_avi_non_square_at_a_fractional_fps(
    weights_root, tmp_path, fps, stored, text
):
    """FrameHeight/FrameWidth/NumberOfFrames are the AVI's frame rows/columns/count and FPS the
    rate the AVI stores (10 significant digits: 30000/1001 is 29.97002997, where ``f"{fps:g}"``
    said 29.97), for non-square videos (the real generation loop and writer, with a stand-in for
    the models) at fractional rates."""
    out = tmp_path / "ds"
    summary = generate_dataset(
        _cfg(weights_root, out, num_videos=3, frames=4, fps=fps), pipe=_NonSquarePipe(16, 24)
    )
    assert summary["complete"] and summary["generated"] == 3
    with open(out / "FileList.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["FileName"] for r in rows] == [f"synthetic_{i:06d}" for i in range(3)]
    for row in rows:
        path = out / "Videos" / f"{row['FileName']}.avi"
        frames, _ = _decode(path)
        with av.open(str(path)) as c:
            rate = c.streams.video[0].average_rate
        assert frames.shape == (4, 16, 24)  # (T, rows, columns) as the stand-in made them
        columns = ("NumberOfFrames", "FrameHeight", "FrameWidth")
        assert tuple(int(row[k]) for k in columns) == frames.shape
        assert rate == stored and row["FPS"] == text
        assert abs(float(row["FPS"]) - float(rate)) <= 1e-9 * float(rate)


def test_rerun_is_a_no_op_and_other_arguments_are_refused(reference_run, weights_root):
    out, _ = reference_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "Videos").iterdir()}
    with pytest.warns(UserWarning, match="records batch size 2, this run uses 3"):
        summary = generate_dataset(_cfg(weights_root, out, batch_size=3))
    assert summary["generated"] == 0 and summary["already_done"] == N
    with pytest.raises(GenerationConflict, match=r"seed: folder has 4, this run asks 5"):
        generate_dataset(_cfg(weights_root, out, seed=5))
    with pytest.raises(GenerationConflict, match="frames"):
        generate_dataset(_cfg(weights_root, out, frames=8))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "Videos").iterdir()} == before


def test_foreign_folder_refused(weights_root, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(GenerationConflict, match="not an echofast generation folder"):
        generate_dataset(_cfg(weights_root, tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_reports_errors_cleanly(weights_root, tmp_path):
    bad = subprocess.run(
        _cli(weights_root, tmp_path / "x", "--splits", "1,1,1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "splits must be 3 non-negative counts summing to 5" in bad.stderr
    missing = subprocess.run(
        _cli(tmp_path / "nowhere", tmp_path / "y"), capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 1 and "lacks model folder" in missing.stderr


@pytest.mark.parametrize("kill_after", [0, 1, 3])
def test_kill_9_then_resume_gives_identical_dataset(
    reference_run, weights_root, tmp_path, kill_after
):
    """SIGKILL once ``kill_after`` videos are journaled (0: while the first chunk runs), rerun the
    same command: exactly N videos, no temporary files, bytes identical to an uninterrupted run."""
    ref_out, _ = reference_run
    out = tmp_path / "ds"
    proc = subprocess.Popen(
        _cli(weights_root, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    journal = out / ".echofast" / "journal-0of1.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        lines = journal.read_bytes().count(b"\n") if journal.exists() else 0
        if (kill_after == 0 and (out / "generation.json").exists()) or (
            kill_after and lines >= kill_after
        ):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_journal(journal))
    assert partial < N
    done = subprocess.run(_cli(weights_root, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{partial} were already done" in done.stdout
    assert _videos(out) == _videos(ref_out)
    assert not list((out / "Videos").glob(".*"))
    assert (out / "FileList.csv").read_text() == (ref_out / "FileList.csv").read_text()


def test_torn_journal_line_is_dropped(tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text('{"index": 0}\n\n{"index": 1, "File')
    assert read_journal(journal) == [{"index": 0}]
    assert journal.read_text() == '{"index": 0}\n\n'


def test_shards_merge_to_the_single_process_dataset(reference_run, weights_root, tmp_path):
    ref_out, _ = reference_run
    for i, owned in enumerate(([0, 1, 4], [2, 3])):  # chunks of batch size 2: c % 2 == i
        s = generate_dataset(_cfg(weights_root, tmp_path / f"s{i}", shard=Shard(i, 2)))
        assert not s["complete"] and s["in_dataset"] == len(owned)
        assert sorted(p.name for p in (tmp_path / f"s{i}" / "Videos").iterdir()) == [
            f"synthetic_{j:06d}.avi" for j in owned
        ]
    summary = merge_datasets(tmp_path / "merged", [tmp_path / "s0", tmp_path / "s1"])
    assert summary["complete"]
    assert _videos(tmp_path / "merged") == _videos(ref_out)
    assert (tmp_path / "merged" / "FileList.csv").read_text() == (
        ref_out / "FileList.csv"
    ).read_text()


def test_shards_sharing_a_folder_via_torchrun_env(weights_root, tmp_path, monkeypatch):
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        generate_dataset(_cfg(weights_root, tmp_path / "shared", shard=Shard.parse(None)))
    rows = list(csv.DictReader(open(tmp_path / "shared" / "FileList.csv")))
    assert [r["FileName"] for r in rows] == [f"synthetic_{i:06d}" for i in range(N)]


def test_merge_refuses_mismatched_shards(weights_root, tmp_path):
    generate_dataset(_cfg(weights_root, tmp_path / "a", shard=Shard(0, 2), num_videos=2))
    generate_dataset(_cfg(weights_root, tmp_path / "b", shard=Shard(1, 2), num_videos=2, seed=9))
    with pytest.raises(EchofastError, match=r"other arguments.*seed"):
        merge_datasets(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])


def test_ef_from_filelist(weights_root, tmp_path):
    src = tmp_path / "FileList.csv"
    src.write_text("FileName,EF,Split\na,33.5,TRAIN\nb,61.25,TEST\n")
    cfg = _cfg(weights_root, tmp_path / "ds", ef_from=str(src), num_videos=4, frames=4)
    values = {requested_ef(cfg, i, [33.5, 61.25]) for i in range(50)}
    assert values == {33.5, 61.25}
    generate_dataset(cfg)
    rows = list(csv.DictReader(open(tmp_path / "ds" / "FileList.csv")))
    assert {float(r["EF"]) for r in rows} <= {33.5, 61.25}


def test_shard_parsing():
    assert Shard.parse("1/4") == Shard(1, 4)
    with pytest.raises(ValueError, match="0 <= i < N"):
        Shard.parse("4/4")
    with pytest.raises(ValueError, match="'i/N'"):
        Shard.parse("x")


def test_shard_from_torchrun_needs_both_rank_and_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert Shard.parse(None) == Shard(0, 1)
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert Shard.parse(None) == Shard(0, 1)
    monkeypatch.setenv("RANK", "2")
    assert Shard.parse(None) == Shard(2, 3)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match=r"RANK/WORLD_SIZE: .*0 <= i < N, got '3/3'"):
        Shard.parse(None)
