"""`echofast generate` / `echofast merge` on folders in every state a crash or a user can leave:
what is taken over, what is refused, what is kept and what is rewritten (no duplicated rows)."""

from __future__ import annotations

import csv
import fcntl
import json
from pathlib import Path

import pytest
from pipelines.test_generate_sharding import _cfg, _journaled, _make_legacy, _RecordingPipe, _videos

from echofast.pipelines.dataset import (
    GenerationConflict,
    Shard,
    _running,
    generate_dataset,
    merge_datasets,
    read_journal,
    rebuild_filelist,
)


def _generate(weights_root: Path, out: Path, **kw: object) -> dict:
    return generate_dataset(_cfg(weights_root, out, **kw), pipe=_RecordingPipe())


def _rows(folder: Path) -> list[str]:
    with open(folder / "FileList.csv", newline="") as fh:
        return [row["FileName"] for row in csv.DictReader(fh)]


def _journal_lines(folder: Path) -> list[int]:
    """Journaled indices, one per line of every journal (duplicates kept)."""
    return sorted(
        e["index"] for j in (folder / ".echofast").glob("journal-*.jsonl") for e in read_journal(j)
    )


@pytest.mark.parametrize(
    "leftover",
    [
        "Videos/clip.avi",
        ".echofast/journal-0of1.jsonl",
        ".echofast/notes.txt",
        "FileList.csv",
    ],
)
def test_a_folder_without_manifest_holding_more_than_locks_is_refused(
    weights_root, tmp_path, leftover
):
    out = tmp_path / "ds"
    (out / Path(leftover).parent).mkdir(parents=True, exist_ok=True)
    (out / leftover).write_text("not ours")
    with pytest.raises(GenerationConflict, match="is not an echofast generation folder"):
        _generate(weights_root, out)
    with pytest.raises(GenerationConflict, match="is not an echofast generation folder"):
        merge_datasets(out, [_shard(weights_root, tmp_path)])
    assert (out / leftover).read_text() == "not ours"
    assert not (out / "generation.json").exists()


def _shard(weights_root: Path, tmp_path: Path) -> Path:
    part = tmp_path / "part"
    if not part.exists():
        _generate(weights_root, part, shard=Shard(0, 2))
    return part


def test_a_folder_with_only_locks_and_an_empty_videos_folder_is_used(weights_root, tmp_path):
    out = tmp_path / "ds"
    (out / "Videos").mkdir(parents=True)
    (out / ".echofast").mkdir()
    (out / ".echofast" / "lock").touch()
    (out / ".echofast" / "running-1of2.lock").touch()
    assert _generate(weights_root, out)["complete"]


@pytest.mark.parametrize("left", ["videos", "journal", "a file of the user"])
def test_a_started_job_is_not_taken_over_by_other_arguments(weights_root, tmp_path, left):
    """A job killed after its first videos (no FileList.csv or report yet): its finished videos,
    or a journal that lists some, or a file it does not make, show that the folder holds a
    started dataset, so a job with other arguments is refused."""
    out = tmp_path / "ds"
    _generate(weights_root, out, num_videos=2)
    for name in ("FileList.csv", "VolumeTracings.csv", "privacy_report.json", "privacy_report.png"):
        (out / name).unlink(missing_ok=True)
    if left != "videos":
        for video in (out / "Videos").glob("*.avi"):
            video.unlink()
    if left != "journal":
        (out / ".echofast" / "journal-0of1.jsonl").write_text("")
    if left == "a file of the user":
        (out / "notes.txt").write_text("mine")
    manifest = (out / "generation.json").read_text()
    with pytest.raises(GenerationConflict, match="seed: folder has 2, this run asks 5"):
        _generate(weights_root, out, num_videos=2, seed=5)
    assert (out / "generation.json").read_text() == manifest


def test_a_dataset_of_reduced_decode_precision_is_not_resumed_in_float32(weights_root, tmp_path):
    out = tmp_path / "ds"
    _generate(weights_root, out, decode_dtype="bfloat16", num_videos=2)
    with pytest.raises(GenerationConflict, match="decode_dtype: folder has 'bfloat16'.* None"):
        _generate(weights_root, out, num_videos=2)


def test_resuming_a_half_done_batch_journals_each_video_once(weights_root, tmp_path):
    out = tmp_path / "ds"
    _generate(weights_root, out)
    (out / "Videos" / "synthetic_000003.avi").unlink()
    pipe = _RecordingPipe()
    summary = generate_dataset(_cfg(weights_root, out), pipe=pipe)
    assert pipe.batches == [[2, 3]]
    assert summary["generated"] == 1 and summary["already_done"] == 4 and summary["complete"]
    assert _journal_lines(out) == [0, 1, 2, 3, 3, 4]  # the lost video's old line stays
    assert _rows(out) == [f"synthetic_{i:06d}" for i in range(5)]


def test_filelist_lists_only_videos_whose_file_is_intact(weights_root, tmp_path):
    out = tmp_path / "ds"
    _generate(weights_root, out)
    (out / "Videos" / "synthetic_000001.avi").unlink()
    with open(out / "Videos" / "synthetic_000003.avi", "ab") as fh:
        fh.write(b"\0")
    assert rebuild_filelist(out) == 3
    assert _rows(out) == ["synthetic_000000", "synthetic_000002", "synthetic_000004"]


def test_a_lock_of_unknown_form_held_by_another_process_keeps_every_temporary(
    weights_root, tmp_path
):
    """A held running lock whose name tells no shard may belong to any sample's writer: no
    temporary file is removed; an unrecognised temporary file is kept while any shard runs."""
    out = tmp_path / "ds"
    _generate(weights_root, out, shard=Shard(1, 2))
    own = out / "Videos" / ".synthetic_000000.avi.a1b2c3d4.tmp"
    other = out / "Videos" / ".notes.tmp"
    for tmp in (own, other):
        tmp.write_bytes(b"x")
    with open(out / ".echofast" / "running-custom.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _generate(weights_root, out, shard=Shard(0, 2))
        assert own.exists() and other.exists()
    own.unlink()
    with _running(out, Shard(1, 2)):
        _generate(weights_root, out, shard=Shard(0, 2))
        assert other.exists()
    _generate(weights_root, out, shard=Shard(0, 2))
    assert not other.exists()


def test_merging_again_adds_no_row_twice_and_a_partial_merge_is_incomplete(weights_root, tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    _generate(weights_root, a, shard=Shard(0, 2))
    _generate(weights_root, b, shard=Shard(1, 2))
    partial = merge_datasets(out, [a])
    assert not partial["complete"] and partial["in_dataset"] == 3 and partial["expected"] == 5
    merge_datasets(out, [a])
    summary = merge_datasets(out, [a, b])
    assert summary["complete"] and summary["in_dataset"] == 5
    assert _journal_lines(out) == [0, 1, 2, 3, 4]
    assert _journaled(out) == [0, 1, 2, 3, 4]
    assert _rows(out) == [f"synthetic_{i:06d}" for i in range(5)]
    single = tmp_path / "single"
    _generate(weights_root, single)
    assert _videos(out) == _videos(single)
    for folder in (out, single):
        report = json.loads((folder / "privacy_report.json").read_text())
        assert report["privacy_filtered"] is False and report["seeds"] == {"seed": 2}, folder


def test_merging_into_a_folder_of_the_per_sample_rule_is_refused(weights_root, tmp_path):
    """A started folder of an earlier version (no batch size: shards own samples by index)
    does not take in shards that own whole batches."""
    legacy, part = tmp_path / "legacy", tmp_path / "part"
    _make_legacy(weights_root, legacy, Shard(1, 2))
    _generate(weights_root, legacy, shard=Shard(1, 2))
    _generate(weights_root, part, shard=Shard(0, 2))
    before = _videos(legacy)
    with pytest.raises(GenerationConflict, match=r"legacy/generation.json records no batch size"):
        merge_datasets(legacy, [part])
    assert _videos(legacy) == before
