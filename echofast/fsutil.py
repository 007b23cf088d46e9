"""Crash-safe file writing: temp file (or folder) in the same folder, fsync, atomic rename."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the result, rename it over ``path`` and fsync the folder.

    Readers see the old file or the complete new one, never a partial one; on error the
    temporary file is removed and ``path`` is untouched. The folder's fsync makes the rename
    itself survive a power loss (where the file system can sync a folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 files, and writers that replace ``tmp`` with a file of their own
        # (safetensors' save_file renames its own temporary file over it) make the same:
        # give the written file the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        _name_file(err, path)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_folder(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp)`` on a new folder beside ``path``, then rename it into place, replacing
    a folder already there.

    Readers see the old folder or the complete new one, never a mix (between the two renames,
    for an instant, neither). On error (an interrupt too) the temporary folder is removed and
    ``path`` is as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = tmp.with_suffix(".old")
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as err:
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        _name_file(err, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(path.parent)
    return path


def _name_file(err: BaseException, path: Path) -> None:
    """Make an ``OSError`` that names no file (a write's ENOSPC, EIO, ...) name ``path``."""
    if isinstance(err, OSError) and err.errno is not None and err.filename is None:
        err.filename = str(path)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder: the rename is still atomic
        pass
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    """The process umask, read once (reading it means setting it briefly)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
