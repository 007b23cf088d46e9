"""Datasets and their on-disk layouts."""

from .echonet import (
    FILELIST_COLUMNS,
    REFERENCE_SPLITS,
    SPLITS,
    TRACINGS_COLUMNS,
    read_filelist,
    split_counts,
    split_of,
    write_empty_tracings,
    write_filelist,
)

__all__ = [
    "FILELIST_COLUMNS",
    "REFERENCE_SPLITS",
    "SPLITS",
    "TRACINGS_COLUMNS",
    "read_filelist",
    "split_counts",
    "split_of",
    "write_empty_tracings",
    "write_filelist",
]
