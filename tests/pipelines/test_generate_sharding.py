"""`echofast generate --shard i/N`: shards own whole batches of a single-process run (so they write
its bytes), the recorded batch size, and folders of earlier versions (per-sample ownership)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pipelines.test_generate_robustness import _cfg as robustness_cfg

import echofast.pipelines.dataset as dataset_mod
from echofast.cli import main
from echofast.pipelines import EchoSyntheticPipeline
from echofast.pipelines.dataset import (
    GenerateConfig,
    GenerationConflict,
    Shard,
    generate_dataset,
    merge_datasets,
    read_journal,
)
from echofast.weights import demo_defaults, demo_root

SINGLE_PROCESS_BATCHES = [[0, 1], [2, 3], [4]]
"""The batches of a 5-video job at batch size 2."""


def _cfg(weights_root: Path | str, out: Path, **kw: object) -> GenerateConfig:
    return robustness_cfg(weights_root, out, **{"num_videos": 5, **kw})


class _RecordingPipe:
    """Records the batches it is called with; video ``i`` is 16×16 frames of grey level ``9·i``.
    ``stop_at``: the call (0-based) that fails, as a job interrupted there."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.stop_at = stop_at

    def __call__(
        self, efs: list[float], *, sample_indices: list[int], num_frames: int, **_: object
    ) -> SimpleNamespace:
        if len(self.batches) == self.stop_at:
            raise RuntimeError("stopped")
        self.batches.append(list(sample_indices))
        levels = torch.tensor([9 * i for i in sample_indices], dtype=torch.uint8)
        return SimpleNamespace(videos=levels.view(-1, 1, 1, 1).expand(-1, num_frames, 16, 16))


def _videos(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "Videos").glob("*.avi"))}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "generation.json").read_text())


def _journaled(folder: Path) -> list[int]:
    journals = sorted((folder / ".echofast").glob("journal-*.jsonl"))
    return sorted(e["index"] for j in journals for e in read_journal(j))


def _make_legacy(weights_root: Path, folder: Path, shard: Shard) -> None:
    """The start of a job by an earlier echofast: its manifest records no batch size, no video
    is finished yet (a start that stopped before its first video, then the keys removed)."""
    with pytest.raises(RuntimeError, match="stopped"):
        generate_dataset(_cfg(weights_root, folder, shard=shard), pipe=_RecordingPipe(stop_at=0))
    manifest = _manifest(folder)
    del manifest["batch_size"], manifest["shard_rule"]
    (folder / "generation.json").write_text(json.dumps(manifest))


def test_shards_generate_the_batches_of_a_single_process_run(weights_root, tmp_path):
    """Shard i of N generates the chunks c of the single-process run with c % N == i, in one
    shared folder or in separate folders; the manifest records the batch size and the rule."""
    single = _RecordingPipe()
    generate_dataset(_cfg(weights_root, tmp_path / "single"), pipe=single)
    assert single.batches == SINGLE_PROCESS_BATCHES
    for count in (2, 3, 4):
        pipe = _RecordingPipe()
        for index in range(count):
            generate_dataset(
                _cfg(weights_root, tmp_path / f"shared{count}", shard=Shard(index, count)),
                pipe=pipe,
            )
        assert sorted(pipe.batches) == SINGLE_PROCESS_BATCHES, count
        assert _videos(tmp_path / f"shared{count}") == _videos(tmp_path / "single")
        journals = sorted(p.name for p in (tmp_path / f"shared{count}" / ".echofast").iterdir())
        assert [j for j in journals if j.startswith("journal-")] == [
            f"journal-{index}of{count}.jsonl" for index in range(count) if index < 3
        ]
    parts = [tmp_path / "part0", tmp_path / "part1"]
    pipe = _RecordingPipe()
    for index, part in enumerate(parts):
        generate_dataset(_cfg(weights_root, part, shard=Shard(index, 2)), pipe=pipe)
    assert pipe.batches == [[0, 1], [4], [2, 3]]
    assert merge_datasets(tmp_path / "merged", parts)["complete"]
    for folder in ("single", "shared2", "part0", "merged"):
        manifest = _manifest(tmp_path / folder)
        assert manifest["batch_size"] == 2 and "c % N == i" in manifest["shard_rule"]
        assert "batch_size" not in manifest["arguments"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[EchoSyntheticPipeline, Path]:
    """The demo pipeline and a single-process run of 5 videos at batch size 3 (batches [0, 1, 2]
    and [3, 4]: with per-sample ownership shards 0/2 and 0/3 would batch [0, 2, 4] and [0, 3])."""
    pipe = EchoSyntheticPipeline.from_pretrained(demo_root())
    out = tmp_path_factory.mktemp("demo") / "single"
    generate_dataset(_demo_cfg(out), pipe=pipe)
    return pipe, out


def _demo_cfg(out: Path, **kw: object) -> GenerateConfig:
    return _cfg(demo_root(), out, frames=8, steps=1, seed=1, batch_size=3, **kw)


def test_demo_shards_merged_are_byte_identical_to_one_process(demo_run, tmp_path):
    pipe, single = demo_run
    parts = [tmp_path / "s0", tmp_path / "s1"]
    for index, part in enumerate(parts):
        generate_dataset(_demo_cfg(part, shard=Shard(index, 2)), pipe=pipe)
    merge_datasets(tmp_path / "merged", parts)
    assert _videos(tmp_path / "merged") == _videos(single)
    assert (tmp_path / "merged" / "FileList.csv").read_bytes() == (
        single / "FileList.csv"
    ).read_bytes()


def test_demo_shards_in_one_folder_are_byte_identical_to_one_process(demo_run, tmp_path):
    pipe, single = demo_run
    generated = [
        generate_dataset(_demo_cfg(tmp_path / "shared", shard=Shard(index, 3)), pipe=pipe)[
            "generated"
        ]
        for index in (2, 0, 1)
    ]
    assert generated == [0, 3, 2]  # two chunks: shard 2/3 owns none
    assert _videos(tmp_path / "shared") == _videos(single)
    assert (tmp_path / "shared" / "FileList.csv").read_bytes() == (
        single / "FileList.csv"
    ).read_bytes()


def test_a_sharded_job_keeps_its_recorded_batch_size(weights_root, tmp_path):
    out = tmp_path / "shared"
    generate_dataset(_cfg(weights_root, out, shard=Shard(0, 2)), pipe=_RecordingPipe())
    before = _videos(out)
    pipe = _RecordingPipe()
    for shard in (Shard(1, 2), Shard(0, 2)):
        with pytest.raises(
            GenerationConflict,
            match=rf"shared/generation.json records batch size 2, this run \(shard {shard}\) "
            "asks 3",
        ):
            generate_dataset(_cfg(weights_root, out, shard=shard, batch_size=3), pipe=pipe)
    assert pipe.batches == [] and _videos(out) == before
    generate_dataset(_cfg(weights_root, out, shard=Shard(1, 2)), pipe=pipe)
    assert pipe.batches == [[2, 3]] and _journaled(out) == [0, 1, 2, 3, 4]
    assert _manifest(out)["batch_size"] == 2


def test_an_unsharded_job_resumed_with_another_batch_size_warns(weights_root, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="stopped"):
        generate_dataset(_cfg(weights_root, out), pipe=_RecordingPipe(stop_at=1))
    assert _journaled(out) == [0, 1]
    pipe = _RecordingPipe()
    with pytest.warns(
        UserWarning,
        match=r"ds/generation.json records batch size 2, this run uses 3: videos generated from "
        "now on may differ by float rounding",
    ):
        summary = generate_dataset(_cfg(weights_root, out, batch_size=3), pipe=pipe)
    assert pipe.batches == [[0, 1, 2], [3, 4]] and summary["generated"] == 3
    assert summary["complete"] and _manifest(out)["batch_size"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate_dataset(_cfg(weights_root, out), pipe=pipe)["generated"] == 0


def test_a_folder_of_an_earlier_version_keeps_per_sample_ownership(weights_root, tmp_path):
    """Shard i of N of a folder without a recorded batch size owns index % N == i (whatever its
    batch size, as before): resumed, shared and merged, nothing is generated twice or left out."""
    shared = tmp_path / "shared"
    _make_legacy(weights_root, shared, Shard(0, 2))
    pipe = _RecordingPipe()
    generate_dataset(_cfg(weights_root, shared, shard=Shard(0, 2)), pipe=pipe)
    generate_dataset(_cfg(weights_root, shared, shard=Shard(1, 2), batch_size=3), pipe=pipe)
    generate_dataset(_cfg(weights_root, shared, shard=Shard(0, 2), batch_size=4), pipe=pipe)
    assert pipe.batches == [[0, 2], [4], [1, 3]]
    assert _journaled(shared) == [0, 1, 2, 3, 4] and "batch_size" not in _manifest(shared)
    parts = [tmp_path / "a", tmp_path / "b"]
    pipe = _RecordingPipe()
    for index, part in enumerate(parts):
        _make_legacy(weights_root, part, Shard(index, 2))
        generate_dataset(_cfg(weights_root, part, shard=Shard(index, 2)), pipe=pipe)
    assert pipe.batches == [[0, 2], [4], [1, 3]]
    assert merge_datasets(tmp_path / "merged", parts)["complete"]
    assert _videos(tmp_path / "merged") == _videos(shared)
    assert "batch_size" not in _manifest(tmp_path / "merged")


def test_merge_refuses_shards_of_other_batch_sizes_or_rules(weights_root, tmp_path):
    a, b, legacy = tmp_path / "a", tmp_path / "b", tmp_path / "legacy"
    generate_dataset(_cfg(weights_root, a, shard=Shard(0, 2)), pipe=_RecordingPipe())
    generate_dataset(_cfg(weights_root, b, shard=Shard(1, 2), batch_size=3), pipe=_RecordingPipe())
    _make_legacy(weights_root, legacy, Shard(1, 2))
    generate_dataset(_cfg(weights_root, legacy, shard=Shard(1, 2)), pipe=_RecordingPipe())
    out = tmp_path / "merged"
    with pytest.raises(
        GenerationConflict, match=r"/b: its generation.json records batch size 3, that of .*/a "
    ):
        merge_datasets(out, [a, b])
    with pytest.raises(
        GenerationConflict, match=r"/legacy: its generation.json records no batch size .*/a batch "
    ):
        merge_datasets(out, [a, legacy])
    assert not out.exists()
    b2 = tmp_path / "b2"
    generate_dataset(_cfg(weights_root, b2, shard=Shard(1, 2)), pipe=_RecordingPipe())
    assert merge_datasets(out, [a, b2])["complete"]
    a3 = tmp_path / "a3"
    generate_dataset(_cfg(weights_root, a3, shard=Shard(0, 2), batch_size=3), pipe=_RecordingPipe())
    with pytest.raises(
        GenerationConflict, match=r"merged/generation.json records batch size 2; the shards .* 3"
    ):
        merge_datasets(out, [a3, b])


def test_cli_batch_size_defaults_to_the_recorded_one(weights_root, tmp_path, monkeypatch):
    """Without --batch-size the CLI resumes with the folder's batch size; a new folder gets the
    defaults (the reference's 8 with --weights, demo.json's without)."""
    seen: list[int] = []

    def record(cfg: GenerateConfig) -> dict:
        seen.append(cfg.batch_size)
        return dict(folder=cfg.out, generated=0, seconds=0.0, already_done=0, in_dataset=0,
                    expected=cfg.num_videos, complete=True)  # fmt: skip

    out = tmp_path / "shared"
    generate_dataset(
        _cfg(weights_root, out, shard=Shard(0, 2), batch_size=3), pipe=_RecordingPipe()
    )
    monkeypatch.setattr(dataset_mod, "generate_dataset", record)
    common = ["generate", "--num-videos", "5", "--frames", "4", "--steps", "1", "--seed", "2",
              "--device", "cpu", "--no-progress"]  # fmt: skip
    weights = ["--weights", str(weights_root)]
    assert main(common + weights + ["--out", str(out), "--shard", "1/2"]) == 0
    assert main(common + weights + ["--out", str(out), "--batch-size", "4"]) == 0
    assert main(common + weights + ["--out", str(tmp_path / "new")]) == 0
    assert main(common + ["--out", str(tmp_path / "demo")]) == 0
    assert seen == [3, 4, 8, demo_defaults()["batch_size"]]


def test_a_start_that_finished_no_video_takes_the_new_batch_size(weights_root, tmp_path):
    """Before the first video is finished, the recorded batch size binds nothing yet: a restart
    with another one takes the folder over, without a warning, and records it."""
    out = tmp_path / "shared"
    with pytest.raises(RuntimeError, match="stopped"):
        generate_dataset(_cfg(weights_root, out, shard=Shard(0, 2)), pipe=_RecordingPipe(stop_at=0))
    pipe = _RecordingPipe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_dataset(_cfg(weights_root, out, shard=Shard(0, 2), batch_size=3), pipe=pipe)
    assert pipe.batches == [[0, 1, 2]] and _manifest(out)["batch_size"] == 3


def test_merge_refuses_a_sample_in_two_shards_before_writing(weights_root, tmp_path):
    """Two folders holding the same samples (a shard's folder copied, or the same shard run
    twice into two folders) are refused naming the sample and both folders; ``out`` is not
    created."""
    a, copy, b = tmp_path / "a", tmp_path / "copy", tmp_path / "b"
    generate_dataset(_cfg(weights_root, a, shard=Shard(0, 2)), pipe=_RecordingPipe())
    generate_dataset(_cfg(weights_root, copy, shard=Shard(0, 2)), pipe=_RecordingPipe())
    generate_dataset(_cfg(weights_root, b, shard=Shard(1, 2)), pipe=_RecordingPipe())
    out = tmp_path / "merged"
    with pytest.raises(GenerationConflict, match=r"sample 0 is in both .*/a and .*/copy"):
        merge_datasets(out, [a, b, copy])
    assert not out.exists()
