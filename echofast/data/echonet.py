"""The EchoNet-Dynamic dataset layout: Videos/*.avi, FileList.csv, VolumeTracings.csv."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..fsutil import atomic_write_text

FILELIST_COLUMNS = (
    "FileName",
    "EF",
    "ESV",
    "EDV",
    "FrameHeight",
    "FrameWidth",
    "FPS",
    "NumberOfFrames",
    "Split",
)
TRACINGS_COLUMNS = ("FileName", "X1", "Y1", "X2", "Y2", "Frame")
SPLITS = ("TRAIN", "VAL", "TEST")
REFERENCE_SPLITS = {
    "dynamic": (7465, 1288, 1277),
    "ped_a4c": (2580, 336, 368),
    "ped_psax": (3559, 448, 519),
}
#: frames per video of the reference's synthetic datasets
REFERENCE_FRAMES = {"dynamic": 192, "ped_a4c": 128, "ped_psax": 128}


def splits_argument(text: str) -> tuple[int, int, int]:
    """argparse type of ``--splits``: ``TRAIN,VAL,TEST`` as three non-negative integers."""
    import argparse

    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 0:
        raise argparse.ArgumentTypeError(
            f"expected TRAIN,VAL,TEST: three non-negative integers such as 7,1,2, got {text!r}"
        )
    return counts


def split_counts(num_videos: int, splits: Iterable[int] | None, dataset: str) -> tuple[int, ...]:
    """TRAIN/VAL/TEST counts: given ones (must sum to ``num_videos``) or the reference dataset's
    proportions scaled to ``num_videos`` (TEST takes the rounding remainder)."""
    if splits is not None:
        counts = tuple(int(s) for s in splits)
        if len(counts) != 3 or min(counts) < 0 or sum(counts) != num_videos:
            raise ValueError(
                f"splits must be 3 non-negative counts summing to {num_videos}, got {counts}"
            )
        return counts
    ref = REFERENCE_SPLITS[dataset]
    train = round(num_videos * ref[0] / sum(ref))
    val = min(num_videos - train, round(num_videos * ref[1] / sum(ref)))
    return train, val, num_videos - train - val


def split_of(index: int, counts: tuple[int, ...]) -> str:
    """Samples 0..TRAIN-1 are TRAIN, the next VAL are VAL, the rest TEST."""
    for name, end in zip(SPLITS, (counts[0], counts[0] + counts[1], sum(counts))):
        if index < end:
            return name
    raise IndexError(f"sample {index} is beyond the {sum(counts)} videos of the split plan")


def number_text(value: float) -> str:
    """The FileList.csv text of a number: the shortest that reads back as the same float ("53"
    for a whole number, "68.2120227", "29.97002997002997")."""
    return repr(float(value)).removesuffix(".0")


def _csv_text(columns: Iterable[str], rows: Iterable[Mapping[str, object]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buf.getvalue()


def write_filelist(root: str | os.PathLike, rows: Iterable[Mapping[str, object]]) -> Path:
    """Write ``root/FileList.csv`` atomically (columns :data:`FILELIST_COLUMNS`)."""
    path = Path(root) / "FileList.csv"
    atomic_write_text(path, _csv_text(FILELIST_COLUMNS, rows))
    return path


def write_empty_tracings(root: str | os.PathLike) -> Path:
    """Header-only ``VolumeTracings.csv`` (synthetic videos have no tracings)."""
    path = Path(root) / "VolumeTracings.csv"
    atomic_write_text(path, _csv_text(TRACINGS_COLUMNS, []))
    return path


def read_filelist(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a FileList.csv (UTF-8, with or without a byte order mark) as dicts; raises
    ValueError naming the file on a bad header or bytes that are not UTF-8."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"FileName", "EF"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: FileList lacks column(s) {sorted(missing)}")
            return list(reader)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
