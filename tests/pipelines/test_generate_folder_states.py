"""`echofast generate` / `echofast merge` on folders in every state a crash or a user can leave:
what is taken over, what is refused, what is kept and what is rewritten (no duplicated rows)."""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from pipelines.test_generate_sharding import _cfg, _journaled, _make_legacy, _RecordingPipe, _videos

import echofast.pipelines.dataset as dataset_mod
from echofast.pipelines.dataset import (
    GenerationArgumentError,
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
        ".echofast/running-notes.txt",
        "FileList.csv",
    ],
)
def test_a_folder_without_manifest_holding_more_than_locks_is_refused(
    weights_root, tmp_path, leftover
):
    out = tmp_path / "ds"
    (out / ".echofast").mkdir(parents=True)
    (out / ".echofast" / "lock").touch()  # as a run that crashed before its manifest leaves
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
    """The message names the run's float32 (the default, which generation.json leaves out: it
    said 'this run asks None')."""
    out = tmp_path / "ds"
    _generate(weights_root, out, decode_dtype="bfloat16", num_videos=2)
    with pytest.raises(
        GenerationConflict, match="decode_dtype: folder has 'bfloat16', this run asks 'float32'$"
    ):
        _generate(weights_root, out, num_videos=2)
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["arguments"]["decode_dtype"] == "bfloat16"
    other = tmp_path / "other"
    _generate(weights_root, other, num_videos=2)
    assert "decode_dtype" not in json.loads((other / "generation.json").read_text())["arguments"]
    with pytest.raises(
        GenerationConflict, match="decode_dtype: folder has 'float32', this run asks 'float16'$"
    ):
        _generate(weights_root, other, decode_dtype="float16", num_videos=2)


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
    other.write_bytes(b"x")
    with open(out / ".echofast" / "running-custom.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _generate(weights_root, out)  # an unsharded run too
        assert other.exists()


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


def test_merge_needs_generation_folders(weights_root, tmp_path):
    with pytest.raises(GenerationArgumentError, match="at least one shard folder"):
        merge_datasets(tmp_path / "merged", [])
    (tmp_path / "plain").mkdir()
    with pytest.raises(GenerationConflict, match=r"plain: not an echofast generation folder"):
        merge_datasets(tmp_path / "merged", [_shard(weights_root, tmp_path), tmp_path / "plain"])
    assert not (tmp_path / "merged").exists()


def test_merge_leaves_out_journaled_videos_that_are_lost_or_cut(weights_root, tmp_path):
    """A shard's journaled video whose file is gone or no longer has its recorded size is not
    brought into the merged folder (nor is a cut copy): the merge is incomplete, and the shard,
    resumed, completes it."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    _generate(weights_root, a, shard=Shard(0, 2))
    _generate(weights_root, b, shard=Shard(1, 2))
    (a / "Videos" / "synthetic_000001.avi").unlink()
    cut = a / "Videos" / "synthetic_000004.avi"
    cut.write_bytes(cut.read_bytes()[:100])
    summary = merge_datasets(out, [a, b])
    assert not summary["complete"] and summary["in_dataset"] == 3
    assert sorted(_videos(out)) == [f"synthetic_{i:06d}.avi" for i in (0, 2, 3)]
    assert _rows(out) == [f"synthetic_{i:06d}" for i in (0, 2, 3)]
    _generate(weights_root, a, shard=Shard(0, 2))
    assert merge_datasets(out, [a, b])["complete"]
    assert _rows(out) == [f"synthetic_{i:06d}" for i in range(5)]


def test_merge_takes_a_shard_whose_journal_lists_a_regenerated_video_twice(weights_root, tmp_path):
    """A shard that regenerated a lost video journals it again (its old line stays): that sample
    is still in one shard only, so the merge takes it."""
    a, b = tmp_path / "a", tmp_path / "b"
    _generate(weights_root, a, shard=Shard(0, 2))
    (a / "Videos" / "synthetic_000001.avi").unlink()
    _generate(weights_root, a, shard=Shard(0, 2))
    assert _journal_lines(a) == [0, 1, 1, 4]
    _generate(weights_root, b, shard=Shard(1, 2))
    summary = merge_datasets(tmp_path / "merged", [a, b])
    assert summary["complete"] and _rows(tmp_path / "merged") == [
        f"synthetic_{i:06d}" for i in range(5)
    ]


def test_merge_copies_videos_where_hard_links_fail(weights_root, tmp_path, monkeypatch):
    """Shards on another file system than the merged folder (``os.link`` fails with EXDEV):
    the videos are copied, byte for byte."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    _generate(weights_root, a, shard=Shard(0, 2))
    _generate(weights_root, b, shard=Shard(1, 2))

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    assert merge_datasets(out, [a, b])["complete"]
    assert _videos(out) == {**_videos(a), **_videos(b)}
    assert all(p.stat().st_nlink == 1 for p in (out / "Videos").iterdir())


def test_a_merge_killed_while_copying_a_video_is_completed_by_the_next_merge(
    weights_root, tmp_path, monkeypatch
):
    """A merge that copies (hard links fail) and is killed in the middle of a video left the cut
    copy under the video's name: the next merge took it for done, journaled it, and left it out
    of FileList.csv for good ('incomplete' at every merge). Copies are written beside the video
    and renamed into place, and a video whose size is not the journaled one is brought again."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    _generate(weights_root, a, shard=Shard(0, 2))
    _generate(weights_root, b, shard=Shard(1, 2))

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    copy = shutil.copy2

    def killed_in_the_second_copy(src: str, dst: str) -> None:
        if len(list((out / "Videos").iterdir())) == 1:
            Path(dst).write_bytes(Path(src).read_bytes()[:100])
            raise KeyboardInterrupt
        copy(src, dst)

    monkeypatch.setattr(os, "link", cross_device)
    monkeypatch.setattr(shutil, "copy2", killed_in_the_second_copy)
    with pytest.raises(KeyboardInterrupt):
        merge_datasets(out, [a, b])
    monkeypatch.setattr(shutil, "copy2", copy)
    assert merge_datasets(out, [a, b])["complete"]
    assert _videos(out) == {**_videos(a), **_videos(b)}
    assert _rows(out) == [f"synthetic_{i:06d}" for i in range(5)]
    assert not list((out / "Videos").glob(".*"))
    # a cut copy that an earlier echofast left under the video's name is brought again, and
    # the temporary copy that a kill -9 leaves is removed
    cut = out / "Videos" / "synthetic_000003.avi"
    cut.write_bytes(cut.read_bytes()[:100])
    (out / "Videos" / ".synthetic_000003.avi.a1b2c3d4.tmp").write_bytes(b"RIFF")
    assert merge_datasets(out, [a, b])["complete"]
    assert _videos(out) == {**_videos(a), **_videos(b)}
    assert not list((out / "Videos").glob(".*"))


def test_restart_in_a_folder_of_an_earlier_version_keeps_the_running_shards_temporaries(
    weights_root, tmp_path
):
    """In a folder without a recorded batch size shard i of N owns ``index % N == i``: a shard
    that restarts while another runs removes its own stale temporary files only, by that rule
    (not by the chunks of its batch size)."""
    out = tmp_path / "shared"
    _make_legacy(weights_root, out, Shard(0, 2))
    _generate(weights_root, out, shard=Shard(0, 2))
    videos = out / "Videos"
    temporaries = {i: videos / f".synthetic_{i:06d}.avi.a1b2c3d4.tmp" for i in (1, 2, 3)}
    with _running(out, Shard(1, 2)):
        for tmp in temporaries.values():
            tmp.write_bytes(b"x")
        _generate(weights_root, out, shard=Shard(0, 2))
        assert sorted(i for i, tmp in temporaries.items() if tmp.exists()) == [1, 3]


@pytest.mark.parametrize("left", ["a temporary video", "an empty journal"])
def test_a_start_that_finished_no_video_is_taken_over(weights_root, tmp_path, left):
    """A start that stopped before its first video was finished (a temporary file of the video
    being written, or a journal created empty) holds no dataset: a job with other arguments
    takes the folder over."""
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="stopped"):
        generate_dataset(_cfg(weights_root, out, seed=7), pipe=_RecordingPipe(stop_at=0))
    if left == "a temporary video":
        (out / "Videos" / ".synthetic_000000.avi.a1b2c3d4.tmp").write_bytes(b"RIFF")
    else:
        (out / ".echofast" / "journal-0of1.jsonl").touch()
    assert _generate(weights_root, out)["complete"]
    assert json.loads((out / "generation.json").read_text())["arguments"]["seed"] == 2
    assert not list((out / "Videos").glob(".*"))


def test_rerunning_a_finished_job_does_not_load_the_models(weights_root, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    _generate(weights_root, out)

    def no_models(cfg: object) -> None:
        raise AssertionError("the models were loaded")

    monkeypatch.setattr(dataset_mod, "_load", no_models)
    summary = generate_dataset(_cfg(weights_root, out))
    assert summary["complete"] and summary["generated"] == 0 and summary["already_done"] == 5


def test_a_restart_beside_a_running_shard_removes_its_stale_temporaries_of_any_name_prefix(
    weights_root, tmp_path
):
    out = tmp_path / "shared"
    _generate(weights_root, out, shard=Shard(1, 2), name_prefix="echo.")
    theirs = out / "Videos" / ".echo.000002.avi.k3j2h1g0.tmp"
    stale = out / "Videos" / ".echo.000001.avi.a1b2c3d4.tmp"
    with _running(out, Shard(1, 2)):
        theirs.write_bytes(b"being written by shard 1/2")
        stale.write_bytes(b"left by a killed shard 0/2")
        assert _generate(weights_root, out, shard=Shard(0, 2), name_prefix="echo.")["complete"]
        assert theirs.exists() and not stale.exists()


def test_the_summary_counts_the_videos_another_shard_finished_meanwhile(weights_root, tmp_path):
    """Shards share a folder: ``in_dataset`` is the number of rows of the FileList.csv written at
    the end, with the videos that shard 1/2 finished while shard 0/2 ran."""
    out = tmp_path / "shared"

    class OtherShardMeanwhile(_RecordingPipe):
        def __call__(self, *args: object, **kwargs: object) -> object:
            if not self.batches:
                _generate(weights_root, out, shard=Shard(1, 2))
            return super().__call__(*args, **kwargs)

    summary = generate_dataset(
        _cfg(weights_root, out, shard=Shard(0, 2)), pipe=OtherShardMeanwhile()
    )
    assert summary["generated"] == 3 and summary["already_done"] == 0
    assert summary["in_dataset"] == 5 and summary["complete"]
    assert _rows(out) == [f"synthetic_{i:06d}" for i in range(5)]


def test_a_videos_folder_that_cannot_take_files_is_refused_before_sampling(
    weights_root, tmp_path, monkeypatch
):
    """(Tests run as root, whom a read-only folder does not stop: the refusal is simulated. The
    private job prepares its folder with the same function.)"""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and Path(dir).name == "Videos":
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    pipe, out = _RecordingPipe(), tmp_path / "ds"
    with pytest.raises(PermissionError, match=r"ds/Videos: cannot write videos here \(Perm"):
        generate_dataset(_cfg(weights_root, out), pipe=pipe)
    assert pipe.batches == []


ROOT_FILES = (
    "generation.json",
    "FileList.csv",
    "VolumeTracings.csv",
    "privacy_report.json",
    "privacy_report.png",
)


def test_a_start_killed_while_writing_its_manifest_is_taken_over(weights_root, tmp_path):
    """A kill (SIGKILL, SIGTERM) during the first generation.json write leaves the locks, an
    empty Videos/ and the write's temporary file: the rerun takes the folder over (it said the
    folder 'is not an echofast generation folder') and leaves no temporary file behind."""
    out = tmp_path / "ds"
    (out / "Videos").mkdir(parents=True)
    (out / ".echofast").mkdir()
    for name in ("lock", "running-0of1.lock"):
        (out / ".echofast" / name).touch()
    (out / ".generation.json.k1l2m3n4.tmp").write_text('{"echofast_ver')
    assert _generate(weights_root, out)["complete"]
    assert not list(out.glob(".*.tmp"))


def test_the_temporaries_of_writes_killed_in_the_root_are_removed_by_the_rerun(
    weights_root, tmp_path
):
    """A job killed while it wrote a file in the dataset's root (FileList.csv and the rest at the
    end of a run, generation.json at its start) left the write's hidden temporary file there,
    which every later run kept: it would be shipped with the dataset. The rerun (and a merge into
    the folder) removes them; files of other names are the user's and stay."""
    out = tmp_path / "ds"
    _generate(weights_root, out)
    want = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    killed = [out / f".{name}.a1b2c3d4.tmp" for name in ROOT_FILES]
    for tmp in killed:
        tmp.write_bytes(b"cut")
    mine = [out / ".notes.a1b2c3d4.tmp", out / ".FileList.csv.tmp"]
    for path in mine:
        path.write_text("mine")
    assert _generate(weights_root, out)["complete"]
    assert [p for p in killed if p.exists()] == []
    assert all(p.read_text() == "mine" for p in mine)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p not in mine} == want
    for tmp in killed:
        tmp.write_bytes(b"cut")
    merge_datasets(out, [_shard(weights_root, tmp_path)])
    assert [p for p in killed if p.exists()] == []
