"""echofast.fsutil: a result is replaced whole or not at all, by a hidden temporary file in the
same folder that is fsynced before the rename and given the umask's permissions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from echofast import fsutil
from echofast.fsutil import atomic_folder, atomic_write, atomic_write_text, sha256_file


def test_the_temporary_file_is_hidden_in_the_target_folder(tmp_path):
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_bytes(b"new")

    target = tmp_path / "a" / "b" / "video.avi"
    assert atomic_write(target, write) == target
    (tmp,) = seen
    assert tmp.parent == target.parent
    assert tmp.name.startswith(".video.avi.") and tmp.suffix == ".tmp"
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["video.avi"]


def test_fsync_runs_on_the_written_file_before_the_rename_and_on_the_folder_after(
    tmp_path, monkeypatch
):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "x.json", lambda tmp: Path(tmp).write_text("{}"))
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] == events[1][1]
    assert events[2][1] == str(tmp_path)


def test_a_folder_that_cannot_be_synced_still_gets_the_file(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "x.json", lambda tmp: Path(tmp).write_text("{}"))
    assert (tmp_path / "x.json").read_text() == "{}"


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_the_old_file_alone(tmp_path, exc):
    target = tmp_path / "FileList.csv"
    target.write_text("old")

    def write(tmp):
        Path(tmp).write_text("half")
        raise exc

    with pytest.raises(type(exc)) as raised:
        atomic_write(target, write)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["FileList.csv"]
    if isinstance(exc, OSError):  # a full disk's error names the file (it named none)
        assert str(raised.value) == f"[Errno 28] No space left on device: '{target}'"


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path, exc):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    (target / "stale").write_text("old")

    def half(folder):
        (folder / "weights").write_text("half")
        raise exc

    with pytest.raises(type(exc)) as raised:
        atomic_folder(target, half)
    if isinstance(exc, OSError):
        assert str(raised.value) == f"[Errno 28] No space left on device: '{target}'"
    assert os.listdir(tmp_path) == ["model"]
    assert sorted(os.listdir(target)) == ["stale", "weights"]
    assert (target / "weights").read_text() == "old"

    def whole(folder):
        (folder / "weights").write_text("new")

    assert atomic_folder(target, whole) == target
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["weights"]
    assert (target / "weights").read_text() == "new"
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~fsutil._umask()
    assert atomic_folder(tmp_path / "new" / "m", whole).is_dir()


@pytest.mark.parametrize("umask,mode", [(0o077, 0o600), (0o022, 0o644), (0o002, 0o664)])
def test_files_get_the_umask_mode_and_the_umask_is_left_as_it_was(tmp_path, umask, mode):
    saved = os.umask(umask)
    fsutil._umask.cache_clear()
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        assert os.stat(path).st_mode & 0o777 == mode
        assert os.umask(umask) == umask
    finally:
        os.umask(saved)
        fsutil._umask.cache_clear()


def test_atomic_write_text_replaces_the_whole_text(tmp_path):
    path = tmp_path / "generation.json"
    path.write_text("a much longer old text\n")
    text = ' {\n  "seed": 0\n}\n'
    assert atomic_write_text(path, text) == path
    assert path.read_text() == text


@pytest.mark.parametrize("size,chunk", [(0, 4), (1, 4), (4, 4), (4097, 1000), (3 << 20, 1 << 20)])
def test_sha256_file_matches_hashlib(tmp_path, size, chunk):
    data = os.urandom(size)
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    assert sha256_file(path, chunk=chunk) == hashlib.sha256(data).hexdigest()


def test_a_folder_whose_rename_fails_is_left_as_it_was(tmp_path, monkeypatch):
    """The new folder's rename into place fails (after the old one was moved aside): the old
    folder is put back whole and nothing else is left."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_folder(target, lambda folder: (folder / "weights").write_text("new"))
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["weights"]
    assert (target / "weights").read_text() == "old"
