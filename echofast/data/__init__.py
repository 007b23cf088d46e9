"""Datasets and their on-disk layouts."""

from .datasets import (
    DatasetError,
    EchoVideoDataset,
    FrameDataset,
    LatentFrameDataset,
    LatentVideoDataset,
    VideoRecord,
    read_latent_records,
    read_records,
    resample_indices,
    window_indices,
)
from .echonet import (
    FILELIST_COLUMNS,
    REFERENCE_FRAMES,
    REFERENCE_SPLITS,
    SPLITS,
    TRACINGS_COLUMNS,
    read_filelist,
    split_counts,
    split_of,
    write_empty_tracings,
    write_filelist,
)
from .encode import EncodeConfig, encode_dataset, encode_frames
from .measure import EFMeasurement, measure_ef, measure_volumes
from .phantom import PhantomClip, PhantomDatasetConfig, make_phantom, write_phantom_dataset

__all__ = [
    "FILELIST_COLUMNS",
    "REFERENCE_FRAMES",
    "REFERENCE_SPLITS",
    "SPLITS",
    "TRACINGS_COLUMNS",
    "DatasetError",
    "EFMeasurement",
    "EchoVideoDataset",
    "EncodeConfig",
    "FrameDataset",
    "LatentFrameDataset",
    "LatentVideoDataset",
    "PhantomClip",
    "PhantomDatasetConfig",
    "VideoRecord",
    "encode_dataset",
    "encode_frames",
    "make_phantom",
    "measure_ef",
    "measure_volumes",
    "read_filelist",
    "read_latent_records",
    "read_records",
    "resample_indices",
    "split_counts",
    "split_of",
    "window_indices",
    "write_empty_tracings",
    "write_filelist",
    "write_phantom_dataset",
]
